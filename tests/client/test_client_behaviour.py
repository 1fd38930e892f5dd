"""Client behaviours that Go derper never triggers, checked against a scripted server.

All over real loopback sockets; timeouts are shortened through ``read_timeout`` rather
than by sleeping for minutes.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from derpkit.client import (
    DerpClient,
    DerpConnectionError,
    DerpTimeoutError,
    DerpUpgradeError,
    ReconnectingClient,
    backoff_delay,
    parse_url,
)
from derpkit.protocol.constants import FrameType
from derpkit.protocol.frames import (
    Health,
    KeepAlive,
    PeerGone,
    PeerPresent,
    Ping,
    RecvPacket,
    Restarting,
    ServerKey,
    frame,
    header,
)
from derpkit.protocol.handshake import ServerInfo
from derpkit.protocol.keys import MeshKey, NodePrivate

from .fakeserver import FakeConn, FakeDerpServer, wait_until

# ------------------------------------------------------------------ URL parsing


@pytest.mark.parametrize(
    ("url", "tls", "host", "port", "path", "host_header"),
    [
        ("http://127.0.0.1:3340", False, "127.0.0.1", 3340, "/derp", "127.0.0.1:3340"),
        (
            "https://derp1.example.com/derp",
            True,
            "derp1.example.com",
            443,
            "/derp",
            "derp1.example.com",
        ),
        ("derp://derp1.example.com", True, "derp1.example.com", 443, "/derp", "derp1.example.com"),
        ("http://[::1]/", False, "::1", 80, "/derp", "[::1]"),
        ("https://h:8443/custom?x=1", True, "h", 8443, "/custom?x=1", "h:8443"),
    ],
)
def test_parse_url(url: str, tls: bool, host: str, port: int, path: str, host_header: str) -> None:
    u = parse_url(url)
    assert (u.tls, u.host, u.port, u.path, u.host_header) == (tls, host, port, path, host_header)


@pytest.mark.parametrize("url", ["ftp://h/derp", "https:///derp", "http://h:99999/"])
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_url(url)


def test_backoff_delay_bounds() -> None:
    rng = random.Random(1)
    assert backoff_delay(0) == 0
    for n, base in [(1, 0.01), (3, 0.09), (10, 1.0), (23, 5.0), (1000, 5.0)]:
        for _ in range(50):
            d = backoff_delay(n, rng)
            assert 0.5 * base <= d < 1.5 * base + 1e-12


# ------------------------------------------------------------------ handshake details


async def test_hello_is_pipelined_and_client_info_is_what_we_asked_for() -> None:
    seen: list[tuple[int, bytes]] = []

    async def handler(c: FakeConn) -> None:
        seen.append(await c.read_frame())
        seen.append(await c.read_frame())
        await c.reader.read()

    mesh = MeshKey.generate()
    async with FakeDerpServer(handler, send_server_info=False) as srv:
        c = await DerpClient.connect(
            srv.url,
            mesh_key=mesh,
            is_prober=True,
            app_name="derpkit-test",
            preferred=True,
            watch_conns=True,
            wait_for_server_info=False,
        )
        try:
            await wait_until(lambda: len(seen) >= 2)
            assert seen == [(FrameType.NOTE_PREFERRED, b"\x01"), (FrameType.WATCH_CONNS, b"")]
            conn = srv.conns[0]
            assert conn.client_key == c.public_key
            info = conn.client_info
            assert info.mesh_key == mesh and info.is_prober and info.can_ack_pings
            assert info.app_name == "derpkit-test" and info.version == 2
            head = conn.request_head.decode()
            assert head.startswith("GET /derp HTTP/1.1\r\n")
            assert f"Host: 127.0.0.1:{srv.port}\r\n" in head
            assert "Upgrade: DERP\r\n" in head and "Connection: Upgrade\r\n" in head
            assert "Derp-Fast-Start" not in head and "Ideal-Node" not in head
            assert c.server_info is None
            with pytest.raises(TimeoutError):
                await c.wait_server_info(timeout=0.1)
        finally:
            await c.close()


async def test_fast_start_sends_header_and_skips_late_server_key() -> None:
    async with FakeDerpServer() as srv:
        c = await DerpClient.connect(srv.url, server_key=srv.public_key, ideal_node="n1")
        try:
            head = srv.conns[0].request_head.decode()
            assert "Derp-Fast-Start: 1\r\n" in head and "Ideal-Node: n1\r\n" in head
            assert c.server_info == ServerInfo(version=2)
        finally:
            await c.close()


async def test_connect_waits_for_server_info_with_timeout() -> None:
    async with FakeDerpServer(send_server_info=False) as srv:
        with pytest.raises(DerpTimeoutError, match="ServerInfo"):
            await DerpClient.connect(srv.url, timeout=0.3)


async def test_non_101_reports_status_and_body() -> None:
    body = b"admission says no\n"
    refuse = (b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    async with FakeDerpServer(refuse=refuse) as srv:
        with pytest.raises(DerpUpgradeError) as ei:
            await DerpClient.connect(srv.url, timeout=3)
        assert ei.value.status == 403 and ei.value.body == body
        assert "403" in str(ei.value) and "admission says no" in str(ei.value)


async def test_bad_server_greeting_is_fatal() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n" + frame(0x06, b""))
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DerpConnectionError, match="invalid_server_greeting"):
            await DerpClient.connect(f"http://127.0.0.1:{port}/derp", timeout=3)
    finally:
        server.close()


async def test_server_key_with_a_bad_magic_is_fatal() -> None:
    """A ServerKey whose 8 magic bytes are not ``DERP🔑`` is no DERP server: the client
    refuses it (Go's client does the same) and says why, over a real socket."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        bad = frame(FrameType.SERVER_KEY, b"XERP\xf0\x9f\x94\x91" + NodePrivate.generate().public().raw)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\n\r\n" + bad)
        await writer.drain()
        await reader.read()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DerpConnectionError, match="bad magic"):
            await DerpClient.connect(f"http://127.0.0.1:{port}/derp", timeout=3)
    finally:
        server.close()


