"""CONNECT ("ACE", spec derper-cli §3.12): the target rule, and derpkit serve's answers.

The rule table follows Go's cmd/derper/ace.go and net.SplitHostPort (error texts included,
since derper logs them). The server tests run ``derpkit serve`` over real TLS on loopback.

Only targets that are refused (or ``-ace=false``) are sent from this process: an allowed
target makes the server resolve a ``*.tailscale.com`` name, and that lookup must not leave
the machine. The success and dial-failure paths therefore run in tests/server/ace_netns.py
under ``unshare -rnm``: a private network namespace (only a loopback) with a bind-mounted
private /etc/hosts mapping ``controlplane.tailscale.com`` to 127.0.0.1 and a resolv.conf
pointing at the namespace's own loopback. That tests the real resolver and dialler; no test
hook in the server is needed.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from derpkit.server.frontdoor import ace
from derpkit.server.frontdoor.goresponse import go_error
from tests.goderper import require_netns
from tests.server.helpers import converse
from tests.server.serve_proc import ServeProc, start_serve

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(60)

# (target, allowed (host, port) or Go's error text)
TARGETS = [
    ("controlplane.tailscale.com:443", ("controlplane.tailscale.com", 443)),
    ("controlplane.tailscale.com:80", ("controlplane.tailscale.com", 80)),
    ("login.tailscale.com:443", ("login.tailscale.com", 443)),
    ("a.b.tailscale.com:80", ("a.b.tailscale.com", 80)),
    # A bracketed name passes the rule (Go's URL parser rejects it earlier, see below).
    ("[controlplane.tailscale.com]:443", ("controlplane.tailscale.com", 443)),
    ("derp1.tailscale.com:443", "bad host"),
    ("derp.tailscale.com:80", "bad host"),
    ("x-derp-y.tailscale.com:443", "bad host"),
    ("notderp.tailscale.com:443", "bad host"),
    ("tailscale.com:443", "bad host"),  # no dot before the suffix
    (".tailscale.com:443", (".tailscale.com", 443)),  # the bare suffix passes, as in Go
    ("controlplane.tailscale.com.:443", "bad host"),  # trailing dot
    ("CONTROLPLANE.TAILSCALE.COM:443", "bad host"),  # case-sensitive suffix, as Go
    ("DERP1.tailscale.com:443", ("DERP1.tailscale.com", 443)),  # and case-sensitive "derp"
    ("example.com:443", "bad host"),
    ("tailscale.com.evil.example:443", "bad host"),
    (":443", "bad host"),
    ("controlplane.tailscale.com:8443", "only ports 443 and 80 are allowed"),
    ("controlplane.tailscale.com:0443", "only ports 443 and 80 are allowed"),
    ("controlplane.tailscale.com:", "only ports 443 and 80 are allowed"),
    ("controlplane.tailscale.com:443/x", "only ports 443 and 80 are allowed"),
    ("controlplane.tailscale.com", "address controlplane.tailscale.com: missing port in address"),
    ("/foo", "address /foo: missing port in address"),
    ("", "missing port in address"),
    ("[::1]:443", "bad host"),
    ("::1:443", "address ::1:443: too many colons in address"),
    ("[::1:443", "address [::1:443: missing ']' in address"),
    ("[::1]", "address [::1]: missing port in address"),
    ("[::1]x:443", "address [::1]x:443: missing port in address"),
    ("[::1]:443:1", "address [::1]:443:1: too many colons in address"),
    ("a[b.tailscale.com:443", "address a[b.tailscale.com:443: unexpected '[' in address"),
    ("ab].tailscale.com:443", "address ab].tailscale.com:443: unexpected ']' in address"),
    ("127.0.0.1:443", "bad host"),
]


@pytest.mark.parametrize(("target", "want"), TARGETS, ids=[t or "<empty>" for t, _ in TARGETS])
def test_check_target(target: str, want: object) -> None:
    if isinstance(want, tuple):
        assert ace.check_target(target) == want
    else:
        with pytest.raises(ace.TargetError) as e:
            ace.check_target(target)
        assert str(e.value) == want


# Request URIs Go's HTTP server turns into 400 before derper sees them (observed on
# derper v1.102.3; tests/interop/test_ace_go.py compares them live).
URIS = [
    (b"controlplane.tailscale.com:443", True),
    (b"derp1.tailscale.com:443", True),
    (b"", True),
    (b":443", True),
    (b"x.tailscale.com:", True),
    (b"/foo", True),
    (b"x.tailscale.com:443/p?q", True),
    (b"u@x.tailscale.com:443", True),
    (b"[::1]:443", True),
    (b"[::1%25eth0]:8080", True),
    (b"x%25.tailscale.com:8080", True),
    ("\u00e9.tailscale.com:8080".encode(), True),
    (b"x.tailscale.com:443?%zz", True),
    (b"x.tailscale.com:abc", False),
    (b"[::1:443", False),
    (b"[foo]:443", False),
    (b"[controlplane.tailscale.com]:443", False),
    (b"a:b:443", False),
    (b"a{b}.tailscale.com:443", False),
    (b"a%zz.tailscale.com:443", False),
    (b"a%41derp.tailscale.com:443", False),
    (b"u{@x.tailscale.com:443", False),
    (b"x.tailscale.com:443/%zz", False),
    (b"[::1]x:8080", False),
    (b"x.tailscale.com\x01:443", False),
]


@pytest.mark.parametrize(("uri", "ok"), URIS, ids=[u.decode("utf-8", "replace") or "<empty>" for u, _ in URIS])
def test_request_uri_ok(uri: bytes, ok: bool) -> None:
    assert ace.request_uri_ok(uri) is ok


def test_go_error_bytes() -> None:
    r = go_error(403, "CONNECT not enabled")
    assert re.fullmatch(
        rb"HTTP/1\.1 403 Forbidden\r\nContent-Type: text/plain; charset=utf-8\r\n"
        rb"X-Content-Type-Options: nosniff\r\nDate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT\r\n"
        rb"Content-Length: 20\r\n\r\nCONNECT not enabled\n", r), r
    assert go_error(502, "Connect failure", close=True).split(b"\r\n")[5] == b"Connection: close"
    assert go_error(404, "404 page not found", http10=True, close=True).startswith(b"HTTP/1.0 404 Not Found\r\n")
    assert b"Connection" not in go_error(404, "x", http10=True, close=True)


# ---------------------------------------------------------------- over real sockets


async def exchange(port: int, request: bytes, *, tls: bool) -> tuple[bytes, bool]:
    """Send ``request`` (may hold several), read until the server is quiet; (bytes, closed)."""
    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return await converse(port, request, quiet=0.5, ssl=ctx, server_hostname="127.0.0.1" if tls else None)


async def tls_serve(tmp_path: Path, *extra: str) -> ServeProc:
    return await start_serve("-a", "127.0.0.1:0", "-certmode", "manual", "-hostname", "127.0.0.1",
                             "-certdir", str(tmp_path), "-http-port", "-1", "-stun=false", *extra)


async def wait_log(sp: ServeProc, needle: str, timeout: float = 5.0) -> bool:
    async with asyncio.timeout(timeout):
        while not any(needle in line for line in sp.log):
            await asyncio.sleep(0.05)
    return True


ROBOTS = b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n"


def _varz(port: int) -> str:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/debug/varz", timeout=5, context=ctx) as r:
        return r.read().decode()


async def test_connect_disabled_is_403_and_keeps_the_connection(tmp_path: Path) -> None:
    sp = await tls_serve(tmp_path)
    try:
        # Allowed-looking, but -ace is off: no dial happens.
        out, closed = await exchange(sp.port, b"CONNECT controlplane.tailscale.com:443 HTTP/1.1\r\n\r\n" + ROBOTS, tls=True)
        assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n") and not closed
        first, _, second = out.partition(b"CONNECT not enabled\n")
        assert b"\r\nContent-Length: 20\r\n" in first and b"\r\nX-Content-Type-Options: nosniff\r\n" in first
        assert second.startswith(b"HTTP/1.1 200 OK\r\n") and second.endswith(b"Disallow: /\n")
        out, closed = await exchange(sp.port, b"CONNECT /anything HTTP/1.1\r\nConnection: close\r\n\r\n", tls=True)
        assert out.endswith(b"\r\nConnection: close\r\n\r\nCONNECT not enabled\n") and closed
        # derper counts CONNECTs among TLS requests: two of them, robots.txt, and this scrape.
        varz = await asyncio.to_thread(_varz, sp.port)
        assert re.search(r'^derper_tls_request_version\{version="1.3"\} 4$', varz, re.M), varz
        assert re.search(r'^derper_tls_active_version\{version="1.3"\} 1$', varz, re.M)
    finally:
        await sp.stop()


async def test_bad_target_is_403_and_logged(tmp_path: Path) -> None:
    sp = await tls_serve(tmp_path, "-ace")
    try:
        for target, why in (("derp1.tailscale.com:443", "bad host"),
                            ("controlplane.tailscale.com:8443", "only ports 443 and 80 are allowed"),
                            ("controlplane.tailscale.com", "missing port in address"),
                            ("[::1]:443", "bad host")):
            out, closed = await exchange(sp.port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode(), tls=True)
            assert out.startswith(b"HTTP/1.1 403 Forbidden\r\n"), out
            assert out.endswith(b"\r\n\r\nInvalid CONNECT target\n") and not closed
            assert await wait_log(sp, f'CONNECT target "{target}" not allowed: ')
            assert any(why in line and target in line for line in sp.log)
        # A body is skipped; the next request on the connection is served.
        out, _ = await exchange(sp.port, b"CONNECT example.com:443 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + ROBOTS,
                                tls=True)
        assert out.count(b"HTTP/1.1 ") == 2 and out.endswith(b"Disallow: /\n")
        # A target Go's server cannot parse: its bare 400, then the connection closes.
        out, closed = await exchange(sp.port, b"CONNECT [foo]:443 HTTP/1.1\r\n\r\n", tls=True)
        assert out == ace.GO_BAD_REQUEST and closed
    finally:
        await sp.stop()


async def test_plain_listener_connect_is_404(tmp_path: Path) -> None:
    """No TLS: derper's mux answers an authority-form CONNECT with its 404, keeps the line open."""
    sp = await start_serve("-a", "127.0.0.1:0", "-certmode", "letsencrypt", "-certdir", str(tmp_path),
                           "-http-port", "-1", "-stun=false", "-ace")
    try:
        out, closed = await exchange(sp.port, b"CONNECT controlplane.tailscale.com:443 HTTP/1.1\r\n\r\n" + ROBOTS,
                                     tls=False)
        assert out.startswith(b"HTTP/1.1 404 Not Found\r\n") and not closed
        assert b"\r\n\r\n404 page not found\nHTTP/1.1 200 OK\r\n" in out
        assert not any("CONNECT" in line for line in sp.log)  # never reached ACE
    finally:
        await sp.stop()


