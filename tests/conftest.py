"""Suite-wide plumbing: one loud line when tests against Go programs were skipped.

It lives at the root, not in tests/interop/, because tests/client/ and tests/server/ also
talk to Go programs (derper, tailscaled): running only those files on a machine without Go
must still say so, not skip quietly.
"""

from __future__ import annotations

import pytest

from tests.goderper import GO_TOOLS, REQUIRE_ENV, find_go_tool


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    # Every test of the session skipped for a missing Go program (anywhere in tests/),
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