async def test_bad_server_info_box_is_fatal() -> None:
    async def handler(c: FakeConn) -> None:
        c.write(frame(FrameType.SERVER_INFO, bytes(24 + 16 + 13)))
        await c.reader.read()

    async with FakeDerpServer(handler, send_server_info=False) as srv:
        with pytest.raises(DerpConnectionError, match="ServerInfo"):
            await DerpClient.connect(srv.url, timeout=3)


# ------------------------------------------------------------------ receive loop


async def test_receive_loop_frame_handling() -> None:
    """Unknown types and a stray ServerKey are skipped; Ping is answered and delivered."""
    pongs: list[tuple[int, bytes]] = []
    k = NodePrivate.generate().public().raw

    async def handler(c: FakeConn) -> None:
        c.write(
            frame(0x7F, b"future frame")
            + ServerKey(c.client_key.raw).encode()
            + frame(FrameType.SEND_PACKET, k + b"x")  # a client-to-server type: skipped
            + KeepAlive().encode()
            + Ping(b"12345678").encode()
            + frame(FrameType.PEER_GONE, k)  # old 32-byte form: Disconnected
            + frame(FrameType.PEER_GONE, k + b"\x01extra")
            + frame(FrameType.PEER_GONE, k[:10])  # too short: ignored
            + frame(FrameType.PEER_PRESENT, k)  # key only (old server)
            + frame(FrameType.PEER_PRESENT, k + bytes(18))  # 50-byte form: no flags
            + frame(FrameType.RECV_PACKET, b"short")  # < 32 bytes: ignored
            + frame(FrameType.RECV_PACKET, k + b"payload")
            + Health("BAD").encode()
            + Health("").encode()
            + Restarting(1, 2).encode()
        )
        pongs.append(await c.read_frame())
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        async with await DerpClient.connect(srv.url) as c:
            got = [await c.recv(timeout=3) for _ in range(10)]
            assert got[0] == KeepAlive()
            assert got[1] == Ping(b"12345678")
            assert got[2] == PeerGone(k, 0) and got[3] == PeerGone(k, 1)
            assert got[4] == PeerPresent(k)
            assert isinstance(got[5], PeerPresent) and got[5].flags == 0 and str(got[5].ip) == "::"
            assert got[6] == RecvPacket(k, b"payload")
            assert got[7:] == [Health("BAD"), Health(""), Restarting(1, 2)]
            await wait_until(lambda: bool(pongs))
            assert pongs == [(FrameType.PONG, b"12345678")]


