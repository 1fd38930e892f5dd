"""The relay over real loopback connections: delivery, peer gone, ping, keepalive, dups."""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.constants import DISCO_MAGIC, PeerGoneReason
from derpkit.protocol.events import ConnectionFailed, ServerKeyReceived
from derpkit.protocol.keys import NodePrivate

from .helpers import exchange, nothing_arrives, recv_kind, recv_packet, running_node


async def test_two_clients_exchange_both_ways_with_sender_key() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        assert a.server_key == node.public_key
        assert a.server_info is not None and a.server_info.version == 2
        await exchange(a, b, 5)
        s = node.server.stats
        assert s.packets_received == 10 and s.packets_sent == 10
        assert s.bytes_received == sum(len(b"a->b %d" % i) * 2 for i in range(5))
        await a.close()
        await b.close()


async def test_empty_and_maximum_packets_and_self_send() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        await a.send(b.public_key, b"")
        assert (await recv_packet(b)).data == b""
        big = os.urandom(65536)
        await a.send(b.public_key, big)
        assert (await recv_packet(b)).data == big
        await a.send(a.public_key, b"to myself")
        got = await recv_packet(a)
        assert got.data == b"to myself" and got.src == a.public_key.raw


async def test_unknown_destination_is_dropped_and_counted_with_not_here_for_disco() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        nobody = NodePrivate.generate().public()
        await a.send(nobody, b"plain data")
        assert await nothing_arrives(a, F.PeerGone)
        disco = DISCO_MAGIC + os.urandom(60)
        for _ in range(6):
            await a.send(nobody, disco)
        gone = []
        try:
            async with asyncio.timeout(0.5):
                while True:
                    f = await a.recv()
                    if isinstance(f, F.PeerGone):
                        gone.append(f)
        except TimeoutError:
            pass
        assert len(gone) == 3  # burst of 3, then 1 per second
        assert all(g.key == nobody.raw and g.reason == PeerGoneReason.NOT_HERE for g in gone)
        d = node.server.stats.dropped_packets
        assert d[("unknown_dest", "other")] == 1
        assert d[("unknown_dest", "disco")] == 6
        assert node.server.stats.peer_gone_not_here_frames == 3


async def test_peer_gone_reaches_those_who_received_from_the_leaver() -> None:
    async with running_node() as node:
        c0, c1, c2 = [await DerpClient.connect(node.url) for _ in range(3)]
        await c0.send(c1.public_key, b"0->1")
        await recv_packet(c1)
        await c1.send(c2.public_key, b"1->2")
        await recv_packet(c2)
        await c1.close()
        gone = await recv_kind(c2, F.PeerGone)
        assert gone.key == c1.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        # c0 only sent to c1; it never received from c1, so it hears nothing.
        assert await nothing_arrives(c0, F.PeerGone)
        await c2.close()
        assert await nothing_arrives(c0, F.PeerGone)  # nobody received from c2
        assert node.server.stats.peer_gone_disconnected_frames == 1


async def test_ping_gets_pong_with_same_bytes_and_rtt() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        rtt = await a.ping()
        assert 0 < rtt < 1
        await a.send_ping(b"12345678")
        pong = await recv_kind(a, F.Pong)
        assert pong.data == b"12345678"
        assert node.server.stats.got_ping == 2 and node.server.stats.sent_pong == 2


async def test_keepalives_arrive_on_schedule() -> None:
    async with running_node(keepalive_interval=0.2, keepalive_jitter=0.05) as node:
        a = await DerpClient.connect(node.url, can_ack_pings=False)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        stamps = []
        for _ in range(3):
            await recv_kind(a, F.KeepAlive, timeout=2)
            stamps.append(loop.time() - t0)
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        assert all(0.15 < g < 0.45 for g in gaps), gaps


def test_default_keepalive_cadence_is_derpers() -> None:
    from derpkit.server.relay.derp import DerpServer

    s = DerpServer(NodePrivate.generate())
    assert s.keepalive_interval == 60.0 and s.keepalive_jitter == 5.0


async def test_server_pings_silent_clients_and_closes_dead_ones() -> None:
    async with running_node(keepalive_interval=0.2, keepalive_jitter=0.0) as node:
        # This client promised to answer pings and does (DerpClient auto-answers).
        alive = await DerpClient.connect(node.url, can_ack_pings=True)
        # This one promised but will not answer: a raw connection that stops reading.
        from derpkit.protocol.handshake import ClientInfo

        from .helpers import RawConn

        raw = await RawConn.open(node.port, info=ClientInfo(can_ack_pings=True))
        raw.hello()
        ping = await recv_kind(alive, F.Ping, timeout=2)
        assert len(ping.data) == 8
        assert await raw.closed_by_server(timeout=3)
        assert node.server.stats.dead_clients_closed >= 1
        await asyncio.sleep(0.5)
        assert not alive.closed  # the one that answered stays


