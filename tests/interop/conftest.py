"""Interop suite plumbing: Go peers and a test CA.

Every test here talks to one of Tailscale's own Go programs (derper, derpprobe, stunc at
the release pinned in scripts/install-go-peers.sh). Without them the tests skip, and
tests/conftest.py prints a single line naming every skipped test and why; with
``DERPKIT_REQUIRE_GO_PEERS=1`` (set by .ci/run) a missing program is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.goderper import GO_TOOLS, find_go_tool

from .pki import Leaf, TestCA


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


@pytest.fixture(scope="session")
def go_tools() -> dict[str, str | None]:
    return {t: find_go_tool(t) for t in GO_TOOLS}


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA.create(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def localhost_leaf(test_ca: TestCA) -> Leaf:
    """``localhost.crt``/``.key`` in the CA's directory: derper's manual cert-mode names."""
    return test_ca.issue("localhost", ["localhost"], ["127.0.0.1"])


@pytest.fixture
def trust_test_ca(test_ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> TestCA:
    """Make Python's default SSL contexts (our MeshLink) trust the test CA, like Go does."""
    monkeypatch.setenv("SSL_CERT_FILE", str(test_ca.cert_path))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    return test_ca


def go_env(ca: TestCA) -> dict[str, str]:
    env = dict(os.environ)
    env["SSL_CERT_FILE"] = str(ca.cert_path)
    env.pop("SSL_CERT_DIR", None)
    return env
