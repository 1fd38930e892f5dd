"""A tiny scripted DERP server for client behaviours Go derper never shows.

Go derper never sends Ping, Health or Restarting, never sends oversized frames and never
falls silent for 120 s, yet a client must handle all of these. This server does the real
upgrade and handshake over a loopback socket (using the protocol core's server side) and
then hands the connection to a per-test coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from derpkit.protocol import handshake
from derpkit.protocol.frames import FrameReader, ServerKey
from derpkit.protocol.keys import NodePrivate, NodePublic
from derpkit.protocol.upgrade import switching_protocols


def _keep_all(ftype: int, length: int) -> bool:
    """Keep every payload: tests inspect frames a real server would discard (Pong)."""
    return True


@dataclass
class FakeConn:
    """One accepted connection after the handshake."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    request_head: bytes
    client_key: NodePublic
    client_info: handshake.ClientInfo
    frames: FrameReader = field(default_factory=lambda: FrameReader(_keep_all))
    pending: list[tuple[int, bytes]] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def read_frame(self, timeout: float = 3.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            while not self.pending:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("client closed")
                self.pending.extend(self.frames.feed(data))
        return self.pending.pop(0)


Handler = Callable[[FakeConn], Awaitable[None]]


async def wait_until(pred: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll ``pred`` until true: the fake server records frames from its own tasks."""
    async with asyncio.timeout(timeout):
        while True:
            if pred():
                return
            await asyncio.sleep(0.01)


class FakeDerpServer:
    """Listens on 127.0.0.1; each connection runs the handshake, then ``handler``.

    ``refuse`` replaces the 101 with a canned HTTP response. ``send_server_info=False``
    leaves the client waiting after ClientInfo.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        refuse: bytes | None = None,
        send_server_info: bool = True,
        server_info: handshake.ServerInfo | None = None,
    ) -> None:
        self.key = NodePrivate.generate()
        self.handler = handler
        self.refuse = refuse
        self.send_server_info = send_server_info
        self.server_info = server_info
        self.conns: list[FakeConn] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/derp"

    @property
    def public_key(self) -> NodePublic:
        return self.key.public()

    async def start(self, port: int = 0) -> FakeDerpServer:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for c in self.conns:
                c.writer.close()
            for t in list(self._tasks):
                t.cancel()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None

    async def __aenter__(self) -> FakeDerpServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (EOFError, ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if self.refuse is not None:
            writer.write(self.refuse)
            await writer.drain()
            return
        fast = b"derp-fast-start: 1" in head.lower()
        if not fast:
            writer.write(switching_protocols(self.public_key))
        writer.write(ServerKey(self.public_key.raw).encode())
        await writer.drain()
        frames = FrameReader(_keep_all)
        got: list[tuple[int, bytes]] = []
        while not got:
            data = await reader.read(65536)
            if not data:
                return
            got.extend(frames.feed(data))
        ftype, payload = got.pop(0)
        assert ftype == 0x02, ftype
        client_key, info = handshake.open_client_info(self.key, payload)
        conn = FakeConn(reader, writer, head, client_key, info, frames, got)
        self.conns.append(conn)
        if self.send_server_info:
            writer.write(handshake.server_info_frame(self.key, client_key, self.server_info))
        if self.handler is not None:
            await self.handler(conn)
        else:
            await reader.read()  # hold the connection until the client leaves