async def test_duplicate_connections_follow_last_writer_policy() -> None:
    async with running_node() as node:
        key = NodePrivate.generate()
        sender = await DerpClient.connect(node.url)
        first = await DerpClient.connect(node.url, private_key=key)
        second = await DerpClient.connect(node.url, private_key=key)
        # The newest connection is active.
        await sender.send(key.public(), b"p1")
        assert (await recv_packet(second)).data == b"p1"
        assert await nothing_arrives(first, F.RecvPacket, ping=False)
        # The older one sends any frame: it becomes active.
        await first.send_ping(b"abcdefgh")
        await recv_kind(first, F.Pong)
        await sender.send(key.public(), b"p2")
        assert (await recv_packet(first)).data == b"p2"
        assert await nothing_arrives(second, F.RecvPacket, ping=False)
        g = node.server.gauges()
        assert g["current_dup_client_keys"] == 1 and g["current_dup_client_conns"] == 2
        assert node.server.stats.total_dup_client_conns == 1
        # The active one leaves: the other gets packets again, and nobody hears PeerGone.
        await first.close()
        await asyncio.sleep(0.1)
        await sender.send(key.public(), b"p3")
        assert (await recv_packet(second)).data == b"p3"
        assert await nothing_arrives(sender, F.PeerGone)
        assert node.server.gauges()["current_dup_client_keys"] == 0
        # The last one leaves: the sender, who never received from it, hears nothing;
        await second.close()
        assert await nothing_arrives(sender, F.PeerGone)


async def test_third_duplicate_and_active_leaving_falls_back_to_history() -> None:
    async with running_node() as node:
        key = NodePrivate.generate()
        sender = await DerpClient.connect(node.url)
        a = await DerpClient.connect(node.url, private_key=key)
        b = await DerpClient.connect(node.url, private_key=key)
        c = await DerpClient.connect(node.url, private_key=key)
        await sender.send(key.public(), b"to c")
        assert (await recv_packet(c)).data == b"to c"
        await c.close()  # history was [a, c]: a takes over, not b
        await asyncio.sleep(0.1)
        await sender.send(key.public(), b"to a")
        assert (await recv_packet(a)).data == b"to a"
        assert await nothing_arrives(b, F.RecvPacket)


async def test_note_preferred_counts_home_connections() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url, preferred=True)
        await a.ping()
        assert node.server.gauges()["current_home_connections"] == 1
        await a.note_preferred(False)
        await a.ping()
        assert node.server.gauges()["current_home_connections"] == 0
        assert node.server.stats.home_moves_out == 0  # within the first 5 s: not a move


async def test_fast_start_skips_the_101() -> None:
    async with running_node() as node:
        from .helpers import RawConn

        # The core checks the ServerKey the server still sends against the one given.
        raw = await RawConn.open(node.port, server_key=node.public_key)
        assert raw.conn.fast_start and raw.conn.server_key_received
        assert raw.head == b""  # no HTTP response at all
        c = await DerpClient.connect(node.url, server_key=node.public_key)
        other = await DerpClient.connect(node.url)
        await exchange(c, other, 1)


async def test_websocket_clients_relay_with_tcp_clients() -> None:
    async with running_node() as node:
        ws = await DerpClient.connect(node.url, websocket=True)
        tcp = await DerpClient.connect(node.url)
        await exchange(ws, tcp, 3)
        big = os.urandom(65536)  # spans several 32 KiB messages each way
        await tcp.send(ws.public_key, big)
        assert (await recv_packet(ws)).data == big
        await ws.send(tcp.public_key, big)
        assert (await recv_packet(tcp)).data == big
        assert node.server.stats.websocket_accepts == 1


async def test_rate_limit_slows_a_sender_without_dropping() -> None:
    async with running_node() as node:
        node.server.set_rate_limit(200_000, 0)  # burst raised to 65 568
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        payload = b"x" * 10_000
        for _ in range(30):  # 300 kB: about 65 kB burst + 235 kB at 200 kB/s
            await a.send(b.public_key, payload)
        for _ in range(30):
            await recv_packet(b)
        elapsed = loop.time() - t0
        assert elapsed > 0.8, elapsed
        assert node.server.stats.rate_limit_waited > 0
        assert sum(node.server.stats.dropped_packets.values()) == 0


