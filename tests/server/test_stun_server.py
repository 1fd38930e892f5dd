"""The asyncio STUN server over real UDP on loopback (127.0.0.1 and ::1, ephemeral ports)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import random
import shutil
import socket
import struct
from collections.abc import AsyncIterator

import pytest

from derpkit.server.stun import StunServer, start_stun_server
from derpkit.stun import build_request, build_response, parse_response, parse_rfc_binding_request
from tests.stun.vectors import VECTORS, build_message

REPLY_WAIT = 1.0  # seconds; loopback replies take microseconds


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1)")


class Client:
    """A non-blocking UDP socket driven by the running loop, with bounded waits only."""

    def __init__(self, family: int, bind_host: str) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.bind((bind_host, 0))
        self.loop = asyncio.get_running_loop()

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def send(self, data: bytes, dst: tuple) -> None:
        self.sock.sendto(data, dst)

    async def recv(self, wait: float = REPLY_WAIT) -> bytes:
        data, _ = await asyncio.wait_for(self.loop.sock_recvfrom(self.sock, 65535), wait)
        return data

    async def recv_none(self, wait: float = 0.15) -> None:
        """Assert silence for a short bounded time."""
        with pytest.raises(TimeoutError):
            data = await self.recv(wait)
            pytest.fail(f"unexpected reply {data.hex()}")

    async def request(self, dst: tuple, txid: bytes | None = None) -> bytes:
        req = build_request(txid)
        self.send(req, dst)
        reply = await self.recv()
        assert parse_response(reply).txid == req[8:20]
        return reply

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
async def server4() -> AsyncIterator[StunServer]:
    srv = await start_stun_server("127.0.0.1", 0)
    yield srv
    srv.close()
    await srv.wait_closed()


@pytest.fixture
async def strict4() -> AsyncIterator[StunServer]:
    """The default, spelled out: only Tailscale-shaped requests, as Go derper."""
    srv = await start_stun_server("127.0.0.1", 0, strict=True)
    yield srv
    srv.close()
    await srv.wait_closed()


@pytest.fixture
async def lenient4() -> AsyncIterator[StunServer]:
    """``-stun-strict=false``: any well-formed Binding request is answered too."""
    srv = await start_stun_server("127.0.0.1", 0, strict=False)
    yield srv
    srv.close()
    await srv.wait_closed()


@pytest.fixture
async def client4() -> AsyncIterator[Client]:
    c = Client(socket.AF_INET, "127.0.0.1")
    yield c
    c.close()


def dst(srv: StunServer, host: str = "127.0.0.1") -> tuple[str, int]:
    assert srv.sockname is not None
    return host, srv.sockname[1]


# --- the mapped address ------------------------------------------------------------------------


async def test_ipv4_mapped_address_is_client_address(server4: StunServer, client4: Client) -> None:
    txid = os.urandom(12)
    reply = await client4.request(dst(server4), txid)
    r = parse_response(reply)
    assert (str(r.ip), r.port) == client4.addr
    assert reply == build_response(txid, *client4.addr)  # XOR-MAPPED-ADDRESS only, 32 bytes
    assert server4.counts["requests", "success"] == 1
    assert server4.counts["addrfamily", "ipv4"] == 1


@needs_ipv6
async def test_ipv6_mapped_address_is_client_address() -> None:
    srv = await start_stun_server("::1", 0)
    c = Client(socket.AF_INET6, "::1")
    try:
        reply = await c.request(("::1", srv.sockname[1]))
        r = parse_response(reply)
        assert (str(r.ip), r.port) == ("::1", c.addr[1])
        assert len(reply) == 44 and reply[25] == 0x02
        assert srv.counts["addrfamily", "ipv6"] == 1
        assert srv.address == f"[::1]:{srv.sockname[1]}"
    finally:
        c.close()
        srv.close()


@needs_ipv6
async def test_dual_stack_answers_ipv4_with_family_1(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derpkit.stun")
    srv = await start_stun_server("", 0)
    c4 = Client(socket.AF_INET, "127.0.0.1")
    c6 = Client(socket.AF_INET6, "::1")
    try:
        assert srv.sockname[0] == "::"
        port = srv.sockname[1]
        assert f"STUN server listening on [::]:{port}" in caplog.text
        reply = await c4.request(("127.0.0.1", port))
        # Go derper would send family 0x02 ::ffff:127.0.0.1 (44 bytes) here.
        assert len(reply) == 32 and reply[25] == 0x01
        r = parse_response(reply)
        assert (str(r.ip), r.port) == c4.addr
        reply6 = await c6.request(("::1", port))
        assert reply6[25] == 0x02 and parse_response(reply6).ip == ipaddress.ip_address("::1")
        assert srv.counts["addrfamily", "ipv4"] == 1
        assert srv.counts["addrfamily", "ipv6"] == 1
    finally:
        c4.close()
        c6.close()
        srv.close()


async def test_listen_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="derpkit.stun")
    srv = await start_stun_server("127.0.0.1", 0)
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), 2)
    assert f"STUN server listening on 127.0.0.1:{srv.sockname[1]}" in caplog.text


async def test_port_in_use_raises(server4: StunServer) -> None:
    with pytest.raises(OSError):
        await start_stun_server("127.0.0.1", server4.sockname[1])


async def test_closed_server_is_silent(client4: Client) -> None:
    srv = await start_stun_server("127.0.0.1", 0)
    port = srv.sockname[1]
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), 2)
    client4.send(build_request(), ("127.0.0.1", port))
    with pytest.raises((TimeoutError, ConnectionRefusedError)):
        await client4.recv(0.2)


# --- RFC mode vs strict mode -------------------------------------------------------------------

RFC5769 = bytes.fromhex(
    next(v["hex"] for v in VECTORS if v["name"] == "rfc5769-2.1-sample-request")
)
BARE_RFC = build_message(0x0001, bytes(range(1, 13)), [])  # what coturn's client sends


@pytest.mark.parametrize("req", [RFC5769, BARE_RFC], ids=["rfc5769-sample", "bare-20-bytes"])
async def test_rfc_request_answered_with_strict_off(
    lenient4: StunServer, client4: Client, req: bytes
) -> None:
    client4.send(req, dst(lenient4))
    reply = await client4.recv()
    assert reply == build_response(req[8:20], *client4.addr)
    assert lenient4.counts["requests", "rfc"] == 1
    assert lenient4.counts["requests", "success"] == 0


async def test_default_server_is_strict(server4: StunServer) -> None:
    """Go derper's behaviour is the default: the server the node starts without options."""
    assert server4.strict


