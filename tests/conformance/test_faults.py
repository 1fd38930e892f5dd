"""Each case can fail: a server with one known defect fails exactly the cases that check it.

The backend is a real ``derpkit serve``; ``faultproxy.FaultProxy`` sits in front and breaks
one rule. The suite runs strict (a failed SHOULD is FAIL) so that SHOULD cases are shown
able to fail too. The transparent proxy is the control: through it nothing fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from derpkit.conformance.registry import Result, select
from derpkit.conformance.runner import run
from derpkit.conformance.target import make_target
from tests.conformance import faultproxy as fp
from tests.conformance import servers
from tests.interop.pki import self_signed_ip

#: Every DERP fault: the class, and whether it needs the server's keys to do its damage.
FAULTS: list[type[fp.Fault]] = [
    fp.Fault, fp.ProxyAddress,
    # http/
    fp.ProbeNotFound, fp.ProbeNoCors, fp.ProbeAnyMethod, fp.Generate204As200, fp.ChallengeIgnored,
    fp.ChallengeUnchecked, fp.NoCacheControl,
    # upgrade/ and fast-start/ and websocket/
    fp.OkInsteadOf426, fp.Wrong426Body, fp.No101Upgrade, fp.NoDerpVersion, fp.WrongPublicKeyHeader,
    fp.CaseSensitiveUpgrade, fp.DropPipelinedBytes, fp.FastStartIgnored, fp.FastStartAnyValue, fp.NoWebSocket,
    # handshake/
    fp.FrameBeforeServerInfo, fp.AdmitUnopenable, fp.StrictClientInfo, fp.TolerateWrongFirstFrame,
    fp.TolerateShortClientInfo, fp.TolerateLongClientInfo, fp.TolerateZeroKey,
    # framing/
    fp.AcceptOversized, fp.CloseOnUnknown, fp.TruncateBigPackets, fp.TolerateShortSendPacket,
    fp.CloseOnNotePreferred, fp.TolerateBadNotePreferred,
    # relay/ and peer-gone/
    fp.LeakToThird, fp.DropEmptyPackets, fp.NotHereForEverything, fp.Reorder, fp.HeadOfLineBlocking,
    fp.MangleDisco, fp.DropPeerGone, fp.NotHereUnlimited, fp.ShortPeerGone,
    # ping/ and keepalive/
    fp.NoPongForLongPing, fp.TolerateBadPing, fp.PaddedPong, fp.IdleClose, fp.KeepAliveStorm,
    # mesh/
    fp.MeshUnchecked, fp.WrongMeshKeyRefused, fp.NoSelfInFlood, fp.NoPresenceFlags, fp.ForwardNamesMeshPeer,
    fp.ClosePeerIgnored, fp.WatchConnsLengthUnchecked,
    # foundations: each breaks something many cases rely on
    fp.DropToSelf, fp.WrongSource, fp.PongMismatch,
    # tls/
    fp.TlsWithoutMetaCert, fp.PlainOnTlsPort,
]
STUN_FAULTS: list[type[fp.StunFault]] = [
    fp.StunFault, fp.StunAnswersGarbage, fp.StunWrongAddress, fp.StunWrongTxid, fp.StunOncePerTransaction,
]


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    s = servers.serve(tmp_path_factory.mktemp("fault-backend"))
    try:
        yield s
    finally:
        s.stop()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


#: Faults whose suite runs overlap (each has its own proxy, so they cannot see each other;
#: the backend is shared). Three at a time keeps the 2-core machine far from the patience.
CONCURRENT = 3


async def _run_fault(backend: servers.Server, cls: type[fp.Fault], tmp: Path) -> dict[str, str]:
    """The cases that FAILed through a proxy with this one fault, with their reasons."""
    fault = cls(backend.private_key, backend.mesh_key) if issubclass(cls, fp._ServerKeyFault) else cls()
    ctx, pin = None, None
    if fault.tls:
        leaf = self_signed_ip(tmp)
        ctx, pin = leaf.server_context(), leaf.cert_name
    proxy = await fp.FaultProxy(("127.0.0.1", _port(backend.url)), fault, ctx).start()
    try:
        scheme = "https" if fault.tls else "http"
        target = make_target(f"{scheme}://127.0.0.1:{proxy.port}", mesh_key=backend.mesh_key if fault.mesh else None,
                             cert_name=pin)
        # A correct server closes or answers at once; the patience only bounds the faulty case.
        target = dataclasses.replace(target, patience=1.5, io_timeout=2.5, connect_timeout=3.0)
        r = await run(select(exclude=["stun", *fault.exclude]), target, strict=True, jobs=1 if fault.sequential else 8)
    finally:
        await proxy.stop()
    return {x.case.id: x.reason for x in r.results if x.result is Result.FAIL}


@pytest.fixture(scope="module")
def fault_runs(backend: servers.Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """Run the suite through every fault once, a few faults at a time, in a loop of its own."""

    async def all_faults() -> dict[str, dict[str, str]]:
        sem = asyncio.Semaphore(CONCURRENT)

        async def one(cls: type[fp.Fault]) -> tuple[str, dict[str, str]]:
            async with sem:
                return cls.name, await _run_fault(backend, cls, tmp_path_factory.mktemp("fault"))

        # The sequential one (a leak across connections) first: it is the longest.
        order = sorted(FAULTS, key=lambda c: not c.sequential)
        return dict(await asyncio.gather(*(one(c) for c in order)))

    return asyncio.run(all_faults())


@pytest.mark.parametrize("cls", FAULTS, ids=lambda c: c.name)
def test_fault_fails_exactly_its_cases(fault_runs: dict[str, dict[str, str]], cls: type[fp.Fault]) -> None:
    failed = fault_runs[cls.name]
    detail = "\n".join(f"  {k}: {v}" for k, v in sorted(failed.items()))
    assert set(failed) == set(cls.expected), f"{cls.name}: failed\n{detail}"
    for cid, reason in failed.items():
        assert reason and "unexpected" not in reason, f"{cid}: {reason}"


@pytest.mark.parametrize("cls", STUN_FAULTS, ids=lambda c: c.name)
async def test_stun_fault_fails_exactly_its_cases(backend: servers.Server, cls: type[fp.StunFault]) -> None:
    fault = cls()
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
