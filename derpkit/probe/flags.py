"""derpprobe's command line, flag for flag, plus the few derpkit extensions (marked so).

Go's ``flag`` syntax comes from :mod:`derpkit.gosyntax` (``-f v``, ``-f=v``, ``--f=v``, bools
switched off with ``-f=false``, Go durations). Scripts that run derpprobe keep working when
the binary name changes; a bad flag stops start-up with one line naming it (exit 2, as Go).

The map may also be given as one positional argument (URL, path or ``local``); unlike Go's
flag package, flags after it are still read, because people type ``derpkit probe map.json
-once``.

The mesh key's source follows derpprobe (derpprobe.md §1.1): ``-dev`` reads
``TAILSCALE_DERPER_MESH_KEY``; else ``-secrets-url`` asks setec; else ``-mesh-psk-file``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from derpkit.gosyntax import (
    FlagError,
    GoValueError,
    flag_value_error,
    format_duration,
    parse_bool,
    parse_duration_seconds,
    parse_int,
    scan_flags,
)
from derpkit.protocol.keys import MeshKey

from .dmap import DEFAULT_LOCAL_SOCKET

__all__ = ["Options", "UsageError", "parse_args", "resolve_mesh_key", "usage"]

DEFAULT_MAP = "https://login.tailscale.com/derpmap/default"
MESH_ENV = "TAILSCALE_DERPER_MESH_KEY"


class UsageError(Exception):
    """A command-line problem: one line, and the exit status Go would use."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


# name -> (kind, default, help); kind is "str", "bool", "dur", "int". Order = help order.
FLAGS: dict[str, tuple[str, Any, str]] = {
    "derp-map": ("str", DEFAULT_MAP, "where the DERP map comes from: https:// or file:// URL, a path, or 'local' (tailscaled)"),
    "listen": ("str", ":8030", "address of the status page, health checks and metrics"),
    "once": ("bool", False, "run every probe once, print the verdicts and exit (1 if any failed)"),
    "spread": ("bool", True, "start each probe at a stable offset within its interval"),
    "interval": ("dur", 15.0, "how often the DERP map is fetched again"),
    "mesh-interval": ("dur", 15.0, "mesh (packet relay) probe period; 0 turns them off"),
    "stun-interval": ("dur", 15.0, "STUN probe period; 0 turns them off"),
    "tls-interval": ("dur", 15.0, "TLS certificate probe period; 0 turns them off"),
    "bw-interval": ("dur", 0.0, "bandwidth probe period; 0 (the default) turns them off"),
    "bw-probe-size-bytes": ("int", 1_000_000, "bytes moved by each bandwidth probe"),
    "bw-tun-ipv4-addr": ("str", "", "TCP-in-TCP bandwidth over a TUN device (not implemented by derpkit: refused)"),
    "qd-packets-per-second": ("int", 0, "rate of the continuous queuing-delay probes (260-byte packets); 0 turns them off"),
    "qd-packet-timeout": ("dur", 5.0, "a queuing-delay packet later than this counts as dropped"),
    "region-code": ("str", "", "probe one region only, by RegionCode or RegionID; empty probes all"),
    "mesh-psk-file": ("str", "", "file with the DERP mesh key (64 hex digits; surrounding whitespace ignored)"),
    "secrets-url": ("str", "", "setec server to read the mesh key from"),
    "secrets-path-prefix": ("str", "prod/derp", "setec prefix; the secret read is <prefix>/meshkey"),
    "secrets-cache-dir": ("str", "", "setec cache location (default ~/.cache/derper-secrets)"),
    "dev": ("bool", False, "development mode: the mesh key comes from $TAILSCALE_DERPER_MESH_KEY"),
    "version": ("bool", False, "print the version and exit"),
    # derpkit extensions
    "json": ("bool", False, "[derpkit] with -once: print every result as one JSON object on stdout"),
    "concurrency": ("int", 32, "[derpkit] most probe runs in flight at once"),
    "websocket": ("bool", False, "[derpkit] connect mesh/bw/qd probes over WebSocket (/derp with Upgrade: websocket)"),
    "socket": ("str", "", "[derpkit] tailscaled LocalAPI socket for -derp-map local (default $TS_SOCKET or " + DEFAULT_LOCAL_SOCKET + ")"),
    "stale-after": ("dur", 0.0, "[derpkit] readiness fails when the map is older than this (default 3 x -interval, at least 1m)"),
}


@dataclass
class Options:
    derp_map: str = DEFAULT_MAP
    listen: str = ":8030"
    once: bool = False
    spread: bool = True
    interval: float = 15.0
    mesh_interval: float = 15.0
    stun_interval: float = 15.0
    tls_interval: float = 15.0
    bw_interval: float = 0.0
    bw_probe_size_bytes: int = 1_000_000
    bw_tun_ipv4_addr: str = ""
    qd_packets_per_second: int = 0
    qd_packet_timeout: float = 5.0
    region_code: str = ""
    mesh_psk_file: str = ""
    secrets_url: str = ""
    secrets_path_prefix: str = "prod/derp"
    secrets_cache_dir: str = ""
    dev: bool = False
    version: bool = False
    json: bool = False
    concurrency: int = 32
    websocket: bool = False
    socket: str = ""
    stale_after: float = 0.0

    @property
    def socket_path(self) -> str:
        return self.socket or os.environ.get("TS_SOCKET") or DEFAULT_LOCAL_SOCKET

    @property
    def stale_limit(self) -> float:
        return self.stale_after if self.stale_after > 0 else max(60.0, 3 * self.interval)


