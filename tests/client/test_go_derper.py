"""DerpClient against Tailscale's real Go derper over loopback.

derper is the reference implementation, so every behaviour checked here is the wire truth
our client must cope with. Each test is bounded by short timeouts; nothing waits for
derper's 60 s keepalives.
"""

from __future__ import annotations

import asyncio
import os
import ssl

import pytest

from derpkit.client import (
    DerpCertificateError,
    DerpClient,
    DerpConnectionError,
    DerpUpgradeError,
    ReconnectingClient,
)
from derpkit.protocol.constants import (
    DISCO_MAGIC,
    MAX_PACKET_SIZE,
    PeerGoneReason,
    PeerPresentFlags,
)
from derpkit.protocol.frames import PeerGone, PeerPresent, RecvPacket
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic
from tests.goderper import derper_fixture
from tests.server.helpers import nothing_arrives

pytestmark = pytest.mark.interop

MESH_HEX = "5eed" * 16

derper = derper_fixture(scope="module", mesh_key_hex=MESH_HEX)
derper_tls = derper_fixture(tls=True, scope="module")
derper_own = derper_fixture()  # for tests that kill or restart it


def disco_packet() -> bytes:
    """Looks like disco to the server: magic + 32-byte key + 24-byte nonce + body."""
    return DISCO_MAGIC + os.urandom(32 + 24 + 8)


async def recv_kind(c: DerpClient, kind: type, timeout: float = 3.0):
    """Next frame of ``kind``, skipping others (KeepAlive, say)."""
    async with asyncio.timeout(timeout):
        while True:
            f = await c.recv()
            if isinstance(f, kind):
                return f


# ------------------------------------------------------------------ handshake / transport


async def test_plain_http_handshake(derper) -> None:
    async with await DerpClient.connect(derper.url) as c:
        assert c.server_info is not None and c.server_info.version == 2
        assert c.server_info.token_bucket_bytes_per_second == 0
        assert c.server_key == derper.public_key
        assert not c.closed
    assert c.closed


async def test_tls_with_certname_pin(derper_tls) -> None:
    assert derper_tls.cert_name and derper_tls.cert_name.startswith("sha256-raw:")
    async with await DerpClient.connect(derper_tls.url, cert_name=derper_tls.cert_name) as c:
        assert c.server_info.version == 2
        assert c.server_key == derper_tls.public_key


async def test_tls_wrong_pin_is_refused_naming_both_hashes(derper_tls) -> None:
    wrong = "sha256-raw:" + "00" * 32
    with pytest.raises(DerpCertificateError) as ei:
        await DerpClient.connect(derper_tls.url, cert_name=wrong)
    msg = str(ei.value)
    assert wrong in msg and derper_tls.cert_name in msg


async def test_tls_wrong_pin_is_refused_over_websocket(derper_tls) -> None:
    wrong = "sha256-raw:" + "11" * 32
    with pytest.raises(DerpCertificateError) as ei:
        await DerpClient.connect(derper_tls.url, cert_name=wrong, websocket=True)
    assert wrong in str(ei.value) and derper_tls.cert_name in str(ei.value)


async def test_tls_self_signed_fails_default_verification(derper_tls) -> None:
    with pytest.raises(DerpCertificateError, match="verif"):
        await DerpClient.connect(derper_tls.url)


async def test_tls_insecure(derper_tls) -> None:
    async with await DerpClient.connect(derper_tls.url, insecure_tls=True) as c:
        assert c.server_key == derper_tls.public_key


async def test_tls_certname_as_server_name(derper_tls) -> None:
    """A non-pin CertName is the name checked against the chain (and sent as SNI)."""
    ctx = ssl.create_default_context(cafile=str(derper_tls.workdir / "127.0.0.1.crt"))
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # trust the self-signed leaf itself
    async with await DerpClient.connect(
        derper_tls.url, cert_name="127.0.0.1", ssl_context=ctx
    ) as c:
        assert c.server_key == derper_tls.public_key
    with pytest.raises(DerpCertificateError):
        await DerpClient.connect(derper_tls.url, cert_name="derp.example.com", ssl_context=ctx)


