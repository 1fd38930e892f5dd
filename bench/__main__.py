"""``python -m bench``: derpkit and Go derper on loopback, one generator, one table.

    python -m bench                 # full run: 3 rounds, plain HTTP (long; see docs)
    python -m bench --quick         # smoke: 1 round, small N, half a second per figure
    python -m bench --transport http,tls,ws --servers derpkit,go --rounds 3
    python -m bench --help
    python -m bench soak --minutes 30   # long steady load, sampled (bench/soak.py)

Each server runs in turn, pinned to the first CPU (``taskset``) with the generator pinned
to the others, so the two never share a core. The generator is ``bench/derpgen`` (Go, on
``tailscale.com/derp``'s client) when Go is installed, else ``bench/pygen.py`` (plain HTTP
only); the same one drives every server. Per transport and round, each server gets a fresh
process for the load figures (sweep, flood), another for the latency figures (equal-rate
latency at rates fixed from Go derper's round-1 peak, the p99-bounded search, handshakes)
and one per idle count; servers alternate A B, B A, ... between rounds and the table shows
median (min–max). See docs/benchmarks.md for what each figure means and what limits it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import netns
from .latency import Bounded, Rate, Trial, bounded_search, equal_rates
from .rounds import Group, Result, Row, render, round_order, to_json
from .servers import (
    Kind,
    Server,
    ServerEnv,
    load_kinds,
    pin_prefix,
    raise_nofile,
    tree_cpu_seconds,
    tree_rss,
)
from .tlscert import BenchTLS, make_tls
from .transports import Transport, parse_transports

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

    def run(self, mode: str, url: str, pairs: int = 0, targs: list[str] | None = None,
            **kw: Any) -> dict[str, Any]:
        """Run ``procs`` processes (pairs split between them) and merge their JSON.
        ``targs`` are the transport's flags (bench/transports.py)."""
        procs = max(1, min(self.procs, pairs)) if pairs else self.procs
        children = []
        for i in range(procs):
            args = ["-url", url, *(targs or [])]
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
                raise RuntimeError(f"generator {mode} against {url} failed with {c.returncode} "
                                   "(its message is above)")
            results.append(json.loads(out.strip().splitlines()[-1]))
        return merge(results)


def merge(rs: list[dict[str, Any]]) -> dict[str, Any]:
    if len(rs) == 1:
        return rs[0]
    out = dict(rs[0])
    for k in ("sent", "received", "received_bytes", "ok", "failed", "cpu_seconds", "conns",
              "fast_starts"):
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


# --------------------------------------------------------------------------- measuring


def cpu_of(pid: int) -> float:
    """Server CPU seconds, its worker processes included."""
    return tree_cpu_seconds(pid)


def rss_of(pid: int) -> int:
    """Server resident bytes, its worker processes included."""
    return tree_rss(pid)


def gen_note(r: dict[str, Any], gen: Generator, server_util: float) -> str:
    """The notes column: generator and server CPU shares, and GENERATOR-BOUND when the
    generator was at least ``GEN_BOUND`` busy (then the row says more about the generator
    than about the server)."""
    util = r["cpu_seconds"] / max(r["wall_seconds"], 1e-9) / gen.ncpu
    bound = util >= GEN_BOUND
    return (f"gen CPU {util:.0%} of {gen.ncpu}, server {server_util:.0%}"
            + (" GENERATOR-BOUND" if bound else ""))


def flood(srv: Server, gen: Generator, cfg: argparse.Namespace, size: int,
          rate: float, targs: list[str] | None = None) -> tuple[dict[str, Any], float, float]:
    """One flood; returns (merged result, server CPU s, server CPU share while sending)."""
    c0, t0 = cpu_of(srv.pid), time.monotonic()
    kw: dict[str, Any] = {"size": size, "duration": f"{cfg.duration}s"}
    if rate:
        kw["rate"] = f"{rate:.0f}"
    if getattr(cfg, "drain", None):
        kw["drain"] = f"{cfg.drain}s"
    r = gen.run("flood", srv.url, cfg.pairs, targs, **kw)
    cpu, wall = cpu_of(srv.pid) - c0, time.monotonic() - t0
    # The wall time includes connecting and draining; the sending phase dominates the CPU.
    return r, cpu, cpu / max(min(wall, r["wall_seconds"]), 1e-9)


