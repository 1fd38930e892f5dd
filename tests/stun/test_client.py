"""The asyncio STUN client against real loopback sockets: derpkit's own STUN server, and a tiny
scripted UDP responder built from the codec for the misbehaviours a real server never shows
(garbage, foreign ids, late and duplicate replies, error responses, looped requests).

ICMP port unreachable is real too: requests go to a loopback UDP port nobody has bound, and
the kernel's answer must surface as :class:`StunUnreachable` long before the timeout.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from derpkit.server.stun import StunServer, start_stun_server
from derpkit.stun import codec
from derpkit.stun.client import (
    StunBadReply,
    StunClientError,
    StunEndpoint,
    StunErrorResponse,
    StunLookupError,
    StunSendError,
    StunTimeout,
    StunTxidMismatch,
    StunUnreachable,
    query,
    resolve,
)

pytestmark = pytest.mark.timeout(30)

# (delay seconds, datagram) pairs a responder sends back for one request.
Script = Callable[[bytes, int], list[tuple[float, bytes]]]


@pytest.fixture
async def server() -> AsyncIterator[StunServer]:
    srv = await start_stun_server("127.0.0.1", 0)
    yield srv
    srv.close()


def port_of(srv: StunServer) -> int:
    assert srv.sockname is not None
    return int(srv.sockname[1])


@pytest.fixture
def closed_port() -> int:
    """A loopback UDP port with no socket: the kernel answers ICMP port unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Any:
    """A bound UDP port that never answers (so no ICMP either): only a timeout can end a wait."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


class Responder(asyncio.DatagramProtocol):
    """Answers each datagram with what ``script(request, n)`` says; records every request."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        n = len(self.requests)
        self.requests.append(data)
        loop = asyncio.get_running_loop()
        for delay, reply in self.script(data, n):
            loop.call_later(delay, self.transport.sendto, reply, addr)


@pytest.fixture
async def responder() -> AsyncIterator[Callable[[Script], Any]]:
    transports: list[Any] = []

    async def start(script: Script) -> tuple[int, Responder]:
        loop = asyncio.get_running_loop()
        transport, proto = await loop.create_datagram_endpoint(
            lambda: Responder(script), local_addr=("127.0.0.1", 0)
        )
        transports.append(transport)
        return int(transport.get_extra_info("sockname")[1]), proto

    yield start
    for t in transports:
        t.close()


def txid_of(req: bytes) -> bytes:
    return req[8:20]


def answer(req: bytes, ip: str = "192.0.2.7", port: int = 4242) -> bytes:
    return codec.build_response(txid_of(req), ip, port)


def with_attr(msg: bytes, atype: int, value: bytes) -> bytes:
    """``msg`` plus one attribute, header length fixed (builds RFC 5780-style replies)."""
    attr = struct.pack("!HH", atype, len(value)) + value + b"\x00" * (-len(value) % 4)
    body = msg[20:] + attr
    return msg[:2] + struct.pack("!H", len(body)) + msg[4:20] + body


# --- against derpkit's own server ---------------------------------------------------------------


async def test_query_reports_mapped_origin_rtt_and_raw(server: StunServer) -> None:
    r = await query("127.0.0.1", port_of(server), timeout=2, local=("127.0.0.1", 0))
    assert (str(r.mapped_ip), r.mapped_port) == r.local  # loopback: no NAT in between
    assert r.origin == r.server == ("127.0.0.1", port_of(server))
    assert r.addr_attr == codec.ATTR_XOR_MAPPED_ADDRESS and r.attempts == 1
    assert 0 <= r.rtt < 1
    assert r.raw == codec.build_response(r.txid, "127.0.0.1", r.mapped_port)
    assert [t for t, _ in r.attrs] == [codec.ATTR_XOR_MAPPED_ADDRESS]
    assert r.address_attr(codec.ATTR_XOR_MAPPED_ADDRESS) == (r.mapped_ip, r.mapped_port)
    assert r.mapped == f"127.0.0.1:{r.mapped_port}"
    assert server.counts["requests", "success"] == 1


