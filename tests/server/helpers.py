"""Shared pieces for server tests: a raw DERP connection for sending bad bytes, and helpers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl as ssl_mod
from collections.abc import AsyncIterator

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol import frames as F
from derpkit.protocol.connection import ClientConnection, ClientState
from derpkit.protocol.constants import FrameType
from derpkit.protocol.events import ConnectionFailed, Event, ServerKeyReceived
from derpkit.protocol.handshake import ClientInfo, seal
from derpkit.protocol.keys import NodePrivate, NodePublic
from derpkit.server.node import DerpNode


class RawConn:
    """A hand-driven DERP connection: we choose every byte, including the wrong ones.

    The upgrade, the ServerKey and the ClientInfo are the client core's
    (``ClientConnection``), so these tests exercise the server against the bytes a real
    client sends; but nothing goes out unless the test asks. ``open`` stops at the
    ServerKey with the core's sealed ClientInfo held back: ``hello()`` sends it, ``send()``
    sends anything else (garbage instead of a ClientInfo, malformed frames). What the core
    queues in reply to the server (a Pong when ``info.can_ack_pings``) is dropped, so a
    RawConn is the client that promised and stays silent; use DerpClient for one that
    answers.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ClientConnection) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = conn
        #: The HTTP response head before the DERP bytes; b"" when fast start skipped it.
        self.head = b""
        self._hello = b""

    @property
    def server_key(self) -> NodePublic | None:
        return self.conn.server_key

    @property
    def private_key(self) -> NodePrivate:
        return self.conn.private_key

    @classmethod
    async def open(
        cls,
        port: int,
        *,
        upgrade: bool = True,
        server_key: NodePublic | None = None,
        private_key: NodePrivate | None = None,
        info: ClientInfo | None = None,
    ) -> RawConn:
        """Connect and (unless ``upgrade=False``) upgrade and read the ServerKey.

        With ``server_key`` the upgrade is a fast start: request and ClientInfo go in one
        write (the core's rule), so the hello is already sent when this returns.
        """
        r, w = await asyncio.open_connection("127.0.0.1", port)
        core = ClientConnection(
            private_key or NodePrivate.generate(),
            info=info,
            host=f"127.0.0.1:{port}",
            server_key=server_key,
            read_timeout=None,
        )
        c = cls(r, w, core)
        if not upgrade:
            return c
        core.start(_clock())
        w.write(core.data_to_send())
        got_key = False
        while not got_key:
            data = await asyncio.wait_for(r.read(4096), 5)
            if not c.head and core.state in _BEFORE_FRAMES and data.startswith(b"HTTP/"):
                # Recorded for assertions only (did fast start skip the 101?); the core
                # is what reads and checks the response.
                end = data.find(b"\r\n\r\n")
                c.head = data if end < 0 else data[:end]
            for ev in c._feed(data):
                assert not isinstance(ev, ConnectionFailed), f"upgrade failed: {ev.error}"
                got_key = got_key or isinstance(ev, ServerKeyReceived)
        c._hello = core.data_to_send()  # ClientInfo, held until hello()
        return c

    def _feed(self, data: bytes) -> list[Event]:
        now = _clock()
        events = self.conn.receive_data(data, now) if data else self.conn.connection_lost(now)
        return events

    def hello(self) -> None:
        """Send the ClientInfo the core sealed for the server's key (``open``'s ``info``)."""
        assert self._hello, "no ClientInfo held (fast start sent it already, or hello() twice)"
        self.writer.write(self._hello)
        self._hello = b""

    def send(self, data: bytes) -> None:
        """Exactly these bytes, through the core's ``send_raw``: right or wrong."""
        self.conn.data_to_send()  # replies the core queued are not sent (see the class doc)
        self.conn.send_raw(data)
        self.writer.write(self.conn.data_to_send())

    async def read_events(self, timeout: float = 5.0) -> list[Event]:
        """What the next read from the server meant, decoded by the core (EOF included)."""
        data = await asyncio.wait_for(self.reader.read(65536), timeout)
        events = self._feed(data)
        self.conn.data_to_send()  # silent by design: drop the core's Pongs
        return events

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True once the server ends the connection within the timeout: EOF, or a reset
        (a server that closes with our bytes still unread in its buffer makes the kernel
        send RST)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        return True
        except ConnectionError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()


_BEFORE_FRAMES = (ClientState.AWAIT_RESPONSE, ClientState.AWAIT_FIRST_BYTES)