def unpaced(srv: Server, gen: Generator, cfg: argparse.Namespace, size: int, res: Result,
            log: Any, targs: list[str] | None = None) -> None:
    """``flood<size>``/``floodloss<size>``: senders as fast as TCP lets them."""
    log(f"  unpaced flood {size} B x {cfg.pairs} pairs, {cfg.duration:g} s")
    r, _cpu, util = flood(srv, gen, cfg, size, 0, targs)
    res.figures[f"flood{size}"] = r["pps"]
    res.figures[f"floodloss{size}"] = r["loss"] * 100
    res.notes[f"flood{size}"] = gen_note(r, gen, util)


def sweep(srv: Server, gen: Generator, cfg: argparse.Namespace, size: int, res: Result,
          log: Any, targs: list[str] | None = None) -> None:
    """``pps/gbps/loss/cpu<size>``: raise the offered rate until delivery falls behind
    (>1 % loss or <90 % delivered); keep the best delivered rate."""
    f, n = res.figures, res.notes
    rate, best = cfg.start_rate, None
    for _ in range(cfg.steps):
        log(f"  paced {size} B at {rate:,.0f} packets/s")
        r, cpu, util = flood(srv, gen, cfg, size, rate, targs)
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


def paced_trial(srv: Server, gen: Generator, cfg: argparse.Namespace, size: int, rate: float,
                log: Any, targs: list[str] | None = None) -> Trial:
    """One paced flood read as a latency trial (bench/latency.py)."""
    r, _cpu, util = flood(srv, gen, cfg, size, rate, targs)
    t = Trial.from_generator(rate, r, f"delivered {r['pps']:,.0f}/s; " + gen_note(r, gen, util))
    log(f"  {size} B at {rate:,.0f} packets/s: p99 "
        + ("n/a" if t.p99 is None else f"{t.p99:.2f} ms") + f", loss {t.loss * 100:.3f} %")
    return t


def latency_figures(res: Result, key: str, t: Trial) -> None:
    """``<key>_p50/_p99/_p999/_loss/_pps`` from a trial."""
    f = res.figures
    f[f"{key}_p50"], f[f"{key}_p99"], f[f"{key}_p999"] = t.p50, t.p99, t.p999
    f[f"{key}_loss"] = t.loss * 100
    f[f"{key}_pps"] = t.pps
    res.notes[f"{key}_p99"] = t.note


def handshakes(srv: Server, gen: Generator, cfg: argparse.Namespace, res: Result, log: Any,
               targs: list[str] | None = None) -> None:
    """``hs``: connect + upgrade + ServerKey + ClientInfo + ServerInfo per second."""
    log("  handshakes")
    c0, t0 = cpu_of(srv.pid), time.monotonic()
    r = gen.run("handshake", srv.url, 0, targs, duration=f"{cfg.duration}s",
                concurrency=cfg.concurrency)
    cpu, wall = cpu_of(srv.pid) - c0, time.monotonic() - t0
    res.figures["hs"] = r["per_second"]
    res.notes["hs"] = ((f"{r['failed']} failed; " if r["failed"] else "")
                       + (f"{r['tls_version']}, {r.get('fast_starts', 0):,} fast starts; "
                          if r.get("tls_version") else "")
                       + gen_note(r, gen, cpu / wall))


