"""HTTP routes side by side with the real Go derper: status, headers and body shape.

One Go derper and one ``derpkit serve`` process (plain HTTP, loopback) answer the same
requests. Headers must match exactly, except the ones that only describe transport or
time (Date, Content-Length, Transfer-Encoding) and ``Server`` (derper sends none; aiohttp
insists on one, so derpkit sends ``Server: derpkit`` — a documented difference). Bodies
must be byte-equal except where derpkit words its own page (home, debug index, metrics).
"""

from __future__ import annotations

import aiohttp
import pytest

from tests.goderper import GoDerper, start_derper

from .serve_proc import ServeProc, start_serve

IGNORED = {"Date", "Content-Length", "Transfer-Encoding", "Server"}

# (method, path, request headers, bodies must be equal)
CASES = [
    ("GET", "/robots.txt", {}, True),
    ("GET", "/derp/probe", {}, True),
    ("HEAD", "/derp/probe", {}, True),
    ("POST", "/derp/probe", {}, True),
    ("PUT", "/derp/latency-check", {}, True),
    ("GET", "/derp/latency-check", {}, True),
    ("GET", "/generate_204", {}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "ts_derp99b.tailscale.com"}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "foo bar"}, True),
    ("GET", "/generate_204", {"X-Tailscale-Challenge": "x" * 65}, True),
    ("POST", "/generate_204", {"X-Tailscale-Challenge": "input"}, True),
    ("GET", "/bootstrap-dns", {}, True),
    ("GET", "/bootstrap-dns?q=foo.example", {}, True),
    ("GET", "/derp", {}, True),
    ("POST", "/derp", {"Upgrade": "h2c"}, True),
    ("GET", "/debug", {}, True),
    ("HEAD", "/debug", {}, True),
    ("GET", "//x", {}, True),
    ("GET", "/a/../robots.txt", {}, True),
    ("GET", "/debug/check", {}, True),
    ("GET", "/debug/nope", {}, True),
    ("GET", "/debug/", {"X-Forwarded-For": "192.0.2.1"}, True),
    ("GET", "/debug/varz", {"X-Forwarded-For": "192.0.2.1"}, True),
    ("GET", "/", {}, False),
    ("POST", "/", {}, False),
    ("GET", "/derp/", {}, False),
    ("GET", "/no/such/page", {}, False),
    ("GET", "/debug/", {}, False),
    ("GET", "/debug/varz", {}, False),
    ("GET", "/debug/vars", {}, False),
    ("GET", "/debug/gc", {}, True),
]


@pytest.fixture(scope="module")
def go_derper(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    d = start_derper(tmp_path_factory.mktemp("derper"), extra_args=("-stun=false",))
    yield d
    d.stop()


async def fetch(base: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, base + path, headers=headers, allow_redirects=False) as r:
            return r.status, dict(r.headers), await r.read()


@pytest.fixture
async def ours():  # noqa: ANN201
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false")
    yield sp
    await sp.stop()


async def test_every_route_matches_go_derper(go_derper: GoDerper, ours: ServeProc) -> None:
    base = f"http://127.0.0.1:{ours.port}"
    for method, path, headers, same_body in CASES:
        g = await fetch(go_derper.base_url, method, path, headers)
        o = await fetch(base, method, path, headers)
        what = f"{method} {path} {headers}"
        assert o[0] == g[0], f"{what}: status {o[0]} != derper's {g[0]}"
        gh = {k: v for k, v in g[1].items() if k not in IGNORED}
        oh = {k: v for k, v in o[1].items() if k not in IGNORED}
        assert oh == gh, f"{what}: headers differ"
        if same_body:
            assert o[2] == g[2], f"{what}: body {o[2]!r} != derper's {g[2]!r}"
        assert o[1].get("Server") == "derpkit" and "Server" not in g[1]


async def test_home_and_debug_pages_keep_derpers_blocks(go_derper: GoDerper, ours: ServeProc) -> None:
    base = f"http://127.0.0.1:{ours.port}"
    for url in (go_derper.base_url, base):
        _, _, home = await fetch(url, "GET", "/", {})
        text = home.decode()
        # default -hostname derp.tailscale.com: the prod blocks are shown; loopback: debug link.
        for needle in ("If you suspect abuse", "Tailscale Security Policies", "Debug info",
                       "https://tailscale.com/kb/1232/derp-servers"):
            assert needle in text, (url, needle)
        _, _, dbg = await fetch(url, "GET", "/debug/", {})
        for needle in ("Uptime", "Version", "Machine", "TLS hostname", "Mesh key", "/debug/vars", "/debug/varz",
                       "/debug/check", "/debug/gc", "/debug/pprof/"):
            assert needle in dbg.decode(), (url, needle)


async def test_derp_disabled_and_blank_home_like_go() -> None:
    go = start_derper(extra_args=("-stun=false", "-derp=false", "-home", "blank"))
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-derp=false", "-home", "blank")
    try:
        for method, path in (("GET", "/derp"), ("GET", "/"), ("GET", "/derp/probe"), ("GET", "/elsewhere")):
            g = await fetch(go.base_url, method, path, {})
            o = await fetch(f"http://127.0.0.1:{sp.port}", method, path, {})
            assert (o[0], o[2]) == (g[0], g[2]), path
            assert {k: v for k, v in o[1].items() if k not in IGNORED} == {
                k: v for k, v in g[1].items() if k not in IGNORED
            }, path
    finally:
        go.stop()
        await sp.stop()


async def test_home_redirect_like_go() -> None:
    go = start_derper(extra_args=("-stun=false", "-home", "https://example.com/derp-info"))
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-home", "https://example.com/derp-info")
    try:
        for path in ("/", "/anything"):
            g = await fetch(go.base_url, "GET", path, {})
            o = await fetch(f"http://127.0.0.1:{sp.port}", "GET", path, {})
            assert o[0] == g[0] == 302
            assert o[1]["Location"] == g[1]["Location"] == "https://example.com/derp-info"
    finally:
        go.stop()
        await sp.stop()
