"""Our client against Go derper over TLS with a CA-signed ``localhost`` certificate.

tests/client/test_go_derper.py already covers the self-signed IP certificate (CertName pins,
WebSocket, mesh frames, restart). What it lacks, and this adds: ordinary chain-and-name
verification against a CA, TLS 1.3 fast start through derper's meta-certificate, and every
claim checked against Go's own counters (/debug/varz) rather than only our side.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol import frames as F
from tests.goderper import start_derper

from .helpers import recv_packet, tls_varz
from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def go_tls(tmp_path_factory, test_ca: TestCA, localhost_leaf: Leaf):  # noqa: ANN201
    d = start_derper(tmp_path_factory.mktemp("derper"), tls=True, hostname="localhost",
                     certdir=test_ca.dir)
    try:
        yield d
    finally:
        d.stop()


def varz(d, ca: TestCA) -> dict[str, float]:  # noqa: ANN001
    return tls_varz(d.base_url, ca)


async def test_tls_session_counted_by_go(go_tls, test_ca: TestCA) -> None:
    ctx = test_ca.client_context()
    before = varz(go_tls, test_ca)
    a = await DerpClient.connect(go_tls.url, ssl_context=ctx)
    b = await DerpClient.connect(go_tls.url, ssl_context=ctx)
    try:
        assert go_tls.url.startswith("https://localhost:")
        info = await a.wait_server_info(timeout=5)
        assert info.version == 2 and a.server_key == go_tls.public_key
        await a.send(b.public_key, b"over tls")
        got = await recv_packet(b)
        assert got.src == a.public_key.raw and got.data == b"over tls"
        await b.send(a.public_key, b"back")
        assert (await recv_packet(a)).data == b"back"
        rtt = await a.ping(timeout=3)
        assert 0 < rtt < 3
        after = varz(go_tls, test_ca)
        assert after["derp_accepts"] - before["derp_accepts"] == 2
        assert after["derp_packets_received"] - before["derp_packets_received"] == 2
        assert after["derp_packets_sent"] - before["derp_packets_sent"] == 2
        assert after["derp_got_ping"] - before["derp_got_ping"] == 1
        assert after["derp_sent_pong"] - before["derp_sent_pong"] == 1
        assert after["derp_current_connections"] == 2
    finally:
        await a.close()
        await b.close()


async def test_fast_start_over_tls_with_known_key(go_tls, test_ca: TestCA) -> None:
    """``Derp-Fast-Start: 1`` over TLS with the key given up front (from a DERP map or an
    earlier connection): Go writes no 101, and the session still works."""
    before = varz(go_tls, test_ca)
    c = await DerpClient.connect(go_tls.url, ssl_context=test_ca.client_context(),
                                 server_key=go_tls.public_key)
    other = await DerpClient.connect(go_tls.url, ssl_context=test_ca.client_context())
    try:
        assert (await c.wait_server_info(timeout=5)).version == 2
        await other.send(c.public_key, b"x")
        f = await recv_packet(c)
        assert isinstance(f, F.RecvPacket) and f.data == b"x"
        assert varz(go_tls, test_ca)["derp_accepts"] - before["derp_accepts"] == 2
    finally:
        await other.close()
        await c.close()


async def test_wrong_host_name_is_refused(go_tls, test_ca: TestCA) -> None:
    """127.0.0.1 is in the certificate, but derper's manual cert mode wants SNI 'localhost'."""
    with pytest.raises(DerpConnectionError):
        await DerpClient.connect(f"https://127.0.0.1:{go_tls.port}/derp",
                                 ssl_context=test_ca.client_context())
    assert "cert mismatch with hostname" in go_tls.log()


async def test_key_read_from_go_meta_certificate_enables_fast_start(go_tls, test_ca: TestCA) -> None:
    """Without a known key our client reads Go derper's TLS meta-certificate (TLS 1.3, as
    Go's own client does) and uses fast start; over TLS 1.2 it does the ordinary upgrade."""
    before = varz(go_tls, test_ca)
    c = await DerpClient.connect(go_tls.url, ssl_context=test_ca.client_context())
    ctx12 = test_ca.client_context()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    old = await DerpClient.connect(go_tls.url, ssl_context=ctx12)
    try:
        assert c.fast_start and c.server_key == go_tls.public_key
        assert not old.fast_start and old.server_key == go_tls.public_key
        await old.send(c.public_key, b"to the fast one")
        assert (await recv_packet(c)).data == b"to the fast one"
        await c.send(old.public_key, b"back")
        assert (await recv_packet(old)).data == b"back"
        assert varz(go_tls, test_ca)["derp_accepts"] - before["derp_accepts"] == 2
    finally:
        await c.close()
        await old.close()


async def test_note_preferred_moves_gos_home_connection_gauge(go_tls, test_ca: TestCA) -> None:
    """Go derper reads our NotePreferred: its ``derp_current_home_connections`` gauge rises
    for a client that says "this is my home" (pipelined with fast start, or sent later on an
    open connection), does not for one that never says it, and falls when it says "no
    longer"."""
    ctx = test_ca.client_context()

    async def home() -> float:
        # The frame is handled by derper's reader goroutine: poll briefly, bounded.
        return varz(go_tls, test_ca)["derp_current_home_connections"]

    async def settles_at(want: float) -> float:
        got = await home()
        for _ in range(40):
            if got == want:
                break
            await asyncio.sleep(0.05)
            got = await home()
        return got

    base = await home()
    plain = await DerpClient.connect(go_tls.url, ssl_context=ctx)
    fast_home = await DerpClient.connect(go_tls.url, ssl_context=ctx, server_key=go_tls.public_key,
                                         preferred=True)
    later = await DerpClient.connect(go_tls.url, ssl_context=ctx)
    try:
        assert await settles_at(base + 1) == base + 1  # only the preferred one counts
        await later.note_preferred(True)
        assert await settles_at(base + 2) == base + 2
        await fast_home.note_preferred(False)
        assert await settles_at(base + 1) == base + 1
        await plain.send(later.public_key, b"still relaying")
        assert (await recv_packet(later)).data == b"still relaying"
    finally:
        for c in (plain, fast_home, later):
            await c.close()