def idle_rss(make: Any, gen: Generator, count: int, res: Result, log: Any,
             targs: list[str] | None = None) -> None:
    """``idle<count>``: RSS growth per held connection, on a fresh server."""
    log(f"  {count} idle connections")
    srv = make()
    with srv:
        srv.start()
        time.sleep(0.5)
        rss0 = rss_of(srv.pid)
        p = subprocess.Popen(
            [*pin_prefix(gen.cpus), *gen.argv, "idle", "-url", srv.url, *(targs or []),
             "-conns", str(count), "-src", ",".join(f"127.0.1.{i}" for i in range(1, 9))],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=raise_nofile,
        )
        assert p.stdout is not None and p.stdin is not None
        line = p.stdout.readline()
        held = int(line.split()[1]) if line.startswith("READY") else 0
        time.sleep(1.0)
        rss1 = rss_of(srv.pid)
        p.stdin.close()
        p.wait(timeout=60)
        res.figures[f"idle{count}"] = (rss1 - rss0) / held if held else None
        res.notes[f"idle{count}"] = f"{held} held" + ("" if held == count else f" of {count} asked")


def measure(make: Any, gen: Generator, cfg: argparse.Namespace, log: Any,
            lat_rate: float | None = None) -> Result:
    """The single-run figures of plain HTTP (bench/upgrade_paths.py uses this): flood and
    sweep at 1200 and 100 B, latency at ``lat_rate`` packets/s (else 50 % of this server's
    own 1200 B peak), handshakes, idle RSS."""
    res = Result()
    f, n = res.figures, res.notes
    srv: Server = make()
    with srv:
        srv.start()
        time.sleep(0.3)
        for size in (1200, 100):
            unpaced(srv, gen, cfg, size, res, log)
            sweep(srv, gen, cfg, size, res, log)
        rate = lat_rate or max(100.0, 0.5 * (f["pps1200"] or 0.0))
        log(f"  latency at {rate:,.0f} packets/s" + ("" if lat_rate else " (50% of saturation)"))
        t = paced_trial(srv, gen, cfg, 1200, rate, log)
        f["p50"], f["p99"], f["p999"], f["lat_loss"] = t.p50, t.p99, t.p999, t.loss * 100
        n["p50"] = f"at {t.pps:,.0f} pkt/s; " + t.note.split("; ", 1)[-1]
        handshakes(srv, gen, cfg, res, log)
    for count in cfg.idle:
        idle_rss(make, gen, count, res, log)
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


