"""``python -m bench``: derpkit and Go derper on loopback, one generator, one table.

    python -m bench                 # full run (several minutes on 2 cores)
    python -m bench --quick         # smoke: small N, about a second per figure
    python -m bench --help
    python -m bench soak --minutes 30   # long steady load, sampled (bench/soak.py)

Each server runs in turn, pinned to the first CPU (``taskset``) with the generator pinned
to the others, so the two never share a core. The generator is ``bench/derpgen`` (Go, on
``tailscale.com/derp``'s client) when Go is installed, else ``bench/pygen.py``; the same
one drives both servers. See docs/benchmarks.md for what each figure means and what
limits it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from .servers import DerpkitServer, GoDerperServer, Server, find_go_derper, pin_prefix, raise_nofile

HERE = Path(__file__).resolve().parent
HIST_BUCKETS = 400
#: Generator at least this busy (share of its own CPUs) = GENERATOR-BOUND, whatever the
#: server's share: a saturated generator cannot offer more, so the figure is a floor for the
#: server, not its limit. (The server's share is not part of the rule: on one pinned core a
#: server can look busy while it still waits on the generator, and the notes print both.)
GEN_BOUND = 0.90


# --------------------------------------------------------------------------- generator


def build_derpgen() -> str | None:
    """Build bench/derpgen into a temp dir; None when Go is missing or the build fails."""
    go = shutil.which("go")
    if go is None:
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="derpgen-"), "derpgen")
    env = dict(os.environ, GOFLAGS="-mod=mod", GOSUMDB="off")
    p = subprocess.run([go, "build", "-o", out, "."], cwd=HERE / "derpgen", env=env,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        print(f"bench: building derpgen failed, using the Python generator:\n{p.stderr[-2000:]}",
              file=sys.stderr)
        return None
    return out


@dataclass
class Generator:
    argv: list[str]
    name: str
    cpus: str | None
    ncpu: int
    procs: int

    def _cmd(self, mode: str, args: list[str]) -> list[str]:
        return [*pin_prefix(self.cpus), *self.argv, mode, *args]

    def run(self, mode: str, url: str, pairs: int = 0, **kw: Any) -> dict[str, Any]:
        """Run ``procs`` processes (pairs split between them) and merge their JSON."""
        procs = max(1, min(self.procs, pairs)) if pairs else self.procs
        children = []
        for i in range(procs):
            args = ["-url", url]
            if pairs:
                args += ["-pairs", str(pairs // procs + (1 if i < pairs % procs else 0))]
            for k, v in kw.items():
                if k == "rate" and v:
                    v = f"{float(v) / procs:.0f}"
                args += [f"-{k}", str(v)]
            children.append(subprocess.Popen(self._cmd(mode, args), stdout=subprocess.PIPE,
                                             stdin=subprocess.DEVNULL, text=True,
                                             preexec_fn=raise_nofile))
        results = []
        for c in children:
            out, _ = c.communicate(timeout=300)
            if c.returncode != 0:
                raise RuntimeError(f"generator {mode} failed with {c.returncode}")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return merge(results)


def merge(rs: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rs) == 1:
        return rs[0]
    out = dict(rs[0])
    for k in ("sent", "received", "received_bytes", "ok", "failed", "cpu_seconds", "conns"):
        if k in out:
            out[k] = sum(r[k] for r in rs)
    for k in ("seconds", "wall_seconds"):
        if k in out:
            out[k] = max(r[k] for r in rs)
    if "hist" in out:
        h: dict[str, int] = {}
        for r in rs:
            for b, c in r["hist"].items():
                h[b] = h.get(b, 0) + c
        out["hist"] = h
    if "received" in out:
        out["pps"] = out["received"] / out["seconds"]
        out["loss"] = 1 - out["received"] / max(out["sent"], 1)
    if "ok" in out:
        out["per_second"] = out["ok"] / out["seconds"]
    return out


def percentile(hist: dict[str, int], p: float) -> float | None:
    """Microseconds at percentile p; the bucket's upper edge (buckets are ~9% wide)."""
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


# --------------------------------------------------------------------------- measuring


@dataclass
class Result:
    figures: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