async def test_dial_host_keeps_url_host(derper_tls) -> None:
    """`-mesh-with host/dialhost`: TCP to the dial host, TLS/Host from the URL."""
    url = f"https://derp.invalid:{derper_tls.port}/derp"
    async with await DerpClient.connect(
        url, dial_host="127.0.0.1", cert_name=derper_tls.cert_name
    ) as c:
        assert c.server_key == derper_tls.public_key


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_websocket_exchange(derper, derper_tls, tls: bool) -> None:
    d = derper_tls if tls else derper
    a = await DerpClient.connect(d.url, websocket=True, cert_name=d.cert_name)
    b = await DerpClient.connect(d.url, websocket=True, cert_name=d.cert_name)
    try:
        assert a.server_info.version == 2 and a.server_key == d.public_key
        await a.send(b.public_key, b"over websocket")
        f = await recv_kind(b, RecvPacket)
        assert f.src == a.public_key.raw and f.data == b"over websocket"
        # 65 536 bytes must be split into messages of at most 32 KiB or Go closes (1009).
        big = os.urandom(MAX_PACKET_SIZE)
        await b.send(a.public_key, big)
        f = await recv_kind(a, RecvPacket)
        assert f.src == b.public_key.raw and f.data == big
        assert 0 <= await a.ping() < 2
    finally:
        await a.close()
        await b.close()


async def test_upgrade_refused_reports_status(derper) -> None:
    with pytest.raises(DerpUpgradeError) as ei:
        await DerpClient.connect(derper.base_url + "/derp/probe")
    assert ei.value.status == 200
    assert "200" in str(ei.value)


async def test_connection_refused_is_a_connection_error() -> None:
    from tests.goderper import free_port

    with pytest.raises(DerpConnectionError):
        await DerpClient.connect(f"http://127.0.0.1:{free_port()}/derp", timeout=3)


# ------------------------------------------------------------------ packets


async def test_two_clients_exchange_packets_both_ways(derper) -> None:
    a = await DerpClient.connect(derper.url)
    b = await DerpClient.connect(derper.url)
    try:
        for i in range(20):
            await a.send(b.public_key, b"a->b %d" % i)
            await b.send(a.public_key.raw, b"b->a %d" % i)
        for i in range(20):
            f = await recv_kind(b, RecvPacket)
            assert (f.src, f.data) == (a.public_key.raw, b"a->b %d" % i)
            g = await recv_kind(a, RecvPacket)
            assert (g.src, g.data) == (b.public_key.raw, b"b->a %d" % i)
    finally:
        await a.close()
        await b.close()


async def test_empty_and_maximum_packets(derper) -> None:
    a = await DerpClient.connect(derper.url)
    b = await DerpClient.connect(derper.url)
    try:
        big = os.urandom(MAX_PACKET_SIZE)
        await a.send(b.public_key, b"")
        await a.send(b.public_key, big)
        assert (await recv_kind(b, RecvPacket)).data == b""
        assert (await recv_kind(b, RecvPacket)).data == big
        with pytest.raises(ValueError):
            await a.send(b.public_key, big + b"x")
        # Sending to yourself is legal.
        await a.send(a.public_key, b"me")
        assert (await recv_kind(a, RecvPacket)).data == b"me"
    finally:
        await a.close()
        await b.close()


async def test_burst_of_packets_arrives_in_order(derper) -> None:
    a = await DerpClient.connect(derper.url)
    b = await DerpClient.connect(derper.url)
    try:
        # Below the server's 32-packet queue so none may be dropped even if b is slow.
        for i in range(30):
            await a.send(b.public_key, i.to_bytes(4, "big") * 100)
        got = [int.from_bytes((await recv_kind(b, RecvPacket)).data[:4], "big") for _ in range(30)]
        assert got == list(range(30))
    finally:
        await a.close()
        await b.close()


