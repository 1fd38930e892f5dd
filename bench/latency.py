"""Latency at equal offered rates, and the highest rate a server carries within a p99 bound.

Issue 16: a server measured at half of *its own* peak is compared at unlike loads, and a
loss-only sweep says nothing about queueing. So every server is offered the *same* rates
(by default 25/50/75 % of Go derper's measured peak in that transport), and a short search
finds the highest offered rate each one carries with p99 one-way delay ≤ a bound (5 ms by
default, what a WireGuard tunnel tolerates without noticing) and no packet lost.

Nothing here starts processes: ``bounded_search`` takes a ``run(rate) -> Trial`` callable,
so its stepping is tested without servers (tests/bench).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def percentile(hist: dict[str, int], p: float) -> float | None:
    """Microseconds at percentile p of a derpgen histogram; the bucket's upper edge.

    Bucket b holds delays d (µs) with floor(8·log2(d+1)) == b, so buckets are ~9 % wide and
    a figure can overstate the true percentile by up to that much.
    """
    total = sum(hist.values())
    if not total:
        return None
    want = p * total
    seen = 0
    for b in sorted(hist, key=int):
        seen += hist[b]
        if seen >= want:
            return 2 ** ((int(b) + 1) / 8) - 1
    return None


@dataclass
class Trial:
    """One paced flood at ``offered`` packets/s: what arrived and how late."""

    offered: float
    sent: int
    received: int
    pps: float                 # delivered packets/s
    loss: float                # fraction of sent packets not delivered
    p50: float | None          # ms
    p99: float | None
    p999: float | None
    note: str = ""

    @classmethod
    def from_generator(cls, offered: float, r: dict[str, Any], note: str = "") -> Trial:
        """From derpgen's (merged) flood JSON."""
        ms = [percentile(r["hist"], p) for p in (0.5, 0.99, 0.999)]
        p50, p99, p999 = (None if v is None else v / 1e3 for v in ms)
        return cls(offered, int(r["sent"]), int(r["received"]), float(r["pps"]),
                   float(r["loss"]), p50, p99, p999, note)

    def within(self, bound_ms: float) -> bool:
        """p99 ≤ bound and not one packet lost (and something was delivered at all)."""
        return (self.received > 0 and self.received >= self.sent and self.p99 is not None
                and self.p99 <= bound_ms)

    def why_not(self, bound_ms: float) -> str:
        if self.received == 0:
            return "nothing delivered"
        parts = []
        if self.received < self.sent:
            parts.append(f"loss {self.loss * 100:.3f} %")
        if self.p99 is None or self.p99 > bound_ms:
            parts.append(f"p99 {self.p99 or 0:.2f} ms")
        return ", ".join(parts) or "within"


@dataclass(frozen=True)
class Rate:
    """One equal-rate latency point: packets/s offered to every server, and its label."""

    pps: float
    label: str


def equal_rates(reference_peak: float | None, shares: list[float], absolute: list[float],
                reference: str = "Go derper") -> list[Rate]:
    """Absolute rates if given, else ``shares`` of the reference server's peak."""
    if absolute:
        return [Rate(r, f"{r:,.0f} pkt/s") for r in absolute]
    if not reference_peak:
        return []
    return [Rate(round(reference_peak * s, -2) or 100.0,
                 f"{s:.0%} of {reference}'s peak") for s in shares]


@dataclass
class Bounded:
    """The search's outcome: the best passing trial (None if none passed) and every trial."""

    best: Trial | None
    tried: list[Trial] = field(default_factory=list)
    stopped: str = ""          # why the search ended

    @property
    def rate(self) -> float | None:
        """Delivered packets/s of the best passing trial (what the server carried)."""
        return None if self.best is None else self.best.pps

    def note(self, bound_ms: float) -> str:
        fails = [t for t in self.tried if not t.within(bound_ms)
                 and (self.best is None or t.offered > self.best.offered)]
        nxt = min(fails, key=lambda t: t.offered) if fails else None
        s = ("none passed" if self.best is None else
             f"offered {self.best.offered:,.0f}/s, p99 {self.best.p99:.2f} ms")
        if nxt is not None:
            s += f"; {nxt.offered:,.0f}/s failed ({nxt.why_not(bound_ms)})"
        return s + f"; {len(self.tried)} trials, {self.stopped}"


def bounded_search(run: Callable[[float], Trial], known: list[Trial], bound_ms: float, *,
                   start: float, step: float = 1.4, max_steps: int = 6, tol: float = 0.08,
                   seconds: float = 120.0, floor: float = 500.0,
                   clock: Callable[[], float] = time.monotonic) -> Bounded:
    """Highest offered rate with ``Trial.within(bound_ms)``, in at most ``max_steps`` new
    trials and about ``seconds``.

    ``known`` trials (the equal-rate points, same server, same session) seed the bracket:
    the highest passing rate is ``lo``, the lowest failing rate above it ``hi``. Without a
    passing point the search halves down from ``start`` (to ``floor``); without a failing
    one it multiplies by ``step``; then it bisects (geometric mean) until ``hi/lo ≤ 1+tol``.
    A passing rate above a failing one (noise) is believed: the bracket is rebuilt each step.
    """
    tried = list(known)
    deadline = clock() + seconds
    steps = 0

    def bracket() -> tuple[Trial | None, Trial | None]:
        ok = [t for t in tried if t.within(bound_ms)]
        lo = max(ok, key=lambda t: t.offered) if ok else None
        bad = [t for t in tried if not t.within(bound_ms)
               and (lo is None or t.offered > lo.offered)]
        hi = min(bad, key=lambda t: t.offered) if bad else None
        return lo, hi

    stopped = "bracket closed"
    while True:
        lo, hi = bracket()
        if lo is None:
            nxt = (hi.offered if hi else start * 2) / 2
            if nxt < floor:
                stopped = f"nothing passed down to {floor:,.0f}/s"
                break
        elif hi is None:
            nxt = lo.offered * step
        elif hi.offered / lo.offered <= 1 + tol:
            break
        else:
            nxt = math.sqrt(lo.offered * hi.offered)
        if steps >= max_steps:
            stopped = f"step limit ({max_steps})"
            break
        if clock() > deadline:
            stopped = f"time limit ({seconds:g} s)"
            break
        tried.append(run(nxt))
        steps += 1
    lo, _ = bracket()
    return Bounded(lo, tried, stopped)
