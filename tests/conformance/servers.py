"""Servers the conformance tests aim the suite at, as module-scoped fixtures.

``derpkit serve`` runs through ``tests/server/serve_proc.start_serve`` (a real subprocess);
its log is drained by a task, so the process gets an event loop of its own in a daemon
thread that outlives the per-test loops of pytest-asyncio. Go derper comes from
``tests/goderper.start_derper`` (skips loudly when missing, fails under
DERPKIT_REQUIRE_GO_PEERS=1).
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from derpkit.conformance.target import Target, make_target
from derpkit.protocol.keys import MeshKey, NodePrivate
from tests.goderper import REQUIRE_ENV, GoDerper, free_port, start_derper
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
    popen: subprocess.Popen[bytes] | None = None
    key_file: Path | None = None

    @property
    def private_key(self) -> NodePrivate:
        """The server's own key (from its key file): fault proxies seal ServerInfo with it."""
        import json

        assert self.key_file is not None
        return NodePrivate.parse(json.loads(self.key_file.read_text())["PrivateKey"])

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
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


def serve(workdir: Path, *, tls: bool = False, mesh: bool = True, stun: bool = True, extra: tuple[str, ...] = ()) -> Server:
    """``derpkit serve`` on loopback: plain HTTP, or TLS with its self-signed IP certificate."""
    loop = LoopThread()
    mesh_key = MeshKey(secrets.token_bytes(32)) if mesh else None
    args = ["-a", "127.0.0.1:0", "-http-port", "-1", "-c", str(workdir / "derper.key")]
    args += ["-stun-port", "0"] if stun else ["-stun=false"]
    if mesh_key is not None:
        (workdir / "mesh.key").write_text(mesh_key.hex() + "\n")
        args += ["-mesh-psk-file", str(workdir / "mesh.key")]
    if tls:
        args += ["-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(workdir)]
    proc = loop.run(start_serve(*args, *extra))
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
                  f"127.0.0.1:{proc.stun_port}" if proc.stun_port else None, cert_name, proc=proc, loop=loop,
                  key_file=workdir / "derper.key")


def derper(workdir: Path, *, tls: bool = False, mesh: bool = True, binary: str | None = None, name: str = "derper") -> Server:
    """Go derper on loopback (the pinned one, or ``binary``), with STUN and a mesh key."""
    mesh_hex = secrets.token_hex(32) if mesh else None
    if binary is not None:
        d = GoDerper(binary, workdir, tls, free_port(), free_port(socket.SOCK_DGRAM), mesh_hex).start()
    else:
        d = start_derper(workdir, tls=tls, mesh_key_hex=mesh_hex)
    scheme = "https" if tls else "http"
    return Server(f"{name}-{scheme}", d.base_url, d.mesh_key, f"127.0.0.1:{d.stun_port}", d.cert_name, go=d)


#: Matrix peers made by scripts/install-matrix-peers.sh: $(go env GOPATH)/peers/<dir>/<binary>.
PEERS = {
    "derper-v1.80.3": ("derper-v1.80.3", "derper"),
    "derper-v1.104.7": ("derper-v1.104.7", "derper"),
    "sing-box-v1.13.19": ("sing-box-v1.13.19", "sing-box"),
}


def peer_binary(name: str) -> str | None:
    """Path of a matrix peer, or None. ``$DERPKIT_PEER_<NAME>`` overrides (dots and dashes as _)."""
    env = os.environ.get("DERPKIT_PEER_" + name.upper().replace("-", "_").replace(".", "_"))
    if env:
        return env if os.access(env, os.X_OK) else None
    d, b = PEERS[name]
    roots = []
    go = shutil.which("go")
    if go:
        try:
            roots.append(subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True, timeout=20).stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    roots.append(str(Path.home() / "go"))
    for r in roots:
        for root in r.split(os.pathsep):
            p = Path(root) / "peers" / d / b
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def require_peer(name: str) -> str:
    import pytest

    path = peer_binary(name)
    if path is None:
        msg = (f"{name} NOT INSTALLED: the conformance matrix needs it; run `bash scripts/install-matrix-peers.sh` "
               f"(it lands in $(go env GOPATH)/peers/{PEERS[name][0]}/)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(msg)
    return path


def _wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {port} not listening after {timeout:g} s:\n{log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)


def singbox(workdir: Path, binary: str) -> Server:
    """sing-box's ``derp`` service (it requires TLS): a self-signed IP certificate, pinned."""
    import json

    from tests.interop.pki import self_signed_ip

    leaf = self_signed_ip(workdir / "tls")
    mesh = MeshKey(secrets.token_bytes(32))
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    config = {
        "log": {"level": "warn"},
        "services": [{
            "type": "derp", "tag": "derp", "listen": "127.0.0.1", "listen_port": port,
            "tls": {"enabled": True, "certificate_path": str(leaf.cert_path), "key_path": str(leaf.key_path)},
            "config_path": str(workdir / "derper.key"), "mesh_psk": mesh.hex(),
            "stun": {"enabled": True, "listen": "127.0.0.1", "listen_port": stun},
        }],
    }
    (workdir / "config.json").write_text(json.dumps(config, indent=2))
    log = workdir / "sing-box.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen([binary, "run", "-c", str(workdir / "config.json")], stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        _wait_tcp(port, proc, log)
    except RuntimeError:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return Server("sing-box-https", f"https://127.0.0.1:{port}", mesh, f"127.0.0.1:{stun}", leaf.cert_name, popen=proc)