def usage() -> str:
    lines = ["usage: derpkit probe [flags] [derp-map]", ""]
    for name, (kind, default, help_) in FLAGS.items():
        typ = {"str": " string", "bool": "", "dur": " duration", "int": " int"}[kind]
        lines.append(f"  -{name}{typ}")
        if kind == "dur":
            d = format_duration(round(default * 1e9))
        elif kind == "str":
            d = f'"{default}"' if default else ""
        else:
            d = str(default).lower() if kind == "bool" else str(default)
        show = d and d not in ("false", "0", "0s")
        lines.append(f"    \t{help_}" + (f" (default {d})" if show else ""))
    return "\n".join(lines) + "\n"


def _kind(name: str) -> bool | None:
    spec = FLAGS.get(name)
    return None if spec is None else spec[0] == "bool"


def parse_args(argv: list[str], environ: Mapping[str, str] | None = None) -> Options:
    """Parse argv into Options; UsageError (one line naming the flag) on anything wrong."""
    opts = Options()
    args = list(argv)
    positional: list[str] = []
    explicit: set[str] = set()
    while True:
        rest: list[str] = []
        try:
            for name, text, is_bool in scan_flags(args, _kind, rest):
                kind = FLAGS[name][0]
                try:
                    if kind == "bool":
                        value: Any = parse_bool(text)
                    elif kind == "dur":
                        value = parse_duration_seconds(text)
                    elif kind == "int":
                        value = parse_int(text)
                    else:
                        value = text
                except GoValueError as e:
                    raise flag_value_error(name, text, e.reason, is_bool=is_bool) from None
                setattr(opts, name.replace("-", "_"), value)
                explicit.add(name)
        except FlagError as e:
            raise UsageError(str(e), 0 if str(e) == "flag: help requested" else 2) from None
        if not rest:
            break
        positional.append(rest[0])
        args = rest[1:]
    if len(positional) > 1:
        raise UsageError(f"want at most one DERP map argument, got {len(positional)}: {' '.join(positional)}")
    if positional:
        if "derp-map" in explicit and opts.derp_map != positional[0]:
            raise UsageError(
                f"-derp-map {opts.derp_map!r} and the argument {positional[0]!r} name two maps; give one"
            )
        opts.derp_map = positional[0]
    _check(opts)
    return opts


def _check(o: Options) -> None:
    if o.interval <= 0:
        raise UsageError(f"-interval must be > 0, not {format_duration(round(o.interval * 1e9))} (the map probe needs a period)")
    if o.bw_probe_size_bytes < 0:
        raise UsageError(f"-bw-probe-size-bytes must be >= 0, not {o.bw_probe_size_bytes}")
    if o.qd_packets_per_second < 0:
        raise UsageError(f"-qd-packets-per-second must be >= 0, not {o.qd_packets_per_second}")
    if o.concurrency < 1:
        raise UsageError(f"-concurrency must be >= 1, not {o.concurrency}")
    if o.bw_tun_ipv4_addr:
        import ipaddress

        try:
            ipaddress.IPv4Address(o.bw_tun_ipv4_addr)
        except ValueError:
            raise UsageError(f"-bw-tun-ipv4-addr {o.bw_tun_ipv4_addr!r} is not an IPv4 address") from None
        raise UsageError("-bw-tun-ipv4-addr: TCP-in-TCP bandwidth probes over a TUN device are not implemented "
                         "in derpkit probe; leave it unset for direct bandwidth probes (-bw-interval)", 1)
    if o.secrets_url:
        from derpkit.setec import check_url

        problem = check_url(o.secrets_url)
        if problem:
            raise UsageError(f"-secrets-url: {problem}")


def _default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "derper-secrets")


def _read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def _parse_key(text: str, where: str) -> MeshKey | None:
    text = text.strip()
    if not text:
        return None
    try:
        return MeshKey.parse(text)
    except ValueError:
        raise UsageError(f"{where}: the mesh key must be 64 hex digits, got {len(text)} characters", 1) from None


async def resolve_mesh_key(opts: Options, environ: Mapping[str, str] | None = None, *, setec_timeout: float = 60.0) -> tuple[MeshKey | None, str]:
    """The mesh key and a phrase saying where it came from (derpprobe's order)."""
    env = os.environ if environ is None else environ
    if opts.dev:
        key = _parse_key(env.get(MESH_ENV, ""), f"-dev: ${MESH_ENV}")
        return key, f"${MESH_ENV} (-dev)" if key else "none (-dev and $" + MESH_ENV + " empty)"
    if opts.secrets_url:
        from derpkit.setec import SetecError, SetecStopped, fetch_mesh_secret

        cache_dir = opts.secrets_cache_dir or _default_cache_dir()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        handle = loop.call_later(setec_timeout, stop.set)
        try:
            raw = await fetch_mesh_secret(opts.secrets_url, opts.secrets_path_prefix, cache_dir, stop)
        except SetecStopped:
            raise UsageError(f"-secrets-url {opts.secrets_url}: no mesh key from setec within {setec_timeout:g} s", 1) from None
        except SetecError as e:
            raise UsageError(f"-secrets-url {opts.secrets_url}: {e}", 1) from None
        finally:
            handle.cancel()
        key = _parse_key(raw.decode(errors="replace"), f"setec secret {opts.secrets_path_prefix}/meshkey")
        return key, f"setec {opts.secrets_url}"
    if opts.mesh_psk_file:
        try:
            text = await asyncio.to_thread(_read_text, opts.mesh_psk_file)
        except OSError as e:
            raise UsageError(f"-mesh-psk-file {opts.mesh_psk_file}: {e.strerror or e}", 1) from None
        key = _parse_key(text, f"-mesh-psk-file {opts.mesh_psk_file}")
        return key, f"-mesh-psk-file {opts.mesh_psk_file}"
    return None, "none"
