"""Bad input affects only the connection that sent it, is counted, and others keep flowing."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.constants import FrameType
from derpkit.protocol.handshake import ClientInfo
from derpkit.protocol.keys import NodePrivate

from .helpers import RawConn, exchange, garbage_cases, recv_packet, running_node


async def _handshaken_raw(port: int, **info: object) -> tuple[RawConn, NodePrivate]:
    raw = await RawConn.open(port, info=ClientInfo(**info))  # type: ignore[arg-type]
    raw.hello()
    return raw, raw.private_key


#: Cases whose connection-error reason is not the case's own name.
_REASON = {
    "server_key_instead_of_client_info": "bad_first_frame",
    "http_request_instead_of_derp": "bad_first_frame",
    "tls_client_hello_instead_of_derp": "bad_first_frame",
    "close_peer_without_mesh_key": "not_mesh_peer",
    "forward_packet_without_mesh_key": "not_mesh_peer",
}


@pytest.mark.parametrize(
    "case",
    list(garbage_cases(NodePrivate.generate().public().raw)),
)
async def test_garbage_closes_only_that_connection(case: str) -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        raw = await RawConn.open(node.port)
        assert raw.server_key is not None
        payload, needs_hello = garbage_cases(raw.server_key.raw)[case]
        if needs_hello:
            raw.hello()
            await asyncio.sleep(0.05)
        raw.send(payload)
        await exchange(a, b, 2)  # traffic flows while the bad one is being dropped
        assert await raw.closed_by_server(), f"{case}: server kept the connection"
        want = _REASON.get(case, case)
        assert node.server.stats.conn_errors[want] == 1, dict(node.server.stats.conn_errors)
        await exchange(a, b, 2)
        assert not a.closed and not b.closed


async def test_garbage_instead_of_http_gets_400_and_nothing_else_breaks() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        raw = await RawConn.open(node.port, upgrade=False)
        raw.send(os.urandom(3000) + b"\r\n\r\n")
        data = await asyncio.wait_for(raw.reader.read(100), 5)
        assert data == b"" or data.split(b" ")[1] == b"400"
        await exchange(a, b, 2)


async def test_unknown_frames_are_skipped_and_counted() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        raw, key = await _handshaken_raw(node.port)
        raw.send(F.frame(0x7E, os.urandom(5000)) + F.SendPacket(b.public_key.raw, b"after").encode())
        got = await recv_packet(b)
        assert got.data == b"after" and got.src == key.public().raw
        assert node.server.stats.unknown_frames == 1
        await exchange(a, b, 1)


async def test_handshake_timeout_closes_silent_connection() -> None:
    async with running_node() as node:
        node.server.policy.handshake_timeout = 0.3
        raw = await RawConn.open(node.port)
        assert await raw.closed_by_server(timeout=3)
        assert node.server.stats.conn_errors["handshake_timeout"] == 1


async def test_slow_reader_is_cut_off_alone() -> None:
    async with running_node(write_timeout=0.5) as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        sender = await DerpClient.connect(node.url)
        # A client with a tiny receive buffer that completes the handshake, then never reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", node.port))
        sock.setblocking(False)
        r, w = await asyncio.open_connection(sock=sock)
        slow_key = NodePrivate.generate()
        # Fast start: the client core writes the request and ClientInfo at once.
        core = ClientConnection(slow_key, host="x", server_key=node.public_key, read_timeout=None)
        core.start(0.0)
        w.write(core.data_to_send())
        await asyncio.sleep(0.1)
        blob = os.urandom(60_000)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i in range(300):  # 18 MB at a reader that takes nothing
            await sender.send(slow_key.public(), blob)
            if i % 20 == 0:
                await exchange(a, b, 1)
        assert loop.time() - t0 < 10  # the sender was never blocked by the slow reader
        async with asyncio.timeout(5):
            while node.server.stats.sclient_write_timeouts == 0:
                await asyncio.sleep(0.05)
        await exchange(a, b, 2)
        d = node.server.stats.dropped_packets
        assert d[("queue_head", "other")] > 0
        assert node.server.stats.conn_errors["write_timeout"] == 1
        assert node.server.gauges()["current_connections"] == 3
        w.close()


async def test_frames_before_an_oversized_header_are_still_relayed() -> None:
    async with running_node() as node:
        b = await DerpClient.connect(node.url)
        raw, key = await _handshaken_raw(node.port)
        await asyncio.sleep(0.05)
        # One write: a good packet, then a header claiming a too-large packet.
        raw.send(F.SendPacket(b.public_key.raw, b"last words").encode() + F.header(FrameType.SEND_PACKET, 32 + 70000))
        got = await recv_packet(b)
        assert got.data == b"last words" and got.src == key.public().raw
        assert await raw.closed_by_server()
        assert node.server.stats.conn_errors["oversized_packet"] == 1


async def test_close_peer_without_the_mesh_key_closes_the_asker_not_the_target() -> None:
    """ClosePeer is for mesh peers (spec §5.16): from anyone else it ends only the sender's
    connection, counted as ``not_mesh_peer``; the client it named stays connected."""
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        raw, _key = await _handshaken_raw(node.port)
        await asyncio.sleep(0.05)
        raw.send(F.ClosePeer(a.public_key.raw).encode())
        assert await raw.closed_by_server()
        assert node.server.stats.conn_errors["not_mesh_peer"] == 1
        await exchange(a, b, 2)
        assert not a.closed and a.public_key.raw in node.server.clients
