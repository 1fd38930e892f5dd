"""Malformed and ambiguous request heads, Go derper and ``derpkit serve`` side by side.

Each head is sent over plain TCP to both servers, followed on the same connection by
``GET /robots.txt``: a server that reads on after a refusal, or from another offset,
answers that second request too. For every case we compare the status lines sent and
whether the connection was closed. Where derpkit is stricter than Go (RFC 9112 allows or
requires the refusal; docs/reliability.md lists each with the rule), the test asserts both
sides as they are: derpkit refuses and closes, Go answers and keeps the connection.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from derpkit.server.frontdoor import request as R
from tests.goderper import GoDerper, require_derper, start_derper
from tests.server.helpers import converse as send_and_read
from tests.server.serve_proc import ServeProc, start_serve

pytestmark = pytest.mark.timeout(120)

ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n"
UPGRADE = b"GET /derp HTTP/1.1\r\nHost: h\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"

# id -> head (ROBOTS follows each)
SAME: dict[str, bytes] = {
    "connect_two_cl": b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 10\r\n\r\n",
    "connect_cl_list": b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\nabc",
    "connect_cl_sign": b"CONNECT x:443 HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc",
    "connect_te_gzip": b"CONNECT x:443 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    "connect_bare_cr": b"CONNECT x:443 HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
    "connect_nul": b"CONNECT x:443 HTTP/1.1\r\nX-A: a\x00b\r\n\r\n",
    "connect_space_colon": b"CONNECT x:443 HTTP/1.1\r\nContent-Length : 3\r\n\r\nabc",
    "connect_body": b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    "get_two_cl": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nContent-Length: 10\r\n\r\n",
    "get_bare_cr": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n",
    "get_nul": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    "get_del": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n",
    "get_2m_head": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\n"
                   + b"".join(b"X-%d: %s\r\n" % (i, b"b" * 1000) for i in range(1100)) + b"\r\n",
    "get_leading_space": b"GET /robots.txt HTTP/1.1\r\n Host: h\r\n\r\n",
    "get_no_host": b"GET /robots.txt HTTP/1.1\r\n\r\n",
    "get_two_hosts": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
    "get_bad_host": b"GET /robots.txt HTTP/1.1\r\nHost: a b\r\n\r\n",
    "bad_method": b"G(T /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n",
    "two_spaces": b"GET  /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "http2": b"GET /robots.txt HTTP/2.0\r\nHost: h\r\n\r\n",
    "leading_crlf": b"\r\nGET /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n",
    "te_twice": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n0\r\n\r\n",
    "te_list": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "te_chunked": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "cl_huge": b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
    "derp_two_cl": UPGRADE + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\n",
    "derp_no_host": b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
}
# id -> (head, Go's status lines, Go closes?) where derpkit refuses and closes instead.
STRICTER: dict[str, tuple[bytes, list[str], bool]] = {
    "connect_same_cl_twice": (b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
                              ["HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK"], False),
    "connect_te_cl": (b"CONNECT x:443 HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
                      ["HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK"], False),
    "get_te_cl": (b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                  b"0\r\n\r\n", ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    "connect_obs_fold": (b"CONNECT x:443 HTTP/1.1\r\nX-A: a\r\n b\r\n\r\n",
                         ["HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK"], False),
    "get_obs_fold": (b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
                     ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    # Go upgrades; the request after it is then read as DERP frames and ends the connection.
    "derp_obs_fold": (UPGRADE + b"X-A: a\r\n b\r\n\r\n", ["HTTP/1.1 101 Switching Protocols"], True),
    "connect_bare_lf": (b"CONNECT x:443 HTTP/1.1\nX-A: a\n\n", ["HTTP/1.1 404 Not Found", "HTTP/1.1 200 OK"], False),
    "get_bare_lf": (b"GET /robots.txt HTTP/1.1\nHost: h\n\n", ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    "get_long_line": (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
                      ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    "get_big_head": (b"GET /robots.txt HTTP/1.1\r\nHost: h\r\nX-A: " + b"b" * 8000 + b"\r\nX-B: " + b"b" * 9000
                     + b"\r\n\r\n", ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    "get_many_fields": (b"GET /robots.txt HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200))
                        + b"\r\n", ["HTTP/1.1 200 OK", "HTTP/1.1 200 OK"], False),
    "te_http10": (b"GET /robots.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ["HTTP/1.0 200 OK"], True),
}

_STATUS = re.compile(rb"HTTP/1\.[01] \d\d\d[^\r\n]*")


async def converse(port: int, data: bytes) -> tuple[list[str], bool]:
    buf, closed = await send_and_read(port, data, quiet=0.7)
    return [s.decode() for s in _STATUS.findall(buf)], closed


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GoDerper, ServeProc, asyncio.AbstractEventLoop]]:
    require_derper()
    loop = asyncio.new_event_loop()
    go = start_derper(tmp_path_factory.mktemp("go"))
    try:
        ours = loop.run_until_complete(start_serve(
            "-a", "127.0.0.1:0", "-stun=false", "-certmode", "letsencrypt",
            "-certdir", str(tmp_path_factory.mktemp("ours")), "-http-port", "-1"))
    except BaseException:
        go.stop()
        loop.close()
        raise
    try:
        yield go, ours, loop
    finally:
        go.stop()
        loop.run_until_complete(ours.stop())
        loop.close()


@pytest.mark.parametrize("case", list(SAME))
def test_same_answer_as_go(servers: tuple[GoDerper, ServeProc, asyncio.AbstractEventLoop], case: str) -> None:
    go, ours, loop = servers
    data = SAME[case] + ROBOTS
    theirs = loop.run_until_complete(converse(go.port, data))
    mine = loop.run_until_complete(converse(ours.port, data))
    # A 101 is followed by DERP frames, not a next request: only the status lines count.
    assert mine == theirs, f"go={theirs} derpkit={mine}"
    assert theirs[0], "Go sent nothing: the case tests nothing"


@pytest.mark.parametrize("case", list(STRICTER))
def test_stricter_than_go(servers: tuple[GoDerper, ServeProc, asyncio.AbstractEventLoop], case: str) -> None:
    go, ours, loop = servers
    head, go_status, go_closes = STRICTER[case]
    theirs = loop.run_until_complete(converse(go.port, head + ROBOTS))
    mine = loop.run_until_complete(converse(ours.port, head + ROBOTS))
    assert theirs == (go_status, go_closes), f"Go changed: {theirs}"
    with pytest.raises(R.Refused) as e:
        R.parse(head)
    want = e.value.response.split(b"\r\n", 1)[0].decode()
    assert mine == ([want], True), mine
