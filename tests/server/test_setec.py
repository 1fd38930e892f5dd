"""``derpkit serve -secrets-url``: the mesh key from a setec server, as Go derper gets it.

Everything runs as real processes over real loopback HTTP. The real setec server needs a
tailnet, so the setec side is either a Python stand-in that records requests
(tests/server/setec_standin.py says why and what it reproduces) or, in the last test,
setec's own server code on loopback (tests/server/setecserver). The derpkit side is the
``derpkit serve`` command an operator runs, judged by its log, its cache file, its exit
status and by DERP clients that need the mesh key (a watcher, or a packet forwarded between
two meshed processes). Go derper is put in front of the same setec as a reference.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerPresentFlags
from derpkit.protocol.keys import MeshKey
from tests.goderper import GoDerper, build_go_program, free_port, require_derper

from .helpers import deliver_eventually, free_ports
from .serve_proc import ServeProc, start_serve
from .setec_standin import SetecStandIn

pytestmark = pytest.mark.timeout(90)

NAME = "prod/derp/meshkey"


@pytest.fixture
async def setec() -> AsyncIterator[SetecStandIn]:
    s = await SetecStandIn().start()
    try:
        yield s
    finally:
        await s.stop()


def serve_args(tmp: Path, port: int, *extra: str) -> list[str]:
    """Plain HTTP on loopback, no STUN, its own server key; no PSK file picked up by chance."""
    return ["-a", f"127.0.0.1:{port}", "-stun=false", "-c", str(tmp / f"{port}.key"),
            "-mesh-psk-file", "", *extra]


async def mesh_key_in_force(port: int, key: MeshKey) -> bool:
    """True when the server at ``port`` treats ``key`` as its mesh key.

    A client presenting the server's mesh key may watch connections and is announced with
    the mesh-peer flag; with any other key the server closes it when it asks to watch.
    """
    w = await DerpClient.connect(f"http://127.0.0.1:{port}/derp", mesh_key=key, watch_conns=True)
    try:
        async with asyncio.timeout(5):
            while True:
                f = await w.recv()
                if isinstance(f, F.PeerPresent) and f.key == w.public_key.raw:
                    return f.flags == PeerPresentFlags.IS_MESH_PEER
    except Exception:
        return False
    finally:
        await w.close()


class Waiting:
    """A ``derpkit serve`` process that is not expected to reach "DERP on port"."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []

    @classmethod
    async def start(cls, args: Sequence[str], env: dict[str, str] | None = None) -> Waiting:
        full = dict(os.environ)
        full.pop("HOSTNAME", None)
        full.update(env or {})
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "derpkit", "serve", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=full,
        )
        return cls(proc)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    async def until(self, pattern: str, timeout: float = 15.0) -> str:
        """Read stderr until a line matches; fail with the log if it never does."""
        assert self.proc.stderr is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for line in self.lines:
                        if re.search(pattern, line):
                            return line
                    raw = await self.proc.stderr.readline()
                    if not raw:
                        raise AssertionError(f"exited before logging {pattern!r}:\n{self.text}")
                    self.lines.append(raw.decode(errors="replace"))
        except TimeoutError:
            raise AssertionError(f"no line matching {pattern!r} within {timeout} s:\n{self.text}") from None

    async def finish(self, timeout: float = 15.0) -> int:
        assert self.proc.stderr is not None
        async with asyncio.timeout(timeout):
            rest = await self.proc.stderr.read()
            self.lines.append(rest.decode(errors="replace"))
            return await self.proc.wait()

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def test_two_serve_processes_get_the_mesh_key_from_setec_and_mesh(
    setec: SetecStandIn, tmp_path: Path
) -> None:
    key = MeshKey.generate()
    setec.put(NAME, key.hex().encode() + b"\n")  # trailing whitespace is trimmed, as Go does
    ports = free_ports(2)
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs: list[ServeProc] = []
    a = b = None
    try:
        for i, port in enumerate(ports):
            cache = tmp_path / f"node{i}" / "cache" / "derper-secrets"
            env = {"SECRETS_URL": setec.url, "SECRETS_CACHEDIR": str(cache)}
            procs.append(await start_serve(*serve_args(tmp_path, port, "-mesh-with", peers), env=env))
        for p in procs:
            log = "".join(p.log)
            assert f'Setting up setec store from "{setec.url}"' in log, log
            assert "Got mesh key from setec store" in log and "DERP mesh key configured" in log, log

        # Each process asked once, exactly as Go's setec client asks.
        assert len(setec.requests) == 2
        for r in setec.requests:
            assert (r.method, r.path) == ("POST", "/api/get")
            assert r.headers["content-type"] == "application/json"
            assert r.headers["sec-x-tailscale-no-browsers"] == "setec"
            assert r.json == {"Name": NAME, "Version": 0, "UpdateIfChanged": False}

        # The key from setec is in force on both: a watcher with it is a mesh peer...
        assert await mesh_key_in_force(ports[0], key) and await mesh_key_in_force(ports[1], key)
        assert not await mesh_key_in_force(ports[0], MeshKey.generate())
        # ...and the two processes meshed with it: a packet crosses from node 0 to node 1.
        a = await DerpClient.connect(f"http://127.0.0.1:{ports[0]}/derp")
        b = await DerpClient.connect(f"http://127.0.0.1:{ports[1]}/derp")
        await deliver_eventually(a, b, b"node 0 -> node 1 over a setec-keyed mesh")
        await deliver_eventually(b, a, b"and back")

        # The cache file: setec's format, mode 0600, in a parent made with mode 0700.
        cache = tmp_path / "node0" / "cache" / "derper-secrets"
        assert stat.S_IMODE(cache.stat().st_mode) == 0o600
        assert stat.S_IMODE(cache.parent.stat().st_mode) == 0o700
        data = json.loads(cache.read_text())
        assert list(data) == [NAME]
        assert base64.b64decode(data[NAME]["secret"]["Value"]) == key.hex().encode() + b"\n"
        assert data[NAME]["secret"]["Version"] == 1
        assert data[NAME]["lastAccess"].isdigit()  # an integer inside a JSON string
    finally:
        for c in (a, b):
            if c is not None:
                await c.close()
        for p in procs:
            p.proc.kill()
            await p.proc.wait()


