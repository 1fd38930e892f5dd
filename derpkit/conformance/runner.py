"""Run the selected cases against one target and turn each outcome into a result.

Cases run a few at a time (``jobs``); each gets a fresh context, its own timeout, and
every connection it opened is closed afterwards. A case that breaks in an unexpected way
becomes FAIL with a one-line reason rather than stopping the run. Before any case, one
TCP connection checks that the target answers at all, so an unreachable server is one
error line instead of sixty failures.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .context import CaseContext
from .registry import Case, CaseResult, Level, Need, Result, Verdict
from .target import Target


class TargetUnreachable(Exception):
    """The target does not accept connections; the message is one line for a person."""


@dataclass
class Run:
    target: Target
    strict: bool
    results: list[CaseResult] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [r for r in self.results if r.result is Result.FAIL]

    def counts(self) -> dict[str, int]:
        out = {r.value: 0 for r in Result}
        for r in self.results:
            out[r.result.value] += 1
        return out


def missing_need(case: Case, target: Target) -> str | None:
    """Why ``case`` cannot run against ``target`` (None when it can)."""
    for need in sorted(case.needs, key=lambda n: n.value):
        if need is Need.MESH_KEY and target.mesh_key is None:
            return "needs the server's mesh key (--mesh-key-file)"
        if need is Need.STUN and target.stun is None:
            return "needs a STUN address (--stun HOST:PORT)"
        if need is Need.TLS and not target.tls:
            return "needs an https:// target"
        if need is Need.LONG and not target.long:
            return f"waits on the server's own timers (up to {case.timeout:g} s); run with --long"
    return None


def judge(case: Case, verdict: Result, reason: str, strict: bool) -> tuple[Result, str]:
    """Apply the level: SHOULD failures are FAIL only when strict; INFORMATIONAL never fails."""
    if verdict is Result.FAIL:
        if case.level is Level.INFORMATIONAL:
            return Result.INFO, reason
        if case.level is Level.SHOULD and not strict:
            return Result.INFO, f"SHOULD not met: {reason}"
    if verdict is Result.PASS and case.level is Level.INFORMATIONAL:
        return Result.INFO, reason
    return verdict, reason


async def run_case(case: Case, target: Target, strict: bool) -> CaseResult:
    t0 = time.monotonic()
    why = missing_need(case, target)
    if why is not None:
        return CaseResult(case, Result.SKIP, why, 0.0, [])
    ctx = CaseContext(target)
    try:
        async with asyncio.timeout(case.timeout):
            reason = await case.fn(ctx)
        verdict, text = Result.PASS, reason or "ok"
    except Verdict as v:
        verdict, text = v.result, v.reason
    except TimeoutError:
        verdict, text = Result.FAIL, f"case did not finish within {case.timeout:g} s"
    except Exception as e:  # noqa: BLE001 - a broken case is a FAIL with a reason, not a crash
        verdict, text = Result.FAIL, f"unexpected {type(e).__name__}: {e}".splitlines()[0]
    finally:
        ctx.close()
    await asyncio.sleep(0)  # let aborted transports finish closing
    result, text = judge(case, verdict, text, strict)
    return CaseResult(case, result, text, time.monotonic() - t0, ctx.log.to_json())


async def check_reachable(target: Target, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """One TCP (and TLS) connection; ``TargetUnreachable`` with a one-line reason if it fails."""
    u = target.derp
    loop = asyncio.get_running_loop()
    plan = target.tls_plan() if u.tls else None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                asyncio.Protocol, u.host, u.port,
                ssl=plan.context if plan else None, server_hostname=plan.server_name if plan else None,
            )
    except TimeoutError:
        raise TargetUnreachable(f"cannot reach {u.host}:{u.port}: no answer within {timeout:g} s") from None
    except ssl.SSLCertVerificationError as e:
        raise TargetUnreachable(
            f"TLS to {u.host}:{u.port} failed verification: {e.verify_message or e} "
            "(use --cert-name or --insecure for a self-signed server)"
        ) from None
    except ssl.SSLError as e:
        raise TargetUnreachable(f"TLS to {u.host}:{u.port} failed: {e.reason or e} (is it plain HTTP?)") from None
    except OSError as e:
        raise TargetUnreachable(f"cannot reach {u.host}:{u.port}: {e.strerror or e}") from None
    try:
        if plan is not None:
            from derpkit.client.errors import DerpCertificateError
            from derpkit.client.tls import check_after_handshake

            try:
                check_after_handshake(plan, transport.get_extra_info("ssl_object"), target.url)
            except DerpCertificateError as e:
                raise TargetUnreachable(str(e)) from None
    finally:
        transport.abort()


async def run(
    cases: Sequence[Case],
    target: Target,
    *,
    strict: bool = False,
    jobs: int = 4,
    on_result: Callable[[CaseResult], None] | None = None,
) -> Run:
    """Run ``cases`` ``jobs`` at a time; results come back in the order of ``cases``."""
    await check_reachable(target)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(max(1, jobs))
    results: list[CaseResult | None] = [None] * len(cases)

    async def one(i: int, c: Case) -> None:
        async with sem:
            r = await run_case(c, target, strict)
        results[i] = r
        if on_result is not None:
            on_result(r)

    await asyncio.gather(*(one(i, c) for i, c in enumerate(cases)))
    return Run(target, strict, [r for r in results if r is not None], time.monotonic() - t0)