@pytest.mark.parametrize("req", [RFC5769, BARE_RFC], ids=["rfc5769-sample", "bare-20-bytes"])
async def test_rfc_request_dropped_in_strict_mode(
    strict4: StunServer, client4: Client, req: bytes
) -> None:
    client4.send(req, dst(strict4))
    await client4.request(dst(strict4))  # the next reply is for the Tailscale request
    assert strict4.counts["requests", "not_stun"] == 1
    assert strict4.counts["dropped", "ErrWrongSoftware"] == 1
    assert strict4.counts["requests", "rfc"] == 0


# --- garbage -------------------------------------------------------------------------------

GOOD = build_request(bytes(12))
BAD_FP = GOOD[:-1] + bytes([GOOD[-1] ^ 1])
GARBAGE = {
    "empty": b"",
    "one-byte": b"\x00",
    "19-bytes": GOOD[:19],
    "http": b"GET / HTTP/1.1\r\nHost: derp\r\n\r\n",
    "random-1200": random.Random(1).randbytes(1200),
    "random-64k": random.Random(2).randbytes(65507),  # largest IPv4 UDP payload
    "stun-64k-junk-attrs": b"\x00\x01\xff\xeb" + GOOD[4:20] + random.Random(3).randbytes(65487),
    "bad-fingerprint": BAD_FP,
    "tailscale-response": build_response(bytes(12), "127.0.0.1", 1),  # no reflection loops
    "binding-indication": b"\x00\x11" + GOOD[2:],
    "rfc3489-no-cookie": bytes.fromhex(
        next(v["hex"] for v in VECTORS if v["name"] == "debian-stun-client-0.97-request")
    ),
    "turn-allocate": build_message(0x0003, bytes(12), [(0x0019, b"\x11\x00\x00\x00")]),
    "change-request": build_message(0x0001, bytes(12), [(0x0003, b"\x00\x00\x00\x06")]),
}


