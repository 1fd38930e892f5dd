"""CONNECT, Go derper and derpkit side by side (spec derper-cli §3.12).

Three pairs of servers, each pair started with the same flags: TLS with ``-ace=false``, TLS
with ``-ace=true`` (both with a CA-signed ``localhost`` certificate, -certmode manual), and
plain HTTP. Every request is a CONNECT followed on the same connection by
``GET /robots.txt``, so the comparison also covers whether the server keeps the connection
after its answer. For each response: same status line, same header names (Date aside),
same header values, same body; and the same open/closed state at the end.

Only refused targets are sent here (or ``-ace=false``, where nothing is dialled): an allowed
target would make both servers resolve a real ``*.tailscale.com`` name. The tunnel itself
and the 502 path are compared inside a private network namespace by
``test_tunnel_matches_go_in_private_namespace`` (tests/server/ace_netns.py).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.goderper import GoDerper, require_derper, start_derper
from tests.server.serve_proc import ServeProc, start_serve
from tests.server.test_ace import run_netns

from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(120)

ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: localhost\r\n\r\n"
Response = tuple[str, dict[str, str], bytes]


def responses(data: bytes) -> list[Response]:
    """Split a byte stream into (status line, headers without Date, body) triples."""
    out: list[Response] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"truncated response: {data[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.lower() != "date":
                headers[name.lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        else:
            body, data = rest, b""
        out.append((lines[0], headers, body))
    return out


def converse(port: int, request: bytes, ca: TestCA | None) -> tuple[list[Response], bool]:
    """Send, read until EOF or 0.5 s of quiet; (responses, closed by the server)."""
    s: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=5)
    if ca is not None:
        s = ca.client_context().wrap_socket(s, server_hostname="localhost")
    s.sendall(request)
    s.settimeout(0.5)
    buf, closed = b"", False
    try:
        while True:
            d = s.recv(65536)
            if not d:
                closed = True
                break
            buf += d
    except TimeoutError:
        pass
    except (ConnectionError, ssl.SSLError):
        closed = True
    s.close()
    return responses(buf), closed


class Pair:
    def __init__(self, go: GoDerper, ours: ServeProc, ca: TestCA | None, loop: asyncio.AbstractEventLoop) -> None:
        self.go, self.ours, self.ca, self.loop = go, ours, ca, loop

    def ours_logged(self, line: str, timeout: float = 5.0) -> bool:
        """Whether derpkit logged ``line``; runs the fixture's loop, which drains its stderr."""

        async def wait() -> bool:
            try:
                async with asyncio.timeout(timeout):
                    while not any(line in x for x in self.ours.log):
                        await asyncio.sleep(0.05)
            except TimeoutError:
                return False
            return True

        return self.loop.run_until_complete(wait())

    def compare(self, request: bytes) -> list[Response]:
        g, g_closed = converse(self.go.port, request, self.ca)
        o, o_closed = converse(self.ours.port, request, self.ca)
        assert len(o) == len(g) and o_closed == g_closed, {"go": (g, g_closed), "derpkit": (o, o_closed)}
        for (gs, gh, gb), (os_, oh, ob) in zip(g, o, strict=True):
            assert os_ == gs
            if gs.endswith(" 200 OK"):  # the robots.txt follow-up: only its presence matters here
                continue
            assert oh == gh, {"go": gh, "derpkit": oh}
            assert ob == gb
        return g


def _pair(tmp: pytest.TempPathFactory, ca: TestCA | None, go_args: tuple[str, ...], our_args: tuple[str, ...],
          loop: asyncio.AbstractEventLoop) -> Pair:
    if ca is not None:
        go = start_derper(tmp.mktemp("go"), tls=True, hostname="localhost", certdir=ca.dir, extra_args=go_args)
    else:
        go = start_derper(tmp.mktemp("go"), extra_args=go_args)
    try:
        ours = loop.run_until_complete(start_serve("-a", "127.0.0.1:0", "-http-port", "-1", "-stun=false", *our_args))
    except BaseException:
        go.stop()
        raise
    return Pair(go, ours, ca, loop)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, test_ca: TestCA, localhost_leaf: Leaf) -> Iterator[dict[str, Pair]]:
    require_derper()
    loop = asyncio.new_event_loop()
    tls = ("-certmode", "manual", "-hostname", "localhost", "-certdir", str(test_ca.dir))
    plain = ("-certmode", "letsencrypt", "-certdir", str(tmp_path_factory.mktemp("acme")))
    made: dict[str, Pair] = {}
    try:
        made["tls"] = _pair(tmp_path_factory, test_ca, (), tls, loop)
        made["ace"] = _pair(tmp_path_factory, test_ca, ("-ace",), (*tls, "-ace"), loop)
        made["plain"] = _pair(tmp_path_factory, None, (), (*plain, "-ace"), loop)
        yield made
    finally:
        for p in made.values():
            p.go.stop()
            loop.run_until_complete(p.ours.stop())
        loop.close()


def connect(target: str, *headers: str, version: str = "1.1") -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"CONNECT {target} HTTP/{version}\r\n{extra}\r\n".encode() + ROBOTS


