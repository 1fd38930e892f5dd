"""Hyper-DERP (C++23, io_uring) as a benchmark peer: the fastest DERP server we can run here.

Built by ``bench/build_hyperderp.sh`` into ``$(go env GOPATH)/peers/hyperderp/hyper-derp``.
Three things about it shape this class:

- It listens on 0.0.0.0 (no address flag), so it may only run inside a private network
  namespace (``unshare -n`` with ``lo`` up, or ``python -m bench --netns``); ``start()``
  refuses on the host's own network.
- It binds a fixed control socket, ``ipc:///tmp/hyper-derp.sock`` (ZeroMQ), which is not
  per-namespace: a second instance would take it over. ``start()`` refuses while another
  instance answers on it.
- Plain DERP only: its TLS is kernel TLS (kTLS), and this kernel has no ``tls`` ULP.

Importing this module registers two ``python -m bench --servers`` kinds (bench/servers.py
imports it when it exists): ``hyperderp``, one worker held to the pinned server CPU, and
``hyperderp-all``, a worker per CPU, unpinned. Both serve plain HTTP only and need
``--netns``.

It has no ``/debug/varz``; ``varz()`` returns its Prometheus ``/metrics`` text (served on a
separate port) so a caller can still read counters, or None when metrics are off.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from .servers import Kind, Server, ServerEnv, free_port, pin_prefix, register

#: The control socket every Hyper-DERP process binds (src/main.cc, not configurable).
IPC_SOCKET = "/tmp/hyper-derp.sock"
_READY_RE = re.compile(rb"accept loop started on port (\d+)")


def find_hyperderp() -> str | None:
    """``$HYPERDERP``, else the binary build_hyperderp.sh installs under GOPATH/peers."""
    env = os.environ.get("HYPERDERP")
    if env and os.access(env, os.X_OK):
        return env
    bases = [os.environ.get("GOPATH", "").split(os.pathsep)[0], str(Path.home() / "go")]
    go = shutil.which("go")
    if go:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            bases.insert(0, subprocess.run([go, "env", "GOPATH"], capture_output=True, text=True,
                                           timeout=10).stdout.strip().split(os.pathsep)[0])
    for base in bases:
        if base:
            p = Path(base) / "peers" / "hyperderp" / "hyper-derp"
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def in_private_netns() -> bool:
    """True when this network namespace has no interface but ``lo``, so 0.0.0.0 is loopback.

    That is the property that matters (nothing bound here is reachable from another
    network), and it needs no privilege: comparing with PID 1's namespace does not work
    where /proc/1/ns is unreadable, as in this sandbox.
    """
    try:
        names = {name for _, name in socket.if_nameindex()}
    except OSError:
        return False  # cannot tell: treat as the host's, the safe answer
    return names == {"lo"}


def ipc_socket_in_use(path: str = IPC_SOCKET) -> bool:
    """True when a live process listens on Hyper-DERP's control socket (a stale file is not)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


