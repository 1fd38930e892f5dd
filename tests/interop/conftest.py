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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.interop)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    # Every test of the session skipped for a missing Go program (here or in tests/client/),
    # including those a module-scoped fixture skipped.
    skipped = [r.nodeid for r in terminalreporter.stats.get("skipped", [])
               if "NOT INSTALLED" in str(getattr(r, "longrepr", ""))]
    skipped = list(dict.fromkeys(skipped))
    if not skipped:
        return
    missing = [t for t in GO_TOOLS if find_go_tool(t) is None]
    per_file: dict[str, int] = {}
    for nid in skipped:
        f = nid.split("::", 1)[0]
        per_file[f] = per_file.get(f, 0) + 1
    names = ", ".join(f"{f} ({n})" for f, n in sorted(per_file.items()))
    terminalreporter.write_line(
        f"!!! GO INTEROP SKIPPED: {len(skipped)} tests did not run because Tailscale's Go "
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
