"""``python -m bench soak``: derpkit serve under steady load for a long time, sampled.

    python -m bench soak --minutes 30            # 50 % of a measured saturation
    python -m bench soak --minutes 5 --rate 20000 --json /tmp/soak.json

One ``derpkit serve`` (pinned to CPU 0 like the rest of the bench) and the bench generator
(derpgen when Go is installed, else pygen) sending paced packets between ``--pairs``
sender/receiver pairs. First a short unpaced flood measures saturation; the soak then offers
``--load`` (default 0.5) of it, in back-to-back segments of ``--segment`` seconds (each a
fresh generator run, so a segment's loss is exact). Every ``--sample`` seconds the server's
RSS, open descriptors, average queue duration and drop counters are read (psutil and
/debug/varz). The report: packets sent, delivered, lost; drops by reason; RSS at start,
end and peak; the RSS growth per hour as the least-squares slope over the samples after
the first segment (warm-up); descriptors min/max. A soak is a benchmark, not a test:
nothing is asserted, the figures go to docs/reliability.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from .servers import DerpkitServer

_DROP_RE = re.compile(r'^derp_packets_dropped\{reason="([^"]+)",kind="([^"]+)"\} (\S+)$', re.M)
_GAUGE_RE = re.compile(r"^(derp_average_queue_duration_ms|derp_current_connections) (\S+)$", re.M)


def drops(varz: str) -> dict[str, float]:
    """Packets dropped by reason (disco and other summed)."""
    out: dict[str, float] = {}
    for reason, _kind, v in _DROP_RE.findall(varz):
        out[reason] = out.get(reason, 0.0) + float(v)
    return out


def slope_per_hour(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, bytes), in bytes per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    if den == 0:
        return None
    return sum((t - mx) * (v - my) for t, v in points) / den * 3600


class Sampler(threading.Thread):
    """Reads the server's RSS, fds and varz every ``every`` seconds until stopped."""

    def __init__(self, srv: DerpkitServer, every: float) -> None:
        super().__init__(daemon=True)
        self.srv, self.every = srv, every
        self.proc = psutil.Process(srv.pid)
        self.samples: list[dict[str, Any]] = []
        self.halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        varz = self.srv.varz()
        g = dict(_GAUGE_RE.findall(varz))
        self.samples.append({
            "t": time.monotonic() - self.t0,
            "rss": self.proc.memory_info().rss,
            "fds": self.proc.num_fds(),
            "queue_ms": float(g.get("derp_average_queue_duration_ms", 0)),
            "conns": float(g.get("derp_current_connections", 0)),
            "drops": drops(varz),
        })

    def run(self) -> None:
        while not self.halt.wait(self.every):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a missed sample is reported, not fatal
                print(f"soak: sample failed: {e}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from .__main__ import plan_run  # the bench's CPU and generator choice

    ap = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="soak length (default 30)")
    ap.add_argument("--rate", type=float, default=0.0, help="packets/s offered (default: --load x saturation)")
    ap.add_argument("--load", type=float, default=0.5, help="share of the measured saturation (default 0.5)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--size", type=int, default=1200, help="packet payload bytes")
    ap.add_argument("--segment", type=float, default=60.0, help="seconds per generator run")
    ap.add_argument("--sample", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--generator", choices=("auto", "go", "python"), default="auto")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    cfg = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = plan_run(cfg.generator, cfg.no_pin, 0, log)
    if plan is None:
        return 2
    _ncpu, server_cpus, _gen_cpus, gen = plan
    with DerpkitServer(server_cpus) as srv:
        srv.start()
        time.sleep(0.5)
        rate = cfg.rate
        if not rate:
            log("soak: measuring saturation (5 s unpaced flood)")
            sat = gen.run("flood", srv.url, cfg.pairs, size=cfg.size, duration="5s")
            rate = sat["pps"] * cfg.load
            log(f"soak: saturation {sat['pps']:,.0f} packets/s; offering {rate:,.0f}")
        sampler = Sampler(srv, cfg.sample)
        sampler.sample()
        drops0 = sampler.samples[0]["drops"]
        sampler.start()
        sent = delivered = 0
        segments: list[dict[str, Any]] = []
        end = time.monotonic() + cfg.minutes * 60
        while (left := end - time.monotonic()) > 1:
            seg = min(cfg.segment, left)
            r = gen.run("flood", srv.url, cfg.pairs, size=cfg.size, duration=f"{seg:.0f}s", rate=f"{rate:.0f}")
            sent += r["sent"]
            delivered += r["received"]
            segments.append({"sent": r["sent"], "received": r["received"], "pps": r["pps"]})
            log(f"soak: {time.monotonic() - sampler.t0:6.0f} s  segment {len(segments)}: "
                f"{r['received']:,}/{r['sent']:,} delivered, RSS {sampler.samples[-1]['rss'] / 2**20:.1f} MiB")
        sampler.halt.set()
        sampler.join()
        sampler.sample()
    s = sampler.samples
    warm = [x for x in s if x["t"] >= (s[0]["t"] + min(cfg.segment, cfg.minutes * 60 / 4))]
    growth = slope_per_hour([(x["t"], x["rss"]) for x in warm])
    dropped = {k: v - drops0.get(k, 0.0) for k, v in s[-1]["drops"].items() if v - drops0.get(k, 0.0)}
    report = {
        "minutes": cfg.minutes, "rate_offered": rate, "pairs": cfg.pairs, "size": cfg.size, "generator": gen.name,
        "sent": sent, "delivered": delivered, "lost": sent - delivered,
        "loss_pct": 100 * (sent - delivered) / max(sent, 1), "dropped_by_reason": dropped,
        "rss_start": s[0]["rss"], "rss_end": s[-1]["rss"], "rss_peak": max(x["rss"] for x in s),
        "rss_growth_bytes_per_hour": growth,
        "fds_min": min(x["fds"] for x in s), "fds_max": max(x["fds"] for x in s),
        "queue_ms_max": max(x["queue_ms"] for x in s), "samples": len(s), "segments": segments,
    }
    print(f"# derpkit soak: {time.strftime('%Y-%m-%d %H:%M')}, {cfg.minutes:g} min, {rate:,.0f} packets/s offered "
          f"({cfg.pairs} pairs, {cfg.size} B, {gen.name})")
    print("| figure | value |\n|---|---|")
    rows = [
        ("packets sent / delivered", f"{sent:,} / {delivered:,}"),
        ("lost", f"{sent - delivered:,} ({report['loss_pct']:.4f} %)"),
        ("dropped by the server, by reason", ", ".join(f"{k} {v:,.0f}" for k, v in dropped.items()) or "none"),
        ("RSS start / end / peak (MiB)",
         f"{s[0]['rss'] / 2**20:.1f} / {s[-1]['rss'] / 2**20:.1f} / {report['rss_peak'] / 2**20:.1f}"),
        ("RSS growth after warm-up (MiB/hour)", "n/a" if growth is None else f"{growth / 2**20:+.2f}"),
        ("open fds min / max", f"{report['fds_min']} / {report['fds_max']}"),
        ("average queue duration, max sample (ms)", f"{report['queue_ms_max']:.2f}"),
        ("samples", f"{len(s)} every {cfg.sample:g} s"),
    ]
    for k, v in rows:
        print(f"| {k} | {v} |")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({**report, "series": s}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
