"""derper's environment knobs: ``TS_*``/``TAILSCALE_*`` variables that are not flags.

Go's derper reads these through ``envknob`` and the process environment never changes
under it, so reading them once at start-up is what derper does in effect. Reading them here,
with the flags, keeps request handlers free of ``os.environ`` (a handler sees one frozen
value for the life of the server, as a Go process does) and lets tests hand a server its
knobs without touching the process environment.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Knobs:
    """The knobs, as raw text: each consumer keeps derper's own parse rules and timing.

    ``debug_trusted_cidrs`` in particular stays unparsed: derper parses it at the first
    debug check from an outside address and exits there if it is bad, and so does derpkit.
    """

    #: TS_DEBUG_KEY_PATH: a file whose content, given as ``?debugkey=``, opens /debug/.
    debug_key_path: str = ""
    #: TS_ALLOW_DEBUG_IP: one peer address that may reach /debug/.
    allow_debug_ip: str = ""
    #: TS_DEBUG_TRUSTED_CIDRS: comma-separated prefixes that may reach /debug/.
    debug_trusted_cidrs: str = ""
    #: TAILSCALE_DERPER_MESH_KEY: the mesh key in -dev mode (its only source there).
    dev_mesh_key: str = field(default="", repr=False)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Knobs:
        """The knobs as set in ``environ`` (unset and empty are the same, as in derper)."""
        return cls(
            debug_key_path=environ.get("TS_DEBUG_KEY_PATH", ""),
            allow_debug_ip=environ.get("TS_ALLOW_DEBUG_IP", ""),
            debug_trusted_cidrs=environ.get("TS_DEBUG_TRUSTED_CIDRS", ""),
            dev_mesh_key=environ.get("TAILSCALE_DERPER_MESH_KEY", ""),
        )
