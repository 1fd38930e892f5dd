"""derper's HTTP routes, Go and derpkit side by side.

One Go derper and one ``derpkit serve`` process, started with the same flags, get the same
requests, once with both serving plain HTTP and once with both serving TLS (``-certmode
manual -hostname localhost``, a certificate from the test CA); each answer must have the same status code,
the same set of header names (bar the ones listed in IGNORED) and the same values for the
headers clients act on. Bodies are compared where they are protocol (not the home page).
Differences we keep on purpose are in docs/compat.md.
"""

from __future__ import annotations

import asyncio
import http.client
import ssl
from dataclasses import dataclass

import pytest

from tests.goderper import start_derper
from tests.server.serve_proc import start_serve

from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(60)

# Headers that legitimately differ per server or per response.
#  Date: the clock; Server: Go sends none, derpkit sends "derpkit" (docs/compat.md).
IGNORED = {"date", "server"}
# Headers whose value must match, not just their presence.
VALUES = {"cache-control", "x-tailscale-response", "access-control-allow-origin", "content-type",
          "x-content-type-options", "strict-transport-security", "content-security-policy",
          "x-frame-options", "location", "connection"}

CHALLENGE_OK = "abc-1.2_3:4Z"
CASES = [
    ("GET", "/", {}, False),
    ("HEAD", "/", {}, False),
    ("POST", "/", {}, False),
    ("GET", "/some/other/path", {}, False),
    ("GET", "/robots.txt", {}, True),
    ("GET", "/derp/probe", {}, True),
    ("HEAD", "/derp/probe", {}, True),
    ("POST", "/derp/probe", {}, True),
    ("GET", "/derp/latency-check", {}, True),
    ("PUT", "/derp/latency-check", {}, True),
    ("GET", "/generate_204", {}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": CHALLENGE_OK}, True),
    ("POST", "/generate_204", {"X-Tailscale-Challenge": CHALLENGE_OK}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "bad!char"}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "a" * 64}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "a" * 65}, True),
    ("GET", "/bootstrap-dns", {}, True),
    ("GET", "/bootstrap-dns?q=example.com", {}, True),
    ("GET", "/derp", {}, True),
    ("POST", "/derp", {}, True),
    ("GET", "/derp", {"Upgrade": "not-derp", "Connection": "Upgrade"}, True),
    ("GET", "/debug/", {}, False),
]


@dataclass(frozen=True)
class Pair:
    """Go derper's port and ours, and how to reach both (plain HTTP, or TLS to ``localhost``)."""

    go_port: int
    our_port: int
    ssl_context: ssl.SSLContext | None = None


def fetch(pair: Pair, port: int, method: str, path: str,
          headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    if pair.ssl_context is None:
        c: http.client.HTTPConnection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        c = http.client.HTTPSConnection("localhost", port, timeout=5, context=pair.ssl_context)
    try:
        c.request(method, path, headers=headers)
        r = c.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        c.close()


@pytest.fixture(scope="module", params=["plain", "tls"])
def servers(request, tmp_path_factory, test_ca: TestCA, localhost_leaf: Leaf):  # noqa: ANN001, ANN201
    """Go derper and ``derpkit serve`` with the same flags: no STUN, no port-80 listener."""
    tls = request.param == "tls"
    if tls:
        go = start_derper(tmp_path_factory.mktemp("go"), tls=True, hostname="localhost",
                          certdir=test_ca.dir)
        common = ["-certmode", "manual", "-hostname", "localhost", "-certdir", str(test_ca.dir)]
        addr = "localhost:0"
    else:
        go = start_derper(tmp_path_factory.mktemp("go"))
        common = ["-certmode", "letsencrypt", "-certdir", str(tmp_path_factory.mktemp("acme"))]
        addr = "127.0.0.1:0"
    loop = asyncio.new_event_loop()
    try:
        sp = loop.run_until_complete(start_serve("-a", addr, *common, "-http-port", "-1", "-stun=false"))
    except BaseException:
        go.stop()
        loop.close()
        raise
    try:
        yield Pair(go.port, sp.port, test_ca.client_context() if tls else None)
    finally:
        go.stop()
        loop.run_until_complete(sp.stop())
        loop.close()


@pytest.mark.parametrize(("method", "path", "headers", "same_body"), CASES,
                         ids=[f"{m} {p} {next(iter(h.values()), '')[:10]}" for m, p, h, _ in CASES])
def test_route_matches_go(servers, method: str, path: str, headers: dict[str, str], same_body: bool) -> None:
    g_status, g_h, g_body = fetch(servers, servers.go_port, method, path, headers)
    o_status, o_h, o_body = fetch(servers, servers.our_port, method, path, headers)
    assert o_status == g_status, (g_status, g_h, o_status, o_h)
    g_names = set(g_h) - IGNORED
    o_names = set(o_h) - IGNORED
    if not same_body:
        # Different page text means a different length; the header must still be there.
        assert ("content-length" in g_names) == ("content-length" in o_names)
        g_names.discard("content-length")
        o_names.discard("content-length")
    assert o_names == g_names, {"go": g_h, "derpkit": o_h}
    for name in VALUES & g_names:
        assert o_h[name] == g_h[name], (name, g_h[name], o_h[name])
    if same_body:
        assert o_body == g_body


def test_challenge_answer_is_exact(servers) -> None:
    """The one route a Tailscale client checks byte for byte (captive-portal detection)."""
    for port in (servers.go_port, servers.our_port):
        status, h, body = fetch(servers, port, "GET", "/generate_204", {"X-Tailscale-Challenge": CHALLENGE_OK})
        assert status == 204 and h["x-tailscale-response"] == f"response {CHALLENGE_OK}" and body == b""


def test_debug_redirect_matches_go(servers) -> None:
    """/debug -> /debug/: Go answers 307 Temporary Redirect (found here; derpkit had 301)."""
    g = fetch(servers, servers.go_port, "GET", "/debug", {})
    o = fetch(servers, servers.our_port, "GET", "/debug", {})
    assert g[0] == 307 and g[1]["location"] == "/debug/"
    assert o[0] == g[0] and o[1]["location"] == g[1]["location"]
    assert o[1]["content-type"] == g[1]["content-type"]