async def test_restart_uses_the_cache_when_setec_is_down_and_ignores_a_rotated_key(
    setec: SetecStandIn, tmp_path: Path
) -> None:
    key = MeshKey.generate()
    setec.put(NAME, key.hex().encode())
    cache = tmp_path / "derper-secrets"
    port = free_port()
    args = serve_args(tmp_path, port, "-secrets-url", setec.url, "-secrets-cache-dir", str(cache))
    first = await start_serve(*args)
    await first.stop()
    assert len(setec.requests) == 1 and cache.is_file()

    # setec goes away; the restart starts from the cache without a word to the server.
    url = setec.url
    await setec.stop()
    second = await start_serve(*args)
    try:
        log = "".join(second.log)
        assert f'Setting up setec store from "{url}"' in log and "Got mesh key from setec store" in log, log
        assert "error fetching" not in log, log
        assert await mesh_key_in_force(port, key)
    finally:
        await second.stop()

    # setec is back with a rotated key: Go's store still takes the cached one and does not
    # ask (the store is closed before its first poll), so derpkit does the same.
    await setec.start()
    url2 = setec.url
    rotated = MeshKey.generate()
    setec.put(NAME, rotated.hex().encode())
    args2 = serve_args(tmp_path, port, "-secrets-url", url2, "-secrets-cache-dir", str(cache))
    third = await start_serve(*args2)
    try:
        assert setec.requests[1:] == []
        assert await mesh_key_in_force(port, key)
        assert not await mesh_key_in_force(port, rotated)
    finally:
        await third.stop()
    # Removing the cache file is how an operator picks up the rotated key.
    cache.unlink()
    fourth = await start_serve(*args2)
    try:
        assert len(setec.requests) == 2
        assert await mesh_key_in_force(port, rotated)
    finally:
        await fourth.stop()


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["-secrets-url", "setec.example.com"], {}, "-secrets-url"),
        ([], {"SECRETS_URL": "ftp://setec.example.com"}, "env SECRETS_URL"),
    ],
)
async def test_a_url_that_can_never_work_stops_start_up_at_once(
    tmp_path: Path, args: list[str], env: dict[str, str], named: str
) -> None:
    p = await Waiting.start(serve_args(tmp_path, free_port(), *args), env)
    try:
        rc = await p.finish()
    finally:
        await p.kill()
    assert rc == 2, p.text
    first = p.text.splitlines()[0]
    assert named in first and "must be an http:// or https:// URL of a setec server" in first, p.text