class HyperDerpServer(Server):
    """One Hyper-DERP process, plain HTTP DERP on 127.0.0.1:``port`` inside a namespace.

    ``workers=1`` with ``cpus="0"`` is the one-core column: the whole process (accept,
    control and metrics threads too) is held to that CPU by taskset and its one data-plane
    worker pinned there by ``--pin-workers``. ``workers=0`` is Hyper-DERP's own default, a
    worker per online CPU; with ``cpus`` the process is still confined to those CPUs and the
    workers pinned one per listed CPU.
    """

    def __init__(self, binary: str | None = None, cpus: str | None = None, workers: int = 1,
                 metrics: bool = True, log_level: str = "info", name: str | None = None) -> None:
        found = binary or find_hyperderp()
        if not found:
            raise RuntimeError("Hyper-DERP is not built: run `bash bench/build_hyperderp.sh` "
                               "(or set HYPERDERP to its binary)")
        self.binary = found
        self.cpus = cpus
        self.workers = workers
        self.metrics_port = 0
        self._metrics = metrics
        self._log_level = log_level
        super().__init__(name or ("hyperderp" if workers == 1 else f"hyperderp-w{workers or 'all'}"),
                         [], dict(os.environ))

    def _args(self) -> list[str]:
        argv = [*pin_prefix(self.cpus), self.binary, "--port", str(self.port),
                "--workers", str(self.workers), "--log-level", self._log_level]
        if self.cpus:
            cores = _expand_cpus(self.cpus)
            if self.workers:
                cores = [cores[i % len(cores)] for i in range(self.workers)]
            argv += ["--pin-workers", ",".join(map(str, cores))]
        if self._metrics:
            argv += ["--metrics-port", str(self.metrics_port)]
        return argv

    def start(self, timeout: float = 20.0) -> HyperDerpServer:
        if not in_private_netns():
            raise RuntimeError("Hyper-DERP listens on 0.0.0.0: run it inside a private network "
                               "namespace (`unshare -n` with lo up, or `python -m bench --netns`)")
        if ipc_socket_in_use():
            raise RuntimeError(f"another Hyper-DERP is running on this host (it owns {IPC_SOCKET}; "
                               "only one instance per host)")
        self.port = free_port()
        self.metrics_port = free_port() if self._metrics else 0
        self.argv = self._args()
        self.proc = self._spawn()
        deadline = time.monotonic() + timeout
        # Hyper-DERP logs through spdlog to stdout; readiness is its accept-loop line.
        try:
            ready = self._await_line(_READY_RE, deadline)
        except TimeoutError:
            self.stop()
            raise RuntimeError("hyper-derp did not start in time:\n"
                               + b"".join(self.log[-30:]).decode(errors="replace")) from None
        if ready is None:
            raise RuntimeError("hyper-derp exited:\n" + b"".join(self.log[-30:]).decode(errors="replace"))
        threading.Thread(target=self._pump, daemon=True).start()
        self._wait_http(deadline)
        return self

    def _wait_http(self, deadline: float) -> None:
        """The accept line comes just before the loop runs, and the metrics server (Crow)
        starts after it: wait for /derp/probe's 200, and /metrics' when enabled."""
        urls = [f"http://127.0.0.1:{self.port}/derp/probe"]
        if self.metrics_port:
            urls.append(f"http://127.0.0.1:{self.metrics_port}/metrics")
        while urls and time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(urls[0], timeout=1) as r:
                    if r.status == 200:
                        urls.pop(0)
                        continue
            time.sleep(0.05)
        if not urls:
            return
        log = b"".join(self.log[-30:]).decode(errors="replace")
        self.stop()
        raise RuntimeError(f"hyper-derp does not answer {urls[0]}:\n{log}")

    #: With ``--metrics-port`` Hyper-DERP ignores SIGTERM (its Crow metrics server takes the
    #: signal and the relay runs on), so ``stop`` goes to SIGKILL after 3 s rather than the
    #: base class's 10, which would be added to every server a bench starts.
    stop_grace = 3.0

    def varz(self) -> str | None:  # type: ignore[override]
        """Prometheus text from ``--metrics-port`` (Hyper-DERP has no /debug/varz), or None."""
        if not self.metrics_port:
            return None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()


def _expand_cpus(spec: str) -> list[int]:
    """taskset's list syntax ("0", "0,1", "0-3") as CPU numbers, in order."""
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        out += range(int(lo), int(hi or lo) + 1)
    return out


def _unavailable(env: ServerEnv) -> str | None:
    if find_hyperderp() is None:
        return "Hyper-DERP not built (bash bench/build_hyperderp.sh)"
    if ipc_socket_in_use():
        return f"another Hyper-DERP is running on this host ({IPC_SOCKET})"
    return None


register(Kind("hyperderp", "Hyper-DERP, 1 worker",
              lambda env: HyperDerpServer(cpus=env.server_cpus, workers=1),
              transports=frozenset({"http"}), unavailable=_unavailable, needs_netns=True))
register(Kind("hyperderp-all", lambda env: f"Hyper-DERP, {env.ncpu} workers",
              lambda env: HyperDerpServer(cpus=None, workers=env.ncpu, name="hyperderp-all"),
              transports=frozenset({"http"}), unavailable=_unavailable, needs_netns=True))
