"""The plain ``-http-port`` listener of TLS mode, Go derper and derpkit side by side.

Both servers run ``-certmode manual`` with a CA-signed ``localhost`` certificate (pki.py,
as the other interop tests) and ``-http-port`` on a free loopback port. Each request below
is sent over plain TCP to both port-80 listeners, followed on the same connection by
``GET /robots.txt`` (so keep-alive after the answer is compared too). For each response:
same status line, same header names and values (``Date`` aside, and the documented
differences in ``_normalise``), same body, and the same open/closed state at the end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.goderper import GoDerper, free_port, require_derper, start_derper
from tests.server.serve_proc import ServeProc, start_serve

from .pki import Leaf, TestCA
from .test_ace_go import Response, converse
from .test_ace_go import responses as split_responses

pytestmark = pytest.mark.timeout(120)

FOLLOW = b"GET /robots.txt HTTP/1.1\r\nHost: h\r\n\r\n"


class Pair:
    def __init__(self, go: GoDerper, go_port80: int, ours: ServeProc, our_port80: int) -> None:
        self.go, self.go_port80, self.ours, self.our_port80 = go, go_port80, ours, our_port80


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, localhost_leaf: Leaf) -> Iterator[Pair]:
    require_derper()
    loop = asyncio.new_event_loop()
    go_port80, our_port80 = free_port(), free_port()
    go = start_derper(tmp_path_factory.mktemp("go"), tls=True, hostname="localhost", certdir=test_ca.dir,
                      extra_args=("-http-port", str(go_port80)))
    try:
        ours = loop.run_until_complete(start_serve(
            "-a", "127.0.0.1:0", "-stun=false", "-certmode", "manual", "-hostname", "localhost",
            "-certdir", str(test_ca.dir), "-http-port", str(our_port80)))
    except BaseException:
        go.stop()
        loop.close()
        raise
    try:
        yield Pair(go, go_port80, ours, our_port80)
    finally:
        go.stop()
        loop.run_until_complete(ours.stop())
        loop.close()


def _bodiless(status: str, method: str) -> bool:
    return method == "HEAD" or status.split(" ")[1] in ("204", "304")


def _normalise(got: list[Response], first_method: str) -> list[Response]:
    """Re-split where a bodiless answer (HEAD, 204) made ``responses`` take the next
    response for its body; drop ``Server`` (derpkit sends ``Server: derpkit``, derper none)."""
    out: list[Response] = []
    pending = list(got)
    method = first_method
    while pending:
        status, headers, body = pending.pop(0)
        if _bodiless(status, method) and body:
            pending[:0] = split_responses(body)
            body = b""
        h = dict(headers)
        h.pop("server", None)
        out.append((status, h, body))
        method = "GET"  # every follow-up is FOLLOW
    return out


def req(line: str, *headers: str, body: bytes = b"") -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"{line}\r\n{extra}\r\n".encode() + body + FOLLOW


REQUESTS = {
    "GET / (loopback may debug: to /debug/)": req("GET / HTTP/1.1", "Host: relay.test"),
    "GET / behind a proxy": req("GET / HTTP/1.1", "Host: relay.test", "X-Forwarded-For: 192.0.2.7"),
    "GET path and query, Host with port": req("GET /x/y?z=1&w=%2F HTTP/1.1", "Host: relay.test:8080"),
    "HEAD": req("HEAD /derp/probe HTTP/1.1", "Host: relay.test"),
    "GET /generate_204 with challenge": req("GET /generate_204 HTTP/1.1", "Host: h", "X-Tailscale-Challenge: c-1"),
    "GET /derp/probe": req("GET /derp/probe HTTP/1.1", "Host: relay.test"),
    "ACME challenge path": req("GET /.well-known/acme-challenge/tok1 HTTP/1.1", "Host: relay.test"),
    "POST /": req("POST / HTTP/1.1", "Host: relay.test", "Content-Length: 3", body=b"abc"),
    "PUT /derp": req("PUT /derp HTTP/1.1", "Host: relay.test", "Content-Length: 0"),
    "GET /debug": req("GET /debug HTTP/1.1", "Host: relay.test"),
    "GET /debug/ behind a proxy": req("GET /debug/ HTTP/1.1", "Host: relay.test", "X-Forwarded-For: 192.0.2.7"),
    "CONNECT authority form": req("CONNECT example.com:443 HTTP/1.1", "Host: example.com:443"),
    "CONNECT authority form, no Host": req("CONNECT controlplane.tailscale.com:443 HTTP/1.1"),
    "CONNECT path form": req("CONNECT /foo HTTP/1.1", "Host: relay.test"),
    "CONNECT path form, no Host": req("CONNECT /foo HTTP/1.1"),
    "CONNECT /generate_204": req("CONNECT /generate_204 HTTP/1.1", "Host: relay.test"),
    "CONNECT authority form, Connection: close": req("CONNECT example.com:443 HTTP/1.1", "Connection: close"),
    "CONNECT authority form with a path": req("CONNECT derp1.tailscale.com:443/p?q HTTP/1.1"),
    "CONNECT authority form with a query only": req("CONNECT derp1.tailscale.com:443?q HTTP/1.1"),
    "CONNECT path form, HTTP/1.0": req("CONNECT /foo HTTP/1.0"),
    "CONNECT path form with a body": req("CONNECT /foo HTTP/1.1", "Content-Length: 4", body=b"abcd"),
    "CONNECT ACME challenge path": req("CONNECT /.well-known/acme-challenge/tok1 HTTP/1.1", "Host: relay.test"),
    "CONNECT /generate_204, escaped": req("CONNECT /generate%5f204 HTTP/1.1", "X-Tailscale-Challenge: c-2"),
}


@pytest.mark.parametrize("name", list(REQUESTS))
def test_port80_answers_as_go_derper(pair: Pair, name: str) -> None:
    request = REQUESTS[name]
    method = request.split(b" ", 1)[0].decode()
    g, g_closed = converse(pair.go_port80, request, None)
    o, o_closed = converse(pair.our_port80, request, None)
    g, o = _normalise(g, method), _normalise(o, method)
    assert (o, o_closed) == (g, g_closed), {"go": (g, g_closed), "derpkit": (o, o_closed)}


def test_upgrade_request_is_answered_then_closed(pair: Pair) -> None:
    """A known difference: after answering a request that asks for an upgrade (here a DERP
    upgrade sent to the plain port), derper keeps the connection; derpkit hangs up, since
    aiohttp would read the next request as the upgraded stream and never answer it. The
    answer itself is the same."""
    request = req("GET /derp HTTP/1.1", "Host: relay.test", "Upgrade: DERP", "Connection: Upgrade")
    g, g_closed = converse(pair.go_port80, request, None)
    o, o_closed = converse(pair.our_port80, request, None)
    g, o = _normalise(g, "GET"), _normalise(o, "GET")
    assert len(g) == 2 and not g_closed
    assert len(o) == 1 and o_closed
    assert o[0][1].pop("connection") == "close"
    assert o[0] == g[0]
