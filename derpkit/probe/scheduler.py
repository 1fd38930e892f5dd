"""Running probes: once (``-once``) or for ever, spread over their intervals, bounded in number.

- Each run gets a deadline of 80 % of its interval (derpprobe's default timeout).
- At most ``-concurrency`` runs are in flight across all probes (a 100-node map means ~10 000
  mesh pairs; unbounded, they would all dial at the same moment).
- ``-spread`` delays each probe's first run by a stable fraction of its interval, from a hash
  of its name, so restarts keep the phase (Go does the same with FNV-1; any stable hash does).
- ``-once`` ignores spread and skips continuous (qd) probes (Go may never return, Q16).
- A failed map fetch keeps the last good map and its probes (Q11); the map is only replaced
  by one that passed validation (Q12).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from derpkit.gosyntax import format_duration

from .bw import probe_bw
from .checks import map_checks
from .derpconn import ProbeEnv
from .diagnose import correlate
from .dmap import MapError, MapHolder
from .flags import Options
from .inventory import ProbeSpec, wanted
from .mesh import probe_mesh
from .model import Failed, Outcome, Probe
from .qd import probe_qd
from .stun import probe_stun
from .tls import probe_tls

__all__ = ["Prober", "spread_fraction"]

log = logging.getLogger("derpkit.probe")

#: How long a continuous probe pauses after it ended before starting again.
CONTINUOUS_PAUSE = 10.0
#: Slack past a probe's own deadline before the scheduler cancels it.
GUARD = 0.5


def adding_line(s: ProbeSpec, opts: Options) -> str:
    """derpprobe's log line for a new probe (derpprobe.md §3.8)."""
    every = format_duration(int(s.interval * 1e9))
    where = s.region.name or s.region.code
    pair = f"{s.node.name}->{s.to.name}" if s.to is not None else ""
    if s.cls == "tls":
        return f"adding DERP TLS probe for {s.node.name} ({where}) every {every}"
    if s.cls == "derp_udp":
        return f"adding DERP UDP probe for {s.node.name} ({s.name}) every {every}"
    if s.cls == "derp_mesh":
        return f"adding DERP mesh probe for {pair} ({where}) every {every}"
    if s.cls == "derp_bw":
        return f"adding DERP bandwidth probe for {pair} ({where}) {opts.bw_probe_size_bytes} bytes every {every}"
    return f"adding DERP queuing delay probe for {pair} ({where})"