async def test_write_batches_and_fast_start_are_measured() -> None:
    from derpkit.server import metrics

    async with running_node() as node:
        a = await DerpClient.connect(node.url, server_key=node.public_key)  # fast start
        b = await DerpClient.connect(node.url)
        for i in range(50):
            await a.send(b.public_key, b"%d" % i)
        for _ in range(50):
            await recv_packet(b)
        s = node.server.stats
        assert s.fast_start_accepts == 1
        text = metrics.render(metrics.derp_families(node.server, 0))
        count = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("derp_buffered_write_frames_count")))
        total = int(next(ln.split()[1] for ln in text.splitlines() if ln.startswith("derp_buffered_write_frames_sum")))
        assert count >= 1 and total >= 50 + 2  # every packet and both ServerInfos were written
        assert "derpkit_fast_start_accepts 1" in text


# --- drops counted by the spec's reasons ----------------------------------------------------


def _server_conn(node, key: NodePrivate):  # noqa: ANN001, ANN202
    """The server-side connection of ``key`` (to read how many packets it holds)."""
    return node.server.clients[key.public().raw].active


async def _stalled_client(port: int, key: NodePrivate) -> socket.socket:
    """A real client with a tiny receive buffer that completes the handshake, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    loop = asyncio.get_running_loop()
    core = ClientConnection(key, host="x", read_timeout=None)
    core.start(loop.time())
    await loop.sock_sendall(sock, core.data_to_send())
    async with asyncio.timeout(5):
        while not core.server_key_received:
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "server closed before ServerKey"
            for ev in core.receive_data(chunk, loop.time()):
                assert not isinstance(ev, ConnectionFailed), ev
    await loop.sock_sendall(sock, core.data_to_send())  # the ClientInfo
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed client or a NAT timeout looks."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_packets_queued_for_a_receiver_that_leaves_are_gone_disconnected() -> None:
    async with running_node(write_timeout=60.0) as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        sender = await DerpClient.connect(node.url)
        slow_key = NodePrivate.generate()
        sock = await _stalled_client(node.port, slow_key)
        async with asyncio.timeout(5):
            while slow_key.public().raw not in node.server.clients:
                await asyncio.sleep(0.01)
        conn = _server_conn(node, slow_key)
        blob = os.urandom(60_000)
        disco = DISCO_MAGIC + os.urandom(32 + 24 + 40)
        async with asyncio.timeout(10):
            while not conn._qr:  # noqa: SLF001 - until the socket is full and packets wait
                await sender.send(slow_key.public(), blob)
                await sender.ping()
        await sender.send(slow_key.public(), disco)
        await sender.send(slow_key.public(), blob)
        await sender.ping()
        queued_regular = len(conn._qr)  # noqa: SLF001
        queued_disco = len(conn._qd or ())  # noqa: SLF001
        assert queued_regular >= 2 and queued_disco == 1
        d = node.server.stats.dropped_packets
        assert d[("gone_disconnected", "other")] == 0
        _reset(sock)
        async with asyncio.timeout(5):
            while slow_key.public().raw in node.server.clients:
                await asyncio.sleep(0.01)
        assert d[("gone_disconnected", "other")] == queued_regular
        assert d[("gone_disconnected", "disco")] == queued_disco
        assert node.server.stats.sclient_write_timeouts == 0
        # Sent after it left: nothing to deliver to, an ordinary unknown destination.
        await sender.send(slow_key.public(), b"late")
        await sender.ping()
        assert d[("unknown_dest", "other")] == 1
        await exchange(a, b, 2)


async def _write_error_scenario() -> dict[str, int]:
    """A receiver whose socket was reset while the server was not reading from it.

    -rate-config makes the server stop reading B (B overdraws its bucket by a day), so the
    RST B's kernel sends is noticed only when the server next writes to B: the OS refuses
    that write. This is derper's write_error: a packet whose write() failed.
    """
    async with running_node() as node:
        node.server.set_rate_limit(1, 0)
        a = await DerpClient.connect(node.url)
        b_key = NodePrivate.generate()
        sock = await _stalled_client(node.port, b_key)
        async with asyncio.timeout(5):
            while b_key.public().raw not in node.server.clients:
                await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        big = F.SendPacket(a.public_key.raw, bytes(65_536)).encode()
        await loop.sock_sendall(sock, big + big)  # the second frame waits ~18 hours
        await recv_packet(a)
        async with asyncio.timeout(5):
            while node.server.stats.rate_limit_waited == 0:
                await asyncio.sleep(0.01)
        _reset(sock)
        await asyncio.sleep(0.1)
        await a.send(b_key.public(), b"into a reset socket")
        await a.ping()
        async with asyncio.timeout(5):
            while b_key.public().raw in node.server.clients:
                await asyncio.sleep(0.01)
        d = node.server.stats.dropped_packets
        s = node.server.stats
        return {
            "write_error": d[("write_error", "other")],
            "gone_disconnected": d[("gone_disconnected", "other")],
            "packets_sent": s.packets_sent,
        }


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_a_failed_write_is_counted_as_write_error(loop_kind: str) -> None:
    """Run on both loops: ``derpkit serve`` uses uvloop, in-process tests use asyncio."""
    if loop_kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        got = uvloop.run(_write_error_scenario())
    else:
        got = asyncio.run(_write_error_scenario())
    assert got["write_error"] == 1, got
    assert got["packets_sent"] == 1, got  # only B's packet to A; the failed one is not sent
    assert got["gone_disconnected"] == 0, got


async def test_forward_packet_to_an_unknown_key_is_unknown_dest_on_fwd() -> None:
    from derpkit.protocol.keys import MeshKey

    mesh_key = MeshKey.generate()
    async with running_node(mesh_key=mesh_key) as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        peer = await DerpClient.connect(node.url, mesh_key=mesh_key)
        src = NodePrivate.generate().public()
        nobody = NodePrivate.generate().public()
        await peer.forward_packet(src, nobody, b"regular")
        await peer.forward_packet(src, nobody, DISCO_MAGIC + os.urandom(32 + 24 + 40))
        gone = await recv_kind(peer, F.PeerGone)
        assert gone.key == nobody.raw and gone.reason == PeerGoneReason.NOT_HERE
        s = node.server.stats
        assert s.packets_forwarded_in == 2
        d = s.dropped_packets
        assert d[("unknown_dest_on_fwd", "other")] == 1
        assert d[("unknown_dest_on_fwd", "disco")] == 1
        assert d[("unknown_dest", "other")] == 0 and d[("unknown_dest", "disco")] == 0
        assert await nothing_arrives(peer, F.PeerGone)  # the regular one gets no notice
        # A forwarded packet to a connected key is delivered with the original sender's key.
        await peer.forward_packet(src, a.public_key, b"forwarded")
        got = await recv_packet(a)
        assert got.src == src.raw and got.data == b"forwarded"
        await exchange(a, b, 2)
        assert not peer.closed



async def test_duplicates_swap_on_each_send_and_an_inactive_one_leaving_changes_nothing() -> None:
    """Spec §5.6 over real connections: whoever of the key's connections sent last gets packets.

    The older connection sends (a packet, not only a ping) and becomes active; then the
    newer one sends and takes over; the older sends again and is active again. When the
    inactive one leaves, the active one keeps receiving and no sender hears PeerGone.
    ``dup_client`` drops stay at zero throughout: a duplicate set always has an active
    member under derper's policy (see test_registry and docs/protocol.md).
    """
    async with running_node() as node:
        key = NodePrivate.generate()
        sender = await DerpClient.connect(node.url)
        older = await DerpClient.connect(node.url, private_key=key)
        newer = await DerpClient.connect(node.url, private_key=key)

        async def goes_to(want: DerpClient, other: DerpClient, data: bytes) -> None:
            await sender.send(key.public(), data)
            got = await recv_packet(want)
            assert got.data == data and got.src == sender.public_key.raw
            assert await nothing_arrives(other, F.RecvPacket, within=0.2, ping=False)

        await goes_to(newer, older, b"1 newest joined last")
        await older.send(sender.public_key, b"older speaks")
        assert (await recv_packet(sender)).data == b"older speaks"
        await goes_to(older, newer, b"2 older sent last")
        await newer.send(sender.public_key, b"newer speaks")
        assert (await recv_packet(sender)).data == b"newer speaks"
        await goes_to(newer, older, b"3 newer sent last")
        await older.send(sender.public_key, b"older again")
        assert (await recv_packet(sender)).data == b"older again"
        await goes_to(older, newer, b"4 older sent last again")
        # The inactive duplicate leaves: nothing changes for the active one.
        await newer.close()
        async with asyncio.timeout(5):
            while node.server.gauges()["current_dup_client_keys"]:
                await asyncio.sleep(0.01)
        await sender.send(key.public(), b"5 after the inactive left")
        assert (await recv_packet(older)).data == b"5 after the inactive left"
        assert await nothing_arrives(sender, F.PeerGone)
        d = node.server.stats.dropped_packets
        assert d[("dup_client", "other")] == 0 and d[("dup_client", "disco")] == 0
        assert node.server.stats.packets_sent == 8


async def test_keepalive_jitter_is_drawn_once_per_connection() -> None:
    """derper draws its keepalive jitter once, when a connection's writer starts, and ticks
    at interval + jitter from then on (spec §5.10): the gaps of one connection are equal.

    With a jitter range twenty times the interval, a jitter drawn afresh at every tick
    would make the gaps differ by up to 1 s; one draw per connection keeps them within
    scheduling noise of each other.
    """
    async with running_node(keepalive_interval=0.05, keepalive_jitter=1.0) as node:
        assert node.server.keepalive_jitter == 1.0
        a = await DerpClient.connect(node.url, can_ack_pings=False)
        loop = asyncio.get_running_loop()
        stamps = []
        for _ in range(4):
            await recv_kind(a, F.KeepAlive, timeout=3)
            stamps.append(loop.time())
        gaps = [y - x for x, y in zip(stamps, stamps[1:], strict=False)]
        assert max(gaps) - min(gaps) < 0.08, gaps
        assert all(0.04 < g < 1.2 for g in gaps), gaps


async def _ws_open(node, protocols: tuple[str, ...]):  # noqa: ANN001, ANN202
    import aiohttp

    session = aiohttp.ClientSession()
    ws = await session.ws_connect(node.url, protocols=protocols, autoclose=False, compress=0)
    return session, ws


async def _ws_close_code(ws, within: float = 5.0) -> int | None:  # noqa: ANN001
    """Read until the server's Close frame; its code (bounded wait)."""
    import aiohttp

    async with asyncio.timeout(within):
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return ws.close_code if ws.close_code is not None else msg.data