@pytest.mark.parametrize(
    ("status", "why"),
    [
        (500, r'request returned status 500: "internal error"'),
        (None, "not found"),  # nothing stored under the name
        (403, "access denied"),
    ],
)
async def test_server_error_or_missing_secret_holds_start_up_until_a_signal(
    setec: SetecStandIn, tmp_path: Path, status: int | None, why: str
) -> None:
    """Go derper retries for ever (setec's NewStore); it never serves without the key, and a
    signal ends the wait with a fatal ``NewStore:`` line and exit 1."""
    setec.fail_with = status
    port = free_port()
    cache = tmp_path / "c" / "derper-secrets"
    p = await Waiting.start(serve_args(tmp_path, port), {"SECRETS_URL": setec.url, "SECRETS_CACHEDIR": str(cache)})
    try:
        await p.until(rf'\[store\] error fetching "prod/derp/meshkey": {why} \(retrying\)')
        line = await p.until(r"derpkit: -secrets-url \(env SECRETS_URL\)")
        assert setec.url in line and "start-up waits" in line
        # Still waiting after several attempts, not serving, no cache written.
        await p.until(r"error fetching", timeout=5)
        async with asyncio.timeout(10):
            while len(setec.requests) < 5:
                await asyncio.sleep(0.05)
        assert p.proc.returncode is None and not listening(port) and not cache.exists()
        p.proc.terminate()
        rc = await p.finish()
    finally:
        await p.kill()
    assert rc == 1, p.text
    fatal = p.text.strip().splitlines()[-1]
    assert "NewStore: stopped by a signal while waiting for secret" in fatal, p.text
    assert "-secrets-url" in fatal and "SECRETS_URL" in fatal, p.text


async def test_start_up_completes_once_the_missing_secret_appears(setec: SetecStandIn, tmp_path: Path) -> None:
    port = free_port()
    args = serve_args(tmp_path, port, "-secrets-url", setec.url,
                      "-secrets-cache-dir", str(tmp_path / "cache"))
    p = await Waiting.start(args)
    try:
        await p.until(r'error fetching "prod/derp/meshkey": not found \(retrying\)')
        key = MeshKey.generate()
        setec.put(NAME, key.hex().encode())
        await p.until(r"DERP on port \d+")
        assert "Got mesh key from setec store" in p.text
        assert await mesh_key_in_force(port, key)
    finally:
        await p.kill()


async def test_cache_path_that_is_a_directory_is_fatal(setec: SetecStandIn, tmp_path: Path) -> None:
    """-secrets-cache-dir names a file; an existing directory there is refused, as in Go."""
    setec.put(NAME, MeshKey.generate().hex().encode())
    d = tmp_path / "a-directory"
    d.mkdir()
    p = await Waiting.start(serve_args(tmp_path, free_port(), "-secrets-url", setec.url,
                                       "-secrets-cache-dir", str(d)))
    try:
        rc = await p.finish()
    finally:
        await p.kill()
    assert rc == 1, p.text
    assert "NewFileCache: cache path exists and is not a regular file" in p.text, p.text
    assert "-secrets-cache-dir" in p.text and "SECRETS_CACHEDIR" in p.text
    assert setec.requests == []  # refused before asking


