"""``python -m bench.tools``: the cost of derpkit's own tools, each figure over rounds.

    python -m bench.tools                          # all three parts, 3 rounds (~4 min here)
    python -m bench.tools --parts probe --rounds 5
    python -m bench.tools --quick                  # tiny sizes, 1 round: a smoke run
    python -m bench.tools --json out.json          # also JSON (--json - : JSON instead of the table)

Parts: ``conformance`` (derpkit conformance vs derpkit serve and Go derper), ``probe``
(one -once cycle over an N-node map, derpkit probe vs Go derpprobe), ``locust`` (locust
PacketPair packets/s per worker core vs derpgen). Servers are pinned to CPU 0 and the tool
being measured to CPU 1 when there are two CPUs (``--no-pin`` to disable). What each part
measures and how: the docstrings of bench/tools/conformance.py, probe.py and locust.py.
"""

from __future__ import annotations

import argparse
import sys
import time

from ..__main__ import plan_run
from ..servers import raise_nofile
from . import conformance, locust, probe
from .report import Report, markdown, print_rich, write_json

PARTS = ("conformance", "probe", "locust")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.tools", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    ap.add_argument("--rounds", type=int, default=None, help="rounds per figure (default 3; --quick 1)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke sizes: 1 round, 3 conformance cases, 8 nodes, 2 pairs, 1 s windows")
    ap.add_argument("--cases", default=None, help="conformance cases (default: the whole suite)")
    ap.add_argument("--nodes", type=int, default=None, help="probe: nodes in the map (default 100)")
    ap.add_argument("--per-region", type=int, default=None, help="probe: nodes per region (default 4)")
    ap.add_argument("--fleet-procs", type=int, default=None,
                    help="probe: processes hosting the nodes (default 5)")
    ap.add_argument("--probe-trust", default=None,
                    help="probe: trust stores, comma list of system (system roots + test CA), ca "
                    "(test CA only); default both (--quick: ca)")
    ap.add_argument("--pairs", type=int, default=None, help="locust: PacketPair users = derpgen pairs (default 8)")
    ap.add_argument("--size", type=int, default=1200, help="locust: packet payload bytes (default 1200)")
    ap.add_argument("--warmup", type=float, default=None, help="locust: seconds before the window (default 2)")
    ap.add_argument("--window", type=float, default=None, help="locust: measured seconds (default 5)")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset servers and tools")
    ap.add_argument("--markdown", action="store_true", help="print Markdown instead of the rich table")
    ap.add_argument("--json", metavar="FILE", help="write JSON to FILE ('-': to stdout, no table)")
    a = ap.parse_args(argv)
    a.parts = [p.strip() for p in a.parts.split(",") if p.strip()]
    bad = [p for p in a.parts if p not in PARTS]
    if bad:
        ap.error(f"--parts: unknown part {bad[0]!r} (choose from {', '.join(PARTS)})")
    q = a.quick
    a.probe_trust = tuple(t.strip() for t in (a.probe_trust or ("ca" if q else "system,ca")).split(",")
                          if t.strip())
    if not a.probe_trust or any(t not in probe.TRUSTS for t in a.probe_trust):
        ap.error(f"--probe-trust: choose from {', '.join(probe.TRUSTS)}")
    a.rounds = a.rounds or (1 if q else 3)
    a.cases = a.cases or ("http/1,ping/1,stun/1" if q else None)
    a.nodes = a.nodes or (8 if q else 100)
    a.per_region = a.per_region or (2 if q else 4)
    a.fleet_procs = a.fleet_procs or (1 if q else 5)
    a.pairs = a.pairs or (2 if q else 8)
    a.warmup = a.warmup if a.warmup is not None else (0.3 if q else 2.0)
    a.window = a.window or (1.0 if q else 5.0)
    for name in ("rounds", "nodes", "per_region", "fleet_procs", "pairs"):
        if getattr(a, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.size < 20:
        ap.error("--size must be at least 20 (locust's stamp needs 20 bytes)")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    raise_nofile()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = plan_run("go" if "locust" in a.parts else "python", a.no_pin, None, log)
    if plan is None:
        return 2
    ncpu, server_cpus, tool_cpus, _ = plan
    rep = Report(header=[
        f"derpkit tool figures{' --quick' if a.quick else ''}: {time.strftime('%Y-%m-%d %H:%M')}, "
        f"{ncpu} CPUs, Python {sys.version.split()[0]}, {a.rounds} round(s)",
        f"servers on CPU {server_cpus or 'any'}, measured tool on CPU {tool_cpus or 'any'}",
    ])
    try:
        if "conformance" in a.parts:
            c = conformance.measure(a.rounds, server_cpus, tool_cpus, a.cases, log)
            rep.figures += c.figures
            rep.slowest = c.slowest
            rep.errors += c.errors
            rep.facts["conformance_counts"] = c.counts
            rep.notes.append("conformance: " + "; ".join(f"{k}: {conformance._counts(v)}"
                                                         for k, v in c.counts.items()))
        if "probe" in a.parts:
            p = probe.measure(a.rounds, a.nodes, a.per_region, a.fleet_procs, server_cpus,
                              tool_cpus, log, a.probe_trust)
            rep.figures += p.figures
            rep.errors += p.errors
            rep.facts["probes_per_cycle"] = p.probes
            rep.notes.append("probe fleet: " + p.fleet + "; probes per cycle: "
                             + ", ".join(f"{k} {v}" for k, v in p.probes.items()))
        if "locust" in a.parts:
            lo = locust.measure(a.rounds, a.pairs, a.size, a.warmup, a.window, server_cpus,
                                tool_cpus, log)
            rep.figures += lo.figures
            rep.errors += lo.errors
    except (RuntimeError, OSError) as e:
        print(f"bench.tools: {e}", file=sys.stderr)
        return 1
    if a.json:
        write_json(rep, a.json)
    if a.json != "-":
        if a.markdown:
            print(markdown(rep), end="")
        else:
            print_rich(rep)
    return 1 if rep.errors else 0


if __name__ == "__main__":
    sys.exit(main())
