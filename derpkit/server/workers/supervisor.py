"""``derpkit serve -workers N``: the parent process that starts, watches and stops N workers.

The parent does, once, what must happen once: parse the flags (the single-process start-up
refusals fire here, before any worker exists), load or create the server key file, wait for
the setec mesh key, choose concrete ports where the flags say 0, and make the internal mesh
key (32 fresh random bytes, handed to the workers through their stdin pipes and never
logged). It then starts the workers (``child.py``), tells each the others' private ports,
and says "DERP on port ..." once all of them are linked to each other.

Afterwards it only watches: a worker that exits is started again (after 0.5 s, doubling up
to 30 s while it keeps dying young) and every worker is told its new port; the others keep
relaying meanwhile. SIGTERM or SIGINT stops every worker the way one process stops (each
sends its clients a Restarting frame), SIGHUP is passed on to each. A worker that fails
while the server is first starting stops the whole start-up with status 1; its own
one-line error is already on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.app import build_node, fetch_setec_mesh_key, load_server_key, serve
from derpkit.server.config import ServeConfig

log = logging.getLogger("derpkit.serve")

RESTART_FIRST = 0.5
RESTART_MAX = 30.0
#: A worker that ran this long before exiting is restarted at once (not backed off).
HEALTHY_AFTER = 30.0
#: After SIGTERM, how long beyond -restart-notice the workers get before SIGKILL.
STOP_GRACE = 15.0


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _free_port(host: str, kind: socket.SocketKind) -> int:
    """An ephemeral port every worker can then bind (with SO_REUSEPORT) on ``host``."""
    infos = socket.getaddrinfo(host or None, 0, type=kind, flags=socket.AI_PASSIVE)
    family, _, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(addr)
        return int(s.getsockname()[1])


def choose_ports(cfg: ServeConfig) -> dict[str, int]:
    """Concrete ports for the settings that ask for an ephemeral one (0)."""
    host = cfg.listen_host
    out: dict[str, int] = {}
    if cfg.listen_port == 0:
        out["port"] = _free_port(host, socket.SOCK_STREAM)
    if cfg.stun and cfg.stun_port == 0:
        out["stun_port"] = _free_port(host, socket.SOCK_DGRAM)
    if cfg.http_port_enabled and cfg.http_port == 0:
        out["http_port"] = _free_port(host, socket.SOCK_STREAM)
    return out


class WorkerProc:
    """One worker process as the supervisor sees it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: asyncio.subprocess.Process | None = None
        self.private_port: int | None = None
        self.ready = asyncio.Event()
        self.meshed = asyncio.Event()
        self.started = 0.0
        self.failures = 0
        self.reader: asyncio.Task[None] | None = None


