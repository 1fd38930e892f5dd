"""Servers the conformance tests aim the suite at, as module-scoped fixtures.

``derpkit serve`` runs through ``tests/server/serve_proc.start_serve`` (a real subprocess);
its log is drained by a task, so the process gets an event loop of its own in a daemon
thread that outlives the per-test loops of pytest-asyncio. Go derper comes from
``tests/goderper.start_derper`` (skips loudly when missing, fails under
DERPKIT_REQUIRE_GO_PEERS=1).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import socket
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from derpkit.conformance.target import Target, make_target
from derpkit.protocol.keys import MeshKey
from tests.goderper import GoDerper, free_port, start_derper
from tests.server.serve_proc import ServeProc, start_serve

T = TypeVar("T")
_CERTNAME_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')


class LoopThread:
    """An event loop running forever in a daemon thread, for subprocess helpers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._t = threading.Thread(target=self.loop.run_forever, daemon=True, name="serve-loop")
        self._t.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._t.join(5)


@dataclass
class Server:
    """One running server and the target that reaches it."""

    name: str
    url: str
    mesh_key: MeshKey | None
    stun: str | None
    cert_name: str | None = None
    proc: ServeProc | None = None
    go: GoDerper | None = None
    loop: LoopThread | None = None

    def target(self, *, mesh: bool = True, **kw: Any) -> Target:
        return make_target(self.url, mesh_key=self.mesh_key if mesh else None, cert_name=self.cert_name,
                           stun=self.stun, **kw)

    def cli_args(self, *, mesh_file: Path | None = None) -> list[str]:
        a = [self.url]
        if self.cert_name:
            a += ["--cert-name", self.cert_name]
        if self.stun:
            a += ["--stun", self.stun]
        if mesh_file is not None and self.mesh_key is not None:
            mesh_file.write_text(self.mesh_key.hex() + "\n")
            a += ["--mesh-key-file", str(mesh_file)]
        return a

    def stop(self) -> None:
        if self.proc is not None and self.loop is not None:
            try:
                self.loop.run(self.proc.stop(), timeout=15)
            except Exception:  # noqa: BLE001 - it may already be gone; kill below
                if self.proc.proc.returncode is None:
                    self.proc.proc.kill()
            self.loop.stop()
        if self.go is not None:
            self.go.stop()


def serve(workdir: Path, *, tls: bool = False, mesh: bool = True, stun: bool = True) -> Server:
    """``derpkit serve`` on loopback: plain HTTP, or TLS with its self-signed IP certificate."""
    loop = LoopThread()
    mesh_key = MeshKey(secrets.token_bytes(32)) if mesh else None
    args = ["-a", "127.0.0.1:0", "-http-port", "-1"]
    args += ["-stun-port", "0"] if stun else ["-stun=false"]
    if mesh_key is not None:
        (workdir / "mesh.key").write_text(mesh_key.hex() + "\n")
        args += ["-mesh-psk-file", str(workdir / "mesh.key")]
    if tls:
        args += ["-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(workdir)]
    proc = loop.run(start_serve(*args))
    cert_name = None
    if tls:
        deadline = time.monotonic() + 10
        while cert_name is None and time.monotonic() < deadline:
            m = _CERTNAME_RE.search("".join(proc.log))
            cert_name = m.group(1) if m else None
            time.sleep(0.05)
        assert cert_name, "derpkit serve did not log a CertName:\n" + "".join(proc.log)
    scheme = "https" if tls else "http"
    return Server(f"derpkit-{scheme}", f"{scheme}://127.0.0.1:{proc.port}", mesh_key,
                  f"127.0.0.1:{proc.stun_port}" if proc.stun_port else None, cert_name, proc=proc, loop=loop)


def derper(workdir: Path, *, tls: bool = False, mesh: bool = True, binary: str | None = None, name: str = "derper") -> Server:
    """Go derper on loopback (the pinned one, or ``binary``), with STUN and a mesh key."""
    mesh_hex = secrets.token_hex(32) if mesh else None
    if binary is not None:
        d = GoDerper(binary, workdir, tls, free_port(), free_port(socket.SOCK_DGRAM), mesh_hex).start()
    else:
        d = start_derper(workdir, tls=tls, mesh_key_hex=mesh_hex)
    scheme = "https" if tls else "http"
    return Server(f"{name}-{scheme}", d.base_url, d.mesh_key, f"127.0.0.1:{d.stun_port}", d.cert_name, go=d)
