"""The relays the tool figures run against: bench.servers' processes, plus a mesh key and a
known STUN port, which the conformance suite needs to run its mesh and stun cases."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

from derpkit.protocol.keys import MeshKey

from ..servers import DerpkitServer, GoDerperServer, Server

_STUN_RE = re.compile(rb"STUN server listening on [\d.]+:(\d+)")


def write_mesh_key(directory: Path) -> Path:
    """A fresh mesh key in ``directory/mesh.key`` (64 hex digits, as derper reads it)."""
    path = directory / "mesh.key"
    path.write_text(MeshKey.generate().hex() + "\n")
    return path


class MeshedGoDerper(GoDerperServer):
    """bench.servers' Go derper with ``-mesh-psk-file`` set (its own flags leave it empty;
    Go's flag package lets the later repetition win)."""

    def __init__(self, binary: str, mesh_key_file: Path, cpus: str | None = None) -> None:
        super().__init__(binary, cpus)
        self.mesh_key_file = mesh_key_file
        self.stun_port = 0

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.argv = [*self.argv, "-mesh-psk-file", str(self.mesh_key_file)]
        self.stun_port = int(self.argv[self.argv.index("-stun-port") + 1])
        return super()._spawn()


def derpkit_relay(mesh_key_file: Path | None, cpus: str | None) -> DerpkitServer:
    """``derpkit serve`` on an ephemeral port and STUN port, with the mesh key if given."""
    extra = ["-mesh-psk-file", str(mesh_key_file)] if mesh_key_file else []
    return DerpkitServer(cpus, extra)


def stun_port(srv: Server, timeout: float = 10.0) -> int:
    """The STUN port a started server listens on (Go: from its flags; derpkit: from its log)."""
    if isinstance(srv, MeshedGoDerper):
        return srv.stun_port
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if m := _STUN_RE.search(b"".join(srv.log)):
            return int(m.group(1))
        time.sleep(0.02)
    raise RuntimeError(f"{srv.name} logged no STUN port")
