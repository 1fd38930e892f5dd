"""Client admission: -verify-clients, -verify-client-url, and derpkit's -allowed-keys-file.

Real DERP clients connect to a real node over loopback; admission talks to real HTTP
servers started by the tests:

- ``LocalAPIStandIn`` is a **stand-in for tailscaled**, not tailscaled itself: a small
  aiohttp server on a Unix socket answering the LocalAPI routes derper uses
  (``GET /localapi/v0/whois?addr=nodekey:…`` and ``/localapi/v0/status``) in the shape
  tailscaled gives them (200 JSON, 404 for an unknown key, JSON ``{"error":…}`` otherwise).
- ``Controller`` is an admission controller for ``-verify-client-url`` whose answer each
  test chooses (allow, deny, 500, bad JSON, slow).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time

import pytest
from aiohttp import web

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol.keys import NodePrivate
from derpkit.server.admission import verify
from derpkit.server.admission.verify import (
    Admission,
    AdmissionController,
    AllowedKeys,
    LocalTailscaled,
)

from .helpers import exchange, running_node


class LocalAPIStandIn:
    """Stand-in for tailscaled's LocalAPI on a Unix socket (not a real tailscaled)."""

    def __init__(self) -> None:
        self.known: set[str] = set()
        self.self_key = NodePrivate.generate().public()
        self.known.add(str(self.self_key))
        self.mode = "normal"  # or "old" (tailscaled too old) / "broken" / "badjson"
        self.requests: list[tuple[str, str, str]] = []
        self.path = os.path.join(tempfile.mkdtemp(prefix="ts-"), "tailscaled.sock")
        self.runner: web.AppRunner | None = None

    async def whois(self, request: web.Request) -> web.Response:
        addr = request.query.get("addr", "")
        self.requests.append((request.path_qs, addr, request.headers.get("Tailscale-Cap", "")))
        if self.mode == "old":
            return web.json_response({"error": "invalid 'addr' parameter"}, status=400)
        if self.mode == "broken":
            return web.json_response({"error": "no state"}, status=500)
        if addr in self.known:
            if self.mode == "badjson":
                return web.Response(text="{not json", content_type="application/json")
            return web.json_response({"Node": {"Key": addr}, "UserProfile": {"LoginName": "x@example.com"}})
        return web.Response(status=404, text="no match for IP:port\n")

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"Self": {"PublicKey": str(self.self_key)}})

    async def __aenter__(self) -> LocalAPIStandIn:
        app = web.Application()
        app.router.add_get("/localapi/v0/whois", self.whois)
        app.router.add_get("/localapi/v0/status", self.status)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.UnixSite(self.runner, self.path).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