async def test_ping_not_answered_when_client_cannot_ack() -> None:
    got: list[tuple[int, bytes]] = []

    async def handler(c: FakeConn) -> None:
        c.write(Ping(b"abcdefgh").encode())
        try:
            got.append(await c.read_frame(timeout=0.3))
        except TimeoutError:
            pass
        c.write(KeepAlive().encode())
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        async with await DerpClient.connect(srv.url, can_ack_pings=False) as c:
            assert srv.conns[0].client_info.can_ack_pings is False
            assert await c.recv(timeout=3) == Ping(b"abcdefgh")
            assert await c.recv(timeout=3) == KeepAlive()
            assert got == []


async def test_oversized_frame_is_fatal_and_sticky() -> None:
    async def handler(c: FakeConn) -> None:
        c.write(KeepAlive().encode() + header(FrameType.RECV_PACKET, (1 << 20) + 1))
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        c = await DerpClient.connect(srv.url)
        # Frames that arrived before the error are still delivered.
        assert await c.recv(timeout=3) == KeepAlive()
        for _ in range(2):
            with pytest.raises(DerpConnectionError, match="large frame"):
                await c.recv(timeout=3)
        assert c.closed


async def test_read_timeout_kills_silent_connection() -> None:
    async with FakeDerpServer() as srv:
        c = await DerpClient.connect(srv.url, read_timeout=0.3)
        start = time.monotonic()
        with pytest.raises(DerpTimeoutError, match="no frame"):
            await c.recv(timeout=5)
        assert 0.25 < time.monotonic() - start < 3


async def test_keepalives_keep_connection_alive() -> None:
    async def handler(c: FakeConn) -> None:
        for _ in range(6):
            await asyncio.sleep(0.1)
            c.write(KeepAlive().encode())
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        async with await DerpClient.connect(srv.url, read_timeout=0.35) as c:
            for _ in range(6):
                assert await c.recv(timeout=2) == KeepAlive()


async def test_advisory_rate_limit_drops_silently() -> None:
    received: list[tuple[int, bytes]] = []

    async def handler(c: FakeConn) -> None:
        while True:
            received.append(await c.read_frame(timeout=5))

    info = ServerInfo(version=2, token_bucket_bytes_per_second=1, token_bucket_bytes_burst=300)
    async with FakeDerpServer(handler, server_info=info) as srv:
        async with await DerpClient.connect(srv.url) as c:
            dst = NodePrivate.generate().public()
            for _ in range(5):
                await c.send(dst, bytes(100))  # 137 bytes each: two fit in the burst
            await c.send_ping(b"zzzzzzzz")  # pings are not limited: marks the end
            await wait_until(lambda: bool(received) and received[-1][0] == FrameType.PING)
            assert c.rate_limited_drops == 3
            sends = [f for f in received if f[0] == FrameType.SEND_PACKET]
            assert len(sends) == 2


async def test_recv_timeout_does_not_break_connection() -> None:
    async def handler(c: FakeConn) -> None:
        await asyncio.sleep(0.3)
        c.write(KeepAlive().encode())
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        async with await DerpClient.connect(srv.url) as c:
            with pytest.raises(TimeoutError):
                await c.recv(timeout=0.05)
            assert not c.closed
            assert await c.recv(timeout=3) == KeepAlive()


async def test_async_iteration_ends_on_close() -> None:
    async def handler(c: FakeConn) -> None:
        c.write(KeepAlive().encode() * 3)
        await c.reader.read()

    async with FakeDerpServer(handler) as srv:
        c = await DerpClient.connect(srv.url)
        n = 0
        async for f in c:
            assert f == KeepAlive()
            n += 1
            if n == 3:
                await c.close()
        assert n == 3


# ------------------------------------------------------------------ reconnecting


async def test_reconnecting_client_honours_restarting() -> None:
    """Restarting(reconnect_in=300 ms, try_for=3 s): wait, then retry until it is back."""

    async def handler(c: FakeConn) -> None:
        c.write(Restarting(300, 3000).encode())
        await c.writer.drain()
        await asyncio.sleep(0.05)
        c.writer.close()

    srv = await FakeDerpServer(handler).start()
    port = srv.port
    rc = ReconnectingClient(srv.url, timeout=1)
    try:
        assert await rc.recv(timeout=3) == Restarting(300, 3000)
        t0 = time.monotonic()
        with pytest.raises(DerpConnectionError):
            await rc.recv(timeout=3)
        await srv.stop()  # the server is "restarting": refuse connections for a while

        async def come_back() -> FakeDerpServer:
            await asyncio.sleep(0.6)
            return await FakeDerpServer().start(port)

        back_task = asyncio.ensure_future(come_back())
        c = await rc.connect()  # keeps dialling through refusals inside try_for
        back = await back_task
        try:
            assert time.monotonic() - t0 >= 0.55
            assert rc.generation == 2 and c.server_key == back.public_key
            assert rc.failures == 0
        finally:
            await back.stop()
    finally:
        await rc.close()
        await srv.stop()