async def test_ping_rtt(derper) -> None:
    async with await DerpClient.connect(derper.url) as c:
        rtts = [await c.ping(timeout=2) for _ in range(5)]
        assert all(0 < r < 2 for r in rtts)
        # The Pongs were consumed by ping(), not queued for recv().
        assert await nothing_arrives(c, object, within=0.2)


# ------------------------------------------------------------------ PeerGone


async def test_peer_gone_disconnected_to_past_receivers_only(derper) -> None:
    a = await DerpClient.connect(derper.url)
    b = await DerpClient.connect(derper.url)
    c = await DerpClient.connect(derper.url)
    try:
        await a.send(b.public_key, b"hello b")  # b received from a
        await recv_kind(b, RecvPacket)
        await c.send(a.public_key, b"hello a")  # c only sent to a
        await recv_kind(a, RecvPacket)
        await a.close()
        gone = await recv_kind(b, PeerGone)
        assert gone.key == a.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        assert await nothing_arrives(c, PeerGone)
    finally:
        await b.close()
        await c.close()


async def test_peer_gone_not_here_for_disco_to_unknown_key(derper) -> None:
    async with await DerpClient.connect(derper.url) as a:
        unknown = NodePrivate.generate().public()
        await a.send(unknown, b"not disco, no reply")
        for _ in range(6):
            await a.send(unknown, disco_packet())
        frames = []
        try:
            async with asyncio.timeout(0.5):  # well under the 1/s refill
                while True:
                    frames.append(await a.recv())
        except TimeoutError:
            pass
        gone = [f for f in frames if isinstance(f, PeerGone)]
        assert len(gone) == 3, frames
        assert all(g.key == unknown.raw and g.reason == PeerGoneReason.NOT_HERE for g in gone)


# ------------------------------------------------------------------ mesh


async def test_mesh_watcher_sees_present_and_gone(derper) -> None:
    mesh = MeshKey.parse(MESH_HEX)
    w = await DerpClient.connect(derper.url, mesh_key=mesh, watch_conns=True)
    try:
        # Initial flood includes the watcher itself, flagged as a mesh peer.
        me = await recv_kind(w, PeerPresent)
        while me.key != w.public_key.raw:
            me = await recv_kind(w, PeerPresent)
        assert me.flags == PeerPresentFlags.IS_MESH_PEER
        assert str(me.ip) == "127.0.0.1" and me.port == w.local_address[1]

        b = await DerpClient.connect(derper.url)
        p = await recv_kind(w, PeerPresent)
        while p.key != b.public_key.raw:
            p = await recv_kind(w, PeerPresent)
        assert p.flags == PeerPresentFlags.IS_REGULAR
        assert str(p.ip) == "127.0.0.1" and p.port == b.local_address[1]

        pr = await DerpClient.connect(derper.url, is_prober=True, ideal_node="node1")
        p = await recv_kind(w, PeerPresent)
        while p.key != pr.public_key.raw:
            p = await recv_kind(w, PeerPresent)
        assert p.flags == PeerPresentFlags.IS_PROBER | PeerPresentFlags.NOT_IDEAL

        await b.close()
        g = await recv_kind(w, PeerGone)
        while g.key != b.public_key.raw:
            g = await recv_kind(w, PeerGone)
        assert g.reason == PeerGoneReason.DISCONNECTED
        await pr.close()
    finally:
        await w.close()


async def test_mesh_forward_packet_and_close_peer(derper) -> None:
    mesh = MeshKey.parse(MESH_HEX)
    m = await DerpClient.connect(derper.url, mesh_key=mesh)
    b = await DerpClient.connect(derper.url)
    try:
        origin = NodePrivate.generate().public()
        await m.forward_packet(origin, b.public_key, b"via mesh")
        f = await recv_kind(b, RecvPacket)
        assert f.src == origin.raw and f.data == b"via mesh"
        await m.close_peer(b.public_key)
        with pytest.raises(DerpConnectionError):
            await recv_kind(b, RecvPacket)
        assert b.closed
    finally:
        await m.close()
        await b.close()