ALL_FIGURES = ("sweep", "flood", "latency", "bounded", "hs", "idle")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line, defaults filled in (``--quick`` changes them); SystemExit(2) with
    a message naming the flag for a bad value."""
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 round, 2 pairs, 0.5 s steps, 2 sweep steps, one "
                    "equal rate, 2 search steps, 100 idle")
    ap.add_argument("--servers", default="derpkit,go,go2",
                    help="comma list of server kinds: derpkit, go (Go derper on the server CPU), "
                    "go2 (Go derper unpinned, sharing every CPU with the generator), derpkit-w2 "
                    "(derpkit serve -workers 2, unpinned), and any kind a bench module registers; "
                    "default derpkit,go,go2")
    ap.add_argument("--transport", default="http",
                    help="comma list of http, tls (TLS 1.3, test CA), ws (WebSocket), wss "
                    "(WebSocket over TLS); one row group each in one table (default http)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="measure every server N times, alternating A B / B A (default 3, "
                    "--quick 1); the table shows median (min-max)")
    ap.add_argument("--figures", default=",".join(ALL_FIGURES),
                    help="which figures: " + ",".join(ALL_FIGURES) + " (default all)")
    ap.add_argument("--sizes", default=None,
                    help="packet payload sizes for sweep and flood (default 1200,100); "
                    "latency figures use 1200 when listed, else the first")
    ap.add_argument("--rates", default="",
                    help="absolute offered rates (packets/s, comma list) for the equal-rate "
                    "latency rows, instead of shares of Go derper's peak")
    ap.add_argument("--rate-shares", default=None,
                    help="equal-rate latency at these shares of Go derper's round-1 peak in each "
                    "transport (default 0.25,0.5,0.75; --quick 0.5)")
    ap.add_argument("--p99-bound", type=float, default=5.0,
                    help="latency-bounded throughput: highest rate with p99 <= this many ms and "
                    "no loss (default 5)")
    ap.add_argument("--bound-steps", type=int, default=None,
                    help="most new trials of that search per server and round (default 6, --quick 2)")
    ap.add_argument("--bound-seconds", type=float, default=90.0,
                    help="stop that search after about this long (default 90)")
    ap.add_argument("--generator", choices=("auto", "go", "python"), default="auto")
    ap.add_argument("--pairs", type=int, default=None, help="sender/receiver pairs (default 8)")
    ap.add_argument("--duration", type=float, default=None,
                    help="seconds per figure (default 3, --quick 0.5)")
    ap.add_argument("--idle", default=None,
                    help="idle connection counts (default 1000,10000; --quick 100)")
    ap.add_argument("--start-rate", type=float, default=None,
                    help="first offered rate of the sweep, packets/s (default 20000)")
    ap.add_argument("--step", type=float, default=1.5, help="sweep rate multiplier")
    ap.add_argument("--steps", type=int, default=None, help="most sweep steps (default 8)")
    ap.add_argument("--concurrency", type=int, default=8, help="parallel handshake loops")
    ap.add_argument("--gen-procs", type=int, default=0,
                    help="generator processes (default: 1 for Go, one per generator CPU for Python)")
    ap.add_argument("--no-pin", action="store_true", help="do not taskset server and generator")
    ap.add_argument("--netns", action="store_true",
                    help="run every server and generator inside one fresh network namespace "
                    "(unshare; removed when the run ends)")
    ap.add_argument("--json", metavar="FILE", help="also write every round's figures as JSON")
    cfg = ap.parse_args(argv)

    def bad(flag: str, msg: str) -> None:
        ap.error(f"{flag}: {msg}")

    def floats(flag: str, text: str) -> list[float]:
        try:
            vals = [float(x) for x in text.split(",") if x.strip()]
        except ValueError:
            bad(flag, f"not a comma list of numbers: {text!r}")
        if any(v <= 0 for v in vals):
            bad(flag, "every value must be above 0")
        return vals

    try:
        cfg.transports = parse_transports(cfg.transport)
    except ValueError as e:
        ap.error(str(e))
    cfg.figure_set = {x.strip() for x in cfg.figures.split(",") if x.strip()}
    if not cfg.figure_set or cfg.figure_set - set(ALL_FIGURES):
        bad("--figures", f"choose from {','.join(ALL_FIGURES)} (got {cfg.figures!r})")
    cfg.rounds = cfg.rounds if cfg.rounds is not None else (1 if cfg.quick else 3)
    if cfg.rounds < 1:
        bad("--rounds", "must be at least 1")
    cfg.pairs = cfg.pairs or (2 if cfg.quick else 8)
    cfg.duration = cfg.duration or (0.5 if cfg.quick else 3.0)
    cfg.drain = 0.25 if cfg.quick else None
    cfg.start_rate = cfg.start_rate or 20000.0
    cfg.steps = cfg.steps or (2 if cfg.quick else 8)
    cfg.bound_steps = cfg.bound_steps if cfg.bound_steps is not None else (2 if cfg.quick else 6)
    cfg.size_list = [int(v) for v in floats("--sizes", cfg.sizes or "1200,100")]
    if not cfg.size_list:
        bad("--sizes", "no size given")
    cfg.lat_size = 1200 if 1200 in cfg.size_list else cfg.size_list[0]
    cfg.rate_list = floats("--rates", cfg.rates)
    cfg.share_list = floats("--rate-shares", cfg.rate_shares or ("0.5" if cfg.quick else "0.25,0.5,0.75"))
    if cfg.p99_bound <= 0:
        bad("--p99-bound", "must be above 0 ms")
    try:
        cfg.idle = [int(x) for x in (cfg.idle or ("100" if cfg.quick else "1000,10000")).split(",")
                    if x.strip()]
    except ValueError:
        bad("--idle", f"not a comma list of counts: {cfg.idle!r}")
    cfg.server_list = [s.strip() for s in cfg.servers.split(",") if s.strip()]
    if not cfg.server_list:
        bad("--servers", "no server given")
    return cfg


@dataclass
class Column:
    """One server kind in this run."""

    kind: Kind
    label: str
    failed: str = ""   # set when it could not start or run: left out of that transport


def _rows(cfg: argparse.Namespace, rates: list[Rate]) -> list[Row]:
    """The rows of one transport group, in print order."""
    rows: list[Row] = []
    fs = cfg.figure_set
    for size in cfg.size_list:
        if "sweep" in fs:
            rows += [Row(f"pps{size}", f"peak packets/s, {size} B, {cfg.pairs} pairs (paced sweep)",
                         "{:,.0f}", f"pps{size}"),
                     Row(f"gbps{size}", f"Gbit/s (payload) at that peak, {size} B", "{:.3f}"),
                     Row(f"loss{size}", f"loss % at that peak, {size} B", "{:.2f}"),
                     Row(f"cpu{size}", f"server CPU s / M packets at that peak, {size} B", "{:.2f}")]
        if "flood" in fs:
            rows += [Row(f"flood{size}", f"unpaced flood: delivered packets/s, {size} B",
                         "{:,.0f}", f"flood{size}"),
                     Row(f"floodloss{size}", f"unpaced flood: loss %, {size} B", "{:.1f}")]
    if "latency" in fs:
        for i, r in enumerate(rates):
            at = f"at {r.pps:,.0f} pkt/s ({r.label}), {cfg.lat_size} B"
            rows += [Row(f"lat{i}_p50", f"one-way latency p50 ms {at}", "{:.3f}"),
                     Row(f"lat{i}_p99", f"one-way latency p99 ms {at}", "{:.3f}", f"lat{i}_p99"),
                     Row(f"lat{i}_p999", f"one-way latency p99.9 ms {at}", "{:.3f}"),
                     Row(f"lat{i}_loss", f"loss % {at}", "{:.3f}")]
    if "bounded" in fs:
        rows.append(Row(f"bounded{cfg.lat_size}",
                        f"highest packets/s with p99 <= {cfg.p99_bound:g} ms and no loss, "
                        f"{cfg.lat_size} B", "{:,.0f}", f"bounded{cfg.lat_size}"))
    if "hs" in fs:
        rows.append(Row("hs", "handshakes/s (connect+upgrade+ServerInfo)", "{:,.0f}", "hs"))
    if "idle" in fs:
        rows += [Row(f"idle{c}", f"RSS bytes / idle conn @ {c}", "{:,.0f}", f"idle{c}")
                 for c in cfg.idle]
    return rows


class Run:
    """One ``python -m bench`` run: transports × rounds × phases × servers."""

    def __init__(self, cfg: argparse.Namespace, gen: Generator, columns: list[Column],
                 reference: str | None, env0: ServerEnv, log: Any) -> None:
        self.cfg, self.gen, self.columns, self.log = cfg, gen, columns, log
        self.reference = reference
        self.env0 = env0
        self.groups: dict[str, Group] = {}
        self.rates: dict[str, list[Rate]] = {}
        self.tls: BenchTLS | None = None

    def env(self, t: Transport) -> ServerEnv:
        if t.tls and self.tls is None:
            self.tls = make_tls()
        return ServerEnv(self.env0.server_cpus, self.env0.ncpu, self.tls if t.tls else None)

    def _safely(self, col: Column, what: str, fn: Any) -> None:
        """Run one phase for one column; a failure leaves the column out, with the reason."""
        if col.failed:
            return
        try:
            fn()
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError, KeyError) as e:
            col.failed = f"{what}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            self.log(f"bench: {col.label} left out: {col.failed}")

    def transport(self, t: Transport) -> Group:
        cfg, log = self.cfg, self.log
        env = self.env(t)
        targs = t.generator_args(env.tls)
        cols = [c for c in self.columns if t.name in c.kind.transports]
        for c in cols:
            c.failed = ""  # a failure leaves the column out of this transport only
        g = Group(t.label, [], {c.label: [] for c in cols})
        for c in self.columns:
            if c not in cols:
                g.absent[c.label] = f"does not serve {t.name}"
        rates = equal_rates(None, [], cfg.rate_list)
        for rnd in range(cfg.rounds):
            order = round_order(cols, rnd)
            results = {c.label: Result() for c in cols}
            # Phase 1: load figures, one fresh server each.
            if cfg.figure_set & {"sweep", "flood"}:
                for c in order:
                    log(f"[{t.name} round {rnd + 1}/{cfg.rounds}] {c.label}: load")
                    self._safely(c, "load", lambda c=c, res=results[c.label]: self._load(
                        c, env, targs, res))
            if rnd == 0 and not cfg.rate_list:
                # Shares of Go derper's peak; without Go, of the first server's own.
                ref_name = self.reference if self.reference in results else (
                    cols[0].label if cols else "")
                ref = results.get(ref_name)
                peak = ref.figures.get(f"pps{cfg.lat_size}") if ref else None
                rates = equal_rates(peak, cfg.share_list, [], ref_name)
                if "latency" in cfg.figure_set and not rates:
                    log(f"bench: [{t.name}] no equal-rate latency: it needs a measured peak "
                        "(sweep in --figures) or --rates")
                elif rates:
                    log(f"[{t.name}] equal rates: "
                        + ", ".join(f"{r.pps:,.0f}/s ({r.label})" for r in rates))
            # Phase 2: latency figures, one fresh server each.
            if cfg.figure_set & {"latency", "bounded", "hs"}:
                for c in order:
                    log(f"[{t.name} round {rnd + 1}/{cfg.rounds}] {c.label}: latency")
                    self._safely(c, "latency", lambda c=c, rs=rates, res=results[c.label]: self._latency(
                        c, env, targs, rs, res))
            # Phase 3: idle memory, a fresh server per count.
            if "idle" in cfg.figure_set:
                for c in order:
                    for count in cfg.idle:
                        self._safely(c, "idle", lambda c=c, n=count, res=results[c.label]: idle_rss(
                            lambda: c.kind.make(env), self.gen, n, res, log, targs))
            for c in cols:
                if not c.failed:
                    g.runs[c.label].append(results[c.label])
        for c in cols:
            if c.failed:
                if not g.runs.get(c.label):
                    g.runs.pop(c.label, None)
                g.absent[c.label] = c.failed
        g.rows = _rows(cfg, rates)
        self.rates[t.name] = rates
        return g

    def _load(self, c: Column, env: ServerEnv, targs: list[str], res: Result) -> None:
        cfg = self.cfg
        with c.kind.make(env) as srv:
            srv.start()
            time.sleep(0.3)
            for size in cfg.size_list:
                if "flood" in cfg.figure_set:
                    unpaced(srv, self.gen, cfg, size, res, self.log, targs)
                if "sweep" in cfg.figure_set:
                    sweep(srv, self.gen, cfg, size, res, self.log, targs)

    def _latency(self, c: Column, env: ServerEnv, targs: list[str], rates: list[Rate],
                 res: Result) -> None:
        cfg = self.cfg
        size = cfg.lat_size
        with c.kind.make(env) as srv:
            srv.start()
            time.sleep(0.3)

            def run(rate: float) -> Trial:
                return paced_trial(srv, self.gen, cfg, size, rate, self.log, targs)

            known: list[Trial] = []
            if "latency" in cfg.figure_set:
                for i, r in enumerate(rates):
                    t = run(r.pps)
                    latency_figures(res, f"lat{i}", t)
                    known.append(t)
            if "bounded" in cfg.figure_set:
                start = (rates[len(rates) // 2].pps if rates else
                         res.figures.get(f"pps{size}") or cfg.start_rate)
                self.log(f"  p99 <= {cfg.p99_bound:g} ms search")
                b: Bounded = bounded_search(run, known, cfg.p99_bound, start=start,
                                            max_steps=cfg.bound_steps, seconds=cfg.bound_seconds)
                # None passed: 0 carried within the bound (the note says down to what rate).
                res.figures[f"bounded{size}"] = b.rate or 0.0
                res.notes[f"bounded{size}"] = b.note(cfg.p99_bound)
                res.notes["bounded_trials"] = "; ".join(
                    f"{t.offered:.0f}:{'ok' if t.within(cfg.p99_bound) else t.why_not(cfg.p99_bound)}"
                    for t in b.tried)
            if "hs" in cfg.figure_set:
                handshakes(srv, self.gen, cfg, res, self.log, targs)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["soak"]:  # python -m bench soak ...: bench/soak.py
        from .soak import main as soak_main

        return soak_main(args[1:])
    cfg = parse_args(args)
    if cfg.netns and not netns.inside():
        return netns.run_inside(args)
    raise_nofile()

    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"{time.monotonic() - t_start:6.1f}s {msg}", file=sys.stderr, flush=True)

    kinds = load_kinds()
    for name in cfg.server_list:
        if name not in kinds:
            log(f"bench: --servers: unknown server {name!r} (known: {', '.join(kinds)})")
            return 2
        if kinds[name].needs_netns and not netns.inside():
            log(f"bench: --servers {name} must run in a private network namespace: add --netns")
            return 2
    plan = plan_run(cfg.generator, cfg.no_pin, cfg.gen_procs, log)
    if plan is None:
        return 2
    ncpu, server_cpus, gen_cpus, gen = plan
    if gen.argv[-1] == "bench.pygen" and any(t.name != "http" for t in cfg.transports):
        log("bench: --transport: the Python generator speaks plain HTTP only; TLS and WebSocket "
            "need derpgen (Go)")
        return 2
    env0 = ServerEnv(server_cpus, ncpu, None)
    columns: list[Column] = []
    left_out: list[str] = []
    for name in cfg.server_list:
        k = kinds[name]
        why = k.unavailable(env0)
        if why:
            log(f"bench: {name} left out: {why}")
            left_out.append(f"{name} ({why})")
            continue
        columns.append(Column(k, k.column(env0)))
    if not columns:
        log("bench: no server to measure")
        return 2
    reference = next((c.label for name in ("go", "go2") for c in columns if c.kind.name == name), None)
    run = Run(cfg, gen, columns, reference, env0, log)
    t0 = time.monotonic()
    groups = {t.name: run.transport(t) for t in cfg.transports}
    left_out += [f"{c} in {t} ({why})" for t, g in groups.items() for c, why in g.absent.items()]
    lo = None if cfg.quick else iperf3(3)
    try:
        import uvloop

        loop = f"uvloop {uvloop.__version__}"
    except ImportError:
        loop = "asyncio (no uvloop)"
    print(f"# derpkit bench{' --quick' if cfg.quick else ''}: {time.strftime('%Y-%m-%d %H:%M')}, "
          f"{ncpu} CPUs, Python {sys.version.split()[0]}, {loop}; {cfg.rounds} round(s), "
          f"{time.monotonic() - t0:.0f} s")
    print(f"# generator: {gen.name} x{gen.procs} process(es) on CPUs {gen_cpus or 'any'}; "
          f"servers on CPU {server_cpus or 'any'}; {netns.describe()}; loopback TCP (iperf3, "
          "1 stream): " + (f"{lo:.1f} Gbit/s" if lo else "not measured"))
    if left_out:
        print("# left out: " + "; ".join(left_out))
    print(render(list(groups.values()), [c.label for c in columns], reference, cfg.rounds))
    if cfg.json:
        meta = {"argv": args, "date": time.strftime("%Y-%m-%d %H:%M"), "ncpu": ncpu,
                "rounds": cfg.rounds, "generator": gen.name, "server_cpus": server_cpus,
                "netns": netns.inside(), "left_out": left_out,
                "rates": {t: [{"pps": r.pps, "label": r.label} for r in rs]
                          for t, rs in run.rates.items()}}
        Path(cfg.json).write_text(json.dumps(to_json(groups, meta), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
