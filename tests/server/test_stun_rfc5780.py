"""``derpkit serve -stun-rfc5780``: the four-socket RFC 5780 STUN server.

In-process first (real UDP sockets on 127.0.0.1 and 127.0.0.2, which are both local on
Linux): CHANGE-REQUEST answered from the named socket, RESPONSE-PORT obeyed, OTHER-ADDRESS and
RESPONSE-ORIGIN right, Tailscale-shaped requests still get Go's exact bytes, plain servers
still refuse change requests. Then the flag's start-up refusals, and a real ``derpkit serve``
process examined by coturn's own RFC 5780 client tools.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest

from derpkit.server.config import ConfigError, parse_config
from derpkit.server.stun import StunServer, start_stun_server
from derpkit.stun import codec
from derpkit.stun.client import StunEndpoint, StunTimeout

pytestmark = pytest.mark.timeout(60)
A1, A2 = "127.0.0.1", "127.0.0.2"


@pytest.fixture
async def rfc() -> AsyncIterator[StunServer]:
    srv = await start_stun_server(A1, 0, rfc5780=(A2, 0))
    yield srv
    srv.close()
    await srv.wait_closed()


def addrs(srv: StunServer) -> dict[tuple[int, int], tuple[str, int]]:
    assert srv.group is not None
    return {slot: srv.group.addr(slot) for slot in srv.group.servers}


async def test_four_sockets_and_their_ports(rfc: StunServer) -> None:
    a = addrs(rfc)
    assert a[0, 0][0] == a[0, 1][0] == A1 and a[1, 0][0] == a[1, 1][0] == A2
    assert a[0, 0][1] == a[1, 0][1] != a[0, 1][1] == a[1, 1][1]


@pytest.mark.parametrize(
    ("slot", "change_ip", "change_port", "want"),
    [
        ((0, 0), False, False, (0, 0)),
        ((0, 0), True, True, (1, 1)),
        ((0, 0), False, True, (0, 1)),
        ((0, 0), True, False, (1, 0)),
        ((1, 1), True, False, (0, 1)),
        ((0, 1), False, True, (0, 0)),
    ],
)
async def test_change_request_answered_from_the_named_socket(
    rfc: StunServer, slot: tuple[int, int], change_ip: bool, change_port: bool,
    want: tuple[int, int],
) -> None:
    a = addrs(rfc)
    async with await StunEndpoint.open(socket.AF_INET, local=(A1, 0)) as ep:
        attrs = [codec.change_request(change_ip=change_ip, change_port=change_port)]
        r = await ep.request(a[slot], timeout=2, shape="plain", attrs=attrs)
    assert r.origin == a[want] == r.response_origin
    assert r.other_address == a[1 - slot[0], 1 - slot[1]]
    assert (str(r.mapped_ip), r.mapped_port) == ep.local
    assert r.address_attr(codec.ATTR_MAPPED_ADDRESS) == (r.mapped_ip, r.mapped_port)


async def test_response_port_redirects_the_reply(rfc: StunServer) -> None:
    a = addrs(rfc)
    async with (await StunEndpoint.open(socket.AF_INET, local=(A1, 0)) as asker,
                await StunEndpoint.open(socket.AF_INET, local=(A1, 0)) as target):
        txid = codec.new_txid()
        seen = target.watch(txid)
        value = target.local[1].to_bytes(2, "big") + b"\x00\x00"
        with pytest.raises(StunTimeout):  # the reply goes to the other socket, not back
            await asker.request(a[0, 0], timeout=0.5, shape="plain", txid=txid,
                                attrs=[(codec.ATTR_RESPONSE_PORT, value)])
        assert await asyncio.wait_for(seen, 1) == a[0, 0]
    assert rfc.counts["rfc5780", "response_port"] == 1


async def test_tailscale_requests_keep_gos_exact_reply(rfc: StunServer) -> None:
    a = addrs(rfc)
    async with await StunEndpoint.open(socket.AF_INET, local=(A1, 0)) as ep:
        for slot in a:
            r = await ep.request(a[slot], timeout=2)
            assert r.raw == codec.build_response(r.txid, A1, ep.local[1])
            assert r.origin == a[slot] and r.other_address is None
    assert rfc.counts["requests", "success"] == 4  # one shared counter for the four sockets


async def test_plain_server_still_refuses_change_requests() -> None:
    srv = await start_stun_server(A1, 0, strict=False)  # answers plain requests, but not RFC 5780 ones
    try:
        with pytest.raises(StunTimeout):
            async with await StunEndpoint.open(socket.AF_INET) as ep:
                await ep.request((A1, srv.sockname[1]), timeout=0.3, shape="plain",
                                 attrs=[codec.change_request(change_port=True)])
        assert srv.counts["dropped", "ErrUnknownAttribute"] == 1
    finally:
        srv.close()


def test_codec_rfc_request_parsing() -> None:
    txid = bytes(range(12))
    req = codec.parse_rfc_request(codec.build_plain_request(
        txid, [codec.change_request(change_ip=True), (codec.ATTR_RESPONSE_PORT, b"\x12\x34\0\0"),
               (codec.ATTR_PADDING, b"\0" * 16)], with_fingerprint=True))
    assert (req.txid, req.change_ip, req.change_port, req.response_port) == (txid, True, False,
                                                                             0x1234)
    assert req.asks_rfc5780
    with pytest.raises(codec.StunError, match="RESPONSE-PORT"):
        codec.parse_rfc_binding_request(
            codec.build_plain_request(txid, [(codec.ATTR_RESPONSE_PORT, b"\0\1\0\0")]))
    with pytest.raises(codec.StunError, match="not 4 bytes"):
        codec.parse_rfc_request(codec.build_plain_request(txid, [(codec.ATTR_CHANGE_REQUEST,
                                                                  b"\0\0")]))


# --- the flag ----------------------------------------------------------------------------------


def cfg(*argv: str) -> Any:
    return parse_config(list(argv), {"HOME": "/home/op"}, path_exists=lambda p: False)[0]


def test_flag_off_by_default_and_resolved() -> None:
    assert cfg().stun_rfc5780_alt is None
    c = cfg("-a", "192.0.2.1:443", "-stun-rfc5780", "192.0.2.2")
    assert c.stun_rfc5780_alt == ("192.0.2.2", 3479)
    c = cfg("-a", "192.0.2.1:443", "-stun-port", "3000", "-stun-rfc5780", "192.0.2.2:4000")
    assert c.stun_rfc5780_alt == ("192.0.2.2", 4000)
    c = cfg("-a", "[2001:db8::1]:443", "-stun-rfc5780", "[2001:db8::2]:3500")
    assert c.stun_rfc5780_alt == ("2001:db8::2", 3500)


@pytest.mark.parametrize(
    ("argv", "text", "code"),
    [
        (["-stun-rfc5780", "nope"], "want IP or IP:port", 2),
        (["-stun-rfc5780", "nope:1"], "'nope' is not an IP address", 2),
        (["-stun-rfc5780", "192.0.2.2:99999"], "must be a number from 0 to 65535", 2),
        (["-stun-rfc5780", "192.0.2.2"], "-a must name the server's IP address", 1),
        (["-a", "192.0.2.1:443", "-stun-rfc5780", "192.0.2.1"], "must differ from -a's", 1),
        (["-a", "192.0.2.1:443", "-stun-rfc5780", "2001:db8::2"], "different IP versions", 1),
        (["-a", "192.0.2.1:443", "-stun-rfc5780", "192.0.2.2:3478"], "differ from -stun-port", 1),
        (["-a", "192.0.2.1:443", "-stun-strict", "-stun-rfc5780", "192.0.2.2"], "-stun-strict", 1),
        (["-a", "192.0.2.1:443", "-stun=false", "-stun-rfc5780", "192.0.2.2"], "needs the STUN", 1),
    ],
)
def test_flag_refusals_name_the_flag(argv: list[str], text: str, code: int) -> None:
    with pytest.raises(ConfigError) as ei:
        cfg(*argv)
    assert text in str(ei.value) and "-stun-rfc5780" in str(ei.value)
    assert ei.value.exit_code == code and "\n" not in str(ei.value)


# --- a real process, judged by coturn's RFC 5780 tools -----------------------------------------

NATDISCOVERY = shutil.which("turnutils_natdiscovery")
STUNCLIENT = shutil.which("turnutils_stunclient")


def require_coturn_tools() -> None:
    from tests.goderper import REQUIRE_ENV

    if NATDISCOVERY and STUNCLIENT:
        return
    import os

    msg = "coturn's turnutils_* missing (apt-get install coturn; scripts/install-peers.sh)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


async def test_serve_process_against_coturn_natdiscovery_and_stunclient() -> None:
    require_coturn_tools()
    from .serve_proc import start_serve

    sp = await start_serve("-a", f"{A1}:0", "-stun-port", "0", "-http-port", "-1",
                           "-stun-rfc5780", A2)
    try:
        line = next(ln for ln in sp.log if "STUN server listening" in ln)
        m = re.search(r"on 127\.0\.0\.1:(\d+) \(RFC 5780: also 127\.0\.0\.1:(\d+), "
                      r"127\.0\.0\.2:(\d+), 127\.0\.0\.2:(\d+)\)", line)
        assert m, line
        p1, p2 = m[1], m[2]
        assert m[3] == p1 and m[4] == p2
        nd = await asyncio.to_thread(
            subprocess.run, [NATDISCOVERY, "-m", "-f", "-p", p1, A1],
            capture_output=True, text=True, timeout=30)
        out = nd.stdout + nd.stderr
        assert "NAT with Endpoint Independent Mapping!" in out, out
        assert "NAT with Endpoint Independent Filtering!" in out, out
        assert f"Other addr: : {A2}:{p2}" in out, out
        assert f"Response origin: : {A2}:{p2}" in out, out  # the change-IP+port answer
        sc = await asyncio.to_thread(
            subprocess.run, [STUNCLIENT, "-f", "-p", p1, A1],
            capture_output=True, text=True, timeout=30)
        out = sc.stdout + sc.stderr
        assert re.search(r"UDP reflexive addr: 127\.0\.0\.1:\d+", out), out
        assert f"Response origin: : {A2}:{p2}" in out, out
    finally:
        assert await sp.stop() == 0
