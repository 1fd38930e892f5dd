"""What a probe is and what one run of it produced; no I/O here.

A ``Probe`` is derpprobe's unit: a name (``derp/<rc>/<node>/tls``), a class (``tls``), metric
labels, an interval, and a coroutine that either returns details or raises. The scheduler
turns each run into an ``Outcome``; :mod:`derpkit.probe.diagnose` turns a raised exception
into the one-line error and the one-line diagnosis an operator reads.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Failed", "Outcome", "Probe", "RECENT"]

#: derpprobe keeps the last 10 results per probe (RecentResults / RecentLatencies).
RECENT = 10
#: Points of latency history kept for the status page chart.
CHART_POINTS = 120


class Failed(Exception):
    """A probe failure whose cause the probe already knows: ``error`` and ``diagnosis``."""

    def __init__(self, error: str, diagnosis: str = "", **details: Any) -> None:
        super().__init__(error)
        self.error = error
        self.diagnosis = diagnosis
        self.details = details


@dataclass(slots=True)
class Outcome:
    """One finished run."""

    ok: bool
    start: float  # time.time()
    end: float
    latency: float  # seconds, end - start
    error: str = ""
    diagnosis: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "start": self.start,
            "end": self.end,
            "latency_seconds": self.latency,
            "error": self.error,
            "diagnosis": self.diagnosis,
            "details": self.details,
        }


ProbeFn = Callable[["Probe"], Awaitable[dict[str, Any] | None]]


@dataclass(eq=False)
class Probe:
    """One probe and its record (the fields of derpprobe's ProbeInfo, and the counters)."""

    name: str
    cls: str
    labels: dict[str, str]
    interval: float  # seconds; negative = continuous (qd)
    fn: ProbeFn
    timeout: float
    region: str = ""
    node: str = ""
    continuous: bool = False
    start: float | None = None
    end: float | None = None
    last: Outcome | None = None
    in_flight: int = 0
    attempts: dict[str, int] = field(default_factory=lambda: {"ok": 0, "fail": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"ok": 0.0, "fail": 0.0})
    recent: deque[Outcome] = field(default_factory=lambda: deque(maxlen=RECENT))
    chart: deque[tuple[float, float | None]] = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    #: Class-specific metric values (bw transfer time, qd histogram), set by the probe.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def all_labels(self) -> dict[str, str]:
        return {"name": self.name, "class": self.cls, **self.labels}

    @property
    def status(self) -> str:
        if self.start is None:
            return "unknown"
        if self.end is None or self.end < self.start or self.in_flight:
            return "running"
        return "succeeded" if self.last is not None and self.last.ok else "failed"

    def record(self, out: Outcome) -> None:
        self.end = out.end
        self.last = out
        self.recent.append(out)
        self.chart.append((out.end, out.latency if out.ok else None))
        key = "ok" if out.ok else "fail"
        self.attempts[key] += 1
        self.seconds[key] += out.latency

    def success_ratio(self) -> float:
        if not self.recent:
            return 0.0
        return sum(1 for o in self.recent if o.ok) / len(self.recent)

    def median_latency(self) -> float:
        """The median of recent successful latencies, sorted (Go takes the middle unsorted, Q7)."""
        lat = sorted(o.latency for o in self.recent if o.ok)
        return lat[len(lat) // 2] if lat else 0.0

    def info(self) -> dict[str, Any]:
        """derpprobe's ProbeInfo JSON (§3.2), plus derpkit's diagnosis and details."""
        last = self.last
        ok = last is not None and last.ok and self.status == "succeeded"
        return {
            "Name": self.name,
            "Class": self.cls,
            "Interval": int(self.interval * 1e9),
            "Labels": self.all_labels,
            "Start": _rfc3339(self.start),
            "End": _rfc3339(self.end),
            "Latency": int(last.latency * 1e9) if ok and last else 0,
            "Status": self.status,
            "Error": last.error if last is not None and not last.ok else "",
            "RecentResults": [o.ok for o in self.recent],
            "RecentLatencies": [int(o.latency * 1e9) for o in self.recent if o.ok],
            "Diagnosis": last.diagnosis if last is not None else "",
            "Details": last.details if last is not None else {},
        }


def _rfc3339(t: float | None) -> str:
    if t is None:
        return "0001-01-01T00:00:00Z"
    whole = int(t)
    ns = int(round((t - whole) * 1e9))
    base = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
    return f"{base}.{ns:09d}Z".replace(".000000000Z", "Z")
