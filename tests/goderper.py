"""Start Tailscale's Go ``derper`` on loopback for interop tests.

The real derper is the reference peer: our client is tested against it, and other suites
(server conformance, mesh, prober) can compare against it. It runs *not* in ``-dev`` mode,
because dev mode forces port 3340 and so cannot run twice in parallel:

- plain HTTP: ``-a 127.0.0.1:<port> -certmode letsencrypt`` (no TLS because the port is
  not 443 and the cert mode is not manual; no ACME is attempted for plain HTTP);
- TLS: ``-certmode manual -hostname 127.0.0.1``: derper makes a self-signed certificate
  for the IP and logs the DERP-map ``CertName`` (``sha256-raw:<hex>``) to pin it, which
  we read from its log.

Usage from a test module (fixtures are made by a function, since conftest.py belongs to
others)::

    from tests.goderper import derper_fixture
    derper = derper_fixture()                  # plain HTTP, one per test
    derper_tls = derper_fixture(tls=True, scope="module")

When derper is not installed the tests skip with a loud reason, unless the environment
sets ``DERPKIT_REQUIRE_GO_PEERS=1``; then they fail, so CI cannot pass by skipping.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "DERPKIT_REQUIRE_GO_PEERS"
#: The Go programs scripts/install-go-peers.sh installs and the tests run.
GO_TOOLS = ("derper", "derpprobe", "stunc", "tailscaled")
_CERTNAME_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')
_START_TIMEOUT = 15.0


def _skip_missing(msg: str) -> None:
    """Skip (the message contains "NOT INSTALLED", which tests/conftest.py's one-line
    summary looks for), or fail under DERPKIT_REQUIRE_GO_PEERS=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{msg} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
    pytest.skip(msg)


def require_netns(why: str) -> None:
    """Skip the test (fail it under DERPKIT_REQUIRE_GO_PEERS=1) when ``unshare -rn`` cannot make
    a private network namespace; ``why`` says what the test needs one for."""
    from tests.interop.record_vectors import netns_available

    if netns_available():
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"`unshare -rn` failed and {REQUIRE_ENV}=1: {why}", pytrace=False)
    pytest.skip(f"no unprivileged network namespaces (`unshare -rn` failed): {why}")


