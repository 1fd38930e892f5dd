"""Fixtures for the prober's tests: a test CA the prober trusts, and short probe intervals."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.interop.pki import Leaf, TestCA


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    """A throw-away CA; Python's default contexts (the prober's TLS) trust it via SSL_CERT_FILE,
    as Go programs do."""
    c = TestCA.create(tmp_path_factory.mktemp("probe-ca"))
    old = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    os.environ["SSL_CERT_FILE"] = str(c.cert_path)
    os.environ.pop("SSL_CERT_DIR", None)
    try:
        yield c
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def localhost_leaf(ca: TestCA) -> Leaf:
    return ca.issue("localhost", ["localhost"], ["127.0.0.1", "::1"])


@pytest.fixture(scope="session")
def tailscaled_sock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real, logged-out tailscaled (userspace networking, in-memory state): its socket path."""
    from tests.goderper import require_go_tool

    binary = require_go_tool("tailscaled")
    d = tmp_path_factory.mktemp("tailscaled")
    sock = str(d / "ts.sock")
    with open(d / "log", "wb") as log:
        p = subprocess.Popen([binary, "--tun=userspace-networking", "--state=mem:", f"--socket={sock}",
                              f"--statedir={d}", "--port=0"], stdout=log, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock):
            assert p.poll() is None and time.monotonic() < deadline, (d / "log").read_text()[-2000:]
            time.sleep(0.05)
        yield sock
    finally:
        p.kill()
        p.wait(10)