async def test_a_value_that_is_not_a_mesh_key_is_fatal(setec: SetecStandIn, tmp_path: Path) -> None:
    setec.put(NAME, b"not-a-hex-key")
    p = await Waiting.start(serve_args(tmp_path, free_port(), "-secrets-url", setec.url,
                                       "-secrets-cache-dir", str(tmp_path / "cache")))
    try:
        rc = await p.finish()
    finally:
        await p.kill()
    assert rc == 1, p.text
    assert "want 64 hexadecimal digits" in p.text and f"setec secret {NAME} at {setec.url}" in p.text, p.text


async def test_flags_beat_env_and_setec_beats_the_psk_file(tmp_path: Path) -> None:
    env_setec, flag_setec = await SetecStandIn().start(), await SetecStandIn().start()
    try:
        env_key, flag_key, psk_key = MeshKey.generate(), MeshKey.generate(), MeshKey.generate()
        env_setec.put("env/derp/meshkey", env_key.hex().encode())
        flag_setec.put("flag/derp/meshkey", flag_key.hex().encode())
        psk = tmp_path / "mesh.key"
        psk.write_text(psk_key.hex() + "\n")
        port = free_port()
        env = {"SECRETS_URL": env_setec.url, "SECRETS_PREFIX": "env/derp", "SECRET_PREFIX": "old/derp",
               "SECRETS_CACHEDIR": str(tmp_path / "env-cache")}
        args = ["-a", f"127.0.0.1:{port}", "-stun=false", "-c", str(tmp_path / "k"),
                "-secrets-url", flag_setec.url, "-secrets-path-prefix", "flag/derp",
                "-secrets-cache-dir", str(tmp_path / "flag-cache"), "-mesh-psk-file", str(psk)]
        p = await start_serve(*args, env=env)
        try:
            assert env_setec.requests == []
            assert [r.json["Name"] for r in flag_setec.requests] == ["flag/derp/meshkey"]
            assert (tmp_path / "flag-cache").is_file() and not (tmp_path / "env-cache").exists()
            assert await mesh_key_in_force(port, flag_key)
            assert not await mesh_key_in_force(port, psk_key)
        finally:
            await p.stop()
    finally:
        await env_setec.stop()
        await flag_setec.stop()


# --- Go derper and derpkit in front of the same setec stand-in --------------------------


