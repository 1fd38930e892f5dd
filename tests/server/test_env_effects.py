"""Each environment variable changes what the *running* server does.

Parsing of every variable and every invalid value is covered by test_config.py; here a
real ``derpkit serve`` process (or, for socket options, the same ``build_node`` wiring
in-process) is started with the variable set and its behaviour is observed from outside:
ports that answer, routes, admission, certificates served and files written, the
port-80 listener, the write timeout cutting off a reader that never reads (counted in
``/debug/varz``), tailscaled admission over the socket SOCKET names.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import socket
import ssl
import sys
import tempfile
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.keys import NodePrivate
from derpkit.server.app import build_node
from derpkit.server.config import parse_config
from derpkit.server.tls import certs
from derpkit.stun.client import StunTimeout, StunUnreachable, query

from .helpers import deliver_eventually, free_ports, recv_packet
from .serve_proc import ServeProc, start_serve
from .test_admission import LocalAPIStandIn
from .test_certs import CERTNAME_RE, ahandshake


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def stun_answers(port: int, timeout: float = 1.0) -> bool:
    """Does a Tailscale-shaped Binding request (what Tailscale clients send) get an answer?"""
    try:
        await query("127.0.0.1", port, timeout=timeout)
    except (StunTimeout, StunUnreachable):
        return False
    return True


async def get(sp: ServeProc, path: str, **kw: object) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{sp.port}{path}", allow_redirects=False, **kw) as r:
        return r.status, await r.read()


async def admitted(url: str, key: NodePrivate | None = None) -> bool:
    try:
        c = await DerpClient.connect(url, private_key=key, timeout=5)
    except DerpConnectionError:
        return False
    await c.close()
    return True


BASE = ("-stun=false",)


def _private_key_text(path: str) -> str:
    return json.loads(Path(path).read_text())["PrivateKey"]


def _write(path: str, text: str) -> None:
    Path(path).write_text(text)


async def serve(*args: str, **env: str) -> ServeProc:
    return await start_serve(*args, env=env)


# ------------------------------------------------------------------------ listeners

@pytest.mark.parametrize("var", ["ADDR", "DERP_ADDR"])
async def test_addr(var: str) -> None:
    port = free_ports(1)[0]
    sp = await serve(*BASE, **{var: f"127.0.0.1:{port}"})
    try:
        assert sp.port == port
        assert (await get(sp, "/derp/probe"))[0] == 200
    finally:
        await sp.stop()


@pytest.mark.parametrize("var", ["STUN_PORT", "DERP_STUN_PORT"])
async def test_stun_port_moves_the_udp_listener(var: str) -> None:
    port = free_udp_port()
    sp = await serve("-a", "127.0.0.1:0", **{var: str(port)})
    try:
        assert sp.stun_port == port
        assert await stun_answers(port)
    finally:
        await sp.stop()


@pytest.mark.parametrize("var", ["RUN_STUN", "DERP_STUN"])
async def test_run_stun_false_means_no_udp_answer(var: str) -> None:
    port = free_udp_port()
    sp = await serve("-a", "127.0.0.1:0", "-stun-port", str(port), **{var: "false"})
    try:
        assert not await stun_answers(port, 0.5)
    finally:
        await sp.stop()


async def test_flag_beats_env() -> None:
    port = free_udp_port()
    sp = await serve("-a", "127.0.0.1:0", "-stun=true", "-stun-port", str(port), RUN_STUN="false")
    try:
        assert await stun_answers(port)
    finally:
        await sp.stop()


# ------------------------------------------------------------------------ routes

async def test_run_derp_false_makes_derp_404_and_keeps_probes() -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, RUN_DERP="false")
    try:
        assert await get(sp, "/derp") == (404, b"derp server disabled\n")
        assert (await get(sp, "/derp/probe"))[0] == 200
        assert b"disabled" in (await get(sp, "/"))[1]
        with pytest.raises(DerpConnectionError):
            await DerpClient.connect(sp.url, timeout=5)
    finally:
        await sp.stop()


@pytest.mark.parametrize(("value", "status", "body"), [("blank", 200, b""), ("https://example.net/x", 302, None)])
async def test_flaghome(value: str, status: int, body: bytes | None) -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, FLAGHOME=value)
    try:
        got = await get(sp, "/")
        assert got[0] == status
        if body is not None:
            assert got[1] == body
    finally:
        await sp.stop()


@pytest.mark.parametrize("var", ["HOSTNAME", "DERP_DOMAIN"])
async def test_hostname_shows_on_debug_and_decides_the_abuse_block(var: str) -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, **{var: "relay.example.com"})
    try:
        assert b"relay.example.com" in (await get(sp, "/debug/"))[1]
        assert b"If you suspect abuse" not in (await get(sp, "/"))[1]
    finally:
        await sp.stop()
    sp = await serve("-a", "127.0.0.1:0", *BASE, **{var: "derp42.tailscale.com"})
    try:
        assert b"If you suspect abuse" in (await get(sp, "/"))[1]
    finally:
        await sp.stop()


async def test_bootstrap_dns_and_unpublished_dns() -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, BOOTSTRAP_DNS="localhost", UNPUBLISHED_DNS="127.0.0.1")
    try:
        async with asyncio.timeout(5):
            while not (body := (await get(sp, "/bootstrap-dns"))[1]):
                await asyncio.sleep(0.05)
        assert json.loads(body) == {"localhost": ["127.0.0.1"]}
        assert json.loads((await get(sp, "/bootstrap-dns?q=127.0.0.1"))[1]) == {"127.0.0.1": ["127.0.0.1"]}
    finally:
        await sp.stop()


async def test_config_path_keeps_the_server_key() -> None:
    path = os.path.join(tempfile.mkdtemp(), "sub", "derper.key")
    # A trailing "-- -c" is a positional (ignored, as by derper) that keeps start_serve
    # from adding its own -c flag, which would beat the env var.
    sp = await start_serve("-a", "127.0.0.1:0", *BASE, "--", "-c", env={"CONFIG_PATH": path})
    try:
        first = (await DerpClient.connect(sp.url)).server_key
    finally:
        await sp.stop()
    assert _private_key_text(path).startswith("privkey:")
    # A trailing "-- -c" is a positional (ignored, as by derper) that keeps start_serve
    # from adding its own -c flag, which would beat the env var.
    sp = await start_serve("-a", "127.0.0.1:0", *BASE, "--", "-c", env={"CONFIG_PATH": path})
    try:
        c = await DerpClient.connect(sp.url)
        assert c.server_key == first == NodePrivate.parse(_private_key_text(path)).public()
        await c.close()
    finally:
        await sp.stop()


async def test_version_flag() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derpkit", "serve", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "VERSION_FLAG": "true"},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0 and out.strip()


async def test_debug_key_path_opens_debug_behind_a_proxy(tmp_path: Path) -> None:
    """TS_DEBUG_KEY_PATH (read with the flags at start-up): ``?debugkey=`` with the file's
    content admits a GET to /debug/ even from behind a proxy; a wrong key does not."""
    key_file = tmp_path / "debug.key"
    key_file.write_text("s3cret\n")
    sp = await serve("-a", "127.0.0.1:0", *BASE, TS_DEBUG_KEY_PATH=str(key_file))
    proxied = {"X-Forwarded-For": "192.0.2.1"}
    try:
        assert (await get(sp, "/debug/?debugkey=s3cret", headers=proxied))[0] == 200
        assert (await get(sp, "/debug/?debugkey=wrong", headers=proxied))[0] == 403
        assert (await get(sp, "/debug/", headers=proxied))[0] == 403
    finally:
        await sp.stop()


# ------------------------------------------------------------------------ admission

@pytest.fixture
async def controller():  # noqa: ANN201
    app = web.Application()
    state = {"allow": "", "url": ""}

    async def admit(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        return web.json_response({"Allow": body["NodePublic"] == state["allow"]})

    app.router.add_post("/admit", admit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state["url"] = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/admit"  # noqa: SLF001
    yield state
    await runner.cleanup()


@pytest.mark.parametrize("var", ["VERIFY_CLIENT_URL", "DERP_VERIFY_CLIENT_URL"])
async def test_verify_client_url(var: str, controller: dict[str, str]) -> None:
    good = NodePrivate.generate()
    controller["allow"] = str(good.public())
    sp = await serve("-a", "127.0.0.1:0", *BASE, **{var: controller["url"]})
    try:
        assert await admitted(sp.url, good)
        assert not await admitted(sp.url, NodePrivate.generate())
    finally:
        await sp.stop()


@pytest.mark.parametrize(("var", "url_var"), [("VERIFY_FAIL_OPEN", "VERIFY_CLIENT_URL"),
                                              ("DERP_VERIFY_CLIENT_URL_FAIL_OPEN", "DERP_VERIFY_CLIENT_URL")])
async def test_verify_fail_open(var: str, url_var: str) -> None:
    dead = f"http://127.0.0.1:{free_ports(1)[0]}/admit"
    for value, want in (("false", False), ("true", True)):
        sp = await serve("-a", "127.0.0.1:0", *BASE, **{url_var: dead, var: value})
        try:
            assert await admitted(sp.url) is want, value
        finally:
            await sp.stop()


@pytest.mark.parametrize("var", ["VERIFY_CLIENTS", "DERP_VERIFY_CLIENTS"])
async def test_verify_clients_with_socket_fails_closed(var: str) -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, **{var: "true", "SOCKET": "/nonexistent/tailscaled.sock"})
    try:
        assert not await admitted(sp.url)
        await asyncio.sleep(0.2)
        assert any("/nonexistent/tailscaled.sock" in line or "failed to query local tailscaled" in line for line in sp.log)
    finally:
        await sp.stop()


async def test_allowed_keys_file(tmp_path) -> None:  # noqa: ANN001
    good = NodePrivate.generate()
    (tmp_path / "keys").write_text(f"{good.public()}\n")
    sp = await serve("-a", "127.0.0.1:0", *BASE, ALLOWED_KEYS_FILE=str(tmp_path / "keys"))
    try:
        assert await admitted(sp.url, good)
        assert not await admitted(sp.url, NodePrivate.generate())
    finally:
        await sp.stop()


# ------------------------------------------------------------------------ mesh

async def test_mesh_pskfile_and_mesh_with() -> None:
    d = tempfile.mkdtemp()
    psk = os.path.join(d, "mesh.key")
    _write(psk, os.urandom(32).hex())
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = await asyncio.gather(*(
        serve(*BASE, ADDR=f"127.0.0.1:{p}", MESH_PSKFILE=psk, MESH_WITH=peers) for p in ports
    ))
    try:
        a = await DerpClient.connect(procs[0].url)
        b = await DerpClient.connect(procs[1].url)
        try:
            await deliver_eventually(a, b, b"over the env-configured mesh")
        finally:
            await a.close()
            await b.close()
    finally:
        for p in procs:
            await p.stop()


# ------------------------------------------------------------------------ connection controls

async def _node_from_env(env: dict[str, str], *extra: str):  # noqa: ANN202
    key = os.path.join(tempfile.mkdtemp(), "k")
    cfg, _ = parse_config(["-a", "127.0.0.1:0", "-c", key, "-stun=false", *extra], env)
    node = build_node(cfg)
    await node.start()
    return node


async def test_tcp_user_timeout_and_keepalive_reach_the_servers_socket() -> None:
    node = await _node_from_env({"TCP_USER_TIMEOUT": "3500ms", "TCP_KEEPALIVE_TIME": "2m", "TCP_WRITE_TIMEOUT": "750ms"})
    try:
        c = await DerpClient.connect(node.url)
        try:
            (conn,) = list(node.server.conns)
            s = conn.transport.get_extra_info("socket")
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3500
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 120
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert node.server.write_timeout == 0.75
        finally:
            await c.close()
    finally:
        await node.stop()


async def test_accept_connection_limit_and_burst_on_the_tls_listener(tmp_path) -> None:  # noqa: ANN001
    """TLS mode (derper applies the limiter only there): burst 2, next token in 1000 s."""
    env = {"ACCEPT_CONNECTION_LIMIT": "0.001", "ACCEPT_CONNECTION_BURST": "2"}
    sp = await start_serve("-a", "127.0.0.1:0", *BASE, "-certmode", "manual", "-hostname", "127.0.0.1",
                           "-certdir", str(tmp_path), "-http-port", "-1", env=env)
    try:
        fates = []
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", sp.port)
            try:
                fates.append("closed" if not await asyncio.wait_for(r.read(1), 0.3) else "data")
            except TimeoutError:
                fates.append("open")
            except ConnectionError:
                fates.append("closed")
            w.close()
        assert fates == ["open", "open", "closed"]
        assert sp.proc.returncode is None  # derper would have exited here (spec §11 Q1)
    finally:
        await sp.stop()


async def test_accept_limit_unlimited_by_default_in_tls(tmp_path) -> None:  # noqa: ANN001
    sp = await start_serve("-a", "127.0.0.1:0", *BASE, "-certmode", "manual", "-hostname", "127.0.0.1",
                           "-certdir", str(tmp_path), "-http-port", "-1", env={"ACCEPT_CONNECTION_BURST": "1"})
    try:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as s:
            for _ in range(3):  # +Inf limit ignores the burst
                async with s.get(f"https://127.0.0.1:{sp.port}/derp/probe", ssl=ctx,
                                 headers={"Connection": "close"}) as r:
                    assert r.status == 200
            async with s.get(f"https://127.0.0.1:{sp.port}/debug/varz", ssl=ctx) as r:
                text = await r.text()
        assert "tls_listener_accepted_connections 4" in text
        assert "tls_listener_rejected_connections 0" in text
    finally:
        await sp.stop()


async def test_derp_still_relays_through_env_configured_server() -> None:
    sp = await serve("-a", "127.0.0.1:0", *BASE, TCP_USER_TIMEOUT="5s", TCP_KEEPALIVE_TIME="-1s")
    try:
        a = await DerpClient.connect(sp.url)
        b = await DerpClient.connect(sp.url)
        await a.send(b.public_key, b"x")
        assert (await recv_packet(b)).data == b"x"
        await a.close()
        await b.close()
    finally:
        await sp.stop()


# ------------------------------------------------------------------------ TLS mode: certificates, port 80

def _tls_args(*extra: str) -> tuple[str, ...]:
    return ("-a", "127.0.0.1:0", *BASE, "-hostname", "127.0.0.1", *extra)


@pytest.mark.parametrize(("mode_var", "dir_var"), [("CERT_MODE", "CERT_DIR"), ("DERP_CERT_MODE", "DERP_CERT_DIR")])
async def test_cert_mode_and_cert_dir(mode_var: str, dir_var: str, tmp_path: Path) -> None:
    """Without the variables derper's default mode is letsencrypt; with them the server runs
    manual TLS from that directory: an IP hostname with no files gets a self-signed pair
    written there (CertName logged and served), and files already there are served as they are."""
    certdir = tmp_path / "certs"
    env = {mode_var: "manual", dir_var: str(certdir)}
    sp = await start_serve(*_tls_args("-http-port", "-1"), env=env)
    try:
        crt = certdir / "127.0.0.1.crt"
        assert crt.is_file() and (certdir / "127.0.0.1.key").is_file()
        m = CERTNAME_RE.search("".join(sp.log))
        assert m, "".join(sp.log)
        leaf = hashlib.sha256(ssl.PEM_cert_to_DER_cert(crt.read_text())).hexdigest()
        assert m.group(1) == "sha256-raw:" + leaf
        assert (await ahandshake(sp.port))["leaf_sha256"] == leaf
    finally:
        assert await sp.stop() == 0

    other = tmp_path / "other"
    other.mkdir()
    pem, key = certs.make_self_signed_ip_cert("127.0.0.1")
    (other / "127.0.0.1.crt").write_bytes(pem)
    (other / "127.0.0.1.key").write_bytes(key)
    want = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem.decode())).hexdigest()
    sp = await start_serve(*_tls_args("-http-port", "-1"), env={mode_var: "manual", dir_var: str(other)})
    try:
        assert (await ahandshake(sp.port))["leaf_sha256"] == want
        assert f"sha256-raw:{want}" in "".join(sp.log)
    finally:
        assert await sp.stop() == 0


_PORT80_RE = re.compile(r"plain HTTP \(-http-port\) on port (\d+)")


@pytest.mark.parametrize("var", ["HTTP_PORT", "DERP_HTTP_PORT"])
async def test_http_port_moves_the_port80_listener(var: str, tmp_path: Path) -> None:
    """The plain listener appears on the port the variable names and answers as derper's
    does: 204 for the captive-portal check, 302 to https for GET, 400 for other methods."""
    port = free_ports(1)[0]
    sp = await start_serve(*_tls_args("-certmode", "manual", "-certdir", str(tmp_path)), env={var: str(port)})
    try:
        m = _PORT80_RE.search("".join(sp.log))
        assert m and int(m.group(1)) == port, "".join(sp.log)
        async with aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{port}"
            async with s.get(base + "/generate_204", headers={"X-Tailscale-Challenge": "c1"}) as r:
                assert r.status == 204 and r.headers["X-Tailscale-Response"] == "response c1"
            async with s.get(base + "/derp/probe", headers={"Host": "relay.test"}, allow_redirects=False) as r:
                assert r.status == 302 and r.headers["Location"] == "https://relay.test/derp/probe"
            async with s.post(base + "/", data=b"x") as r:
                assert (r.status, await r.text()) == (400, "Use HTTPS\n")
    finally:
        assert await sp.stop() == 0


async def test_tcp_write_timeout_cuts_off_a_reader_that_never_reads() -> None:
    """A client that completes the handshake and never reads fills the server's buffers.
    With TCP_WRITE_TIMEOUT=300ms it is cut off and derp_sclient_write_timeouts rises; with
    TCP_WRITE_TIMEOUT=0 (no timeout, as derper) it is never cut off, though it stays stalled
    longer than the 2 s default: so the counter moves because of the variable."""
    for value, want_cut in (("0", False), ("300ms", True)):
        sp = await serve("-a", "127.0.0.1:0", *BASE, TCP_WRITE_TIMEOUT=value)
        try:
            sender = await DerpClient.connect(sp.url)
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", sp.port))
            _, w = await asyncio.open_connection(sock=sock)
            slow = NodePrivate.generate()
            # Fast start: the client core writes the request and ClientInfo at once.
            core = ClientConnection(slow, host="x", server_key=sender.server_key, read_timeout=None)
            core.start(0.0)
            w.write(core.data_to_send())
            await w.drain()
            await asyncio.sleep(0.2)
            blob = os.urandom(60_000)
            for _ in range(200):  # 12 MB at a reader that takes nothing
                await sender.send(slow.public(), blob)

            async def varz(sp: ServeProc = sp) -> str:
                return (await get(sp, "/debug/varz"))[1].decode()

            # The writer to the slow reader is stalled: the server drops at its queue head.
            async with asyncio.timeout(10):
                while 'derp_packets_dropped{kind="other",reason="queue_head"} 0' in await varz():
                    await asyncio.sleep(0.1)
            if want_cut:
                async with asyncio.timeout(10):
                    while "derp_sclient_write_timeouts 0\n" in await varz():
                        await asyncio.sleep(0.1)
                assert "derp_sclient_write_timeouts 1\n" in await varz()
                assert any("write timeout, client not reading" in line for line in sp.log)
            else:
                await asyncio.sleep(3.0)  # longer than the 2 s default would allow
                assert "derp_sclient_write_timeouts 0\n" in await varz()
                assert not any("write timeout" in line for line in sp.log)
            w.close()
            await sender.close()
        finally:
            await sp.stop()


@pytest.mark.parametrize("var", ["VERIFY_CLIENTS", "DERP_VERIFY_CLIENTS"])
async def test_socket_names_the_tailscaled_asked_by_verify_clients(var: str) -> None:
    """SOCKET points -verify-clients at a LocalAPI stand-in on a Unix socket (test_admission.py):
    a key it knows is admitted, another refused, and the stand-in saw the whois requests."""
    async with LocalAPIStandIn() as ts:
        known, unknown = NodePrivate.generate(), NodePrivate.generate()
        ts.known.add(str(known.public()))
        sp = await serve("-a", "127.0.0.1:0", *BASE, **{var: "true", "SOCKET": ts.path})
        try:
            assert await admitted(sp.url, known)
            assert not await admitted(sp.url, unknown)
            asked = {addr for _, addr, _ in ts.requests}
            assert {str(known.public()), str(unknown.public())} <= asked
        finally:
            await sp.stop()