@pytest.mark.parametrize("strict", [False, True])
async def test_garbage_gets_no_answer_and_is_counted(strict: bool, client4: Client) -> None:
    srv = await start_stun_server("127.0.0.1", 0, strict=strict)
    try:
        for data in GARBAGE.values():
            client4.send(data, dst(srv))
        # Loopback keeps order: if any garbage had been answered, that reply would come first.
        reply = await client4.request(dst(srv), bytes(range(12)))
        assert parse_response(reply).port == client4.addr[1]
        await client4.recv_none()
        assert srv.counts["requests", "not_stun"] == len(GARBAGE)
        assert srv.counts["requests", "success"] == 1
        assert srv.counts["requests", "rfc"] == 0
        dropped = sum(n for (group, _), n in srv.counts.items() if group == "dropped")
        assert dropped == len(GARBAGE)
        assert srv.counts["dropped", "ErrNotSTUN"] >= 5
    finally:
        srv.close()


async def test_random_datagrams_never_crash(server4: StunServer, client4: Client) -> None:
    rng = random.Random(5624)
    for batch in range(6):
        for i in range(50):
            data = rng.randbytes(rng.randrange(0, 200))
            if i % 3 == 0 and len(data) >= 20:  # make them look like STUN to go deeper
                data = bytes([data[0] & 0x3F, 1]) + data[2:4] + GOOD[4:8] + data[8:]
            client4.send(data, dst(server4))
        # A round trip per batch: the server survived, and it had read the whole batch (loopback
        # keeps order), so no datagram is lost to a full socket buffer.
        await client4.request(dst(server4), bytes(11) + bytes([batch]))
    assert server4.counts["requests", "not_stun"] == 300
    assert server4.counts["requests", "success"] == 6


# --- every shared vector -------------------------------------------------------------------

REQUESTS = [v for v in VECTORS if v["kind"] == "request"]
NOT_REQUESTS = [v for v in VECTORS if v["kind"] != "request"]


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("v", REQUESTS, ids=[v["name"] for v in REQUESTS])
async def test_every_request_vector_answered(v: dict, strict: bool, client4: Client) -> None:
    srv = await start_stun_server("127.0.0.1", 0, strict=strict)
    try:
        client4.send(bytes.fromhex(v["hex"]), dst(srv))
        reply = await client4.recv()
        assert reply == build_response(bytes.fromhex(v["txid"]), *client4.addr)
        assert srv.counts["requests", "success"] == 1
    finally:
        srv.close()


async def test_every_non_request_vector_dropped_in_strict_mode(
    strict4: StunServer, client4: Client
) -> None:
    for v in NOT_REQUESTS:
        client4.send(bytes.fromhex(v["hex"]), dst(strict4))
    await client4.request(dst(strict4))
    await client4.recv_none()
    assert strict4.counts["requests", "not_stun"] == len(NOT_REQUESTS)
    assert strict4.counts["requests", "success"] == 1


async def test_non_request_vectors_in_rfc_mode(lenient4: StunServer, client4: Client) -> None:
    """With -stun-strict=false a vector is answered exactly when it is a well-formed RFC request."""
    answered = []
    for v in NOT_REQUESTS:
        data = bytes.fromhex(v["hex"])
        try:
            parse_rfc_binding_request(data)
            answered.append(v["name"])
        except ValueError:
            pass
        client4.send(data, dst(lenient4))
        # The marker request tells "answered" from "dropped" without waiting out a timeout.
        marker = bytes(11) + bytes([len(answered) % 256])
        client4.send(build_request(marker), dst(lenient4))
        first = parse_response(await client4.recv())
        if v["name"] in answered:
            assert first.txid == data[8:20], v["name"]
            first = parse_response(await client4.recv())
        assert first.txid == marker, v["name"]
    assert lenient4.counts["requests", "rfc"] == len(answered)
    assert "rfc5769-2.1-sample-request" in answered
    assert "req-wrong-software" in answered


