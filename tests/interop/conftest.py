"""Interop suite plumbing: Go peers, a test CA, and one loud line when Go tests are skipped.

Every test here talks to one of Tailscale's own Go programs (derper, derpprobe, stunc at
the release pinned in scripts/install-go-peers.sh). Without them the tests skip, and the
terminal summary prints a single line naming every skipped test and why; with
``DERPKIT_REQUIRE_GO_PEERS=1`` (set by .ci/run) a missing program is a failure instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.goderper import REQUIRE_ENV, find_go_tool

from .pki import Leaf, TestCA

GO_TOOLS = ("derper", "derpprobe", "stunc")
_skipped: list[tuple[str, str]] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "NOT INSTALLED" in str(report.longrepr):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skipped.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if not _skipped:
        return
    missing = [t for t in GO_TOOLS if find_go_tool(t) is None]
    names = ", ".join(sorted({nid.split("::")[-1] for nid, _ in _skipped}))
    terminalreporter.write_line(
        f"!!! GO INTEROP SKIPPED: {len(_skipped)} tests did not run because Tailscale's Go "
        f"programs are missing ({', '.join(missing) or 'see reasons'}); run "
        f"`bash scripts/install-go-peers.sh` or set {REQUIRE_ENV}=1 to make this fail. "
        f"Skipped: {names}",
        red=True,
        bold=True,
    )


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
