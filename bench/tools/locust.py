"""Figure 3: DERP packets/s one locust worker core delivers, next to derpgen's, so an
operator knows how many locust cores it takes to load a relay.

One ``derpkit serve`` (fresh each round) on the server CPU; the generator alone on the
other CPU: first our locust users (``loadtests/locustfile.py``, ``PacketPair`` only, one
standalone headless locust process — one gevent loop, i.e. one worker), then derpgen
(``bench/derpgen``, Tailscale's own DERP client) with the same pairs and packet size,
unpaced, and derpgen again paced at the rate locust delivered. The order alternates.

Both are measured the same way, from outside: once packets flow and a warm-up has passed,
the server's ``derp_packets_sent`` (packets it wrote to receivers) and the CPU time of the
generator and server processes (psutil) are read at the start and end of a window. Packets
per generator core = delivered packets/s ÷ the generator's CPU share of one core.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from ..__main__ import build_derpgen
from ..servers import DerpkitServer, Server, pin_prefix, raise_nofile
from .measure import Figure, child_env, repo_root

LOCUSTFILE = repo_root() / "loadtests" / "locustfile.py"
#: locust's PacketPair paces each user at --derp-pps; this is far above what one core can
#: send, so the users send back to back (each task still yields to gevent between packets).
UNPACED_PPS = 1_000_000


@dataclass
class Window:
    """What one steady-state window measured."""

    pps: float  # packets the server delivered per second
    gen_share: float  # generator CPU seconds per second (1.0 = one core)
    server_share: float
    #: how busy the generator's CPUs were in all (user, system, irq, softirq, anyone's), in
    #: cores; None when unpinned. On loopback the receive side of what the generator sends
    #: runs as softirq on the sending CPU, charged to no process.
    gen_cpu_busy: float | None = None

    @property
    def per_core(self) -> float:
        return self.pps / self.gen_share if self.gen_share > 0 else 0.0

    @property
    def per_busy_core(self) -> float | None:
        if not self.gen_cpu_busy:
            return None
        return self.pps / self.gen_cpu_busy


def cpu_list(spec: str | None) -> list[int]:
    """taskset's "1" / "1-3" / "1,3" as CPU numbers."""
    out: list[int] = []
    for part in (spec or "").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part.strip():
            out.append(int(part))
    return out


def busy_jiffies(cpus: list[int]) -> tuple[int, int]:
    """(busy, total) jiffies of ``cpus`` from /proc/stat; busy = total − idle − iowait."""
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in vals[:8]]
                total += sum(v)
                busy += sum(v) - v[3] - v[4]
    return busy, total


def packets_sent(srv: Server) -> int:
    m = re.search(r"^derp_packets_sent (\d+)", srv.varz(), re.M)
    if not m:
        raise RuntimeError("derp_packets_sent missing from /debug/varz")
    return int(m.group(1))


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def sample_window(srv: Server, gen: subprocess.Popen[Any], warmup: float, seconds: float,
                  gen_cpus: str | None = None, start_timeout: float = 30.0) -> Window:
    """Wait until packets flow, let ``warmup`` pass, then measure ``seconds`` of traffic."""
    c0, deadline = packets_sent(srv), time.monotonic() + start_timeout
    while packets_sent(srv) < c0 + 100:
        if gen.poll() is not None:
            raise RuntimeError(f"the generator exited ({gen.returncode}) before packets flowed")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no packets flowed within {start_timeout:g} s")
        time.sleep(0.1)
    time.sleep(warmup)
    gp, sp = psutil.Process(gen.pid), psutil.Process(srv.pid)
    cpus = cpu_list(gen_cpus)
    t0, n0, g0, s0 = time.monotonic(), packets_sent(srv), _cpu(gp), _cpu(sp)
    b0, j0 = busy_jiffies(cpus)
    time.sleep(seconds)
    t1, n1, g1, s1 = time.monotonic(), packets_sent(srv), _cpu(gp), _cpu(sp)
    b1, j1 = busy_jiffies(cpus)
    if gen.poll() is not None:
        raise RuntimeError(f"the generator exited ({gen.returncode}) inside the window")
    dt = t1 - t0
    busy = (b1 - b0) / (j1 - j0) * len(cpus) if cpus and j1 > j0 else None
    return Window((n1 - n0) / dt, (g1 - g0) / dt, (s1 - s0) / dt, busy)


def _stop(p: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM (locust then writes its CSV and exits), SIGKILL after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)


def locust_cmd() -> list[str]:
    exe = shutil.which("locust")
    return [exe] if exe else [sys.executable, "-m", "locust"]


def run_locust(srv: Server, cpus: str | None, pairs: int, size: int, warmup: float,
               seconds: float, workdir: Path) -> tuple[Window, dict[str, int]]:
    """One headless locust run of ``pairs`` PacketPair users; the window and its CSV counts."""
    run_s = int(warmup + seconds + 60)  # a bound only: it is stopped after the window
    prefix = workdir / "locust"
    argv = [*pin_prefix(cpus), *locust_cmd(), "-f", str(LOCUSTFILE), "--headless",
            "-u", str(pairs), "-r", str(max(pairs, 10)), "-t", f"{run_s}s",
            "--host", f"http://127.0.0.1:{srv.port}", "--csv", str(prefix), "--only-summary",
            "--stop-timeout", "2", "--derp-pps", str(UNPACED_PPS), "--derp-packet-size", str(size),
            "--derp-loss-timeout", "5", "PacketPair"]
    with open(workdir / "locust.log", "wb") as out:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             cwd=workdir, env=child_env(), start_new_session=True,
                             preexec_fn=raise_nofile)
        try:
            w = sample_window(srv, p, warmup, seconds, cpus)
        finally:
            _stop(p, 20)
    counts = {"delivered": 0, "lost": 0, "connect_failed": 0}
    stats = Path(f"{prefix}_stats.csv")
    if stats.exists():
        with open(stats, newline="") as f:
            for row in csv.DictReader(f):
                if row["Name"] == f"packet {size}B":
                    counts["delivered"] = int(row["Request Count"]) - int(row["Failure Count"])
                    counts["lost"] = int(row["Failure Count"])
                elif row["Name"] == "connect":
                    counts["connect_failed"] = int(row["Failure Count"])
    return w, counts


