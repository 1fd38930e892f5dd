"""Start DERP servers on loopback as subprocesses, pinned and with a raised fd limit.

Used by ``python -m bench`` and by tests/loadtests. Every process is started in its own
session and killed (SIGTERM, then SIGKILL) on ``stop()``; ``with`` blocks do that for you.
A server given a ``BenchTLS`` (bench/tlscert.py) serves TLS in ``-certmode manual``.

The ``--servers`` names of ``python -m bench`` are ``Kind`` entries in ``KINDS``; another
module adds one with ``register(Kind(...))`` (see ``OPTIONAL_KIND_MODULES``).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .tlscert import BenchTLS

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


def _tree(pid: int) -> list[psutil.Process]:
    """``pid`` and its live descendants (a multi-process server's workers); [] if gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of ``pid`` and its live descendants."""
    total = 0.0
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its live descendants."""
    total = 0
    for p in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


class Server:
    """One running server process; ``url`` is ready for DERP clients."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None,
                 workdir: str | None = None, tls: BenchTLS | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.workdir = workdir or tempfile.mkdtemp(prefix=f"bench-{name}-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.log: list[bytes] = []
        self.tls = tls

    @property
    def url(self) -> str:
        """The DERP URL on 127.0.0.1; https when serving TLS (the certificate names
        ``localhost`` and 127.0.0.1, and clients send ``localhost`` as SNI)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/derp"

    def _probe_ok(self, timeout: float = 1.0) -> bool:
        """``GET /derp/probe`` answered 200; over TLS with SNI ``localhost`` (Go derper's
        manual mode refuses a handshake whose SNI is not its -hostname)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
                sock: socket.socket = raw
                host = "127.0.0.1"
                if self.tls:
                    host = self.tls.hostname
                    sock = self.tls.client_context().wrap_socket(raw, server_hostname=host)
                sock.sendall(f"GET /derp/probe HTTP/1.1\r\nHost: {host}\r\n"
                             "Connection: close\r\n\r\n".encode())
                return sock.recv(64).startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
        except (OSError, ssl.SSLError):
            return False

    def tail(self, lines: int = 30) -> str:
        return b"".join(self.log[-lines:]).decode(errors="replace")

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

    #: seconds between SIGTERM and SIGKILL in ``stop``
    stop_grace = 10.0

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=self.stop_grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def _await_line(self, pattern: re.Pattern[bytes], deadline: float) -> re.Match[bytes] | None:
        """Read the server's output (kept in ``log``) until a line matches ``pattern``; None
        when the output ends first, TimeoutError when a line arrives after ``deadline``."""
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return None
            self.log.append(line)
            if m := pattern.search(line):
                return m
            if time.monotonic() > deadline:
                raise TimeoutError

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def varz(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/debug/varz", timeout=5) as r:
            return r.read().decode()


class DerpkitServer(Server):
    def __init__(self, cpus: str | None = None, extra: list[str] | None = None, *,
                 tls: BenchTLS | None = None) -> None:
        wd = tempfile.mkdtemp(prefix="bench-derpkit-")
        tls_flags = [*tls.server_flags(), "-http-port", "-1"] if tls else []
        argv = [*pin_prefix(cpus), sys.executable, "-m", "derpkit", "serve",
                "-a", "127.0.0.1:0", "-c", os.path.join(wd, "derper.key"), "-stun-port", "0",
                *tls_flags, *(extra or [])]
        env = dict(os.environ)
        env.pop("HOSTNAME", None)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        super().__init__("derpkit", argv, env, wd, tls)

    def start(self, timeout: float = 20.0) -> DerpkitServer:
        self.proc = self._spawn()
        try:
            m = self._await_line(_PORT_RE, time.monotonic() + timeout)
        except TimeoutError:
            self.stop()
            raise RuntimeError("derpkit serve did not start in time") from None
        if m is None:
            lines = self.tail(2000).strip().splitlines()
            self.stop()
            # A bad flag prints its error first, then the usage; anything else ends
            # with the message.
            why = (lines[0] if any("Usage" in x for x in lines) else lines[-1]) if lines else ""
            raise RuntimeError("derpkit serve exited before listening"
                               + (f": {why.strip()}" if why else " (no output)")
                               + ("\n" + "\n".join(lines) if len(lines) > 1 else ""))
        self.port = int(m.group(1))
        threading.Thread(target=self._pump, daemon=True).start()
        return self


class GoDerperServer(Server):
    def __init__(self, binary: str, cpus: str | None = None, *,
                 tls: BenchTLS | None = None) -> None:
        wd = tempfile.mkdtemp(prefix="bench-goderper-")
        self.binary = binary
        self.cpus = cpus
        super().__init__("go derper", [], dict(os.environ), wd, tls)

    def start(self, timeout: float = 20.0) -> GoDerperServer:
        last = ""
        for _ in range(3):
            self.port = free_port()
            # Plain: -certmode letsencrypt is never built on a non-443 port. TLS: manual mode
            # turns TLS on whatever the port (shared/spec/derper-cli.md §1.5).
            certs = (self.tls.server_flags() if self.tls else
                     ["-certmode", "letsencrypt", "-certdir", os.path.join(self.workdir, "acme")])
            self.argv = [*pin_prefix(self.cpus), self.binary, "-a", f"127.0.0.1:{self.port}",
                         "-c", os.path.join(self.workdir, "derper.key"),
                         "-stun-port", str(free_port(socket.SOCK_DGRAM)), "-http-port", "-1",
                         *certs, "-mesh-psk-file", ""]
            self.proc = self._spawn()
            threading.Thread(target=self._pump, daemon=True).start()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._probe_ok():
                    return self
                time.sleep(0.05)
            last = self.tail().strip().splitlines()
            self.stop()
        raise RuntimeError(f"Go derper did not answer /derp/probe within {timeout:g} s"
                           + (f" (last log line: {last[-1]})" if last else " (no log output)"))


# --------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class ServerEnv:
    """What a kind's factory needs to know about the run."""

    server_cpus: str | None   # the pinned servers' CPU(s), None when not pinning
    ncpu: int                 # CPUs of the whole run
    tls: BenchTLS | None      # set for the TLS transports


@dataclass(frozen=True)
class Kind:
    """One ``--servers`` name: its table column, how to make a server, what it serves.

    ``unavailable`` returns why the kind cannot run here (binary missing, ...), or None;
    the bench then leaves its column out with that line. ``transports`` lists the
    bench transports it serves (see bench/transports.py); others show "n/a".
    """

    name: str
    label: str | Callable[[ServerEnv], str]
    make: Callable[[ServerEnv], Server]
    transports: frozenset[str] = frozenset({"http", "tls", "ws", "wss"})
    unavailable: Callable[[ServerEnv], str | None] = field(default=lambda env: None)
    #: A server that must not see the host network (binds 0.0.0.0, ...): the bench refuses
    #: it without --netns.
    needs_netns: bool = False

    def column(self, env: ServerEnv) -> str:
        return self.label(env) if callable(self.label) else self.label


KINDS: dict[str, Kind] = {}

#: Modules that register more kinds when imported, if they exist (one line each).
OPTIONAL_KIND_MODULES: tuple[str, ...] = ("bench.hyperderp",)


def register(kind: Kind) -> Kind:
    """Add (or replace) a ``--servers`` kind."""
    KINDS[kind.name] = kind
    return kind


def load_kinds() -> dict[str, Kind]:
    """The registry, after importing the optional modules that exist."""
    import importlib
    import importlib.util

    for mod in OPTIONAL_KIND_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
    return KINDS


def _no_go_derper(env: ServerEnv) -> str | None:
    return None if find_go_derper() else "Go derper not installed ($DERPER, PATH, $(go env GOPATH)/bin)"


def _go(cpus: Callable[[ServerEnv], str | None]) -> Callable[[ServerEnv], Server]:
    def make(env: ServerEnv) -> Server:
        binary = find_go_derper()
        assert binary is not None
        return GoDerperServer(binary, cpus(env), tls=env.tls)
    return make


class DerpkitWorkersServer(DerpkitServer):
    """``derpkit serve -workers N``, unpinned (the workers spread over every CPU)."""

    def __init__(self, workers: int, tls: BenchTLS | None) -> None:
        super().__init__(None, ["-workers", str(workers)], tls=tls)
        self.name = f"derpkit-w{workers}"

    def start(self, timeout: float = 20.0) -> DerpkitServer:
        try:
            return super().start(timeout)
        except RuntimeError as e:
            raise RuntimeError(f"derpkit serve -workers did not start (is the -workers flag "
                               f"there yet?): {str(e).strip().splitlines()[-1]}") from None


register(Kind("derpkit", "derpkit", lambda env: DerpkitServer(env.server_cpus, tls=env.tls)))
register(Kind("go", "Go derper", _go(lambda env: env.server_cpus), unavailable=_no_go_derper))
register(Kind("go2", lambda env: f"Go derper, {env.ncpu} CPUs", _go(lambda env: None),
              unavailable=lambda env: _no_go_derper(env) or (
                  None if env.server_cpus is not None else "go2 is go when nothing is pinned")))
register(Kind("derpkit-w2", "derpkit -workers 2", lambda env: DerpkitWorkersServer(2, env.tls)))
