"""bench/latency.py: percentiles of derpgen's histogram, equal rates, and the p99-bounded
search's stepping, driven by a scripted server (no processes, no clocks)."""

from __future__ import annotations

import math

from bench.latency import Trial, bounded_search, equal_rates, percentile


def trial(rate: float, p99: float, lost: int = 0) -> Trial:
    sent = 1000
    return Trial(rate, sent, sent - lost, rate, lost / sent, p99 / 2, p99, p99 * 2)


class Server:
    """Carries any rate up to ``limit`` with p99 1 ms and nothing lost; above it, 20 ms."""

    def __init__(self, limit: float, lossy_above: float | None = None) -> None:
        self.limit, self.lossy_above = limit, lossy_above
        self.asked: list[float] = []

    def __call__(self, rate: float) -> Trial:
        self.asked.append(rate)
        lost = 1 if self.lossy_above is not None and rate > self.lossy_above else 0
        return trial(rate, 1.0 if rate <= self.limit else 20.0, lost)


def test_percentile_reads_bucket_upper_edges() -> None:
    # bucket b holds delays d (us) with floor(8*log2(d+1)) == b
    hist = {"80": 90, "100": 9, "120": 1}
    assert percentile(hist, 0.5) == 2 ** (81 / 8) - 1
    assert percentile(hist, 0.99) == 2 ** (101 / 8) - 1
    assert percentile(hist, 0.999) == 2 ** (121 / 8) - 1
    assert percentile({}, 0.5) is None


def test_trial_from_generator_and_within() -> None:
    r = {"sent": 100, "received": 100, "pps": 1000.0, "loss": 0.0, "hist": {"80": 100}}
    t = Trial.from_generator(1000, r)
    assert t.p99 is not None and math.isclose(t.p99, (2 ** (81 / 8) - 1) / 1e3)
    assert t.within(5.0) and not t.within(t.p99 / 2)
    lossy = Trial.from_generator(1000, {**r, "received": 99, "loss": 0.01})
    assert not lossy.within(5.0) and "loss" in lossy.why_not(5.0)
    dead = Trial.from_generator(1000, {**r, "received": 0, "loss": 1.0, "hist": {}})
    assert not dead.within(5.0) and dead.why_not(5.0) == "nothing delivered"


def test_equal_rates_shares_or_absolute() -> None:
    rs = equal_rates(80_000, [0.25, 0.5, 0.75], [])
    assert [r.pps for r in rs] == [20_000, 40_000, 60_000]
    assert rs[1].label == "50% of Go derper's peak"
    assert [r.pps for r in equal_rates(80_000, [0.5], [1234, 5000])] == [1234, 5000]
    assert equal_rates(None, [0.5], []) == []


def test_search_steps_up_then_bisects_to_the_limit() -> None:
    srv = Server(limit=50_000)
    b = bounded_search(srv, [], 5.0, start=10_000, step=1.4, max_steps=20, tol=0.05)
    assert b.best is not None
    assert 50_000 / 1.05 <= b.best.offered <= 50_000
    assert all(t.within(5.0) == (t.offered <= 50_000) for t in b.tried)
    assert srv.asked[0] == 10_000 and srv.asked[1] == 14_000  # up by `step` first
    assert b.stopped == "bracket closed"


def test_search_uses_known_points_and_respects_the_step_limit() -> None:
    srv = Server(limit=30_000)
    known = [trial(20_000, 1.0), trial(40_000, 20.0), trial(60_000, 20.0)]
    b = bounded_search(srv, known, 5.0, start=40_000, max_steps=3, tol=0.01)
    assert len(srv.asked) == 3 and "step limit" in b.stopped
    assert all(20_000 < r < 40_000 for r in srv.asked)  # inside the known bracket only
    assert b.best is not None and b.best.offered <= 30_000
    assert "failed (p99 20.00 ms)" in b.note(5.0)


def test_search_counts_loss_as_failure() -> None:
    srv = Server(limit=1e9, lossy_above=25_000)
    b = bounded_search(srv, [], 5.0, start=20_000, max_steps=12, tol=0.05)
    assert b.best is not None and b.best.offered <= 25_000
    assert "loss" in b.note(5.0)


def test_search_halves_down_and_gives_up_at_the_floor() -> None:
    srv = Server(limit=0)
    b = bounded_search(srv, [], 5.0, start=4000, max_steps=10, floor=500)
    assert b.best is None and b.rate is None
    assert srv.asked == [4000, 2000, 1000, 500]
    assert "nothing passed down to 500/s" in b.stopped


def test_search_time_limit() -> None:
    now = [0.0]

    def run(rate: float) -> Trial:
        now[0] += 10
        return trial(rate, 1.0)

    b = bounded_search(run, [], 5.0, start=1000, max_steps=100, seconds=25,
                       clock=lambda: now[0])
    assert len(b.tried) == 3 and "time limit" in b.stopped