async def test_go_derper_and_derpkit_get_the_same_key_from_setec_and_mesh(
    setec: SetecStandIn, tmp_path: Path
) -> None:
    """Go derper (-secrets-url, TLS for localhost from a test CA) and ``derpkit serve`` (env
    SECRETS_URL) fetch one key from the stand-in, send the same request, and mesh; then Go's
    cache file starts derpkit with setec down."""
    from tests.interop.pki import TestCA

    binary = require_derper()
    ca = TestCA.create(tmp_path / "ca")
    ca.issue("localhost", ["localhost"], ["127.0.0.1"])
    key = MeshKey.generate()
    setec.put(NAME, key.hex().encode())
    go_port, our_port = free_port(), free_port()
    (tmp_path / "go").mkdir()
    go_cache = tmp_path / "go-cache" / "derper-secrets"
    go = GoDerper(
        binary, tmp_path / "go", True, go_port, free_port(socket.SOCK_DGRAM), None,
        ("-secrets-url", setec.url, "-secrets-cache-dir", str(go_cache),
         "-mesh-with", f"localhost:{our_port}"),
        hostname="localhost", certdir=ca.dir, env={"SSL_CERT_FILE": str(ca.cert_path)},
    )
    ours: ServeProc | None = None
    clients: list[DerpClient] = []
    try:
        await asyncio.to_thread(go.start)
        assert "Got mesh key from setec store" in go.log() and "DERP mesh key configured" in go.log(), go.log()
        ours = await start_serve(
            "-a", f"127.0.0.1:{our_port}", "-c", str(tmp_path / "ours.key"),
            "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir),
            "-http-port", "-1", "-stun=false", "-mesh-psk-file", "",
            "-mesh-with", f"localhost:{go_port}",
            env={"SSL_CERT_FILE": str(ca.cert_path), "SECRETS_URL": setec.url,
                 "SECRETS_CACHEDIR": str(tmp_path / "our-cache")},
        )
        # Both asked the same question the same way.
        go_req, our_req = setec.requests
        assert (go_req.method, go_req.path, go_req.body) == (our_req.method, our_req.path, our_req.body)
        for h in ("content-type", "sec-x-tailscale-no-browsers"):
            assert go_req.headers[h] == our_req.headers[h]
        assert json.loads(go_req.body) == {"Name": NAME, "Version": 0, "UpdateIfChanged": False}
        # Both log lines match Go's wording.
        for line in (f'Setting up setec store from "{setec.url}"', "Got mesh key from setec store"):
            assert line in go.log() and line in "".join(ours.log)

        ctx = ca.client_context()
        x = await DerpClient.connect(go.url, ssl_context=ctx)
        y = await DerpClient.connect(f"https://localhost:{our_port}/derp", ssl_context=ctx)
        clients += [x, y]
        # Go -> derpkit needs Go's mesh link to us, which retries every 5 s after its first
        # dial found nothing listening.
        await deliver_eventually(y, x, b"derpkit -> Go, mesh keyed by setec", within=20)
        await deliver_eventually(x, y, b"Go -> derpkit", within=20)
        assert "insufficient permissions" not in go.log(), go.log()
        assert "not_mesh_peer" not in "".join(ours.log)
    finally:
        for c in clients:
            await c.close()
        if ours is not None:
            ours.proc.kill()
            await ours.proc.wait()
        await asyncio.to_thread(go.stop)

    # Go's cache file, setec down: derpkit reads it and starts with the same key.
    assert go_cache.is_file()
    assert stat.S_IMODE(go_cache.stat().st_mode) == 0o600
    go_data = json.loads(go_cache.read_text())
    assert base64.b64decode(go_data[NAME]["secret"]["Value"]) == key.hex().encode()
    url = setec.url
    await setec.stop()
    port = free_port()
    p = await start_serve(*serve_args(tmp_path, port, "-secrets-url", url,
                                      "-secrets-cache-dir", str(go_cache)))
    try:
        assert "error fetching" not in "".join(p.log)
        assert await mesh_key_in_force(port, key)
    finally:
        await p.stop()
    # ...and rewrote it in the same shape Go wrote.
    ours_data = json.loads(go_cache.read_text())
    assert ours_data[NAME]["secret"] == go_data[NAME]["secret"]
    assert set(ours_data[NAME]) == set(go_data[NAME]) == {"secret", "lastAccess"}


def test_secret_name_is_go_path_join() -> None:
    from derpkit.setec import secret_name

    assert secret_name("prod/derp") == "prod/derp/meshkey"
    assert secret_name("prod/derp/") == "prod/derp/meshkey"
    assert secret_name("") == "meshkey"
    assert secret_name("//a/./b/../c") == "/a/c/meshkey"



# --- setec's own server code (tests/server/setecserver) ---------------------------------

SETEC_SERVER_SRC = Path(__file__).parent / "setecserver"


@pytest.fixture(scope="module")
def setec_server_binary() -> str:
    """Build tests/server/setecserver: setec's real API handlers and database on loopback."""
    return build_go_program(SETEC_SERVER_SRC, "the setec-server tests")