# --- independent implementations -----------------------------------------------------------

TURNUTILS = shutil.which("turnutils_stunclient")
VOVIDA = shutil.which("stun")


async def run_tool(*argv: str, limit: float = 5.0) -> tuple[int | None, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return None, out.decode(errors="replace")
    return proc.returncode, out.decode(errors="replace")


@pytest.mark.skipif(
    TURNUTILS is None, reason="turnutils_stunclient missing (apt-get install coturn)"
)
async def test_coturn_client_gets_an_answer_with_strict_off(lenient4: StunServer) -> None:
    """coturn's client sends a plain RFC request; Go derper ignores it (so does our default),
    -stun-strict=false answers it."""
    _, out = await run_tool(TURNUTILS, "-p", str(lenient4.sockname[1]), "127.0.0.1")
    assert "UDP reflexive addr: 127.0.0.1:" in out, out
    assert lenient4.counts["requests", "rfc"] >= 1


@pytest.mark.skipif(
    TURNUTILS is None, reason="turnutils_stunclient missing (apt-get install coturn)"
)
async def test_coturn_client_ignored_in_strict_mode(strict4: StunServer) -> None:
    _, out = await run_tool(TURNUTILS, "-p", str(strict4.sockname[1]), "127.0.0.1", limit=1.5)
    assert "reflexive addr" not in out
    assert strict4.counts["requests", "not_stun"] >= 1
    assert strict4.counts["requests", "rfc"] == 0


@pytest.mark.skipif(
    VOVIDA is None, reason="stun (RFC 3489 client) missing (apt-get install stun-client)"
)
async def test_rfc3489_client_is_not_answered(server4: StunServer) -> None:
    """Vovida's cookie-less RFC 3489 requests fail the magic-cookie test: silence, counted."""
    _, out = await run_tool(VOVIDA, f"127.0.0.1:{server4.sockname[1]}", limit=10)
    assert server4.counts["dropped", "ErrNotSTUN"] >= 1
    assert server4.counts["requests", "rfc"] + server4.counts["requests", "success"] == 0
    assert "Blocked" in out or "could not reach" in out, out


def test_struct_sanity() -> None:
    # Guard for the garbage table: the 64 KiB STUN-looking datagram really is STUN-looking.
    data = GARBAGE["stun-64k-junk-attrs"]
    assert struct.unpack("!H", data[:2])[0] == 1 and data[4:8] == GOOD[4:8]


# --- -stun-strict through a real `derpkit serve` process ----------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "strict"),
    [
        ((), {}, True),
        (("-stun-strict=false",), {}, False),
        ((), {"STUN_STRICT": "false"}, False),
        (("-stun-strict",), {"STUN_STRICT": "false"}, True),  # the flag beats the env
    ],
    ids=["default", "flag-false", "env-false", "flag-over-env"],
)
async def test_serve_process_stun_strict(args: tuple[str, ...], env: dict[str, str], strict: bool,
                                          client4: Client) -> None:
    """``derpkit serve`` as an operator starts it: an ordinary RFC 5389 Binding request is
    met with silence by default, as Go derper does (only Tailscale-shaped requests are
    answered), and answered with ``-stun-strict=false`` (flag or STUN_STRICT=false)."""
    from .serve_proc import start_serve

    sp = await start_serve("-a", "127.0.0.1:0", "-stun-port", "0", "-http-port", "-1", *args, env=env)
    try:
        assert sp.stun_port
        where = ("127.0.0.1", sp.stun_port)
        client4.send(BARE_RFC, where)
        if strict:
            await client4.recv_none(0.5)
        else:
            assert await client4.recv() == build_response(BARE_RFC[8:20], *client4.addr)
        reply = await client4.request(where)  # Tailscale-shaped: always answered
        r = parse_response(reply)
        assert (str(r.ip), r.port) == client4.addr
        if env:
            assert any("STUN_STRICT" in line for line in sp.log), sp.log
    finally:
        assert await sp.stop() == 0
