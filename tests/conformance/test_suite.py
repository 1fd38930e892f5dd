"""The whole suite against real servers: derpkit serve and Go derper, plain and TLS.

Every case must PASS, or be INFO/SKIP for a stated reason; no FAIL anywhere. The fault
tests (test_faults.py) show that the same cases do fail when the server misbehaves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from derpkit.conformance.registry import Level, Result, select
from derpkit.conformance.runner import Run, run
from tests.conformance import servers

#: Cases that wait on the server's own timers; not run by default (see docs/conformance.md).
LONG = {"handshake/16", "keepalive/2"}


@pytest.fixture(scope="module", params=["derpkit-http", "derpkit-https", "derper-http", "derper-https",
                                        "derpkit-http-nomesh", "derper-http-nomesh"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """Each server with a mesh key (the suite is given it), and two without one at all."""
    kind, scheme, *rest = request.param.split("-")
    mesh = not rest
    wd = tmp_path_factory.mktemp(request.param)
    if kind == "derpkit":
        s = servers.serve(wd, tls=scheme == "https", mesh=mesh)
    else:
        s = servers.derper(wd, tls=scheme == "https", mesh=mesh)
    try:
        yield s
    finally:
        s.stop()


def summary(r: Run) -> str:
    return "\n".join(f"{x.case.id} {x.result.value}: {x.reason}" for x in r.results if x.result is not Result.PASS)


async def test_whole_suite_passes(server: servers.Server) -> None:
    t0 = time.monotonic()
    r = await run(select(), server.target(), strict=True, jobs=4)
    took = time.monotonic() - t0
    assert not r.failed, summary(r)
    by_id = {x.case.id: x for x in r.results}
    skipped = {i for i, x in by_id.items() if x.result is Result.SKIP}
    expected_skip = set(LONG) | ({c.id for c in select(["tls"])} if not server.url.startswith("https") else set())
    if server.mesh_key is None:
        expected_skip |= {c.id for c in select(["mesh"]) if c.needs}
    assert skipped == expected_skip, summary(r)
    # Every MUST case really ran and passed: none turned into INFO.
    musts = [x for x in r.results if x.case.level is Level.MUST and x.result is not Result.SKIP]
    assert all(x.result is Result.PASS for x in musts), summary(r)
    assert len(r.results) >= 60
    assert took < 60, f"the suite took {took:.1f} s against a local server"


async def test_mesh_cases_without_the_key(server: servers.Server) -> None:
    """Without --mesh-key-file the privileged cases SKIP and the refusals still PASS."""
    r = await run(select(["mesh"]), server.target(mesh=False), strict=True, jobs=4)
    res = {x.case.id: x.result for x in r.results}
    assert {i for i, v in res.items() if v is Result.PASS} == {"mesh/1", "mesh/2", "mesh/3", "mesh/4"}, summary(r)
    assert all(v is Result.SKIP for i, v in res.items() if i not in {"mesh/1", "mesh/2", "mesh/3", "mesh/4"})


def _by_id(r: Run) -> dict[str, Any]:
    return {x.case.id: x for x in r.results}