DISABLED = [
    connect("controlplane.tailscale.com:443"),  # allowed target, but -ace is off: no dial
    connect("controlplane.tailscale.com:443", "Host: controlplane.tailscale.com:443"),
    connect("derp1.tailscale.com:443"),
    connect("/foo"),
    connect("controlplane.tailscale.com:443", "Connection: close"),
    connect("controlplane.tailscale.com:443", version="1.0"),
    connect("[foo]:443"),  # Go's server refuses to parse it: bare 400, closed
]

INVALID = [
    connect("derp1.tailscale.com:443"),
    connect("derp.tailscale.com:80"),
    connect("controlplane.tailscale.com:8443"),
    connect("controlplane.tailscale.com"),
    connect("controlplane.tailscale.com.:443"),
    connect("CONTROLPLANE.TAILSCALE.COM:443"),
    connect("example.com:443"),
    connect("[::1]:443"),
    connect("127.0.0.1:443"),
    connect(":443"),
    connect("/foo"),
    connect("x.tailscale.com:443/p?q"),
    connect("derp1.tailscale.com:443", "Connection: close"),
    connect("derp1.tailscale.com:443", version="1.0"),
    b"CONNECT derp1.tailscale.com:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + ROBOTS,
    connect("x.tailscale.com:abc"),
    connect("[::1:443"),
    connect("a:b:443"),
    connect("a%41derp.tailscale.com:443"),
    connect("[controlplane.tailscale.com]:443"),
]

PLAIN = [
    connect("controlplane.tailscale.com:443"),
    connect("derp1.tailscale.com:443", "Host: derp1.tailscale.com:443"),
    connect("[::1]:443"),
    connect("controlplane.tailscale.com:443", "Connection: close"),
    connect("controlplane.tailscale.com:443", version="1.0"),
    connect("x.tailscale.com:abc"),
]


def _ids(reqs: list[bytes]) -> list[str]:
    return [r.split(b"\r\n\r\n")[0].decode("utf-8", "replace").replace("\r\n", " | ") for r in reqs]


@pytest.mark.parametrize("request_bytes", DISABLED, ids=_ids(DISABLED))
def test_connect_disabled_matches_go(pairs: dict[str, Pair], request_bytes: bytes) -> None:
    got = pairs["tls"].compare(request_bytes)
    if b"[foo]" not in request_bytes:
        assert got[0][0].endswith("403 Forbidden") and got[0][2] == b"CONNECT not enabled\n"


@pytest.mark.parametrize("request_bytes", INVALID, ids=_ids(INVALID))
def test_connect_invalid_target_matches_go(pairs: dict[str, Pair], request_bytes: bytes) -> None:
    pairs["ace"].compare(request_bytes)


def test_invalid_target_log_line_matches_go(pairs: dict[str, Pair]) -> None:
    p = pairs["ace"]
    p.compare(connect("derp7.tailscale.com:443"))
    p.compare(connect("controlplane.tailscale.com:25"))
    want = ['CONNECT target "derp7.tailscale.com:443" not allowed: bad host',
            'CONNECT target "controlplane.tailscale.com:25" not allowed: only ports 443 and 80 are allowed']
    for line in want:
        assert line in p.go.log()
        assert p.ours_logged(line), line


@pytest.mark.parametrize("request_bytes", PLAIN, ids=_ids(PLAIN))
def test_plain_listener_connect_matches_go(pairs: dict[str, Pair], request_bytes: bytes) -> None:
    pairs["plain"].compare(request_bytes)


def _no_date(raw: str) -> str:
    return re.sub(r"\r\nDate: [^\r]*", "", raw)


@pytest.mark.timeout(150)
def test_tunnel_matches_go_in_private_namespace(tmp_path: Path) -> None:
    """The 200 tunnel and the 502s, both servers in one private namespace (ace_netns.py)."""
    go = require_derper()
    run = run_netns(tmp_path, go)
    g, o = run["go"], run["derpkit"]
    for key in ("ok_head", "early_echo", "ping_echo", "bulk_ok", "client_close_reaches_target",
                "target_bytes", "bye_echo", "target_close_reaches_client"):
        assert o[key] == g[key], (key, g[key], o[key])
    assert g["ok_head"] == "HTTP/1.1 200 OK\r\n\r\n"
    for key in ("unresolvable", "refused"):
        assert _no_date(o[key]["first"]) == _no_date(g[key]["first"])
        assert o[key]["second_status"] == g[key]["second_status"]
    # A live tunnel is a TLS request in flight on both, and stops being one when it ends.
    # (Absolute values can differ: Go still counts the earlier tunnel whose target never read.)
    assert g["active_during_tunnel"] - g["active_after_tunnel"] == 1, g
    assert o["active_during_tunnel"] - o["active_after_tunnel"] == 1, o
    # Both bound what a client can push into a tunnel whose target reads nothing.
    assert o["held_pushed"] < o["held_limit"] // 2 and g["held_pushed"] < g["held_limit"] // 2
