"""Accept limiter and socket options: the token bucket, TLS-listener behaviour, getsockopt.

Everything runs on loopback against a real ``DerpNode``: the limiter must close a
rejected TCP connection before any TLS work, count it under derper's metric names, and
keep serving (spec derper-cli §11 Q1: derper itself exits on the first rejection).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import math
import socket
import ssl
import tempfile

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from derpkit.client import DerpClient
from derpkit.server.frontdoor.limits import AcceptLimiter, ConnectionControls, tune_socket
from derpkit.server.node import DerpNode, NodeOptions

from .helpers import exchange

TCP_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None)


def self_signed_context() -> ssl.SSLContext:
    """A throwaway server certificate for 127.0.0.1 (the cert module is not under test)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    d = tempfile.mkdtemp(prefix="derpkit-limits-")
    with open(f"{d}/c.pem", "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(f"{d}/k.pem", "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
    return ctx


def insecure_client_ctx() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


# ------------------------------------------------------------------------ token bucket

def test_bucket_starts_full_then_refills_at_the_limit() -> None:
    clock = FakeClock()
    lim = AcceptLimiter(2.0, 3, clock=clock)
    assert [lim.allow() for _ in range(4)] == [True, True, True, False]
    clock.t += 0.49
    assert not lim.allow()
    clock.t += 0.02  # 0.51 s at 2/s: one token
    assert lim.allow()
    assert not lim.allow()
    clock.t += 100  # capped at the burst
    assert [lim.allow() for _ in range(4)] == [True, True, True, False]
    assert (lim.accepted, lim.rejected) == (7, 4)


def test_infinite_limit_ignores_burst_and_zero_limit_spends_only_the_burst() -> None:
    lim = AcceptLimiter(math.inf, 0)
    assert all(lim.allow() for _ in range(1000))
    clock = FakeClock()
    zero = AcceptLimiter(0.0, 2, clock=clock)
    clock.t += 1e6
    assert [zero.allow() for _ in range(3)] == [True, True, False]
    neg = AcceptLimiter(-1.0, 5, clock=clock)
    assert not neg.allow()


def test_metric_names_are_derpers() -> None:
    lim = AcceptLimiter(math.inf, 1)
    lim.allow()
    names = {f.name: f for f in lim.families()}
    assert set(names) == {"tls_listener_accepted_connections", "tls_listener_rejected_connections"}
    assert names["tls_listener_accepted_connections"].type == "counter"
    assert names["tls_listener_accepted_connections"].samples == [({}, 1)]


# ------------------------------------------------------------------------ TLS listener

async def _raw_fate(port: int, wait: float = 0.4) -> str:
    """Open a bare TCP connection (no ClientHello): 'closed' if the server drops it at once."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = await asyncio.wait_for(r.read(1), wait)
        return "closed" if not data else "data"
    except TimeoutError:
        return "open"
    except ConnectionError:
        return "closed"
    finally:
        w.close()


async def test_tls_listener_rejects_before_tls_counts_and_keeps_serving() -> None:
    lim = AcceptLimiter(4.0, 2)
    controls = ConnectionControls(lim)
    opts = NodeOptions(stun_port=None, ssl_context=self_signed_context(), on_connect=controls.on_connect,
                       extra_metrics=[lim.families])
    async with DerpNode(opts) as node:
        # Two tokens: two bare TCP connections stay open waiting for a ClientHello, the
        # third is closed before any TLS byte was exchanged.
        fates = [await _raw_fate(node.port, 0.1) for _ in range(3)]
        assert fates == ["open", "open", "closed"]
        assert (lim.accepted, lim.rejected) == (2, 1)
        # Still serving: after a refill a real DERP client over TLS connects and relays.
        await asyncio.sleep(0.6)
        a = await DerpClient.connect(node.url, insecure_tls=True)
        await asyncio.sleep(0.3)
        b = await DerpClient.connect(node.url, insecure_tls=True)
        try:
            await exchange(a, b, 1)
        finally:
            await a.close()
            await b.close()
        await asyncio.sleep(0.3)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{node.port}/debug/varz", ssl=insecure_client_ctx()) as r:
                text = await r.text()
        assert "tls_listener_accepted_connections 5" in text
        assert "tls_listener_rejected_connections 1" in text


async def test_tls_handshake_rejected_client_sees_reset_not_a_hang() -> None:
    clock = FakeClock()
    lim = AcceptLimiter(1.0, 1, clock=clock)
    opts = NodeOptions(stun_port=None, ssl_context=self_signed_context(),
                       on_connect=ConnectionControls(lim).on_connect)
    async with DerpNode(opts) as node:
        r, w = await asyncio.open_connection("127.0.0.1", node.port, ssl=insecure_client_ctx())
        w.close()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            async with asyncio.timeout(3):
                await asyncio.open_connection("127.0.0.1", node.port, ssl=insecure_client_ctx())
        assert loop.time() - t0 < 1.0
        assert lim.rejected == 1


async def test_plain_node_without_limiter_is_unlimited() -> None:
    async with DerpNode(NodeOptions(stun_port=None, on_connect=ConnectionControls(None).on_connect)) as node:
        fates = await asyncio.gather(*(_raw_fate(node.port, 0.2) for _ in range(20)))
        assert set(fates) == {"open"}


# ------------------------------------------------------------------------ socket options

def _server_sock(node: DerpNode):  # noqa: ANN202
    (conn,) = list(node.server.conns)
    return conn.transport.get_extra_info("socket")


@pytest.mark.parametrize("tls", [False, True])
async def test_socket_options_on_accepted_derp_connection(tls: bool) -> None:
    controls = ConnectionControls(None, keepalive_time=123.0, user_timeout=7.5)
    opts = NodeOptions(stun_port=None, on_connect=controls.on_connect,
                       ssl_context=self_signed_context() if tls else None)
    async with DerpNode(opts) as node:
        c = await DerpClient.connect(node.url, insecure_tls=True)
        try:
            s = _server_sock(node)
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert s.getsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE) == 123
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 15
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            await c.close()


def test_tune_socket_keepalive_off_and_go_default_idle() -> None:
    with socket.socket() as s:
        tune_socket(s, -1.0, 0.0)
        assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
    with socket.socket() as s:
        tune_socket(s, 0.0, 15.0)  # 0 means Go's 15 s default idle
        assert s.getsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE) == 15
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 15000
    with socket.socket() as s:
        tune_socket(s, 1.2, 0.0015)  # Go rounds idle up to whole seconds, ms truncated
        assert s.getsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE) == 2
        assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 1
