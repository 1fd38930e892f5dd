"""Start DERP servers on loopback as subprocesses, pinned and with a raised fd limit.

Used by ``python -m bench`` and by tests/loadtests. Every process is started in its own
session and killed (SIGTERM, then SIGKILL) on ``stop()``; ``with`` blocks do that for you.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

_PORT_RE = re.compile(rb"DERP on port (\d+)")


def raise_nofile() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft if hard == resource.RLIM_INFINITY else hard


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_prefix(cpus: str | None) -> list[str]:
    """``taskset -c CPUS`` when asked for and available."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", cpus]
    return []


def find_go_derper() -> str | None:
    env = os.environ.get("DERPER")
    if env and os.access(env, os.X_OK):
        return env
    found = shutil.which("derper")
    if found:
        return found
    for base in (os.environ.get("GOPATH", ""), str(Path.home() / "go")):
        if base:
            p = Path(base.split(os.pathsep)[0]) / "bin" / "derper"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    go = shutil.which("go")
    if go:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            gp = subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
            p = Path(gp.split(os.pathsep)[0]) / "bin" / "derper"
            if gp and p.is_file():
                return str(p)
    return None


class Server:
    """One running server process; ``url`` is ready for DERP clients."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 workdir: str | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=self.env, start_new_session=True, preexec_fn=raise_nofile, cwd=self.workdir,
        )

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self.log) < 2000:
                self.log.append(line)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def varz(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/debug/varz", timeout=5) as r:
            return r.read().decode()


class DerpkitServer(Server):
    def __init__(self, cpus: str | None = None, extra: list[str] | None = None) -> None:
        wd = tempfile.mkdtemp(prefix="bench-derpkit-")
        argv = [*pin_prefix(cpus), sys.executable, "-m", "derpkit", "serve",
                "-a", "127.0.0.1:0", "-c", os.path.join(wd, "derper.key"), "-stun-port", "0",
                *(extra or [])]
        env = dict(os.environ)
        env.pop("HOSTNAME", None)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        super().__init__("derpkit", argv, env, wd)

    def start(self, timeout: float = 20.0) -> DerpkitServer:
        self.proc = self._spawn()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("derpkit serve exited:\n" + b"".join(self.log).decode(errors="replace"))
            self.log.append(line)
            if m := _PORT_RE.search(line):
                self.port = int(m.group(1))
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("derpkit serve did not start in time")
        threading.Thread(target=self._pump, daemon=True).start()
        return self


class GoDerperServer(Server):
    def __init__(self, binary: str, cpus: str | None = None) -> None:
        wd = tempfile.mkdtemp(prefix="bench-goderper-")
        self.binary = binary
        self.cpus = cpus
        super().__init__("go derper", [], dict(os.environ), wd)

    def start(self, timeout: float = 20.0) -> GoDerperServer:
        last = ""
        for _ in range(3):
            self.port = free_port()
            self.argv = [*pin_prefix(self.cpus), self.binary, "-a", f"127.0.0.1:{self.port}",
                         "-c", os.path.join(self.workdir, "derper.key"),
                         "-stun-port", str(free_port(socket.SOCK_DGRAM)), "-http-port", "-1",
                         "-certmode", "letsencrypt", "-certdir", os.path.join(self.workdir, "acme"),
                         "-mesh-psk-file", ""]
            self.proc = self._spawn()
            threading.Thread(target=self._pump, daemon=True).start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{self.port}/derp/probe", timeout=1
                    ) as r:
                        if r.status == 200:
                            return self
                except OSError:
                    pass
                time.sleep(0.05)
            last = b"".join(self.log[-30:]).decode(errors="replace")
            self.stop()
        raise RuntimeError(f"Go derper did not start:\n{last}")