class Controller:
    """An admission controller on loopback; ``mode`` picks its answer."""

    def __init__(self) -> None:
        self.mode = "allow"
        self.bodies: list[dict[str, object]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(json.loads(await request.read()))
        m = self.mode
        if m == "allow":
            return web.json_response({"Allow": True})
        if m == "allow-lower":
            return web.Response(text='{"allow": true, "extra": 1} trailing', content_type="application/json")
        if m == "deny":
            return web.json_response({"Allow": False})
        if m == "empty-object":
            return web.json_response({})
        if m == "500":
            return web.Response(status=500, text="boom")
        if m == "403":
            return web.json_response({"Allow": True}, status=403)
        if m == "badjson":
            return web.Response(text="<html>not json</html>")
        if m == "string-allow":
            return web.json_response({"Allow": "yes"})
        if m == "slow":
            await asyncio.sleep(3)
            return web.json_response({"Allow": True})
        raise AssertionError(m)

    async def __aenter__(self) -> Controller:
        app = web.Application()
        app.router.add_post("/admit", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # noqa: SLF001
        self.url = f"http://127.0.0.1:{port}/admit"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def dead_url() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/admit"  # nothing listens there now


async def admitted(url: str, key: NodePrivate | None = None) -> bool:
    try:
        c = await DerpClient.connect(url, private_key=key, timeout=5)
    except DerpConnectionError:
        return False
    await c.close()
    return True


# ------------------------------------------------------------------------ -verify-clients

async def test_verify_clients_admits_known_rejects_unknown_and_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with LocalAPIStandIn() as ts:
        known, unknown = NodePrivate.generate(), NodePrivate.generate()
        ts.known.add(str(known.public()))
        adm = Admission(tailscaled=LocalTailscaled(ts.path))
        async with running_node(admit=adm) as node:
            a = await DerpClient.connect(node.url, private_key=known)
            b_key = NodePrivate.generate()
            ts.known.add(str(b_key.public()))
            b = await DerpClient.connect(node.url, private_key=b_key)
            try:
                await exchange(a, b, 1)
            finally:
                await a.close()
                await b.close()
            assert not await admitted(node.url, unknown)
            assert f"peer {unknown.public()} not authorized (not found in local tailscaled)" in caplog.text
            # The LocalAPI request has derper's shape.
            path, addr, cap = ts.requests[0]
            assert path == "/localapi/v0/whois?addr=nodekey%3A" + known.public().raw.hex()
            assert addr == str(known.public()) and cap == str(verify.TAILSCALE_CAP)
            ts.mode = "old"
            assert not await admitted(node.url, known)
            assert "tailscaled version is too old (out of sync with derper binary)" in caplog.text
            ts.mode = "broken"
            assert not await admitted(node.url, known)
            assert f"failed to query local tailscaled status for {known.public()}: 500" in caplog.text
            ts.mode = "badjson"
            assert not await admitted(node.url, known)
            assert node.server.stats.conn_errors["admission_denied"] == 4
        await adm.stop()
    # tailscaled gone: the check fails closed.
    adm = Admission(tailscaled=LocalTailscaled(ts.path))
    async with running_node(admit=adm) as node:
        assert not await admitted(node.url, known)
    await adm.stop()
    assert "failed to query local tailscaled status" in caplog.text


async def test_mesh_peers_skip_admission() -> None:
    from derpkit.protocol.keys import MeshKey

    mesh = MeshKey.parse(os.urandom(32).hex())
    adm = Admission(tailscaled=LocalTailscaled("/nonexistent/tailscaled.sock"))
    async with running_node(admit=adm, mesh_key=mesh) as node:
        assert not await admitted(node.url)
        c = await DerpClient.connect(node.url, mesh_key=mesh)
        await c.close()
    await adm.stop()


async def test_debug_check_asks_tailscaled_about_its_own_key() -> None:
    import aiohttp

    from derpkit.server.frontdoor.http import HttpOptions

    async with LocalAPIStandIn() as ts:
        adm = Admission(tailscaled=LocalTailscaled(ts.path))
        http = HttpOptions(consistency_check=adm.self_check_list)
        async with running_node(admit=adm, http=http) as node, aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{node.port}/debug/check"
            async with s.get(base) as r:
                assert r.status == 200
                assert await r.text() == "derp.Server ConsistencyCheck okay"
            ts.known.discard(str(ts.self_key))
            async with s.get(base) as r:
                assert r.status == 500
                body = await r.text()
            assert body.startswith("verifyClient for self nodekey: peer nodekey:")
            assert body.endswith("not authorized (not found in local tailscaled)\n")
        await adm.stop()


# ------------------------------------------------------------------------ -verify-client-url

async def test_verify_client_url_outcomes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with Controller() as ctl:
        adm = Admission(controller=AdmissionController(ctl.url, fail_open=True))
        async with running_node(admit=adm) as node:
            key = NodePrivate.generate()
            assert await admitted(node.url, key)
            assert ctl.bodies[-1] == {"NodePublic": str(key.public()), "Source": "127.0.0.1"}
            ctl.mode = "allow-lower"  # case-insensitive field, first JSON value only
            assert await admitted(node.url)
            for mode, text in [
                ("deny", "not allowed"),
                ("empty-object", "not allowed"),
                ("500", "admission controller: 500 Internal Server Error"),
                ("403", "admission controller: 403 Forbidden"),
                ("badjson", "bad response"),
                ("string-allow", "bad response"),
            ]:
                ctl.mode = mode
                key = NodePrivate.generate()
                assert not await admitted(node.url, key), mode
                assert text in caplog.text, mode
            assert f"admission controller: {key.public()}/127.0.0.1 not allowed" not in caplog.text
            ctl.mode = "deny"
            assert not await admitted(node.url, key)
            assert f"admission controller: {key.public()}/127.0.0.1 not allowed" in caplog.text
        await adm.stop()


@pytest.mark.parametrize("fail_open", [True, False])
async def test_verify_client_url_unreachable(fail_open: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    adm = Admission(controller=AdmissionController(dead_url(), fail_open=fail_open))
    async with running_node(admit=adm) as node:
        key = NodePrivate.generate()
        assert await admitted(node.url, key) is fail_open
    await adm.stop()
    if fail_open:
        assert f"admission controller unreachable; allowing client {key.public()}" in caplog.text


@pytest.mark.parametrize("fail_open", [True, False])
async def test_verify_client_url_timeout_counts_as_unreachable(fail_open: bool) -> None:
    """derper waits 5 s; the test shortens the timeout so the slow controller trips it."""
    assert verify.ADMISSION_TIMEOUT == 5.0
    async with Controller() as ctl:
        ctl.mode = "slow"
        adm = Admission(controller=AdmissionController(ctl.url, fail_open=fail_open, timeout=0.4))
        async with running_node(admit=adm) as node:
            t0 = time.monotonic()
            assert await admitted(node.url) is fail_open
            assert time.monotonic() - t0 < 2.5
        await adm.stop()


async def test_tailscaled_runs_before_the_url_and_both_must_pass() -> None:
    async with LocalAPIStandIn() as ts, Controller() as ctl:
        adm = Admission(tailscaled=LocalTailscaled(ts.path), controller=AdmissionController(ctl.url))
        async with running_node(admit=adm) as node:
            unknown = NodePrivate.generate()
            assert not await admitted(node.url, unknown)
            assert ctl.bodies == []  # refused by tailscaled, the controller never asked
            known = NodePrivate.generate()
            ts.known.add(str(known.public()))
            ctl.mode = "deny"
            assert not await admitted(node.url, known)
            ctl.mode = "allow"
            assert await admitted(node.url, known)
        await adm.stop()


# ------------------------------------------------------------------------ -allowed-keys-file

async def test_allowed_keys_file_admits_listed_and_reloads_on_change(tmp_path, caplog) -> None:  # noqa: ANN001
    caplog.set_level(logging.INFO)
    a, b, c = (NodePrivate.generate() for _ in range(3))
    path = tmp_path / "keys"
    path.write_text(f"# relay clients\n{a.public()}\n\n  {b.public()}  # laptop\n")
    allowed = AllowedKeys(str(path), check_interval=0)
    adm = Admission(allowed=allowed)
    async with running_node(admit=adm) as node:
        ca = await DerpClient.connect(node.url, private_key=a)
        cb = await DerpClient.connect(node.url, private_key=b)
        try:
            await exchange(ca, cb, 1)
        finally:
            await ca.close()
            await cb.close()
        assert not await admitted(node.url, c)
        assert "not in" in caplog.text
        # Rewrite the file: c in, a out.
        path.write_text(f"{c.public()}\n{b.public()}\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
        assert await admitted(node.url, c)
        assert not await admitted(node.url, a)
        assert allowed.reloads == 1
        # A broken rewrite keeps the last good list.
        path.write_text("nodekey:nothex\n")
        os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        assert await admitted(node.url, c)
        assert allowed.reload_errors == 1
        assert "reload of" in caplog.text


def test_allowed_keys_file_bad_at_start_is_fatal(tmp_path) -> None:  # noqa: ANN001
    p = tmp_path / "keys"
    p.write_text("nodekey:" + "ab" * 32 + "\nbogus\n")
    with pytest.raises(ValueError, match="line 2"):
        AllowedKeys(str(p))
    with pytest.raises(ValueError, match="No such file"):
        AllowedKeys(str(tmp_path / "missing"))


async def test_allowed_keys_skip_tailscaled_but_not_the_url(tmp_path) -> None:  # noqa: ANN001
    listed = NodePrivate.generate()
    (tmp_path / "keys").write_text(f"{listed.public()}\n")
    async with LocalAPIStandIn() as ts, Controller() as ctl:
        adm = Admission(
            tailscaled=LocalTailscaled(ts.path),
            controller=AdmissionController(ctl.url),
            allowed=AllowedKeys(str(tmp_path / "keys")),
        )
        async with running_node(admit=adm) as node:
            assert await admitted(node.url, listed)
            assert ts.requests == []  # tailscaled never asked about a listed key
            assert len(ctl.bodies) == 1
            ctl.mode = "deny"
            assert not await admitted(node.url, listed)
            # An unlisted key falls back to tailscaled.
            other = NodePrivate.generate()
            ts.known.add(str(other.public()))
            ctl.mode = "allow"
            assert await admitted(node.url, other)
            assert len(ts.requests) == 1
        await adm.stop()


# ------------------------------------------------------------------------ real tailscaled

@pytest.fixture
def tailscaled(tmp_path):  # noqa: ANN001, ANN201
    """A real, logged-out tailscaled (userspace networking, in-memory state)."""
    import subprocess

    from tests.goderper import require_go_tool

    binary = require_go_tool("tailscaled")  # skips loudly, or fails in CI, when missing
    sock = str(tmp_path / "ts.sock")
    with open(tmp_path / "log", "wb") as log:
        p = subprocess.Popen(
            [binary, "--tun=userspace-networking", "--state=mem:", f"--socket={sock}",
             f"--statedir={tmp_path}", "--port=0"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert p.poll() is None, (tmp_path / "log").read_text()[-2000:]
            assert time.monotonic() < deadline, "tailscaled did not create its socket"
            time.sleep(0.05)
        yield sock
    finally:
        p.kill()
        p.wait(10)


async def test_real_tailscaled_rejects_unknown_key_like_go_derper(tailscaled: str, caplog) -> None:  # noqa: ANN001
    """A logged-out tailscaled knows no node: both derpkit and Go derper must refuse."""
    import aiohttp

    from derpkit.server.frontdoor.http import HttpOptions
    from tests.goderper import start_derper

    caplog.set_level(logging.INFO)
    key = NodePrivate.generate()
    adm = Admission(tailscaled=LocalTailscaled(tailscaled))
    go = start_derper(extra_args=("-verify-clients", "-socket", tailscaled))
    try:
        async with running_node(admit=adm, http=HttpOptions(consistency_check=adm.self_check_list)) as node:
            assert not await admitted(node.url, key)
            assert f"peer {key.public()} not authorized (not found in local tailscaled)" in caplog.text
            assert not await admitted(go.url, key)
            # /debug/check asks about tailscaled's own (zero, logged-out) key on both.
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{node.port}/debug/check") as r:
                    ours = (r.status, await r.text())
                async with s.get(f"{go.base_url}/debug/check") as r:
                    theirs = (r.status, await r.text())
        assert ours == theirs, (ours, theirs)
        assert ours[0] == 500 and "not found in local tailscaled" in ours[1]
        assert f"client {key.public()} rejected" in go.log()
    finally:
        go.stop()
        await adm.stop()