def build_go_program(src: Path, purpose: str) -> str:
    """``go build`` the small program in ``src`` into a temporary directory; its path.

    Skips (fails under DERPKIT_REQUIRE_GO_PEERS=1) without a Go toolchain. ``-mod=mod`` lets
    the build fetch what go.sum names; scripts/install-go-peers.sh warms the cache first.
    """
    go = shutil.which("go")
    if go is None:
        msg = f"Go toolchain NOT INSTALLED: {purpose} need `go` to build {src.name}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{msg} ({REQUIRE_ENV}=1 forbids skipping)", pytrace=False)
        pytest.skip(msg)
    out = os.path.join(tempfile.mkdtemp(prefix=f"{src.name}-"), src.name)
    p = subprocess.run([go, "build", "-o", out, "."], cwd=src, capture_output=True, text=True,
                       timeout=600, env=dict(os.environ, GOFLAGS="-mod=mod"))
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def find_go_tool(name: str) -> str | None:
    """Path of a Go program (derper, derpprobe, stunc): $<NAME>, PATH, then GOPATH/bin."""
    env = os.environ.get(name.upper())
    if env and os.access(env, os.X_OK):
        return env
    if os.environ.get("DERPKIT_HIDE_GO_PEERS") == "1":
        return None  # lets a test run see what a machine without Go sees
    found = shutil.which(name)
    if found:
        return found
    candidates = [Path.home() / "go" / "bin" / name, Path("/root/go/bin") / name]
    go = shutil.which("go")
    if go:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            gopath = subprocess.run(
                [go, "env", "GOPATH"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            for p in gopath.split(os.pathsep):
                if p:
                    candidates.insert(0, Path(p) / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def find_derper() -> str | None:
    """Path of the derper binary: $DERPER, PATH, then $(go env GOPATH)/bin, ~/go/bin."""
    return find_go_tool("derper")


def require_go_tool(name: str) -> str:
    """The path of a Go program, or skip (fail under DERPKIT_REQUIRE_GO_PEERS=1) the test."""
    path = find_go_tool(name)
    if path is None:
        msg = (
            f"Go {name} NOT INSTALLED: interop tests against Tailscale's own {name} are not "
            "running. Install with `bash scripts/install-go-peers.sh` "
            f"or set {name.upper()}=/path/to/{name}."
        )
        _skip_missing(msg)
    return path


def require_derper() -> str:
    """The derper path, or skip (fail under DERPKIT_REQUIRE_GO_PEERS=1) the current test."""
    path = find_derper()
    if path is None:
        msg = (
            "Go derper NOT INSTALLED: interop tests against Tailscale's real DERP server are "
            "not running. Install with `go install tailscale.com/cmd/derper@latest` "
            "or set DERPER=/path/to/derper."
        )
        _skip_missing(msg)
    return path


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free loopback port (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _default_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


@dataclass
class GoDerper:
    """A running derper; ``url`` is ready for ``DerpClient.connect``."""

    binary: str
    workdir: Path
    tls: bool
    port: int
    stun_port: int
    mesh_key_hex: str | None = None
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    cert_name: str | None = None
    #: TLS hostname other than 127.0.0.1: derper then loads ``<certdir>/<hostname>.crt``
    #: and ``.key`` (``-certmode manual``) instead of making a self-signed IP certificate.
    hostname: str | None = None
    certdir: Path | None = None
    #: ``-a`` host; "" listens on every address (dual-stack), for the STUN 4-in-6 record.
    listen_host: str = "127.0.0.1"
    #: Extra environment for the derper process (e.g. ``SSL_CERT_FILE``).
    env: dict[str, str] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "derper.log"

    @property
    def key_file(self) -> Path:
        return self.workdir / "derper.key"

    @property
    def url_host(self) -> str:
        return self.hostname or "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.url_host}:{self.port}/derp"

    @property
    def base_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.url_host}:{self.port}"

    @property
    def mesh_key(self) -> Any:
        """The mesh key as a ``MeshKey`` (None without one)."""
        from derpkit.protocol.keys import MeshKey

        return MeshKey.parse(self.mesh_key_hex) if self.mesh_key_hex else None

    @property
    def public_key(self) -> Any:
        """The server's ``NodePublic``, read from the key file derper wrote."""
        import json

        from derpkit.protocol.keys import NodePrivate

        data = json.loads(self.key_file.read_text())
        return NodePrivate.parse(data["PrivateKey"]).public()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def args(self) -> list[str]:
        a = [
            self.binary,
            "-a",
            f"{self.listen_host}:{self.port}",
            "-c",
            str(self.key_file),
            "-stun-port",
            str(self.stun_port),
            "-http-port",
            "-1",
        ]
        if self.tls:
            a += [
                "-certmode", "manual",
                "-hostname", self.url_host,
                "-certdir", str(self.certdir or self.workdir),
            ]
        else:
            a += ["-certmode", "letsencrypt", "-certdir", str(self.workdir / "acme")]
        mesh_file = self.workdir / "mesh.key"
        if self.mesh_key_hex:
            mesh_file.write_text(self.mesh_key_hex + "\n")
            a += ["-mesh-psk-file", str(mesh_file)]
        else:
            # An empty file name avoids picking up ~/keys/derp-mesh.key by accident.
            a += ["-mesh-psk-file", ""]
        return a + list(self.extra_args)

    def start(self) -> GoDerper:
        """Start (or restart after ``stop``) and wait until /derp/probe answers."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.process = subprocess.Popen(
                self.args(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **self.env} if self.env else None,
                # As an operator starts it: a run under nohup would hand derper an ignored
                # SIGHUP, which Go keeps ignored, and the SIGHUP tests would see another program.
                preexec_fn=_default_sighup,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + _START_TIMEOUT
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"derper exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(
                    self.base_url + "/derp/probe", timeout=1, context=ctx if self.tls else None
                ) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"derper did not answer /derp/probe within {_START_TIMEOUT} s:\n{self.log()[-3000:]}"
                )
            time.sleep(0.05)
        if self.tls and self.hostname is None:
            while True:
                m = _CERTNAME_RE.search(self.log())
                if m:
                    self.cert_name = m.group(1)
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        "derper did not log a sha256-raw CertName:\n" + self.log()[-3000:]
                    )
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill derper (SIGKILL: a restart test wants an abrupt death) and reap it."""
        p, self.process = self.process, None
        if p is None or p.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=10)

    def restart(self) -> GoDerper:
        """Same port, same key file (so the same server key), new process."""
        self.stop()
        return self.start()


def start_derper(
    workdir: Path | None = None,
    *,
    tls: bool = False,
    mesh_key_hex: str | None = None,
    extra_args: tuple[str, ...] = (),
    hostname: str | None = None,
    certdir: Path | None = None,
    listen_host: str = "127.0.0.1",
    env: dict[str, str] | None = None,
) -> GoDerper:
    """Start derper on free loopback ports; retries with new ports if one was taken.

    ``hostname``/``certdir`` (with ``tls=True``) serve a CA-signed ``<hostname>.crt``
    from ``certdir``; ``env`` adds environment variables such as ``SSL_CERT_FILE``.
    """
    binary = require_derper()
    wd = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="goderper-"))
    wd.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(3):
        d = GoDerper(
            binary, wd, tls, free_port(), free_port(socket.SOCK_DGRAM), mesh_key_hex, extra_args,
            hostname=hostname, certdir=certdir, listen_host=listen_host, env=env,
        )
        try:
            return d.start()
        except RuntimeError as e:
            last = e
            d.stop()
    raise RuntimeError(f"could not start derper: {last}")


def derper_fixture(
    *,
    tls: bool = False,
    mesh_key_hex: str | None = None,
    extra_args: tuple[str, ...] = (),
    scope: str = "function",
) -> Any:
    """Make a pytest fixture yielding a running ``GoDerper``; assign it in a test module.

    The fixture is synchronous (derper is a subprocess), so any scope works with
    pytest-asyncio's per-test event loops.
    """

    @pytest.fixture(scope=scope)  # type: ignore[call-overload]
    def _fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GoDerper]:
        d = start_derper(
            tmp_path_factory.mktemp("derper"),
            tls=tls,
            mesh_key_hex=mesh_key_hex,
            extra_args=extra_args,
        )
        try:
            yield d
        finally:
            d.stop()

    return _fixture
