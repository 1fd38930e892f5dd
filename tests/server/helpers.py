"""Shared pieces for server tests: a raw DERP connection for sending bad bytes."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol import frames as F
from derpkit.protocol import upgrade as U
from derpkit.protocol.keys import NodePublic
from derpkit.server.node import DerpNode


class RawConn:
    """A hand-driven DERP connection: we choose every byte, including the wrong ones."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.frames = F.FrameReader()
        self.server_key: NodePublic | None = None
        self.head = b""

    @classmethod
    async def open(cls, port: int, *, upgrade: bool = True, fast_start: bool = False) -> RawConn:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        c = cls(r, w)
        if upgrade:
            w.write(U.build_request(f"127.0.0.1:{port}", fast_start=fast_start))
            if not fast_start:
                buf = b""
                while (parts := U.split_head(buf)) is None:
                    data = await asyncio.wait_for(r.read(4096), 5)
                    assert data, "server closed during upgrade"
                    buf += data
                c.head, rest = parts
                frames = c.frames.feed(rest)
            else:
                frames = []
            while not frames:
                data = await asyncio.wait_for(r.read(4096), 5)
                assert data, "server closed before ServerKey"
                frames = c.frames.feed(data)
            c.server_key = NodePublic(F.decode_server_key(*frames[0]).key)
        return c

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server closes the connection (reads to EOF within the timeout)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except (TimeoutError, ConnectionError):
            return False

    def close(self) -> None:
        self.writer.close()


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback TCP ports (all held open together while picked)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def recv_packet(c: DerpClient, timeout: float = 5.0) -> F.RecvPacket:
    """The next RecvPacket, skipping keepalives and other chatter."""
    async with asyncio.timeout(timeout):
        while True:
            f = await c.recv()
            if isinstance(f, F.RecvPacket):
                return f


async def deliver_eventually(src: DerpClient, dst: DerpClient, data: bytes, within: float = 15.0) -> None:
    """Resend until it arrives: across a mesh, a node learns where a remote client is only
    once the other node tells it, so the first packets may be dropped as unknown."""
    async with asyncio.timeout(within):
        while True:
            await src.send(dst.public_key, data)
            try:
                got = await recv_packet(dst, timeout=0.3)
            except TimeoutError:
                continue
            assert got.data == data and got.src == src.public_key.raw
            return


async def recv_kind(c: DerpClient, kind: type, timeout: float = 5.0):  # noqa: ANN201
    async with asyncio.timeout(timeout):
        while True:
            f = await c.recv()
            if isinstance(f, kind):
                return f


async def nothing_arrives(c: DerpClient, kind: type, within: float = 0.3) -> bool:
    try:
        async with asyncio.timeout(within):
            while True:
                f = await c.recv()
                if isinstance(f, kind):
                    return False
    except TimeoutError:
        return True
    except DerpConnectionError:
        return True


@contextlib.asynccontextmanager
async def running_node(**kw: object) -> AsyncIterator[DerpNode]:
    kw.setdefault("stun_port", None)
    node = DerpNode(**kw)  # type: ignore[arg-type]
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def exchange(a: DerpClient, b: DerpClient, n: int = 3) -> None:
    """Prove a and b still relay in both directions."""
    for i in range(n):
        await a.send(b.public_key, b"a->b %d" % i)
        got = await recv_packet(b)
        assert got.data == b"a->b %d" % i and got.src == a.public_key.raw
        await b.send(a.public_key, b"b->a %d" % i)
        got = await recv_packet(a)
        assert got.data == b"b->a %d" % i and got.src == b.public_key.raw