async def test_reconnecting_client_gives_up_after_try_for() -> None:
    async def handler(c: FakeConn) -> None:
        c.write(Restarting(0, 300).encode())
        await c.writer.drain()
        c.writer.close()

    srv = await FakeDerpServer(handler).start()
    rc = ReconnectingClient(srv.url, timeout=1)
    try:
        await rc.recv(timeout=3)
        with pytest.raises(DerpConnectionError):
            await rc.recv(timeout=3)
        await srv.stop()
        t0 = time.monotonic()
        with pytest.raises(DerpConnectionError):
            await rc.connect()
        assert 0.25 < time.monotonic() - t0 < 2.5
    finally:
        await rc.close()


async def test_reconnecting_client_resends_preferred_and_watch() -> None:
    seen: list[list[tuple[int, bytes]]] = []

    async def handler(c: FakeConn) -> None:
        frames = [await c.read_frame(), await c.read_frame()]
        seen.append(frames)
        c.writer.close()

    async with FakeDerpServer(handler) as srv:
        rc = ReconnectingClient(srv.url, timeout=2, mesh_key=MeshKey.generate())
        try:
            await rc.note_preferred(True)
            await rc.watch_conns()  # connects (sending preferred), then sends WatchConns
            with pytest.raises(DerpConnectionError):
                await rc.recv(timeout=3)
            await rc.connect()  # reconnect sends both in the hello
            await wait_until(lambda: len(seen) >= 2)
            assert seen[0] == [(FrameType.NOTE_PREFERRED, b"\x01"), (FrameType.WATCH_CONNS, b"")]
            assert seen[1] == seen[0]
        finally:
            await rc.close()


async def test_reconnect_backoff_over_real_connections_grows_then_resets() -> None:
    """Spec §8.4 on a real loopback port: refused dials wait min(n² × 10 ms, 5 s) × U[0.5, 1.5)
    with n growing; once a real derpkit server appears on the port the dial succeeds and n
    goes back to 0, so the wait after the next break is the first step's again.

    A seeded ``rng`` makes the jitter reproducible, so each wait is compared exactly with
    ``backoff_delay``; elapsed time is only checked from below (the wait really happened).
    """
    import socket

    from derpkit.server.node import DerpNode

    with socket.socket() as s:  # a loopback port with nobody listening: dials are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    seed = 7
    rc = ReconnectingClient(f"http://127.0.0.1:{port}/derp", backoff=True, rng=random.Random(seed), timeout=2)
    expect = random.Random(seed)
    loop = asyncio.get_running_loop()
    for n in range(4):
        t0 = loop.time()
        with pytest.raises(DerpConnectionError):
            await rc.connect()
        assert rc.failures == n + 1
        if n:
            want = backoff_delay(n, expect)
            assert rc.delays[-1] == want and 0.005 * n * n <= want < 0.015 * n * n
            assert loop.time() - t0 >= want * 0.99
    assert len(rc.delays) == 3 and rc.delays == sorted(rc.delays)  # bands grow: 5-15, 20-60, 45-135 ms

    node = DerpNode(port=port, stun_port=None)
    await node.start()
    try:
        c = await rc.connect()  # waits backoff_delay(4), then a real handshake
        assert rc.delays[-1] == backoff_delay(4, expect)
        assert rc.failures == 0 and rc.generation == 1
        assert c.server_key == node.public_key
        await rc.ping()
    finally:
        await node.stop()
    with pytest.raises(DerpConnectionError):  # the server went away under us
        async with asyncio.timeout(5):
            while True:
                await rc.recv()
    assert rc.failures == 1
    node = DerpNode(port=port, stun_port=None, private_key=node.private_key)
    await node.start()
    try:
        await rc.connect()
        assert rc.delays[-1] == backoff_delay(1, expect)  # reset: the first step's wait again
        assert rc.failures == 0 and rc.generation == 2
    finally:
        await rc.close()
        await node.stop()