def one_line(text: str, limit: int = 400) -> str:
    """A failure as one line: joined lines (an HTML body, several certificate problems), capped."""
    parts = [p.strip() for p in text.splitlines() if p.strip()]
    line = " | ".join(parts)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def spread_fraction(name: str) -> float:
    """A stable number in [0, 1) for ``name``."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big") / 2**64


class Prober:
    """All probes of one map source, their records, and the loops that run them."""

    def __init__(self, opts: Options, env: ProbeEnv, holder: MapHolder) -> None:
        self.opts = opts
        self.env = env
        self.holder = holder
        self.probes: dict[str, Probe] = {}
        self._specs: dict[str, ProbeSpec] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._sem = asyncio.Semaphore(opts.concurrency)
        self._locks: dict[str, asyncio.Lock] = {}
        self.warnings: list[str] = []
        self.node_warnings: list[str] = []
        self.started = time.time()
        self.on_result: Callable[[Probe], None] | None = None
        self._running = False
        #: Runs in flight across all probes now, and the most ever (bounded by -concurrency).
        self.in_flight = 0
        self.max_in_flight = 0
        self.once_seconds: float | None = None
        self.map_probe = Probe("derpmap-probe", "derp_map", {}, opts.interval, self._map_fn,
                               timeout=0.8 * opts.interval)
        self.probes[self.map_probe.name] = self.map_probe

    # --- probe functions ---------------------------------------------------------------------

    async def _map_fn(self, probe: Probe) -> dict[str, Any]:
        try:
            m = await self.holder.refresh(probe.timeout)
        except MapError as e:
            kept = ""
            if self.holder.current is not None and self.holder.age is not None:
                kept = f"; still probing the last good map, {self.holder.age:.0f} s old"
                log.info("Error while fetching DERP map, using cached one: %s", e)
            raise Failed(str(e), f"the DERP map could not be loaded: {e}{kept}") from None
        self._reconcile(wanted(m, self.opts))
        try:
            self.warnings = await map_checks(m, self.opts)
        except Exception as e:  # a check must never fail the map probe
            self.warnings = [f"map checks failed: {e}"]
        return {"regions": len(m.regions), "nodes": len(m.nodes()), "source": self.holder.source}

    def _fn_for(self, spec: ProbeSpec) -> Callable[[Probe], Any]:
        env, opts = self.env, self.opts
        if spec.cls == "tls":
            return lambda p: probe_tls(spec.node, env, p.timeout)
        if spec.cls == "derp_udp":
            return lambda p: probe_stun(spec.node, spec.version, p.timeout)
        assert spec.to is not None
        to = spec.to
        if spec.cls == "derp_mesh":
            return lambda p: probe_mesh(spec.node, to, env, p.timeout)
        if spec.cls == "derp_bw":
            return lambda p: probe_bw(spec.node, to, env, opts.bw_probe_size_bytes, p.timeout, p)
        return lambda p: probe_qd(spec.node, to, env, opts.qd_packets_per_second, opts.qd_packet_timeout, p)

    def _reconcile(self, specs: list[ProbeSpec]) -> None:
        want = {s.name: s for s in specs}
        for name in list(self._specs):
            if name not in want or want[name].signature != self._specs[name].signature:
                log.info("removing DERP probe %s", name)
                self._specs.pop(name)
                self.probes.pop(name, None)
                task = self._tasks.pop(name, None)
                if task is not None:
                    task.cancel()
        for name, s in want.items():
            if name in self._specs:
                continue
            timeout = 0.8 * s.interval if s.interval > 0 else 0.0
            p = Probe(name, s.cls, dict(s.labels), s.interval, self._fn_for(s), timeout,
                      region=s.region.code, node=s.node.name, continuous=s.continuous)
            self._specs[name] = s
            self.probes[name] = p
            log.info("%s", adding_line(s, self.opts))
            if self._running:
                self._tasks[name] = asyncio.ensure_future(self._loop(p))

    # --- one run -------------------------------------------------------------------------------

    async def run(self, p: Probe) -> Outcome:
        """Run ``p`` once now (bounded by the shared limit and the probe's deadline).

        One run per probe at a time, as derpprobe: a /debug/probe-run during a scheduled run
        waits for it instead of racing it.
        """
        lock = self._locks.setdefault(p.name, asyncio.Lock())
        async with lock, self._sem:
            p.in_flight += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            start = time.time()
            p.start = start
            t0 = time.monotonic()
            details: dict[str, Any] = {}
            try:
                if p.continuous or p.timeout <= 0:
                    details = await p.fn(p) or {}
                else:
                    # Probes keep their own deadline (so they can say which step was slow);
                    # this guard only catches one that overran it.
                    async with asyncio.timeout(p.timeout + GUARD):
                        details = await p.fn(p) or {}
                out = Outcome(True, start, time.time(), time.monotonic() - t0, details=details)
            except Failed as e:
                out = Outcome(False, start, time.time(), time.monotonic() - t0, one_line(e.error),
                              one_line(e.diagnosis), dict(e.details))
            except TimeoutError:
                out = Outcome(False, start, time.time(), time.monotonic() - t0, "timeout: context deadline exceeded",
                              f"the probe did not finish within its {p.timeout:g} s deadline (80% of the interval)")
            except asyncio.CancelledError:
                p.in_flight -= 1
                self.in_flight -= 1
                raise
            except Exception as e:  # a probe bug must not kill the prober: record it, as Go does
                out = Outcome(False, start, time.time(), time.monotonic() - t0, f"panic: {type(e).__name__}: {e}",
                              "internal error in the probe (please report it)")
            p.in_flight -= 1
            self.in_flight -= 1
            p.record(out)
            if not out.ok:
                log.info("probe %s: %s", p.name, out.error)
            if self.on_result is not None:
                self.on_result(p)
            return out

    # --- once ----------------------------------------------------------------------------------

    async def run_once(self, progress: Callable[[int, int], None] | None = None) -> None:
        """The map probe, then every non-continuous node probe once, then the cross-checks."""
        t0 = time.monotonic()
        await self.run(self.map_probe)
        todo = [p for p in self.probes.values() if p is not self.map_probe and not p.continuous]
        done = 0
        if progress:
            progress(0, len(todo))

        async def one(p: Probe) -> None:
            nonlocal done
            await self.run(p)
            done += 1
            if progress:
                progress(done, len(todo))

        await asyncio.gather(*(one(p) for p in todo))
        self.correlate()
        self.once_seconds = time.monotonic() - t0

    def correlate(self) -> None:
        self.node_warnings = correlate(list(self.probes.values()), self.env.keys_seen())

    # --- for ever ------------------------------------------------------------------------------

    async def _loop(self, p: Probe) -> None:
        if p.continuous:
            while True:
                await self.run(p)
                await asyncio.sleep(CONTINUOUS_PAUSE)
        if self.opts.spread:
            await asyncio.sleep(p.interval * spread_fraction(p.name))
        while True:
            t0 = time.monotonic()
            await self.run(p)
            if p is not self.map_probe:
                self.correlate()
            await asyncio.sleep(max(0.0, p.interval - (time.monotonic() - t0)))

    async def start(self) -> None:
        """Start the loops (the map probe first, so node probes exist before the page shows)."""
        self._running = True
        await self.run(self.map_probe)
        self._tasks[self.map_probe.name] = asyncio.ensure_future(self._map_loop())
        for name, p in self.probes.items():
            if p is not self.map_probe and name not in self._tasks:
                self._tasks[name] = asyncio.ensure_future(self._loop(p))

    async def _map_loop(self) -> None:
        while True:
            await asyncio.sleep(self.opts.interval)
            await self.run(self.map_probe)

    async def stop(self) -> None:
        self._running = False
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t

    def node_probes(self) -> list[Probe]:
        return [p for p in self.probes.values() if p is not self.map_probe]

    def all_warnings(self) -> list[str]:
        return self.warnings + self.node_warnings