async def test_wrong_mesh_key_connects_but_watch_conns_disconnects(derper) -> None:
    wrong = MeshKey.parse("00ff" * 16)
    c = await DerpClient.connect(derper.url, mesh_key=wrong)
    assert c.server_info.version == 2  # a wrong key is just a regular client
    await c.watch_conns()
    with pytest.raises(DerpConnectionError, match="closed"):
        await recv_kind(c, PeerPresent)
    # The error is sticky.
    with pytest.raises(DerpConnectionError):
        await c.recv(timeout=1)
    with pytest.raises(DerpConnectionError):
        await c.send(c.public_key, b"x")


# ------------------------------------------------------------------ fast start, reconnect


async def test_fast_start_with_known_server_key(derper) -> None:
    a = await DerpClient.connect(derper.url, server_key=derper.public_key, preferred=True)
    b = await DerpClient.connect(derper.url, server_key=derper.public_key)
    try:
        assert a.server_info.version == 2
        await a.send(b.public_key, b"fast")
        f = await recv_kind(b, RecvPacket)
        assert f.src == a.public_key.raw and f.data == b"fast"
    finally:
        await a.close()
        await b.close()


async def test_fast_start_with_wrong_server_key_is_explained(derper) -> None:
    bogus = NodePrivate.generate().public()
    with pytest.raises(DerpConnectionError, match="server's key is"):
        await DerpClient.connect(derper.url, server_key=bogus, timeout=5)


async def test_reconnect_after_server_restart(derper_own) -> None:
    key = NodePrivate.generate()
    rc = ReconnectingClient(derper_own.url, private_key=key, timeout=3)
    try:
        first = await rc.connect()
        server_key = first.server_key
        assert rc.generation == 1
        derper_own.stop()
        with pytest.raises(DerpConnectionError):
            await rc.recv(timeout=5)
        derper_own.start()
        peer = await DerpClient.connect(derper_own.url)
        try:
            await rc.send(peer.public_key, b"back again")  # reconnects lazily
            assert rc.generation == 2
            assert rc.server_key == server_key  # same -c key file, same identity
            assert rc.public_key == NodePublic(key.public().raw)
            f = await recv_kind(peer, RecvPacket)
            assert f.src == key.public().raw and f.data == b"back again"
            await peer.send(rc.public_key, b"reply")
            f = await rc.recv(timeout=3)
            assert isinstance(f, RecvPacket) and f.data == b"reply"
        finally:
            await peer.close()
    finally:
        await rc.close()


def test_under_uvloop(derper) -> None:
    """The server and benchmarks run on uvloop; its transports must behave the same."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> float:
        a = await DerpClient.connect(derper.url)
        b = await DerpClient.connect(derper.url)
        try:
            await a.send(b.public_key, b"uv")
            f = await recv_kind(b, RecvPacket)
            assert f.src == a.public_key.raw and f.data == b"uv"
            return await a.ping()
        finally:
            await a.close()
            await b.close()

    rtt = uvloop.run(main())
    assert 0 < rtt < 2  # a zero would mean a millisecond-resolution clock was used


async def test_go_websocket_read_limit_is_32k(derper) -> None:
    """Why the client splits writes: Go closes with 1009 on a 32 769-byte message."""
    import aiohttp

    from derpkit.protocol import handshake
    from derpkit.protocol.frames import FrameReader, decode_server_key, encode_send_packet

    async with aiohttp.ClientSession() as s:
        for size, closes in ((32768, False), (32769, True)):
            ws = await s.ws_connect(derper.url, protocols=("derp",))
            try:
                first = await ws.receive(timeout=3)
                sk = NodePublic(decode_server_key(*FrameReader().feed(first.data)[0]).key)
                k = NodePrivate.generate()
                info = handshake.ClientInfo(can_ack_pings=True)
                await ws.send_bytes(handshake.client_info_frame(k, sk, info))
                await ws.receive(timeout=3)  # ServerInfo
                await ws.send_bytes(encode_send_packet(k.public().raw, bytes(size - 37)))
                msg = await ws.receive(timeout=3)
                if closes:
                    assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1009
                else:
                    assert msg.type == aiohttp.WSMsgType.BINARY  # our packet, echoed
            finally:
                await ws.close()