class RealSetec:
    """A running tests/server/setecserver process; secrets go in through setec's own API."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str) -> None:
        self.proc, self.url = proc, url

    @classmethod
    async def start(cls, binary: str, state: Path, allow: str | None = None) -> RealSetec:
        os.makedirs(state, exist_ok=True)
        args = [binary, "-state", str(state)] + ([] if allow is None else ["-allow", allow])
        proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        assert proc.stdout is not None
        async with asyncio.timeout(15):
            line = await proc.stdout.readline()
        return cls(proc, json.loads(line)["url"])

    async def call(self, method: str, body: dict) -> tuple[int, bytes]:
        import aiohttp

        headers = {"Content-Type": "application/json", "Sec-X-Tailscale-No-Browsers": "setec"}
        async with aiohttp.ClientSession() as s, s.post(f"{self.url}/api/{method}", json=body,
                                                       headers=headers) as r:
            return r.status, await r.read()

    async def put(self, name: str, value: bytes, activate: bool = False) -> int:
        status, body = await self.call("put", {"Name": name, "Value": base64.b64encode(value).decode()})
        assert status == 200, body
        version = int(json.loads(body))
        if activate:
            status, body = await self.call("activate", {"Name": name, "Version": version})
            assert status == 200, body
        return version

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def test_real_setec_server_code_serves_derpkit_and_go_derper(
    setec_server_binary: str, tmp_path: Path
) -> None:
    """setec's own handlers (only identity and transport replaced) give derpkit and Go derper
    the same key, serve a rotated version, and refuse unknown or forbidden secrets."""
    real = await RealSetec.start(setec_server_binary, tmp_path / "setec")
    denied = await RealSetec.start(setec_server_binary, tmp_path / "setec-denied", allow="put")
    go = None
    try:
        key = MeshKey.generate()
        assert await real.put(NAME, key.hex().encode() + b"\n") == 1
        port = free_port()
        ours = await start_serve(*serve_args(tmp_path, port), env={
            "SECRETS_URL": real.url, "SECRETS_CACHEDIR": str(tmp_path / "ours" / "cache")})
        try:
            assert "Got mesh key from setec store" in "".join(ours.log)
            assert await mesh_key_in_force(port, key)
        finally:
            await ours.stop()

        from tests.goderper import start_derper

        go = await asyncio.to_thread(
            start_derper, tmp_path / "go",
            extra_args=("-secrets-url", real.url, "-secrets-cache-dir", str(tmp_path / "go" / "cache")),
        )
        assert "Got mesh key from setec store" in go.log(), go.log()
        assert await mesh_key_in_force(go.port, key)

        # A new active version reaches a server that starts without a cache.
        rotated = MeshKey.generate()
        assert await real.put(NAME, rotated.hex().encode(), activate=True) == 2
        port = free_port()
        ours = await start_serve(*serve_args(tmp_path, port, "-secrets-url", real.url,
                                             "-secrets-cache-dir", str(tmp_path / "fresh-cache")))
        try:
            assert await mesh_key_in_force(port, rotated)
        finally:
            await ours.stop()
        cached = json.loads((tmp_path / "fresh-cache").read_text())[NAME]["secret"]
        assert cached["Version"] == 2 and base64.b64decode(cached["Value"]) == rotated.hex().encode()

        # Unknown name (404) and a caller without "get" (403): start-up waits, as in Go.
        for url, prefix, why in ((real.url, "nope", "not found"), (denied.url, "prod/derp", "access denied")):
            await denied.put(NAME, key.hex().encode())
            p = await Waiting.start(serve_args(tmp_path, free_port(), "-secrets-url", url,
                                               "-secrets-path-prefix", prefix,
                                               "-secrets-cache-dir", str(tmp_path / f"c-{prefix}")))
            try:
                await p.until(rf'\[store\] error fetching "{prefix}/meshkey": {why} \(retrying\)')
                p.proc.terminate()
                assert await p.finish() == 1
            finally:
                await p.kill()
    finally:
        if go is not None:
            await asyncio.to_thread(go.stop)
        await real.stop()
        await denied.stop()