async def test_websocket_text_message_closes_with_1003_and_is_counted() -> None:
    """DERP over WebSocket is binary only; Go derper closes with 1003 on a text message.

    Only that connection goes: a TCP pair keeps exchanging, and the client that had
    completed its handshake over the WebSocket is unregistered.
    """
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        session, ws = await _ws_open(node, ("derp",))
        try:
            assert ws.protocol == "derp"
            key = NodePrivate.generate()
            core = ClientConnection(key, host="x", websocket=True, read_timeout=None)
            core.start(0.0)
            first = await ws.receive_bytes(timeout=5)
            assert any(isinstance(ev, ServerKeyReceived) for ev in core.receive_data(first, 0.0))
            await ws.send_bytes(core.data_to_send())  # the ClientInfo
            async with asyncio.timeout(5):
                while key.public().raw not in node.server.clients:
                    await asyncio.sleep(0.01)
            await ws.send_str("hello, as text")
            assert await _ws_close_code(ws) == 1003
            assert node.server.stats.conn_errors["websocket_text"] == 1
            async with asyncio.timeout(5):
                while key.public().raw in node.server.clients:
                    await asyncio.sleep(0.01)
            await exchange(a, b, 2)
        finally:
            await ws.close()
            await session.close()


async def test_a_websocket_reader_that_stops_is_paused_and_head_dropped_alone() -> None:
    """The WebSocket path writes frames straight to the connection's transport, so the
    flow control is its own: a WebSocket client that stops reading must be paused at the
    high-water mark (its packets then queue and head-drop, counted) with the server's
    buffer for it bounded, while a TCP pair beside it keeps exchanging; when it reads
    again it gets packets again."""
    from derpkit.server.relay.websocket import _HIGH_WATER

    async with running_node(write_timeout=60.0) as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        session, ws = await _ws_open(node, ("derp",))
        try:
            key = NodePrivate.generate()
            core = ClientConnection(key, host="x", websocket=True, read_timeout=None)
            core.start(0.0)
            core.receive_data(await ws.receive_bytes(timeout=5), 0.0)
            await ws.send_bytes(core.data_to_send())
            async with asyncio.timeout(5):
                while key.public().raw not in node.server.clients:
                    await asyncio.sleep(0.01)
            stuck = node.server.clients[key.public().raw].active
            assert stuck is not None
            payload = os.urandom(1200)
            drops = node.server.stats.dropped_packets
            async with asyncio.timeout(30):
                # Up to 48 MB, stopping at the first head-drop: loopback's socket buffers
                # alone can hold ten of those megabytes before the server sees a backlog.
                for i in range(40_000):
                    await a.send(key.public(), payload)
                    if i % 200 == 0:
                        await asyncio.sleep(0.001)
                        if drops.get(("queue_head", "other")):
                            break
                while not drops.get(("queue_head", "other")):
                    await asyncio.sleep(0.01)
            assert stuck._paused  # noqa: SLF001
            raw = stuck.transport._raw  # noqa: SLF001
            assert raw.get_write_buffer_size() < 2 * _HIGH_WATER + 64 * 1024
            await exchange(a, b, 3)  # nobody else slowed
            # Reading again drains the backlog; the connection resumes and delivers.
            got = 0
            async with asyncio.timeout(20):
                while not got or stuck._paused:  # noqa: SLF001
                    data = await ws.receive_bytes(timeout=5)
                    got += sum(isinstance(ev, F.RecvPacket) for ev in core.receive_data(data, 1.0))
            assert got > 0
        finally:
            await ws.close()
            await session.close()


