"""``python -m bench.upgrade_paths``: DERP via our front door vs. via aiohttp's body stream.

    python -m bench.upgrade_paths               # full run (about 5 minutes on 2 cores)
    python -m bench.upgrade_paths --quick       # smoke: a few seconds per server
    python -m bench.upgrade_paths --help

Two servers, the same code except for how DERP bytes are read after the upgrade:

- ``front door``: the real ``derpkit serve``; ``FrontDoor`` reads the request head and
  hands the transport to ``ClientConn`` (``set_protocol``), which parses frames straight
  from ``data_received``.
- ``aiohttp body``: ``bench/alt_aiohttp_server.py`` (benchmark-only), where an aiohttp
  handler answers the 101 and loops ``await reader.readany()`` on an aiohttp
  ``StreamReader``, feeding the same ``ClientConn``.

Both run pinned to CPU 0 with the generator on the others, driven by the same generator as
``python -m bench`` (``bench/derpgen`` when Go is installed, else ``bench/pygen.py``), using
that module's measuring code. Latency is taken at one fixed rate for both (``--lat-rate``).
With ``--rounds N`` the servers run N times each in ABBA order and each figure is the median.
See docs/benchmarks.md, "Why the front door: DERP outside aiohttp".
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

from .__main__ import Result, measure, plan_run, table
from .servers import DerpkitServer, raise_nofile

ALT_MODULE = "bench.alt_aiohttp_server"
FRONT, ALT = "front door", "aiohttp body"


class AltAiohttpServer(DerpkitServer):
    """``derpkit serve`` with /derp read through aiohttp (bench/alt_aiohttp_server.py)."""

    def __init__(self, cpus: str | None = None, extra: list[str] | None = None) -> None:
        super().__init__(cpus, extra)
        i = self.argv.index("derpkit")  # [taskset -c N] python -m derpkit serve ...
        self.argv[i] = ALT_MODULE
        self.name = "derpkit-aiohttp-body"


def rows(cfg: argparse.Namespace) -> list[tuple[str, str, str, bool]]:
    at = f"@ {cfg.lat_rate:,.0f} pkt/s (1200 B)"
    return [
        ("pps1200", "peak packets/s, 1200 B, {pairs} pairs (paced sweep)", "{:,.0f}", True),
        ("loss1200", "loss % at that peak, 1200 B", "{:.2f}", False),
        ("pps100", "peak packets/s, 100 B, {pairs} pairs (paced sweep)", "{:,.0f}", True),
        ("loss100", "loss % at that peak, 100 B", "{:.2f}", False),
        ("cpu1200", "server CPU s / M packets at peak, 1200 B", "{:.2f}", False),
        ("cpu100", "server CPU s / M packets at peak, 100 B", "{:.2f}", False),
        ("p50", f"one-way latency p50 ms {at}", "{:.3f}", False),
        ("p99", f"one-way latency p99 ms {at}", "{:.3f}", False),
        ("p999", f"one-way latency p99.9 ms {at}", "{:.3f}", False),
        ("flood1200", "unpaced flood: delivered packets/s, 1200 B", "{:,.0f}", True),
        ("flood100", "unpaced flood: delivered packets/s, 100 B", "{:,.0f}", True),
        ("hs", "handshakes/s (connect+upgrade+ServerInfo)", "{:,.0f}", True),
        ("idle1", "RSS bytes / idle conn @ {idle0}", "{:,.0f}", False),
    ]


def median_result(rs: list[Result]) -> Result:
    """Per-figure median over rounds; notes from the first round, plus the spread."""
    out = Result(notes=dict(rs[0].notes))
    for k in rs[0].figures:
        vals = [r.figures.get(k) for r in rs]
        good = [v for v in vals if v is not None]
        out.figures[k] = statistics.median(good) if good else None
        if len(rs) > 1 and k in out.notes and good:
            out.notes[k] += " [rounds: " + ", ".join(
                f"{v:,.0f}" if v >= 100 else f"{v:.3f}" for v in good) + "]"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.upgrade_paths", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 2 pairs, 0.5 s steps, one sweep step, 100 idle")
    ap.add_argument("--generator", choices=("auto", "go", "python"), default="auto")
    ap.add_argument("--pairs", type=int, default=None, help="sender/receiver pairs (default 8)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per figure (default 3)")
    ap.add_argument("--idle", default=None, help="idle connection count (default 1000)")
    ap.add_argument("--start-rate", type=float, default=None,
                    help="first offered rate of the sweep, packets/s (default 20000)")
    ap.add_argument("--step", type=float, default=1.5, help="sweep rate multiplier")
    ap.add_argument("--steps", type=int, default=None, help="most sweep steps (default 8)")
    ap.add_argument("--lat-rate", type=float, default=None,
                    help="fixed rate for the latency figures, packets/s (default 20000)")
    ap.add_argument("--rounds", type=int, default=1, help="measure each server N times (ABBA)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel handshake loops")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset server and generator")
    cfg = ap.parse_args(argv)
    cfg.pairs = cfg.pairs or (2 if cfg.quick else 8)
    cfg.duration = cfg.duration or (0.5 if cfg.quick else 3.0)
    cfg.start_rate = cfg.start_rate or (5000.0 if cfg.quick else 20000.0)
    cfg.steps = cfg.steps or (1 if cfg.quick else 8)
    cfg.lat_rate = cfg.lat_rate or (2000.0 if cfg.quick else 20000.0)
    cfg.idle = [int(cfg.idle or (100 if cfg.quick else 1000))]
    raise_nofile()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = plan_run(cfg.generator, cfg.no_pin, None, log)
    if plan is None:
        return 2
    ncpu, server_cpus, gen_cpus, gen = plan
    extra = ["-stun=false"]
    makers: dict[str, Any] = {
        FRONT: lambda: DerpkitServer(server_cpus, extra),
        ALT: lambda: AltAiohttpServer(server_cpus, extra),
    }
    runs: dict[str, list[Result]] = {FRONT: [], ALT: []}
    for rnd in range(max(1, cfg.rounds)):
        order = [FRONT, ALT] if rnd % 2 == 0 else [ALT, FRONT]
        for name in order:
            log(f"{name} (round {rnd + 1}):")
            runs[name].append(measure(makers[name], gen, cfg, log, lat_rate=cfg.lat_rate))
    results = {name: median_result(rs) for name, rs in runs.items()}
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (no uvloop)"
    import aiohttp

    print(f"# derpkit upgrade paths{' --quick' if cfg.quick else ''}: "
          f"{time.strftime('%Y-%m-%d %H:%M')}, {ncpu} CPUs, Python {sys.version.split()[0]}, "
          f"{loop}, aiohttp {aiohttp.__version__}")
    print(f"# generator: {gen.name} x{gen.procs} process(es) on CPUs {gen_cpus or 'any'}; "
          f"servers on CPU {server_cpus or 'any'}; "
          f"{cfg.rounds} round(s){', medians' if cfg.rounds > 1 else ''}")
    print(table(results, cfg, rows(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