def cpu_of(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss_of(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def gen_note(r: dict[str, Any], gen: Generator, server_util: float) -> str:
    """The notes column: generator and server CPU shares, and GENERATOR-BOUND when the
    generator was at least ``GEN_BOUND`` busy (then the row says more about the generator
    than about the server)."""
    util = r["cpu_seconds"] / max(r["wall_seconds"], 1e-9) / gen.ncpu
    bound = util >= GEN_BOUND
    return (f"gen CPU {util:.0%} of {gen.ncpu}, server {server_util:.0%}"
            + (" GENERATOR-BOUND" if bound else ""))


def flood(srv: Server, gen: Generator, cfg: argparse.Namespace, size: int,
          rate: float) -> tuple[dict[str, Any], float, float]:
    """One flood; returns (merged result, server CPU s, server CPU share while sending)."""
    c0, t0 = cpu_of(srv.pid), time.monotonic()
    kw: dict[str, Any] = {"size": size, "duration": f"{cfg.duration}s"}
    if rate:
        kw["rate"] = f"{rate:.0f}"
    r = gen.run("flood", srv.url, cfg.pairs, **kw)
    cpu, wall = cpu_of(srv.pid) - c0, time.monotonic() - t0
    # The wall time includes connecting and draining; the sending phase dominates the CPU.
    return r, cpu, cpu / max(min(wall, r["wall_seconds"]), 1e-9)


def measure(make: Any, gen: Generator, cfg: argparse.Namespace, log: Any,
            lat_rate: float | None = None) -> Result:
    """All figures for one server; latency at ``lat_rate`` packets/s, else 50 % of its peak."""
    res = Result()
    f, n = res.figures, res.notes
    srv: Server = make()
    with srv:
        srv.start()
        time.sleep(0.3)
        for size in (1200, 100):
            log(f"  unpaced flood {size} B x {cfg.pairs} pairs, {cfg.duration:g} s")
            r, cpu, util = flood(srv, gen, cfg, size, 0)
            f[f"flood{size}"] = r["pps"]
            f[f"floodloss{size}"] = r["loss"] * 100
            n[f"flood{size}"] = gen_note(r, gen, util)
            # Rate sweep: raise the offered rate until delivery falls behind; keep the peak.
            rate, best = cfg.start_rate, None
            for _ in range(cfg.steps):
                log(f"  paced {size} B at {rate:,.0f} packets/s")
                r, cpu, util = flood(srv, gen, cfg, size, rate)
                if best is None or r["pps"] > best[0]["pps"]:
                    best = (r, cpu, util, rate)
                if r["loss"] > 0.01 or r["pps"] < 0.9 * rate:
                    break
                rate *= cfg.step
            assert best is not None
            r, cpu, util, offered = best
            f[f"pps{size}"] = r["pps"]
            f[f"gbps{size}"] = r["received_bytes"] * 8 / r["seconds"] / 1e9
            f[f"loss{size}"] = r["loss"] * 100
            f[f"cpu{size}"] = cpu / max(r["received"], 1) * 1e6
            n[f"pps{size}"] = f"offered {offered:,.0f}/s; " + gen_note(r, gen, util)
            if size == 1200:
                sat = r["pps"]
        rate = lat_rate or max(100.0, 0.5 * sat)
        log(f"  latency at {rate:,.0f} packets/s" + ("" if lat_rate else " (50% of saturation)"))
        r, cpu, util = flood(srv, gen, cfg, 1200, rate)
        for p, k in ((0.5, "p50"), (0.99, "p99"), (0.999, "p999")):
            v = percentile(r["hist"], p)
            f[k] = None if v is None else v / 1e3
        f["lat_loss"] = r["loss"] * 100
        n["p50"] = f"at {r['pps']:,.0f} pkt/s; " + gen_note(r, gen, util)
        log("  handshakes")
        c0, t0 = cpu_of(srv.pid), time.monotonic()
        r = gen.run("handshake", srv.url, duration=f"{cfg.duration}s", concurrency=cfg.concurrency)
        cpu, wall = cpu_of(srv.pid) - c0, time.monotonic() - t0
        f["hs"] = r["per_second"]
        n["hs"] = (f"{r['failed']} failed; " if r["failed"] else "") + gen_note(r, gen, cpu / wall)
    for count in cfg.idle:
        log(f"  {count} idle connections")
        srv = make()
        with srv:
            srv.start()
            time.sleep(0.5)
            rss0 = rss_of(srv.pid)
            p = subprocess.Popen(
                [*pin_prefix(gen.cpus), *gen.argv, "idle", "-url", srv.url, "-conns", str(count),
                 "-src", ",".join(f"127.0.1.{i}" for i in range(1, 9))],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile,
            )
            assert p.stdout is not None and p.stdin is not None
            line = p.stdout.readline()
            held = int(line.split()[1]) if line.startswith("READY") else 0
            time.sleep(1.0)
            rss1 = rss_of(srv.pid)
            p.stdin.close()
            p.wait(timeout=60)
            f[f"idle{count}"] = (rss1 - rss0) / held if held else None
            n[f"idle{count}"] = f"{held} held" + ("" if held == count else f" of {count} asked")
    return res


def iperf3(seconds: float) -> float | None:
    """Loopback TCP throughput in Gbit/s (one stream), or None without iperf3."""
    exe = shutil.which("iperf3")
    if exe is None:
        return None
    from .servers import free_port

    port = free_port()
    s = subprocess.Popen([exe, "-s", "-1", "-B", "127.0.0.1", "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        c = subprocess.run([exe, "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                           capture_output=True, text=True, timeout=seconds + 30)
        return json.loads(c.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError, subprocess.SubprocessError):
        return None
    finally:
        s.kill()
        s.wait()


# --------------------------------------------------------------------------- table

ROWS = [
    ("pps1200", "peak packets/s, 1200 B, {pairs} pairs (paced sweep)", "{:,.0f}", True),
    ("gbps1200", "Gbit/s (payload), 1200 B", "{:.2f}", True),
    ("loss1200", "loss % at that peak, 1200 B", "{:.2f}", False),
    ("flood1200", "unpaced flood: delivered packets/s, 1200 B", "{:,.0f}", True),
    ("floodloss1200", "unpaced flood: loss %, 1200 B", "{:.1f}", False),
    ("pps100", "peak packets/s, 100 B, {pairs} pairs (paced sweep)", "{:,.0f}", True),
    ("gbps100", "Gbit/s (payload), 100 B", "{:.3f}", True),
    ("loss100", "loss % at that peak, 100 B", "{:.2f}", False),
    ("flood100", "unpaced flood: delivered packets/s, 100 B", "{:,.0f}", True),
    ("floodloss100", "unpaced flood: loss %, 100 B", "{:.1f}", False),
    ("p50", "one-way latency p50 ms @50% sat.", "{:.3f}", False),
    ("p99", "one-way latency p99 ms @50% sat.", "{:.3f}", False),
    ("p999", "one-way latency p99.9 ms @50% sat.", "{:.3f}", False),
    ("lat_loss", "loss % @50% sat.", "{:.2f}", False),
    ("hs", "handshakes/s (connect+ServerInfo)", "{:,.0f}", True),
    ("idle1", "RSS bytes / idle conn @ {idle0}", "{:,.0f}", False),
    ("idle2", "RSS bytes / idle conn @ {idle1}", "{:,.0f}", False),
    ("cpu1200", "server CPU s / M packets at peak, 1200 B", "{:.2f}", False),
    ("cpu100", "server CPU s / M packets at peak, 100 B", "{:.2f}", False),
]


def table(results: dict[str, Result], cfg: argparse.Namespace,
          rows: list[tuple[str, str, str, bool]] | None = None) -> str:
    names = list(results)
    idle = list(cfg.idle) + [0, 0]
    header = ["figure", *names]
    header += [f"{names[0]} / {other}" for other in names[1:]]
    header.append("notes (generator CPU share; what limited it)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, label, fmt, _ in rows or ROWS:
        k = key
        if key == "idle1":
            k = f"idle{idle[0]}"
        elif key == "idle2":
            k = f"idle{idle[1]}"
        if k in ("idle0",) or (key.startswith("idle") and not idle[int(key[-1]) - 1]):
            continue
        row = [label.format(pairs=cfg.pairs, idle0=idle[0], idle1=idle[1])]
        vals = [results[nm].figures.get(k) for nm in names]
        row += ["n/a" if v is None else fmt.format(v) for v in vals]
        a = vals[0]
        row += [f"{a / b:.2f}" if a is not None and b else "n/a" for b in vals[1:]]
        note_key = {"gbps1200": "", "gbps100": "", "loss1200": "", "loss100": "",
                    "floodloss1200": "", "floodloss100": "",
                    "p99": "", "p999": "", "lat_loss": "", "cpu1200": "", "cpu100": ""}.get(key, k)
        row.append("; ".join(f"{nm}: {results[nm].notes[note_key]}" for nm in names
                             if note_key and note_key in results[nm].notes))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plan_run(
    generator: str, no_pin: bool, gen_procs: int | None, log: Any
) -> tuple[int, str | None, str | None, Generator] | None:
    """Pick CPUs (server on CPU 0, generator on the rest, via taskset) and the generator.

    Returns (cpu count, server CPUs, generator CPUs, generator), or None when the Go
    generator was demanded but cannot be built. Shared by every benchmark entry point so
    they all pin and generate the same way.
    """
    ncpu = len(os.sched_getaffinity(0))
    server_cpus = gen_cpus = None
    gen_ncpu = ncpu
    if ncpu >= 2 and not no_pin and shutil.which("taskset"):
        server_cpus, gen_cpus = "0", f"1-{ncpu - 1}" if ncpu > 2 else "1"
        gen_ncpu = ncpu - 1
    binary = build_derpgen() if generator in ("auto", "go") else None
    if generator == "go" and binary is None:
        log("bench: --generator go but derpgen could not be built")
        return None
    if binary:
        gen = Generator([binary], "derpgen (Go, tailscale.com/derp client)", gen_cpus, gen_ncpu,
                        gen_procs or 1)
    else:
        gen = Generator([sys.executable, "-m", "bench.pygen"], "pygen (Python, uvloop)",
                        gen_cpus, gen_ncpu, gen_procs or gen_ncpu)
    return ncpu, server_cpus, gen_cpus, gen


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["soak"]:  # python -m bench soak ...: bench/soak.py
        from .soak import main as soak_main

        return soak_main(args[1:])
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 pairs, 1 s, 100/500 idle")
    ap.add_argument("--servers", default="derpkit,go,go2",
                    help="derpkit, go (Go derper on the server CPU), go2 (Go derper unpinned, "
                    "sharing every CPU with the generator); default all three")
    ap.add_argument("--generator", choices=("auto", "go", "python"), default="auto")
    ap.add_argument("--pairs", type=int, default=None, help="sender/receiver pairs (default 8)")
    ap.add_argument("--duration", type=float, default=None, help="seconds per figure (default 3)")
    ap.add_argument("--idle", default=None, help="idle connection counts (default 1000,10000)")
    ap.add_argument("--start-rate", type=float, default=None,
                    help="first offered rate of the sweep, packets/s (default 20000)")
    ap.add_argument("--step", type=float, default=1.5, help="sweep rate multiplier")
    ap.add_argument("--steps", type=int, default=None, help="most sweep steps (default 8)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel handshake loops")
    ap.add_argument("--gen-procs", type=int, default=0,
                    help="generator processes (default: 1 for Go, one per generator CPU for Python)")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset server and generator")
    ap.add_argument("--json", metavar="FILE", help="also write all figures as JSON")
    cfg = ap.parse_args(argv)
    cfg.pairs = cfg.pairs or (2 if cfg.quick else 8)
    cfg.duration = cfg.duration or (1.0 if cfg.quick else 3.0)
    cfg.start_rate = cfg.start_rate or 20000.0
    cfg.steps = cfg.steps or (2 if cfg.quick else 8)
    cfg.idle = [int(x) for x in (cfg.idle or ("100,500" if cfg.quick else "1000,10000")).split(",")
                if x.strip()]
    raise_nofile()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    plan = plan_run(cfg.generator, cfg.no_pin, cfg.gen_procs, log)
    if plan is None:
        return 2
    ncpu, server_cpus, gen_cpus, gen = plan
    makers: dict[str, Any] = {}
    for s in cfg.servers.split(","):
        s = s.strip()
        if s == "derpkit":
            makers["derpkit"] = lambda: DerpkitServer(server_cpus)
        elif s == "go":
            binary_d = find_go_derper()
            if binary_d is None:
                log("bench: Go derper not installed; measuring derpkit only")
                continue
            makers["Go derper"] = lambda b=binary_d: GoDerperServer(b, server_cpus)
        elif s == "go2":
            binary_d = find_go_derper()
            if binary_d is not None and server_cpus is not None:
                makers[f"Go derper, {ncpu} CPUs"] = lambda b=binary_d: GoDerperServer(b, None)
        elif s:
            log(f"bench: unknown server {s!r}")
            return 2
    results: dict[str, Result] = {}
    for name, make in makers.items():
        log(f"{name}:")
        results[name] = measure(make, gen, cfg, log)
    lo = None if cfg.quick else iperf3(3)
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (no uvloop)"
    print(f"# derpkit bench{' --quick' if cfg.quick else ''}: {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{ncpu} CPUs, Python {sys.version.split()[0]}, {loop}")
    print(f"# generator: {gen.name} x{gen.procs} process(es) on CPUs {gen_cpus or 'any'}; "
          f"servers on CPU {server_cpus or 'any'}; loopback TCP (iperf3, 1 stream): "
          + (f"{lo:.1f} Gbit/s" if lo else "not measured"))
    print(table(results, cfg))
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(
            {k: {"figures": v.figures, "notes": v.notes} for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