class Supervisor:
    def __init__(self, cfg: ServeConfig, argv: list[str], count: int, boot: dict[str, Any]) -> None:
        self.cfg = cfg
        self.argv = argv
        self.count = count
        self.boot = boot
        self.workers = [WorkerProc(i) for i in range(count)]
        self.stopping = False
        self.starting = True
        self.failed: int | None = None  # exit status of a worker that died during start-up
        self.changed = asyncio.Event()

    async def spawn(self, w: WorkerProc) -> None:
        w.ready.clear()
        w.meshed.clear()
        w.private_port = None
        w.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "derpkit.server.workers.child", *self.argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=None,
        )
        w.started = time.monotonic()
        assert w.proc.stdin is not None
        w.proc.stdin.write(json.dumps({**self.boot, "index": w.index}).encode() + b"\n")
        await w.proc.stdin.drain()
        w.reader = asyncio.get_running_loop().create_task(self.read(w, w.proc))

    async def read(self, w: WorkerProc, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "ready" in msg and w.proc is proc:
                w.private_port = int(msg["ready"])
                w.ready.set()
                if not self.starting:
                    self.tell_siblings()
            elif msg.get("meshed") and w.proc is proc:
                w.meshed.set()
        code = await proc.wait()
        if w.proc is proc:
            self.exited(w, code)

    def tell_siblings(self) -> None:
        ports = {str(w.index): w.private_port for w in self.workers if w.private_port is not None}
        line = json.dumps({"siblings": ports}).encode() + b"\n"
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None and w.proc.stdin is not None:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    w.proc.stdin.write(line)

    def exited(self, w: WorkerProc, code: int) -> None:
        w.private_port = None
        self.changed.set()
        if self.stopping:
            return
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self.starting:
            log.error("derpkit: worker %d %s while starting; stopping", w.index, how)
            if self.failed is None:
                self.failed = 1
            return
        lived = time.monotonic() - w.started
        w.failures = 0 if lived >= HEALTHY_AFTER else w.failures + 1
        delay = min(RESTART_MAX, RESTART_FIRST * (2 ** max(0, w.failures - 1)))
        log.warning("derpkit: worker %d (pid %s) %s after %.1fs; restarting it in %.1fs",
                    w.index, w.proc.pid if w.proc else "?", how, lived, delay)
        self.tell_siblings()
        asyncio.get_running_loop().call_later(delay, self._restart, w)

    def _restart(self, w: WorkerProc) -> None:
        if not self.stopping:
            asyncio.get_running_loop().create_task(self.spawn(w))

    def forward(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    w.proc.send_signal(sig)

    async def start(self, stop: asyncio.Event) -> bool:
        """Start every worker and link them; False when start-up failed or was stopped."""
        for w in self.workers:
            await self.spawn(w)

        async def all_set(events: list[asyncio.Event]) -> bool:
            while not all(e.is_set() for e in events):
                if stop.is_set() or self.failed is not None:
                    return False
                self.changed.clear()
                waits = [asyncio.ensure_future(e.wait()) for e in events if not e.is_set()]
                waits += [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.changed.wait())]
                _done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for p in pending:
                    p.cancel()
            return True

        if not await all_set([w.ready for w in self.workers]):
            return False
        self.tell_siblings()
        if not await all_set([w.meshed for w in self.workers]):
            return False
        self.starting = False
        return True

    async def stop(self) -> None:
        self.stopping = True
        self.forward(signal.SIGTERM)
        procs = [w.proc for w in self.workers if w.proc is not None]
        try:
            async with asyncio.timeout(self.cfg.restart_notice + STOP_GRACE):
                for p in procs:
                    await p.wait()
        except TimeoutError:
            log.warning("derpkit: workers still running after SIGTERM; killing them")
            for p in procs:
                if p.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        p.kill()
            for p in procs:
                await p.wait()
        for w in self.workers:
            if w.reader is not None:
                with contextlib.suppress(Exception):
                    await w.reader


async def supervise(cfg: ServeConfig, argv: list[str]) -> int:
    count = cfg.workers or usable_cpus()
    if count == 1:
        log.info("derpkit: -workers %d: one usable CPU, so one process", cfg.workers)
        return await serve(cfg)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    key: NodePrivate = load_server_key(cfg)
    setec_value = await fetch_setec_mesh_key(cfg, stop)
    # The refusals one process would make (mesh key, certificates, admission) come once,
    # from here, before any worker starts.
    build_node(cfg, key=key, setec_value=setec_value)
    ports = choose_ports(cfg)
    boot = {
        "count": count,
        "key": str(key),
        "internal": MeshKey.generate().hex(),
        "setec": setec_value.hex() if setec_value is not None else None,
        **ports,
    }
    sup = Supervisor(cfg, argv, count, boot)
    loop.add_signal_handler(signal.SIGHUP, sup.forward, signal.SIGHUP)
    log.info("derpkit: starting %d workers", count)
    ok = await sup.start(stop)
    if ok:
        port = ports.get("port", cfg.listen_port)
        extra = ""
        if cfg.http_port_enabled:
            extra = f"; plain HTTP (-http-port) on port {ports.get('http_port', cfg.http_port)}"
        log.info("derpkit: server public key %s; DERP on port %d%s; %d workers (pids %s)",
                 key.public(), port, extra, count,
                 ", ".join(str(w.proc.pid) for w in sup.workers if w.proc is not None))
        await stop.wait()
        log.info("derpkit: shutting down %d workers", count)
    await sup.stop()
    return 0 if ok or sup.failed is None else sup.failed
