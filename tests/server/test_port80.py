"""The -http-port listener of TLS mode, with real HTTP requests (spec derper-cli §3.11)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
import yarl

from derpkit.protocol.keys import NodePrivate
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs

from .serve_proc import start_serve

pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


class FakeAcme:
    """Stands in for an ACME provider's HTTP-01 table."""

    def __init__(self) -> None:
        self.tokens = {"/.well-known/acme-challenge/tok1": "tok1.thumb"}

    def __call__(self, host: str, path: str) -> tuple[int, str] | None:
        if not path.startswith(certs.CHALLENGE_PREFIX):
            return None
        if host.split(":")[0] not in ("127.0.0.1", "derp.example.test"):
            return 403, "acme/autocert: host not configured"
        answer = self.tokens.get(path)
        return (200, answer) if answer is not None else (404, "404 page not found")


@pytest.fixture
async def node(tmp_path: Path):
    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1", poll_interval=0)
    key = NodePrivate.generate()
    n = DerpNode(NodeOptions(
        ssl_context=provider.ssl_context(key.public()), private_key=key, stun_port=None,
        http_port=0, acme_http01=FakeAcme(),
    ))
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


async def fetch(port: int, method: str, path: str, headers: dict[str, str] | None = None):
    async with aiohttp.ClientSession() as s:
        async with s.request(
            method, yarl.URL(f"http://127.0.0.1:{port}{path}", encoded=True), headers=headers or {}, allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=5),
        ) as r:
            return r.status, r.headers, await r.text()


async def test_generate_204_with_challenge(node: DerpNode) -> None:
    assert node.http_port and node.http_port != node.port
    status, headers, body = await fetch(node.http_port, "GET", "/generate_204", {"X-Tailscale-Challenge": "abc"})
    assert status == 204 and body == ""
    assert headers["X-Tailscale-Response"] == "response abc"


async def test_redirects_copy_host_header_and_raw_uri(node: DerpNode) -> None:
    status, headers, body = await fetch(node.http_port, "GET", "/derp?x=1&y=%2F", {"Host": "derp.example.test:8080"})
    assert status == 302
    assert headers["Location"] == "https://derp.example.test:8080/derp?x=1&y=%2F"
    assert body == '<a href="https://derp.example.test:8080/derp?x=1&amp;y=%2F">Found</a>.\n\n'
    status, headers, body = await fetch(node.http_port, "HEAD", "/bootstrap-dns", {"Host": "h"})
    assert status == 302 and headers["Location"] == "https://h/bootstrap-dns" and body == ""


async def test_other_methods_get_use_https(node: DerpNode) -> None:
    for method in ("POST", "PUT", "DELETE"):
        status, headers, body = await fetch(node.http_port, method, "/derp")
        assert (status, body) == (400, "Use HTTPS\n")
        assert headers["Content-Type"] == "text/plain; charset=utf-8"
        assert headers["X-Content-Type-Options"] == "nosniff"


async def test_root_from_debug_allowed_peer_goes_to_debug(node: DerpNode, monkeypatch) -> None:
    status, headers, _ = await fetch(node.http_port, "GET", "/", {"Host": "derp.example.test"})
    assert status == 302 and headers["Location"] == "https://derp.example.test/debug/"  # loopback is allowed
    # Behind a proxy (X-Forwarded-For), the debug check fails: the plain redirect.
    status, headers, _ = await fetch(node.http_port, "GET", "/", {"Host": "h", "X-Forwarded-For": "192.0.2.1"})
    assert status == 302 and headers["Location"] == "https://h/"


async def test_debug_is_served_from_the_main_app(node: DerpNode) -> None:
    status, _, body = await fetch(node.http_port, "GET", "/debug/varz")
    assert status == 200 and "derp_accepts" in body
    status, _, body = await fetch(node.http_port, "GET", "/debug/")
    assert status == 200 and "TLS hostname" in body
    status, _, body = await fetch(node.http_port, "GET", "/debug/", {"X-Forwarded-For": "192.0.2.1"})
    assert status == 403 and body == "debug access denied\n"
    status, headers, _ = await fetch(node.http_port, "GET", "/debug")
    assert status in (301, 307) and headers["Location"] == "/debug/"  # whatever the main app answers
    # POST to debug is not "Use HTTPS": it goes to the main app first (derper's order).
    status, _, body = await fetch(node.http_port, "POST", "/debug/gc")
    assert status == 200 and "Done" in body