async def test_websocket_offering_only_another_subprotocol_closes_with_1008() -> None:
    """The WebSocket path is taken when ``Sec-WebSocket-Protocol`` contains "derp" (Go's
    substring test); if ``derp`` itself is not among the offers, derper accepts the
    WebSocket and closes it with 1008. Without any "derp" in the header the request is an
    ordinary DERP upgrade (very old Tailscale clients sent ``Upgrade: WebSocket`` and spoke
    raw DERP), so that gets ``101`` with ``Upgrade: DERP``.
    """
    from derpkit.protocol import upgrade as U

    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        session, ws = await _ws_open(node, ("derp-v9",))
        try:
            assert ws.protocol is None
            assert await _ws_close_code(ws) == 1008
        finally:
            await ws.close()
            await session.close()
        assert node.server.stats.websocket_accepts == 0
        assert node.server.stats.accepts == 2  # only a and b ever reached the DERP layer
        r, w = await asyncio.open_connection("127.0.0.1", node.port)
        w.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        buf = b""
        async with asyncio.timeout(5):
            while (parts := U.split_head(buf)) is None:
                data = await r.read(4096)
                assert data
                buf += data
        head = parts[0]
        assert head.startswith(b"HTTP/1.1 101 ") and b"\r\nUpgrade: DERP\r\n" in head, head
        w.close()
        await exchange(a, b, 1)


