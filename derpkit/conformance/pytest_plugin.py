"""pytest plugin: ``pytest --derp-url=URL`` runs the conformance cases as test items.

Registered as a ``pytest11`` entry point, so every pytest run loads it; it therefore does
nothing unless ``--derp-url`` is given and imports the suite only then (this module
imports pytest and nothing else). Each case becomes one item named by its id; FAIL fails
the item with the case's one-line reason (and the end of its wire log), SKIP skips it,
PASS and INFO pass (INFO's observation is attached as a report section and a JUnit
property). ``--derp-strict`` makes failed SHOULDs fail, as ``--strict`` does on the CLI.
"""

from __future__ import annotations

from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("derp", "DERP conformance suite (derpkit)")
    g.addoption("--derp-url", metavar="URL", help="run the DERP conformance cases against this server (http(s)://host[:port])")
    g.addoption("--derp-mesh-key-file", metavar="F", help="the server's mesh key, for the mesh cases")
    g.addoption("--derp-cert-name", metavar="X", help="TLS name or sha256-raw:<hex> pin")
    g.addoption("--derp-insecure", action="store_true", help="do not verify the server's TLS certificate")
    g.addoption("--derp-stun", metavar="HOST:PORT", help="the server's STUN address, for the stun cases")
    g.addoption("--derp-cases", metavar="GLOB", action="append", default=[], help="only these cases (globs, comma lists)")
    g.addoption("--derp-exclude", metavar="GLOB", action="append", default=[], help="leave these cases out")
    g.addoption("--derp-strict", action="store_true", help="a failed SHOULD fails the item")
    g.addoption("--derp-long", action="store_true", help="also run the cases that wait on server timers (60-65 s)")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    url = config.getoption("derp_url")
    if not url:
        return
    from derpkit.conformance.registry import select
    from derpkit.conformance.target import TargetError, make_target

    try:
        target = make_target(
            url, mesh_key_file=config.getoption("derp_mesh_key_file"), cert_name=config.getoption("derp_cert_name"),
            insecure=config.getoption("derp_insecure"), stun=config.getoption("derp_stun"),
            long=config.getoption("derp_long"),
        )
    except TargetError as e:
        raise pytest.UsageError(f"--derp-url: {e}") from None
    config.stash[_target_key] = target
    suite = DerpSuite.from_parent(session, name="derp-conformance")
    for c in select(config.getoption("derp_cases"), config.getoption("derp_exclude")):
        items.append(DerpCaseItem.from_parent(suite, name=c.id, case=c))


_target_key: pytest.StashKey[Any] = pytest.StashKey()
_reach_key: pytest.StashKey[str | None] = pytest.StashKey()


class DerpSuite(pytest.Collector):
    """The parent of the generated items (nothing to collect from a file)."""

    def collect(self) -> list[pytest.Item]:
        return []


class DerpCaseFailed(Exception):
    def __init__(self, reason: str, wire: list[dict[str, Any]]) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wire = wire


class DerpCaseItem(pytest.Item):
    def __init__(self, *, case: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.case = case
        self.add_marker(pytest.mark.derp_conformance)

    def runtest(self) -> None:
        import asyncio

        from derpkit.conformance.registry import Result
        from derpkit.conformance.runner import TargetUnreachable, check_reachable, run_case

        config = self.config
        target = config.stash[_target_key]
        if _reach_key not in config.stash:
            try:
                asyncio.run(check_reachable(target))
                config.stash[_reach_key] = None
            except TargetUnreachable as e:
                config.stash[_reach_key] = str(e)
        unreachable = config.stash[_reach_key]
        if unreachable:
            raise DerpCaseFailed(unreachable, [])
        r = asyncio.run(run_case(self.case, target, config.getoption("derp_strict")))
        self.user_properties += [("level", self.case.level.value), ("result", r.result.value), ("reason", r.reason)]
        if r.result is Result.FAIL:
            raise DerpCaseFailed(r.reason, r.wire)
        if r.result is Result.SKIP:
            pytest.skip(r.reason)
        self.add_report_section("call", "derp", f"{r.result.value}: {r.reason}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        e = excinfo.value
        if isinstance(e, DerpCaseFailed):
            from derpkit.conformance.report import _wire_line

            tail = "\n".join(_wire_line(w) for w in e.wire[-12:])
            return (f"{self.case.id} [{self.case.level.value}] {self.case.title}\n  {self.case.section}: "
                    f"{self.case.quote}\n  FAIL: {e.reason}" + (f"\n  wire (last {min(12, len(e.wire))}):\n{tail}" if tail else ""))
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[str, int | None, str]:
        return "derp-conformance", None, f"{self.case.id}: {self.case.title}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "derp_conformance: a DERP conformance case (derpkit --derp-url)")
