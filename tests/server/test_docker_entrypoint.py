"""The Dockerfile, checked without a Docker engine: its ENV maps onto real settings with the
Docker table's values, and its CMD and HEALTHCHECK work when run as the image would run them
(image ENV, a temp home as WORKDIR, loopback and free ports instead of 443/80/3478)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import socket
import sys
from pathlib import Path

import pytest

from derpkit.server.config import SETTINGS, parse_config

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
NON_SETTINGS = {"PYTHONUNBUFFERED"}

# The Docker table (spec derper-cli §1.2 "Seed dflt" and §9), plus CONFIG_PATH, which a
# non-root image must set (derper refuses an empty -c when not root).
SEED = {
    "DEV": "false", "VERSION_FLAG": "false", "ADDR": ":443", "HTTP_PORT": "80", "STUN_PORT": "3478",
    "CERT_MODE": "manual", "CERT_DIR": "derper-certs", "HOSTNAME": "127.0.0.1",
    "RUN_STUN": "true", "RUN_DERP": "true", "FLAGHOME": "", "MESH_PSKFILE": "", "MESH_WITH": "",
    "SECRETS_URL": "", "SECRETS_PREFIX": "prod/derp", "SECRETS_CACHEDIR": "derper-secrets",
    "BOOTSTRAP_DNS": "", "UNPUBLISHED_DNS": "", "VERIFY_CLIENTS": "true", "VERIFY_CLIENT_URL": "",
    "VERIFY_FAIL_OPEN": "true", "SOCKET": "", "ACCEPT_CONNECTION_LIMIT": "+Inf",
    "ACCEPT_CONNECTION_BURST": "9223372036854775807", "TCP_KEEPALIVE_TIME": "10m0s",
    "TCP_USER_TIMEOUT": "15s", "TCP_WRITE_TIMEOUT": "2s",
}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                k, _, v = item.partition("=")
                env[k] = v
    return env


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    return ins[last_from:]


def exec_form(word: str) -> list[str]:
    rest = next(r for w, r in final_stage() if w == word)
    if word == "HEALTHCHECK":
        rest = rest[rest.index("CMD") + 3 :].strip()
    return json.loads(rest)


def test_every_env_line_is_a_real_setting_with_the_seed_value() -> None:
    env = image_env()
    known = {name for s in SETTINGS for name in s.all_envs}
    unknown = set(env) - known - NON_SETTINGS
    assert not unknown, f"ENV names that no setting reads: {unknown}"
    for name, value in SEED.items():
        assert env.get(name) == value, name
    assert env["CONFIG_PATH"] == "/var/lib/derper/derper.key"
    # Every value parses; the result is the seed image's configuration.
    cfg, notes = parse_config([], {k: v for k, v in env.items() if k not in NON_SETTINGS})
    assert (cfg.certmode, cfg.hostname, cfg.certdir, cfg.verify_clients) == ("manual", "127.0.0.1", "derper-certs", True)
    assert cfg.tls_enabled and cfg.http_port_enabled and cfg.stun_port == 3478
    assert cfg.secrets_path_prefix == "prod/derp"
    assert any("HOSTNAME" in n for n in notes)  # the env layer says which variables it applied


def test_image_shape() -> None:
    ins = final_stage()
    words = [w for w, _ in ins]
    assert ins[0][1].startswith("python:3.11-slim")
    assert sum(1 for w, _ in instructions() if w == "FROM") == 2  # multi-stage
    user = next(r for w, r in ins if w == "USER")
    assert user not in ("root", "0")
    assert next(r for w, r in ins if w == "WORKDIR") == "/home/derp"
    assert set(next(r for w, r in ins if w == "EXPOSE").split()) == {"80/tcp", "443/tcp", "3478/udp"}
    assert exec_form("CMD") == ["derpkit", "serve"]
    assert exec_form("HEALTHCHECK")[:2] == ["derpkit", "healthcheck"]
    assert "ENTRYPOINT" not in words  # no shell wrapper building a command line


def _free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(form: list[str]) -> list[str]:
    assert form[0] == "derpkit"
    return [sys.executable, "-m", "derpkit", *form[1:]]


class Container:
    """`derpkit serve` run as the image's CMD: image ENV, HOME/WORKDIR in a temp dir."""

    def __init__(self, home: Path, **overrides: str) -> None:
        self.home = home
        env = {k: v for k, v in os.environ.items() if k not in SEED and k != "CONFIG_PATH"}
        env.update(image_env())
        env.update(
            HOME=str(home), ADDR=f"127.0.0.1:{_free_port()}", HTTP_PORT=str(_free_port()),
            STUN_PORT=str(_free_port(socket.SOCK_DGRAM)), CONFIG_PATH=str(home / "var-lib-derper" / "derper.key"),
            SOCKET=str(home / "no-tailscaled.sock"),
        )
        env.update(overrides)
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.log: list[str] = []

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *_argv(exec_form("CMD")), cwd=self.home, env=self.env,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        assert self.proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await self.proc.stderr.readline()).decode()
                if not line:
                    raise RuntimeError("serve exited:\n" + "".join(self.log))
                self.log.append(line)
                if "DERP on port" in line:
                    break

        async def drain() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            while line := await self.proc.stderr.readline():
                self.log.append(line.decode())

        self._drain = asyncio.get_running_loop().create_task(drain())

    async def healthcheck(self, *, quiet: bool = False) -> tuple[int, str]:
        """The image's HEALTHCHECK command (without its --quiet unless asked, to see why)."""
        form = [a for a in exec_form("HEALTHCHECK") if quiet or a != "--quiet"]
        p = await asyncio.create_subprocess_exec(
            *_argv(form), "--timeout", "2", cwd=self.home, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(p.communicate(), 30)
        return p.returncode or 0, out.decode()

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.terminate()
        rc = await asyncio.wait_for(self.proc.wait(), 15)
        await self._drain
        return rc


async def test_image_cmd_serves_and_healthcheck_passes_then_fails(tmp_path: Path) -> None:
    c = Container(tmp_path)
    await c.start()
    try:
        text = "".join(c.log)
        # The relative CERT_DIR lands under the WORKDIR (the user's home), as in the image.
        crt = tmp_path / "derper-certs" / "127.0.0.1.crt"
        assert crt.exists() and (tmp_path / "var-lib-derper" / "derper.key").exists()
        assert re.search(r'"CertName":"sha256-raw:[0-9a-f]{64}"', text)
        rc, out = await c.healthcheck()
        # VERIFY_CLIENTS=true and no tailscaled: the probe is refused after the handshake,
        # which still proves DERP works.
        assert rc == 0, out + text
        assert "DERP ok" in out and "STUN ok" in out
        rc, out = await c.healthcheck(quiet=True)
        assert (rc, out) == (0, "")
    finally:
        assert await c.stop() == 0
    rc, out = await c.healthcheck()
    assert rc == 1 and out.count("FAIL") == 2, out


async def test_healthcheck_fails_when_stun_is_down(tmp_path: Path) -> None:
    # Something else holds the STUN port: serve starts without STUN (derper does the same).
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    try:
        c = Container(tmp_path, STUN_PORT=str(blocker.getsockname()[1]), VERIFY_CLIENTS="false")
        await c.start()
        try:
            rc, out = await c.healthcheck()
            assert rc == 1, out
            assert "DERP ok" in out and "ping" in out  # admitted without -verify-clients
            assert "FAIL STUN" in out
        finally:
            await c.stop()
    finally:
        blocker.close()


async def test_healthcheck_fails_when_derp_is_down(tmp_path: Path) -> None:
    c = Container(tmp_path, RUN_DERP="false", VERIFY_CLIENTS="false")
    await c.start()
    try:
        rc, out = await c.healthcheck()
        assert rc == 1, out
        assert "FAIL DERP" in out and "STUN ok" in out
    finally:
        await c.stop()


@pytest.mark.parametrize("name", sorted(SEED))
def test_seed_variable_is_in_the_settings_table(name: str) -> None:
    """Each Docker-table variable is a name the settings table reads (a lookup only: that
    each one changes what a running server does is shown in test_env_effects.py, its
    parsing and refusals in test_config.py)."""
    assert any(name in s.all_envs for s in SETTINGS)