def derpgen_binary() -> str | None:
    """bench.__main__'s derpgen build, kept in ~/.cache keyed by a hash of its sources, so
    repeated runs (and the smoke test) skip the two-second link."""
    src = repo_root() / "bench" / "derpgen"
    h = hashlib.sha256()
    for f in sorted(src.iterdir()):
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    cached = Path.home() / ".cache" / "derpkit-bench" / f"derpgen-{h.hexdigest()[:16]}"
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    built = build_derpgen()
    if built is None:
        return None
    with contextlib.suppress(OSError):
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}")
        shutil.copy2(built, tmp)
        os.replace(tmp, cached)  # atomic: a concurrent run sees the old name or the whole file
        return str(cached)
    return built


def run_derpgen(srv: Server, derpgen: list[str], pairs: int, size: int, rate: float, warmup: float,
                seconds: float, cpus: str | None) -> Window:
    """One derpgen flood (``rate`` 0 = unpaced) measured over the same kind of window."""
    args = ["-url", srv.url, "-pairs", str(pairs), "-size", str(size),
            "-duration", f"{warmup + seconds + 60:.0f}s"]  # a bound: stopped after the window
    if rate:
        args += ["-rate", f"{rate:.0f}"]
    p = subprocess.Popen([*derpgen, "flood", *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=raise_nofile)
    try:
        return sample_window(srv, p, warmup, seconds, cpus)
    finally:
        _stop(p, 10)


@dataclass
class LocustResult:
    figures: list[Figure] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def measure(rounds: int, pairs: int, size: int, warmup: float, seconds: float,
            server_cpus: str | None, gen_cpus: str | None, log: Any) -> LocustResult:
    res = LocustResult()
    binary = derpgen_binary()
    gen = [*pin_prefix(gen_cpus), binary] if binary else None
    if gen is None:
        res.errors.append("derpgen could not be built (no Go toolchain?): its rows are missing")
    rows: dict[str, list[Window]] = {"locust": [], "derpgen": [], "derpgen_paced": []}
    for i in range(rounds):
        wd = Path(tempfile.mkdtemp(prefix="tools-locust-"))
        order = ["locust", "derpgen"] if i % 2 == 0 else ["derpgen", "locust"]
        if gen is None:
            order = ["locust"]
        with DerpkitServer(server_cpus) as srv:
            srv.start()
            for kind in order:
                log(f"locust round {i + 1}/{rounds}: {kind}")
                if kind == "locust":
                    w, counts = run_locust(srv, gen_cpus, pairs, size, warmup, seconds, wd)
                    rows["locust"].append(w)
                    if counts["lost"] or counts["connect_failed"]:
                        res.errors.append(f"locust round {i + 1}: {counts['lost']} packets lost, "
                                          f"{counts['connect_failed']} connects failed")
                    if not counts["delivered"]:
                        res.errors.append(f"locust round {i + 1}: no delivered packets in its CSV")
                else:
                    assert gen is not None
                    rows["derpgen"].append(run_derpgen(srv, gen, pairs, size, 0, warmup, seconds,
                                                         gen_cpus))
            if gen is not None and rows["locust"]:
                log(f"locust round {i + 1}/{rounds}: derpgen paced at locust's rate")
                rate = rows["locust"][-1].pps
                rows["derpgen_paced"].append(run_derpgen(srv, gen, pairs, size, rate, warmup, seconds,
                                                           gen_cpus))
    labels = {"locust": f"locust PacketPair ×{pairs}, 1 process",
              "derpgen": f"derpgen ×{pairs} pairs, unpaced",
              "derpgen_paced": "derpgen paced at locust's delivered rate"}
    for kind, ws in rows.items():
        if not ws:
            continue
        res.figures += [
            Figure(f"load_pps_{kind}", f"{labels[kind]}: delivered packets/s ({size} B)", "pkt/s",
                   [w.pps for w in ws], "server's derp_packets_sent over the window"),
            Figure(f"load_share_{kind}", f"{labels[kind]}: generator CPU share", "cores",
                   [w.gen_share for w in ws], "1.00 = one core busy"),
            Figure(f"load_percore_{kind}", f"{labels[kind]}: packets/s per generator core",
                   "pkt/s/core", [w.per_core for w in ws], "delivered ÷ generator CPU share"),
            Figure(f"load_cpubusy_{kind}", f"{labels[kind]}: generator CPU busy, all causes",
                   "cores", [w.gen_cpu_busy for w in ws if w.gen_cpu_busy is not None],
                   "/proc/stat of the generator's CPU: its process, softirq of its sends, anyone"),
            Figure(f"load_perbusy_{kind}", f"{labels[kind]}: packets/s per busy generator CPU",
                   "pkt/s/core", [w.per_busy_core for w in ws if w.per_busy_core is not None],
                   "delivered ÷ CPU busy: the whole core it takes"),
            Figure(f"load_server_{kind}", f"{labels[kind]}: server CPU share", "cores",
                   [w.server_share for w in ws],
                   "near 1.00: the server, not the generator, may be the limit"),
        ]
    return res
