"""Each case can fail: a server with one known defect fails exactly the cases that check it.

The backend is a real ``derpkit serve``; ``faultproxy.FaultProxy`` sits in front and breaks
one rule. The suite runs strict (a failed SHOULD is FAIL) so that SHOULD cases are shown
able to fail too. The transparent proxy is the control: through it nothing fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from derpkit.conformance.registry import Result, select
from derpkit.conformance.runner import run
from derpkit.conformance.target import make_target
from tests.conformance import faultproxy as fp
from tests.conformance import servers

FAULTS = [fp.Fault(), fp.DropPeerGone(), fp.LeakToThird(), fp.AcceptOversized(), fp.OkInsteadOf426(),
          fp.FrameBeforeServerInfo(), fp.AnswerWatchConns(), fp.ProxyAddress()]
STUN_FAULTS = [fp.StunFault(), fp.StunAnswersGarbage(), fp.StunWrongAddress()]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    s = servers.serve(tmp_path_factory.mktemp("fault-backend"))
    try:
        yield s
    finally:
        s.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
async def test_fault_fails_exactly_its_cases(backend: servers.Server, fault: fp.Fault) -> None:
    proxy = await fp.FaultProxy(("127.0.0.1", _port(backend.url)), fault).start()
    try:
        target = make_target(f"http://127.0.0.1:{proxy.port}", mesh_key=backend.mesh_key if fault.mesh else None)
        r = await run(select(exclude=["stun", *fault.exclude]), target, strict=True, jobs=1 if fault.sequential else 4)
    finally:
        await proxy.stop()
    failed = {x.case.id: x.reason for x in r.results if x.result is Result.FAIL}
    detail = "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items()))
    assert set(failed) == set(fault.expected), f"{fault.name}: failed\n{detail}"
    for cid, reason in failed.items():
        assert reason and "unexpected" not in reason, f"{cid}: {reason}"


@pytest.mark.parametrize("fault", STUN_FAULTS, ids=lambda f: f.name)
async def test_stun_fault_fails_exactly_its_cases(backend: servers.Server, fault: fp.StunFault) -> None:
    assert backend.stun is not None
    host, port = backend.stun.rsplit(":", 1)
    proxy = await fp.StunProxy((host, int(port)), fault).start()
    try:
        target = make_target(backend.url, stun=f"127.0.0.1:{proxy.port}")
        r = await run(select(["stun"]), target, strict=True, jobs=2)
    finally:
        proxy.stop()
    failed = {x.case.id: x.reason for x in r.results if x.result is Result.FAIL}
    detail = "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items()))
    assert set(failed) == set(fault.expected), f"{fault.name}: failed\n{detail}"
