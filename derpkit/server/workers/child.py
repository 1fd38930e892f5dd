"""One worker process of ``derpkit serve -workers N`` (started by ``supervisor.py``).

Run as ``python -m derpkit.server.workers.child <serve flags>``: it parses the same flags
and environment as the parent, then reads its start-up secrets from the first line on
stdin (never argv or the environment, which other users can read in /proc): the server
key, the internal mesh key, the setec mesh secret, its index and the concrete ports. It
serves as ``derpkit serve`` would, with SO_REUSEPORT, plus a private loopback listener.

The pipe stays the control channel. Worker to supervisor, JSON lines on stdout:
``{"ready": <private port>}`` once listening, ``{"meshed": true}`` once linked to every
sibling it was told about. Supervisor to worker, on stdin: ``{"siblings": {"<index>":
<port>}}`` whenever a worker (re)starts. End of stdin means the supervisor is gone: the
worker shuts down as on SIGTERM.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
from typing import Any

from derpkit.gosyntax import join_host_port
from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.app import StartupError, build_node, install_sighup
from derpkit.server.config import ConfigError, ServeConfig, parse_config
from derpkit.server.node import DerpNode, NodeOptions

from .relay import WorkerServer
from .siblings import SiblingLink
from .varz import varz_middleware

log = logging.getLogger("derpkit.worker")

#: How long a worker waits for its sibling links before saying "meshed" anyway.
MESH_WAIT = 10.0


def read_line_unbuffered(fd: int = 0) -> bytes:
    """One line from ``fd`` without reading past it (the rest is asyncio's to read)."""
    out = bytearray()
    while True:
        b = os.read(fd, 1)
        if not b:
            return bytes(out)
        if b == b"\n":
            return bytes(out)
        out += b


def apply_ports(cfg: ServeConfig, boot: dict[str, Any]) -> None:
    """The supervisor chose concrete ports where the flags said 0: every worker binds the same."""
    if boot.get("port") is not None:
        cfg.addr = join_host_port(cfg.listen_host, str(boot["port"]))
    if boot.get("stun_port") is not None:
        cfg.stun_port = boot["stun_port"]
    if boot.get("http_port") is not None:
        cfg.http_port = boot["http_port"]


class Worker:
    """The running worker: its node, its sibling links and the control pipe."""

    def __init__(self, cfg: ServeConfig, boot: dict[str, Any]) -> None:
        self.cfg = cfg
        self.index: int = boot["index"]
        self.count: int = boot["count"]
        self.key = NodePrivate.parse(boot["key"])
        self.internal = MeshKey(bytes.fromhex(boot["internal"]))
        self.setec = bytes.fromhex(boot["setec"]) if boot.get("setec") is not None else None
        self.identity = NodePrivate.generate()
        self.links: dict[int, SiblingLink] = {}
        self.stop = asyncio.Event()
        self.node: DerpNode | None = None

    def sibling_ports(self) -> dict[int, int]:
        return {i: link.port for i, link in self.links.items()}

    def tweak(self, opts: NodeOptions) -> None:
        opts.reuse_port = True
        opts.private_port = 0
        opts.relay_factory = functools.partial(WorkerServer, index=self.index, internal_key=self.internal)
        opts.middlewares.append(varz_middleware(self.index, self.count, self.sibling_ports, self.cfg.knobs))
        opts.http.debug_info = lambda: {"Workers": f"{self.count} (this page is from worker {self.index})"}

    def emit(self, msg: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        node = self.node = build_node(self.cfg, key=self.key, setec_value=self.setec, tweak=self.tweak)
        install_sighup(self.cfg, node)
        try:
            await node.start()
        except OSError as e:
            raise StartupError(f"derper: {e}") from None
        log.info("derpkit: worker %d of %d listening on port %d (private 127.0.0.1:%s)",
                 self.index, self.count, node.port, node.private_port)
        self.emit({"ready": node.private_port})
        control = loop.create_task(self.control())
        await self.stop.wait()
        control.cancel()
        for link in self.links.values():
            await link.stop()
        self.links.clear()
        log.info("derpkit: worker %d shutting down; telling %d clients to reconnect",
                 self.index, len(node.server.conns))
        await node.stop(graceful=True)
        return 0

    async def control(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := await reader.readline():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "siblings" in msg:
                await self.set_siblings({int(i): int(p) for i, p in msg["siblings"].items()})
        log.info("derpkit: worker %d: the supervisor is gone; shutting down", self.index)
        self.stop.set()

    async def set_siblings(self, ports: dict[int, int]) -> None:
        """Link to each sibling's current port (a restarted sibling has a new one)."""
        assert self.node is not None
        server = self.node.server
        assert isinstance(server, WorkerServer)
        for i in list(self.links):
            if ports.get(i) != self.links[i].port:
                await self.links.pop(i).stop()
        for i, port in ports.items():
            if i == self.index or i in self.links:
                continue
            link = SiblingLink(server, i, port, self.identity, self.internal)
            self.links[i] = link
            link.start()
        try:
            async with asyncio.timeout(MESH_WAIT):
                for link in self.links.values():
                    await link.connected.wait()
        except TimeoutError:
            missing = [i for i, link in self.links.items() if not link.connected.is_set()]
            log.warning("derpkit: worker %d: no link to worker(s) %s yet", self.index, missing)
        self.emit({"meshed": True})


def setup_logging(index: int) -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [w{index}] %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: list[str]) -> int:
    raw = read_line_unbuffered()
    if not raw:
        sys.stderr.write("derpkit: a -workers worker is started by derpkit serve, not by hand\n")
        return 2
    boot = json.loads(raw)
    try:
        cfg, _notes = parse_config(argv, os.environ)  # the supervisor logged the notes
    except ConfigError as e:
        sys.stderr.write(e.stderr_text())
        return e.exit_code
    apply_ports(cfg, boot)
    setup_logging(boot["index"])
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        return runner(Worker(cfg, boot).run())
    except StartupError as e:
        logging.getLogger("derpkit.serve").error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
