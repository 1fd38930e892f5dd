"""The front door's request-head parser (frontdoor/request.py) and its refusals on a real server.

The table holds each head, what the parser must make of it, and so what the connection
must do: a refusal is written and the connection closed, and nothing after the head is
read. The socket tests run ``derpkit serve -dev`` and send the issue's smuggling request
(a CONNECT with ``Content-Length: 0`` and ``Content-Length: 10``) followed by a request that
would be answered if the server read on from any offset.
Go derper's answers to the same bytes are compared in tests/interop/test_http_strict_go.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from derpkit.server.frontdoor import request as R
from tests.server.helpers import converse as send_and_read
from tests.server.serve_proc import ServeProc, start_serve

pytestmark = pytest.mark.timeout(60)

ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n"
GOOD_DERP = b"GET /derp HTTP/1.1\r\nHost: h\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"

# (id, head, expected refusal bytes (prefix) or None when accepted)
REFUSED: list[tuple[str, bytes, bytes]] = [
    ("two_cl", b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 10\r\n\r\n", R.BAD_REQUEST),
    ("same_cl_twice", b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n", R.BAD_REQUEST),
    ("cl_list", b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n", R.BAD_REQUEST),
    ("cl_sign", b"CONNECT x:443 HTTP/1.1\r\nContent-Length: +3\r\n\r\n", R.BAD_REQUEST),
    ("cl_empty", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: \r\n\r\n", R.BAD_REQUEST),
    ("cl_hex", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 0x10\r\n\r\n", R.BAD_REQUEST),
    ("cl_huge", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n", R.BAD_REQUEST),
    ("te_cl", b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", R.BAD_REQUEST),
    ("cl_te", b"GET / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", R.BAD_REQUEST),
    ("te_gzip", b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", R.UNSUPPORTED_TE),
    ("te_list", b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", R.UNSUPPORTED_TE),
    ("te_twice", b"GET / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
     R.UNSUPPORTED_TE),
    ("te_http10", b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", R.BAD_REQUEST),
    ("obs_fold", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n", R.BAD_REQUEST),
    ("first_line_space", b"GET / HTTP/1.1\r\n Host: h\r\n\r\n", R.BAD_REQUEST),
    ("bare_lf", b"GET / HTTP/1.1\nHost: h\n\n", R.BAD_REQUEST),
    ("bare_lf_one_line", b"GET / HTTP/1.1\r\nHost: h\nX: y\r\n\r\n", R.BAD_REQUEST),
    ("bare_cr", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", R.BAD_REQUEST),
    ("nul_value", b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", R.BAD_REQUEST),
    ("nul_target", b"GET /\x00 HTTP/1.1\r\nHost: h\r\n\r\n", R.BAD_REQUEST),
    ("del_value", b"GET / HTTP/1.1\r\nHost: h\r\nX: a\x7fb\r\n\r\n", R.BAD_REQUEST),
    ("space_before_colon", b"CONNECT x:443 HTTP/1.1\r\nContent-Length : 3\r\n\r\n",
     R.go_refusal("400 Bad Request", detail="invalid header name")),
    ("no_colon", b"GET / HTTP/1.1\r\nHost: h\r\nfoo\r\n\r\n", R.BAD_REQUEST),
    ("empty_name", b"GET / HTTP/1.1\r\nHost: h\r\n: v\r\n\r\n", R.BAD_REQUEST),
    ("bad_name", b"GET / HTTP/1.1\r\nHost: h\r\nX(A): v\r\n\r\n", R.BAD_REQUEST),
    ("no_host", b"GET /derp HTTP/1.1\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n",
     R.go_refusal("400 Bad Request", detail="missing required Host header")),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", R.BAD_REQUEST),
    ("bad_host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", R.go_refusal("400 Bad Request", detail="malformed Host header")),
    ("bad_method", b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", R.BAD_REQUEST),
    ("two_spaces", b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n", R.BAD_REQUEST),
    ("http09", b"GET /\r\n\r\n", R.BAD_REQUEST),
    ("version_junk", b"GET / HTTP/1.1x\r\nHost: h\r\n\r\n", R.BAD_REQUEST),
    ("http2", b"GET / HTTP/2.0\r\nHost: h\r\n\r\n",
     R.go_refusal("505 HTTP Version Not Supported", detail="unsupported protocol version")),
    ("leading_crlf", b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", R.BAD_REQUEST),
    ("long_line", b"GET /" + b"a" * R.MAX_LINE + b" HTTP/1.1\r\nHost: h\r\n\r\n", R.TOO_LARGE),
    ("long_field", b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * R.MAX_LINE + b"\r\n\r\n", R.TOO_LARGE),
    ("big_head", b"GET / HTTP/1.1\r\nHost: h\r\n" + b"X: " + b"a" * 8000 + b"\r\n" + b"Y: " + b"a" * 9000
     + b"\r\n\r\n", R.TOO_LARGE),
    ("many_fields", b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(R.MAX_HEADERS))
     + b"\r\n", R.TOO_LARGE),
]


@pytest.mark.parametrize(("head", "answer"), [(h, a) for _, h, a in REFUSED], ids=[i for i, _, _ in REFUSED])
def test_refused(head: bytes, answer: bytes) -> None:
    with pytest.raises(R.Refused) as e:
        R.parse(head + ROBOTS)
    assert e.value.response == answer, e.value.why


def test_refusals_are_go_bytes() -> None:
    # As Go's server writes them (captured from derper v1.102.3).
    assert R.BAD_REQUEST == (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Connection: close\r\n\r\n400 Bad Request")
    assert R.go_refusal("400 Bad Request", detail="missing required Host header").startswith(
        b"HTTP/1.1 400 Bad Request: missing required Host header\r\n")
    assert R.UNSUPPORTED_TE.startswith(b"HTTP/1.1 501 Not Implemented\r\n")
    assert R.UNSUPPORTED_TE.endswith(b"\r\n\r\nUnsupported transfer encoding")


@pytest.mark.parametrize("partial", [
    b"GET / HTTP/1.1\nHost",  # a bare LF is refused before the blank line comes
    b"GET / HTTP/1.1\r\nX: \x00",
    b"GET / HTTP/1.1\r\nX: a\rb",
    b"GET /" + b"a" * (R.MAX_LINE + 1),  # an endless request line
    b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 3000,  # an endless head
])
def test_refused_before_the_blank_line(partial: bytes) -> None:
    with pytest.raises(R.Refused):
        R.parse(partial)


@pytest.mark.parametrize("partial", [b"", b"G", b"GET / HTTP/1.1\r", b"GET / HTTP/1.1\r\nHost: h\r\n\r"])
def test_incomplete(partial: bytes) -> None:
    assert R.parse(partial) is None


def test_accepted_heads() -> None:
    h = R.parse(GOOD_DERP + b"\x01\x02")
    assert h is not None and h.size == len(GOOD_DERP) and h.method == b"GET" and h.target == b"/derp"
    assert h.as_dict()["Upgrade"] == "DERP" and not h.http10 and h.content_length == 0 and not h.chunked
    h = R.parse(b"CONNECT x:443 HTTP/1.0\r\nContent-Length:  7 \r\n\r\nabcdefg")
    assert h is not None and h.http10 and h.wants_close and h.content_length == 7
    h = R.parse(b"POST /x HTTP/1.1\r\nHost: [::1]:443\r\ntransfer-encoding: Chunked\r\nX: a\tb \xc3\xa9\r\n\r\n")
    assert h is not None and h.chunked and h.header("x") == "a\tb \xc3\xa9" and not h.wants_close
    h = R.parse(b"get / HTTP/1.2\r\nHost: h\r\nConnection: keep-alive, Close\r\n\r\n")  # Go reads 1.2 as 1.1
    assert h is not None and not h.http10 and h.wants_close
    assert R.parse(b"GET / HTTP/1.1\r\nHost: h\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(R.MAX_HEADERS - 1))
                   + b"\r\n") is not None


# ---------------------------------------------------------------- over real sockets


async def converse(port: int, data: bytes, quiet: float = 0.7) -> tuple[bytes, bool]:
    """Send ``data``, read until the server closes or stays quiet; (bytes, closed)."""
    return await send_and_read(port, data, quiet=quiet)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def dev_serve() -> AsyncIterator[ServeProc]:
    sp = await start_serve("-dev", "-a", "127.0.0.1:0", "-stun=false")
    try:
        yield sp
    finally:
        await sp.stop()


@pytest.mark.asyncio(loop_scope="module")
async def test_issue_13_connect_with_two_content_lengths(dev_serve: ServeProc) -> None:
    """The reported smuggling: one 400, the connection closed, the second request never read."""
    smuggle = b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 10\r\n\r\n"
    out, closed = await converse(dev_serve.port, smuggle + ROBOTS)
    assert out == R.BAD_REQUEST and closed
    # The control: a well-formed CONNECT is answered and the connection read on.
    out, closed = await converse(dev_serve.port, b"CONNECT x:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + ROBOTS)
    assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and out.endswith(b"Disallow: /\n") and not closed


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("case", ["te_cl", "obs_fold", "bare_lf", "nul_value", "no_host", "long_line", "many_fields",
                                  "two_cl", "te_gzip"])
async def test_refused_on_the_wire(dev_serve: ServeProc, case: str) -> None:
    _, head, answer = next(c for c in REFUSED if c[0] == case)
    out, closed = await converse(dev_serve.port, head + ROBOTS)
    assert out == answer and closed


@pytest.mark.asyncio(loop_scope="module")
async def test_smuggling_on_the_derp_path_is_refused(dev_serve: ServeProc) -> None:
    bad = b"GET /derp HTTP/1.1\r\nHost: h\r\nUpgrade: DERP\r\nConnection: Upgrade\r\nContent-Length: 1\r\n" \
          b"Content-Length: 2\r\n\r\n"
    out, closed = await converse(dev_serve.port, bad)
    assert out == R.BAD_REQUEST and closed
    out, closed = await converse(dev_serve.port, GOOD_DERP, quiet=1.5)  # the control: a 101 and the ServerKey frame
    assert out.startswith(b"HTTP/1.1 101 Switching Protocols\r\n") and b"DERP\xf0\x9f\x94\x91" in out and not closed


@pytest.mark.asyncio(loop_scope="module")
async def test_bare_lf_head_is_refused_at_once(dev_serve: ServeProc) -> None:
    """No waiting for a CRLFCRLF that will never come (the connection used to sit for 30 s)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    out, closed = await converse(dev_serve.port, b"GET / HTTP/1.1\nHost: h\n\n", quiet=5)
    assert out == R.BAD_REQUEST and closed and loop.time() - t0 < 4