async def test_ipv6_and_ipv4_from_one_dual_stack_endpoint(server: StunServer) -> None:
    try:
        srv6 = await start_stun_server("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        r6 = await query("[::1]", port_of(srv6), timeout=2)
        assert str(r6.mapped_ip) == "::1" and r6.mapped.startswith("[::1]:")
        async with await StunEndpoint.open(socket.AF_INET6) as ep:
            a = await ep.request(("::1", port_of(srv6)), timeout=2)
            b = await ep.request(("127.0.0.1", port_of(server)), timeout=2)
        assert a.mapped_port == b.mapped_port == ep.local[1]
        assert str(b.mapped_ip) == "127.0.0.1" and b.origin == ("127.0.0.1", port_of(server))
    finally:
        srv6.close()


async def test_plain_request_answered_with_strict_off_ignored_by_default() -> None:
    lenient = await start_stun_server("127.0.0.1", 0, strict=False)
    try:
        r = await query("127.0.0.1", port_of(lenient), timeout=2, shape="plain")
        assert r.mapped_port > 0 and lenient.counts["requests", "rfc"] == 1
    finally:
        lenient.close()
    strict = await start_stun_server("127.0.0.1", 0)  # the default: Go derper's behaviour
    try:
        with pytest.raises(StunTimeout):
            await query("127.0.0.1", port_of(strict), timeout=0.3, shape="plain")
        assert (await query("127.0.0.1", port_of(strict), timeout=2)).mapped_port > 0
    finally:
        strict.close()


async def test_one_socket_many_servers_and_concurrent_requests(server: StunServer) -> None:
    """What NAT mapping tests need: several servers asked from one local port, at once."""
    other = await start_stun_server("127.0.0.1", 0)
    try:
        async with await StunEndpoint.open(socket.AF_INET, local=("127.0.0.1", 0)) as ep:
            results = await asyncio.gather(
                *(ep.request(("127.0.0.1", port_of(s)), timeout=2) for s in [server, other] * 4)
            )
        assert {r.mapped_port for r in results} == {ep.local[1]}
        assert len({r.txid for r in results}) == 8
        assert {r.origin[1] for r in results} == {port_of(server), port_of(other)}
        assert ep.stats.sent == ep.stats.answered == 8
    finally:
        other.close()


# --- failures ----------------------------------------------------------------------------------


async def test_timeout_counts_sends(silent_port: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(StunTimeout) as ei:
        await query("127.0.0.1", silent_port, timeout=0.3, retries=2)
    assert 0.25 < time.monotonic() - t0 < 2
    assert ei.value.sent == 3 and ei.value.kind == "timeout"
    assert str(ei.value) == f"no STUN reply from 127.0.0.1:{silent_port} within 0.3 s (3 requests sent)"


async def test_zero_timeout_sends_once_and_times_out(silent_port: int) -> None:
    with pytest.raises(StunTimeout) as ei:
        await query("127.0.0.1", silent_port, timeout=0)
    assert ei.value.sent == 1


async def test_icmp_port_unreachable_is_a_clear_error(closed_port: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(StunUnreachable) as ei:
        await query("127.0.0.1", closed_port, timeout=5)
    assert time.monotonic() - t0 < 2  # the ICMP answer, not the timeout, ended the wait
    assert ei.value.kind == "refused"
    assert str(ei.value) == (
        f"127.0.0.1:{closed_port} refused the request (ICMP port unreachable): "
        f"nothing listens on UDP port {closed_port} there"
    )


async def test_icmp_fails_only_the_request_that_bounced(server: StunServer, closed_port: int) -> None:
    async with await StunEndpoint.open() as ep:
        bad, good = await asyncio.gather(
            ep.request(("127.0.0.1", closed_port), timeout=3),
            ep.request(("127.0.0.1", port_of(server)), timeout=3),
            return_exceptions=True,
        )
        assert isinstance(bad, StunUnreachable) and bad.server == ("127.0.0.1", closed_port)
        assert not isinstance(good, BaseException) and good.mapped_port == ep.local[1]
        assert ep.stats.icmp_errors == 1
        # The socket is still usable after an ICMP error.
        assert (await ep.request(("127.0.0.1", port_of(server)), timeout=2)).attempts == 1


async def test_garbage_and_foreign_ids_are_counted_and_ignored(responder: Any) -> None:
    def script(req: bytes, n: int) -> list[tuple[float, bytes]]:
        return [
            (0.0, b"hello, not STUN"),
            (0.01, codec.build_response(bytes(12), "192.0.2.1", 1)),  # someone else's id
            (0.02, req),  # our own request, looped back
            (0.05, answer(req)),
            (0.1, answer(req)),  # a duplicate after the answer
        ]

    port, _ = await responder(script)
    async with await StunEndpoint.open(local=("127.0.0.1", 0)) as ep:
        r = await ep.request(("127.0.0.1", port), timeout=2)
        assert r.mapped == "192.0.2.7:4242" and r.origin == ("127.0.0.1", port)
        await asyncio.sleep(0.2)
        s = ep.stats
        assert (s.garbage, s.unmatched, s.looped, s.answered, s.late) == (1, 1, 1, 1, 1)


@pytest.mark.parametrize(
    ("first", "error", "text"),
    [
        (lambda req: b"hello", StunBadReply, "(5 bytes) is not STUN at all: ErrNotSTUN"),
        (lambda req: req, StunBadReply, "is not a Binding success response"),
        (
            lambda req: codec.build_response(bytes(12), "192.0.2.1", 1),
            StunTxidMismatch,
            "txid mismatch: got [0 0 0 0 0 0 0 0 0 0 0 0], want [",
        ),
    ],
    ids=["not-stun", "looped", "wrong-txid"],
)
async def test_strict_first_datagram_decides(
    responder: Any, first: Callable[[bytes], bytes], error: type, text: str
) -> None:
    """Go stunc's rule, which ``derpkit stunc`` keeps: whatever arrives first is the verdict."""
    port, _ = await responder(lambda req, n: [(0.0, first(req)), (0.05, answer(req))])
    with pytest.raises(error) as ei:
        await query("127.0.0.1", port, timeout=2, strict=True)
    assert text in str(ei.value) and "\n" not in str(ei.value)


async def test_reply_without_address_fails_the_request(responder: Any) -> None:
    port, _ = await responder(lambda req, n: [(0.0, b"\x01\x01\x00\x00" + req[4:20])])
    with pytest.raises(StunBadReply) as ei:
        await query("127.0.0.1", port, timeout=2)
    assert ei.value.name == "ErrMalformedAttrs"
    assert "is a STUN response without a usable mapped address" in str(ei.value)


async def test_error_response_is_reported_with_its_code(responder: Any) -> None:
    def script(req: bytes, n: int) -> list[tuple[float, bytes]]:
        head = codec.BINDING_ERROR + b"\x00\x00" + req[4:20]
        return [(0.0, with_attr(head, codec.ATTR_ERROR_CODE, b"\x00\x00\x04\x14Unknown Attribute"))]

    port, proto = await responder(script)
    change = (codec.ATTR_CHANGE_REQUEST, struct.pack("!I", 0x06))
    with pytest.raises(StunErrorResponse) as ei:
        await query("127.0.0.1", port, timeout=2, shape="plain", attrs=[change])
    assert (ei.value.code, ei.value.reason) == (420, "Unknown Attribute")
    assert str(ei.value) == f"127.0.0.1:{port} answered with STUN error 420 Unknown Attribute"
    assert codec.parse_attrs(proto.requests[0]) == [change]  # the attribute went on the wire


async def test_retransmissions_reuse_the_transaction_id(responder: Any) -> None:
    port, proto = await responder(lambda req, n: [] if n < 2 else [(0.0, answer(req))])
    r = await query("127.0.0.1", port, timeout=3, retries=4, retry_interval=0.1)
    assert r.attempts == 3 and len(proto.requests) == 3
    assert {txid_of(q) for q in proto.requests} == {r.txid}
    assert r.rtt < 0.1  # measured from the send that was answered


async def test_late_reply_to_a_finished_request_is_skipped(responder: Any) -> None:
    port, _ = await responder(lambda req, n: [(0.5 if n == 0 else 0.2, answer(req, port=n + 1))])
    async with await StunEndpoint.open() as ep:
        with pytest.raises(StunTimeout):
            await ep.request(("127.0.0.1", port), timeout=0.3, strict=True)
        r = await ep.request(("127.0.0.1", port), timeout=1, strict=True)  # late one lands here
        assert r.mapped_port == 2 and ep.stats.late == 1


async def test_rfc5780_attributes_are_decodable(responder: Any) -> None:
    def script(req: bytes, n: int) -> list[tuple[float, bytes]]:
        other = struct.pack("!BBH", 0, 1, 3479) + bytes([127, 0, 0, 2])
        return [(0.0, with_attr(answer(req), codec.ATTR_OTHER_ADDRESS, other))]

    port, _ = await responder(script)
    r = await query("127.0.0.1", port, timeout=2)
    ip, p = r.address_attr(codec.ATTR_OTHER_ADDRESS) or (None, None)
    assert (str(ip), p) == ("127.0.0.2", 3479)
    assert r.address_attr(codec.ATTR_RESPONSE_ORIGIN) is None


async def test_lookup_and_closed_socket_errors() -> None:
    with pytest.raises(StunLookupError, match=r"^lookup nosuch\.invalid: "):
        await query("nosuch.invalid", 3478, timeout=1)
    assert await resolve("[::1]", 1) == (socket.AF_INET6, "::1")
    ep = await StunEndpoint.open()
    with pytest.raises(StunSendError, match="from an IPv4 socket"):
        await ep.request(("::1", 3478), timeout=1)
    ep.close()
    with pytest.raises(StunSendError, match="closed"):
        await ep.request(("127.0.0.1", 3478), timeout=1)


async def test_close_fails_pending_requests(silent_port: int) -> None:
    ep = await StunEndpoint.open()
    task = asyncio.create_task(ep.request(("127.0.0.1", silent_port), timeout=10))
    await asyncio.sleep(0.05)
    ep.close()
    with pytest.raises(StunClientError, match="closed"):
        await task


async def test_cancelled_request_leaves_no_state(silent_port: int) -> None:
    async with await StunEndpoint.open() as ep:
        task = asyncio.create_task(ep.request(("127.0.0.1", silent_port), timeout=10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not ep._pending
