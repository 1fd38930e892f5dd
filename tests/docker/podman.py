"""Running the image with Debian's podman, using the commands docs/docker.md prints.

There is no Docker engine on the test machines; podman runs the image instead, configured
for this host by ``tests/docker/containers.conf`` (read through ``CONTAINERS_CONF``: runc
with cgroupfs, because crun refuses the host's hybrid cgroups, and ulimits the host allows).

The base image ``python:3.11-slim`` cannot be pulled here: scripts/install-docker-peers.sh
imports a **stand-in** under that name (Debian bookworm with Debian's Python 3.11 and pip,
labelled ``org.derpkit.stand-in``). Everything above the base is the real Dockerfile.

The commands come from docs/docker.md's ``sh`` blocks, run as written except for a few
mechanical rewrites a shared test machine needs (``Localizer``): host ports published on
127.0.0.1 become free ports, and host paths the docs name (the tailscaled socket) become the
test's own. ``ran`` records which documented commands the session really ran, so
test_zz_docs.py can hold the docs to "every command in it is one the tests ran".
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.goderper import _skip_missing

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "docker.md"
CONF = Path(__file__).with_name("containers.conf")
BASE = "docker.io/library/python:3.11-slim-bookworm"
STAND_IN_LABEL = "org.derpkit.stand-in"
IMAGE = "derpkit"

#: Documented commands (their text as in the docs) that this session ran.
ran: set[str] = set()


def podman_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["CONTAINERS_CONF"] = str(CONF)
    env.update(extra or {})
    return env


def run(argv: list[str], *, timeout: float = 60, check: bool = False, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """One podman (or podman-compose) command; output kept for assertions."""
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd or ROOT,
                       env=podman_env(env), stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


def require_podman() -> None:
    """Fail (under DERPKIT_REQUIRE_GO_PEERS=1) or skip loudly, with the reason, when podman
    cannot run a container here or the base stand-in is missing."""
    if shutil.which("podman") is None:
        _skip_missing("podman NOT INSTALLED: run `bash scripts/install-docker-peers.sh`")
    try:
        base = run(["podman", "image", "inspect", "--format",
                    "{{index .Labels \"" + STAND_IN_LABEL + "\"}}", BASE], timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        _skip_missing(f"podman NOT INSTALLED or not working: {e}")
    if base.returncode != 0:
        _skip_missing(f"base image {BASE} NOT INSTALLED (no pulls here): run "
                      f"`bash scripts/install-docker-peers.sh` ({base.stderr.strip()[-200:]})")
    smoke = run(["podman", "run", "--rm", BASE, "true"], timeout=120)
    if smoke.returncode != 0:
        _skip_missing(f"podman NOT INSTALLED properly: it cannot run a container: "
                      f"{smoke.stderr.strip()[-300:]}")


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ docs/docker.md commands

def doc_commands() -> list[str]:
    """Each command of the ``sh`` blocks of docs/docker.md, continuation lines joined."""
    out: list[str] = []
    in_block = False
    buf = ""
    for line in DOCS.read_text().splitlines():
        if line.startswith("```"):
            in_block = (not in_block) and line.strip() == "```sh"
            continue
        if not in_block:
            continue
        text = line.strip()
        if not buf and (not text or text.startswith("#")):
            continue
        if text.endswith("\\"):
            buf += text[:-1].strip() + " "
            continue
        out.append(buf + text)
        buf = ""
    return out


def doc_command(prefix: str) -> str:
    """The one documented command starting with ``prefix``."""
    hits = [c for c in doc_commands() if c == prefix or c.startswith(prefix + " ")]
    assert len(hits) == 1, f"docs/docker.md: expected one command starting {prefix!r}, found {hits}"
    return hits[0]


_PUBLISH = re.compile(r"^127\.0\.0\.1:(\d+):(\d+)(/udp|/tcp)?$")


@dataclass
class Localizer:
    """The mechanical rewrites from a documented command to this machine's."""

    paths: dict[str, str] = field(default_factory=dict)
    ports: dict[tuple[int, str], int] = field(default_factory=dict)

    def port(self, doc_port: int, proto: str = "tcp") -> int:
        """The free host port standing in for ``doc_port`` (allocated on first use)."""
        key = (doc_port, proto)
        if key not in self.ports:
            self.ports[key] = free_port(socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
        return self.ports[key]

    def token(self, tok: str) -> str:
        if m := _PUBLISH.match(tok):
            proto = (m.group(3) or "/tcp")[1:]
            assert m.group(1) != "0", tok
            return f"127.0.0.1:{self.port(int(m.group(1)), proto)}:{m.group(2)}{m.group(3) or ''}"
        assert not re.match(r"^(\d+:\d+|0\.0\.0\.0:)", tok), f"publish only on loopback: {tok}"
        head, sep, rest = tok.partition(":")
        if head in self.paths:
            return self.paths[head] + sep + rest
        return self.paths.get(tok, tok)

    def argv(self, command: str) -> tuple[dict[str, str], list[str]]:
        """(environment assignments in front of the command, argv)."""
        words = shlex.split(command)
        env: dict[str, str] = {}
        while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
            k, _, v = words.pop(0).partition("=")
            env[k] = v
        return env, [self.token(w) for w in words]


def run_doc(command: str, loc: Localizer | None = None, *, timeout: float = 60, check: bool = True,
            env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command as docs/docker.md prints it (after ``loc``'s rewrites), and record it."""
    assert command in doc_commands(), f"not a command of docs/docker.md: {command}"
    assigned, argv = (loc or Localizer()).argv(command)
    ran.add(command)
    return run(argv, timeout=timeout, check=check, cwd=cwd, env={**assigned, **(env or {})})


def container_gone(*names: str) -> None:
    """Remove leftovers of an earlier, interrupted run (and our own, afterwards)."""
    for n in names:
        run(["podman", "rm", "-f", "-v", "-t", "2", n], timeout=60)  # -v: the anonymous VOLUMEs too


def volumes_gone(*names: str) -> None:
    for n in names:
        run(["podman", "volume", "rm", "-f", n], timeout=60)


def wait_log(name: str, text: str, timeout: float = 30) -> str:
    """``podman logs`` until it contains ``text`` (bounded); the whole log."""
    deadline = time.monotonic() + timeout
    while True:
        p = run(["podman", "logs", name], timeout=30)
        log = p.stdout + p.stderr
        if text in log:
            return log
        state = run(["podman", "inspect", "--format", "{{.State.Status}}", name], timeout=30).stdout.strip()
        if state not in ("running", "created", "configured", "initialized") or time.monotonic() > deadline:
            raise AssertionError(f"{name} ({state}) never logged {text!r}:\n{log[-3000:]}")
        time.sleep(0.2)


def health(name: str) -> tuple[int, str]:
    """``podman healthcheck run`` once: (exit code, output)."""
    p = run(["podman", "healthcheck", "run", name], timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()