def _netns_or_skip() -> None:
    require_netns("the CONNECT success and dial-failure paths need a private /etc/hosts and network")


def run_netns(tmp_path: Path, go_derper: str | None = None) -> dict:
    """Run tests/server/ace_netns.py in a private network + mount namespace."""
    _netns_or_skip()
    argv = ["unshare", "-rnm", sys.executable, "-m", "tests.server.ace_netns", str(tmp_path)]
    if go_derper:
        argv.append(go_derper)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def varz_value(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, name
    return float(m.group(1))


@pytest.mark.timeout(120)
def test_tunnel_in_private_namespace(tmp_path: Path) -> None:
    run = run_netns(tmp_path)
    d = run["derpkit"]
    assert d["ok_head"] == "HTTP/1.1 200 OK\r\n\r\n"
    assert d["early_echo"] == "early;"  # bytes sent along with the CONNECT are forwarded
    assert d["ping_echo"] == "ping" and d["bulk_ok"]
    assert d["client_close_reaches_target"] and d["target_bytes"] == len("early;ping") + (4 << 20)
    assert d["bye_echo"] == "BYE" and d["target_close_reaches_client"]
    # The target reads nothing: what the client can push is bounded by socket buffers and
    # the transports' high-water marks, far below what it tried.
    assert d["held_pushed"] < d["held_limit"] // 2, d["held_pushed"]
    for key in ("unresolvable", "refused"):
        assert d[key]["first"].startswith("HTTP/1.1 502 Bad Gateway\r\n")
        assert d[key]["first"].endswith("\r\n\r\nConnect failure\n")
        assert d[key]["second_status"] == "HTTP/1.1 200 OK"  # the connection stays usable
    log = run["derpkit_log"]
    assert "error CONNECT dialing nowhere.tailscale.com:443: " in log
    assert "error CONNECT dialing controlplane.tailscale.com:80: " in log
    v = d["varz"]
    assert varz_value(v, 'derpkit_ace_requests{result="connected"}') == 4
    # derper_tls_active_version counts a live tunnel, and stops counting it once it ends.
    assert d["active_during_tunnel"] - d["active_after_tunnel"] == 1, d
    assert varz_value(v, 'derpkit_ace_requests{result="dial_failed"}') == 2
    assert varz_value(v, 'derpkit_ace_bytes{direction="from_target"}') >= len("early;ping") + (4 << 20)