async def test_a_packet_batched_for_a_client_aborted_in_the_same_turn_is_gone_disconnected() -> None:
    """A packet already in this loop turn's write batch when its receiver is aborted never
    reaches the socket: it is ``gone_disconnected`` (not silently lost, not "sent").

    Made deterministic with asyncio's loop order: the test blocks the loop (time.sleep)
    while A's packet arrives and B's keepalive tick falls due; when the loop runs again it
    handles socket reads before due timers, so A's packet joins B's batch first, then the
    tick finds B silent since its liveness Ping and aborts it before the batch is flushed.
    """
    import time

    from derpkit.protocol.events import ConnectionFailed
    from derpkit.protocol.handshake import ClientInfo

    from .helpers import RawConn

    async with running_node(keepalive_interval=1.0, keepalive_jitter=0.0) as node:
        b_key = NodePrivate.generate()
        b = await RawConn.open(node.port, private_key=b_key, info=ClientInfo(can_ack_pings=True))
        b.hello()
        a = await RawConn.open(node.port)
        a.hello()
        # B never answers (RawConn drops the core's Pongs); wait for the liveness Ping.
        async with asyncio.timeout(5):
            pinged = False
            while not pinged:
                events = await b.read_events()
                assert not any(isinstance(e, ConnectionFailed) for e in events), events
                pinged = any(isinstance(e, F.Ping) for e in events)
        a.send(F.SendPacket(b_key.public().raw, b"caught in the batch").encode())
        time.sleep(1.2)  # noqa: ASYNC251 - block the loop on purpose (see docstring)
        async with asyncio.timeout(5):
            while b_key.public().raw in node.server.clients:
                await asyncio.sleep(0.01)
        s = node.server.stats
        assert s.dead_clients_closed == 1
        assert s.packets_received == 1
        assert s.dropped_packets[("gone_disconnected", "other")] == 1
        assert s.packets_sent == 0
        a.close()
        b.close()