def _clock() -> float:
    return asyncio.get_running_loop().time()


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


def garbage_cases(server_key: bytes) -> dict[str, tuple[bytes, bool]]:
    """Bad input a server must answer by closing that one connection: name -> (bytes sent
    after the upgrade, whether a good ClientInfo goes first). Used against derpkit alone
    (tests/server/test_bad_input.py, with its error counters) and against both derpkit and
    Go derper (tests/interop/test_shared_scenarios.py)."""
    k = NodePrivate.generate()
    other = NodePrivate.generate()
    return {
        # Handshake failures.
        "bad_first_frame": (F.SendPacket(bytes(32), b"x").encode(), False),
        # A frame of the wrong type first (here the server's own ServerKey, echoed back).
        "server_key_instead_of_client_info": (F.ServerKey(bytes(32)).encode(), False),
        # DERP has one magic, in the ServerKey the server sends; what a server sees from a
        # client that is not speaking DERP at all is bytes that are not a ClientInfo frame.
        "http_request_instead_of_derp": (b"GET /derp HTTP/1.1\r\nHost: x\r\n\r\n", False),
        "tls_client_hello_instead_of_derp": (bytes.fromhex("16030100f8010000f40303") + os.urandom(60), False),
        "short_client_info": (F.frame(FrameType.CLIENT_INFO, bytes(40)), False),
        "bad_box": (F.frame(FrameType.CLIENT_INFO, k.public().raw + seal(k, other.public(), b"{}")), False),
        "bad_json": (F.frame(FrameType.CLIENT_INFO, k.public().raw + seal(k, NodePublic(server_key), b"{nope")), False),
        "zero_key": (F.frame(FrameType.CLIENT_INFO, bytes(32) + bytes(24) + bytes(30)), False),
        # Steady-state violations.
        "oversized_packet": (F.header(FrameType.SEND_PACKET, 32 + 65537), True),
        "short_send_packet": (F.frame(FrameType.SEND_PACKET, bytes(10)), True),
        "bad_ping": (F.frame(FrameType.PING, b"1234"), True),
        "bad_note_preferred": (F.frame(FrameType.NOTE_PREFERRED, b"\x01\x01"), True),
        "not_mesh_peer": (F.WatchConns().encode(), True),
        "close_peer_without_mesh_key": (F.ClosePeer(other.public().raw).encode(), True),
        "forward_packet_without_mesh_key": (
            F.ForwardPacket(k.public().raw, other.public().raw, b"sneaky").encode(), True),
    }


async def converse(
    port: int, data: bytes, *, quiet: float = 0.5, ssl: ssl_mod.SSLContext | None = None,
    server_hostname: str | None = None,
) -> tuple[bytes, bool]:
    """Send ``data`` on a new connection, read until the server closes it or stays quiet
    for ``quiet`` seconds; (everything read, whether the server closed or reset it)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ssl, server_hostname=server_hostname)
    w.write(data)
    buf, closed = b"", False
    try:
        while True:
            d = await asyncio.wait_for(r.read(65536), quiet)
            if not d:
                closed = True
                break
            buf += d
    except TimeoutError:
        pass
    except (ConnectionError, ssl_mod.SSLError):
        closed = True
    w.close()
    return buf, closed


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


async def nothing_arrives(
    c: DerpClient, kind: type | tuple[type, ...], within: float = 0.3, *, ping: bool = True
) -> bool:
    """Whether no ``kind`` frame arrives within ``within`` seconds on a live connection.

    Silence proves nothing on its own: a dead connection is silent too. So the connection
    dying during the window fails the test, and afterwards it must still answer a Ping.
    ``ping=False`` is for duplicate-key tests, where any frame from a connection makes it
    the active one: the window then only requires the connection to be open, and the test
    must prove it alive later by delivering to it.
    """
    what = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    try:
        async with asyncio.timeout(within):
            while True:
                f = await c.recv()
                if isinstance(f, kind):
                    return False
    except DerpConnectionError as e:  # before TimeoutError: DerpTimeoutError is both
        raise AssertionError(f"connection died while checking that no {what} arrives: {e}") from e
    except TimeoutError:
        pass
    if not ping:
        assert not c.closed, f"no {what} arrived, but the connection is closed: {c.error}"
        return True
    try:
        await c.ping(timeout=5)
    except (DerpConnectionError, TimeoutError) as e:
        raise AssertionError(f"no {what} arrived, but the connection no longer answers a Ping: {e!r}") from e
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
