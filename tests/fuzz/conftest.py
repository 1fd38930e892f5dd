"""Hypothesis profiles for the fuzz tests.

``ci`` (the default) keeps each property to a few seconds so the whole directory runs in
well under a minute; ``long`` is for a run by hand (HYPOTHESIS_PROFILE=long, see
docs/reliability.md). The example database stays off and ``ci`` draws the same inputs every run; a failure prints the input to paste into test_regressions.py.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.too_slow]}
# derandomize: CI draws the same inputs each run (a new find belongs to a by-hand run, not a flaky CI).
settings.register_profile("ci", max_examples=300, derandomize=True, **_COMMON)
settings.register_profile("long", max_examples=5_000, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_terminal_summary(terminalreporter, exitstatus: int, config) -> None:  # noqa: ANN001
    """One loud line when test_atheris.py skipped for want of atheris (CI fails instead)."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if "ATHERIS MISSING" in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"!!! ATHERIS FUZZING SKIPPED: {len(skipped)} tests did not run; `pip install atheris` "
            "(in the test extra) or set DERPKIT_REQUIRE_GO_PEERS=1 to make this fail.", red=True, bold=True)