async def test_acme_http01_paths(node: DerpNode) -> None:
    status, headers, body = await fetch(node.http_port, "GET", "/.well-known/acme-challenge/tok1")
    assert (status, body) == (200, "tok1.thumb") and headers["Content-Type"].startswith("text/plain")
    status, _, _ = await fetch(node.http_port, "GET", "/.well-known/acme-challenge/nope")
    assert status == 404
    status, _, _ = await fetch(node.http_port, "GET", "/.well-known/acme-challenge/tok1", {"Host": "evil.example"})
    assert status == 403


async def test_manual_mode_has_no_acme_paths(tmp_path: Path) -> None:
    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1", poll_interval=0)
    assert provider.acme_http01("127.0.0.1", "/.well-known/acme-challenge/x") is None


async def test_serve_http_port_ephemeral_and_disabled(tmp_path: Path) -> None:
    common = ["-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path / "c"),
              "-a", "127.0.0.1:0", "-stun=false"]
    sp = await start_serve(*common, "-http-port", "0")
    try:
        line = next(line for line in sp.log if "DERP on port" in line)
        port80 = int(line.rsplit("port ", 1)[1])
        status, headers, _ = await fetch(port80, "GET", "/x", {"Host": "h"})
        assert status == 302 and headers["Location"] == "https://h/x"
    finally:
        assert await sp.stop() == 0
    sp = await start_serve(*common, "-http-port", "-1")
    try:
        assert "plain HTTP" not in "".join(sp.log)
    finally:
        await sp.stop()


async def test_serve_http_port_busy_is_fatal(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    busy = blocker.sockets[0].getsockname()[1]
    try:
        proc = await asyncio.create_subprocess_exec(
            "python3", "-m", "derpkit", "serve", "-c", str(tmp_path / "k"), "-certmode", "manual",
            "-hostname", "127.0.0.1", "-certdir", str(tmp_path / "c"), "-a", "127.0.0.1:0",
            "-http-port", str(busy), "-stun=false",
            stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
        )
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 1, err.decode()
        assert "address already in use" in err.decode().lower()
    finally:
        blocker.close()


async def test_port80_connections_get_the_socket_options(tmp_path: Path) -> None:
    import socket

    from derpkit.server.frontdoor.limits import ConnectionControls

    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1", poll_interval=0)
    key = NodePrivate.generate()
    controls = ConnectionControls(keepalive_time=77, user_timeout=4.5)
    n = DerpNode(NodeOptions(
        ssl_context=provider.ssl_context(key.public()), private_key=key, stun_port=None,
        http_port=0, tune_listener=controls.tune,
    ))
    await n.start()
    try:
        assert n.port80 is not None
        for s in n.port80.sockets:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 4500
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 77
        # Linux copies these options to accepted sockets; the listener still serves.
        reader, writer = await asyncio.open_connection("127.0.0.1", n.http_port)
        writer.write(b"GET /generate_204 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 204")
        writer.close()
    finally:
        await n.stop()


async def test_connect_is_answered_as_derpers_port80_handler(node: DerpNode) -> None:
    """CONNECT never reaches aiohttp here: authority form 404 (Go's mux finds no path),
    path form 400 ``Use HTTPS``, /generate_204 by path 204; the connection is kept for
    the next request (compared with Go derper in tests/interop/test_port80_go.py)."""
    r, w = await asyncio.open_connection("127.0.0.1", node.http_port)
    try:
        for request, status, body in (
            (b"CONNECT example.com:443 HTTP/1.1\r\n\r\n", b"404 Not Found", b"404 page not found\n"),
            (b"CONNECT /foo HTTP/1.1\r\n\r\n", b"400 Bad Request", b"Use HTTPS\n"),
            (b"CONNECT /generate_204 HTTP/1.1\r\nX-Tailscale-Challenge: k\r\n\r\n", b"204 No Content", b""),
        ):
            w.write(request)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 " + status + b"\r\n"), head
            if body:
                assert await asyncio.wait_for(r.readexactly(len(body)), 5) == body
            else:
                assert b"X-Tailscale-Response: response k\r\n" in head
        w.write(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n")
        assert (await asyncio.wait_for(r.readline(), 5)).startswith(b"HTTP/1.1 302")
    finally:
        w.close()
