"""``python -m bench.workers``: what ``derpkit serve -workers N`` costs and gives (docs/workers.md).

Two measurements, each against a fresh ``derpkit serve`` process tree:

``cost``  -- same-worker against cross-worker pairs on one ``-workers 2`` server. Each
    client is placed on a chosen worker through that worker's private loopback port, pairs
    send at a fixed total rate, and the figures are the one-way delay (a timestamp in each
    packet; sender and receiver share this process's monotonic clock) and the server CPU
    per delivered packet (utime+stime of every worker from /proc, over the window). The
    difference is what a packet pays for the extra mesh hop.
``flood`` -- the highest delivered rate with ``-workers 1`` and ``-workers 2``, clients on
    the shared port (so the kernel spreads them; about half the pairs cross workers), the
    generator being ``bench/derpgen`` (Tailscale's own DERP client), as fast as TCP allows.

Every run: ``flock /tmp/bench.lock python3 -m bench.quiet python3 -m bench.workers ...``.
The machine's cores are shared by the server and the generator; say so with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

_PORT_RE = re.compile(r"DERP on port (\d+)")
_PRIVATE_RE = re.compile(r"\[w(\d+)\] derpkit: worker \d+ of \d+ listening on port \d+ \(private 127\.0\.0\.1:(\d+)\)")
_PIDS_RE = re.compile(r"workers \(pids ([\d, ]+)\)")
_STAMP = struct.Struct(">Qq")
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    private: dict[int, int]
    pids: list[int]

    def cpu(self) -> float:
        """CPU seconds used so far by every worker (or the one process)."""
        total = 0.0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_server(workers: int) -> Server:
    key = os.path.join(tempfile.mkdtemp(prefix="bench-workers-"), "derper.key")
    argv = [sys.executable, "-m", "derpkit", "serve", "-a", "127.0.0.1:0", "-stun=false", "-c", key,
            "-workers", str(workers)]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode(errors="replace")
        if not line:
            raise RuntimeError("derpkit serve exited:\n" + log)
        log += line
        if m := _PORT_RE.search(line):
            private = {int(a): int(b) for a, b in _PRIVATE_RE.findall(log)}
            pm = _PIDS_RE.search(line)
            pids = [int(p) for p in pm.group(1).split(", ")] if pm else [proc.pid]
            # Keep reading stderr so the server never blocks on a full pipe.
            import threading

            threading.Thread(target=lambda: [None for _ in iter(proc.stderr.readline, b"")], daemon=True).start()
            return Server(proc, int(m.group(1)), private, pids)
    proc.kill()
    raise RuntimeError("derpkit serve did not start:\n" + log)


def varz(port: int) -> dict[str, float]:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/varz", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+) (\S+)$", text, re.M)}


# ---------------------------------------------------------------------- cost


async def _pairs_run(urls: list[tuple[str, str]], rate: float, seconds: float, size: int,
                     server: Server) -> dict[str, float]:
    from derpkit.client import DerpClient
    from derpkit.protocol import frames as F

    pairs = [(await DerpClient.connect(s), await DerpClient.connect(r)) for s, r in urls]
    delays: list[float] = []
    received = 0
    pad = bytes(max(0, size - _STAMP.size))
    stop = asyncio.Event()
    measuring = False

    async def receive(c: DerpClient) -> None:
        nonlocal received
        while True:
            f = await c.recv()
            if isinstance(f, F.RecvPacket) and len(f.data) >= _STAMP.size:
                _seq, t0 = _STAMP.unpack_from(f.data)
                if measuring and t0 > 0:
                    delays.append((time.perf_counter_ns() - t0) / 1e6)
                    received += 1

    async def send(s: DerpClient, r: DerpClient) -> None:
        per_tick = rate / len(pairs) * 0.005
        owed = 0.0
        seq = 0
        while not stop.is_set():
            owed += per_tick
            while owed >= 1:
                owed -= 1
                seq += 1
                await s.send(r.public_key, _STAMP.pack(seq, time.perf_counter_ns() if measuring else 0) + pad)
            await asyncio.sleep(0.005)

    # Warm up (routes learned, buffers sized), then measure.
    for s, r in pairs:
        for _ in range(50):
            await s.send(r.public_key, _STAMP.pack(0, 0) + pad)
            try:
                await asyncio.wait_for(r.recv(), 0.05)
                break
            except TimeoutError:
                continue
    tasks = [asyncio.create_task(receive(r)) for _s, r in pairs]
    tasks += [asyncio.create_task(send(s, r)) for s, r in pairs]
    await asyncio.sleep(1.0)
    measuring = True
    cpu0, t0 = server.cpu(), time.monotonic()
    await asyncio.sleep(seconds)
    cpu1, t1 = server.cpu(), time.monotonic()
    measuring = False
    stop.set()
    await asyncio.sleep(0.2)
    for t in tasks:
        t.cancel()
    for s, r in pairs:
        await s.close()
        await r.close()
    delays.sort()

    def pct(p: float) -> float:
        return delays[min(len(delays) - 1, int(p * len(delays)))] if delays else float("nan")

    return {
        "delivered_per_s": received / (t1 - t0),
        "cpu_us_per_packet": (cpu1 - cpu0) / max(1, received) * 1e6,
        "server_cpu_pct": (cpu1 - cpu0) / (t1 - t0) * 100,
        "p50_ms": pct(0.5), "p99_ms": pct(0.99), "p999_ms": pct(0.999),
    }


def cost(args: argparse.Namespace) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    for rnd in range(args.rounds):
        for placement in ("same", "cross") if rnd % 2 == 0 else ("cross", "same"):
            server = start_server(2)
            try:
                p = server.private
                u = lambda port: f"http://127.0.0.1:{port}/derp"  # noqa: E731
                if placement == "same":
                    urls = [(u(p[0]), u(p[0])) for _ in range(args.pairs)]
                else:
                    urls = [(u(p[0]), u(p[1])) for _ in range(args.pairs)]
                r = run(_pairs_run(urls, args.rate, args.duration, args.size, server))
            finally:
                server.stop()
            row = {"round": rnd, "placement": placement, **r}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------------- flood


class GoServer:
    """Go derper through bench/servers.py, with the same cpu()/stop() as ``Server``."""

    def __init__(self, srv: object) -> None:
        self.srv = srv
        self.port: int = srv.port  # type: ignore[attr-defined]

    def cpu(self) -> float:
        from bench.servers import tree_cpu_seconds

        return tree_cpu_seconds(self.srv.proc.pid)  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.srv.stop()  # type: ignore[attr-defined]


def start_go() -> GoServer:
    from bench.servers import GoDerperServer, find_go_derper

    binary = find_go_derper()
    if binary is None:
        raise SystemExit("bench.workers flood --go: Go derper not installed")
    return GoServer(GoDerperServer(binary).start())


def flood(args: argparse.Namespace) -> list[dict[str, object]]:
    from bench.__main__ import build_derpgen

    gen = build_derpgen()
    if gen is None:
        raise SystemExit("bench.workers flood: bench/derpgen could not be built")
    rows: list[dict[str, object]] = []
    counts: list[int | str] = [int(w) for w in args.workers.split(",")]
    if args.go:
        counts.append("go")  # Go derper, unpinned: GOMAXPROCS = every CPU
    for rnd in range(args.rounds):
        for workers in counts if rnd % 2 == 0 else list(reversed(counts)):
            server = start_go() if workers == "go" else start_server(int(workers))
            try:
                cpu0 = server.cpu()
                t0 = time.monotonic()
                out = subprocess.run(
                    [gen, "flood", "-url", f"http://127.0.0.1:{server.port}/derp", "-pairs", str(args.pairs),
                     "-size", str(args.size), "-duration", f"{args.duration}s"],
                    capture_output=True, text=True, timeout=args.duration + 60, check=True,
                )
                cpu = server.cpu() - cpu0
                wall = time.monotonic() - t0
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res.pop("hist", None)
                if workers != "go":
                    v = varz(server.port)
                    res["cross_worker_share"] = v.get("derp_packets_forwarded_out", 0) / max(1, v["derp_packets_received"])
            finally:
                server.stop()
            row = {"round": rnd, "workers": workers, "server_cpu_pct": cpu / wall * 100,
                   "gen_cpu_pct": res["cpu_seconds"] / wall * 100, **res}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def profile(args: argparse.Namespace) -> None:
    """py-spy on every worker of a ``-workers 2`` server under a derpgen flood: where the time goes."""
    import collections
    import shutil

    from bench.__main__ import build_derpgen

    gen, spy = build_derpgen(), shutil.which("py-spy")
    if gen is None or spy is None:
        raise SystemExit("bench.workers profile: needs bench/derpgen (Go) and py-spy")
    server = start_server(args.workers)
    outs = [os.path.join(tempfile.mkdtemp(prefix="bench-spy-"), f"w{i}.txt") for i in range(len(server.pids))]
    try:
        flood = subprocess.Popen(
            [gen, "flood", "-url", f"http://127.0.0.1:{server.port}/derp", "-pairs", str(args.pairs),
             "-size", str(args.size), "-duration", f"{args.duration + 2}s"], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        spies = [subprocess.Popen([spy, "record", "--format", "raw", "-r", "200", "-d", str(int(args.duration)),
                                   "-p", str(pid), "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for pid, out in zip(server.pids, outs, strict=True)]
        for sp in spies:
            sp.wait(args.duration + 30)
        res = json.loads(flood.communicate(timeout=args.duration + 60)[0].strip().splitlines()[-1])
    finally:
        server.stop()
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for out in outs:
        with open(out) as f:
            for line in f:
                stack, _, n = line.rstrip().rpartition(" ")
                if not stack:
                    continue
                count = int(n)
                frames = [re.sub(r":\d+\)$", ")", fr) for fr in stack.split(";")]
                total += count
                own[frames[-1]] += count
                for fr in set(frames):
                    incl[fr] += count
    print(f"workers={args.workers} pairs={args.pairs} size={args.size}: {res['pps']:.0f} packets/s delivered, "
          f"loss {res['loss']:.3f}; {total} samples over {len(outs)} worker(s)")
    print("self time (top 20):")
    for fr, n in own.most_common(20):
        print(f"  {n / total * 100:5.1f}%  {fr}")
    print("inclusive (top 30):")
    for fr, n in incl.most_common(30):
        print(f"  {n / total * 100:5.1f}%  {fr}")


def summary(rows: list[dict[str, object]], key: str, fields: tuple[str, ...]) -> None:
    groups: dict[object, list[dict[str, object]]] = {}
    for r in rows:
        groups.setdefault(r[key], []).append(r)
    for g, rs in groups.items():
        parts = []
        for f in fields:
            vals = [float(r[f]) for r in rs if f in r]  # type: ignore[arg-type]
            if vals:
                parts.append(f"{f} median {statistics.median(vals):.4g} (min {min(vals):.4g}, max {max(vals):.4g})")
        print(f"{key}={g}: " + "; ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cost", help="same-worker vs cross-worker pairs on -workers 2")
    c.add_argument("--pairs", type=int, default=4)
    c.add_argument("--rate", type=float, default=4000, help="total packets/s")
    c.add_argument("--size", type=int, default=1200)
    c.add_argument("--duration", type=float, default=5)
    c.add_argument("--rounds", type=int, default=3)
    f = sub.add_parser("flood", help="-workers 1 vs 2, derpgen flood on the shared port")
    f.add_argument("--workers", default="1,2")
    f.add_argument("--pairs", type=int, default=8)
    f.add_argument("--size", type=int, default=1200)
    f.add_argument("--duration", type=float, default=5)
    f.add_argument("--rounds", type=int, default=3)
    f.add_argument("--go", action="store_true", help="also Go derper (every CPU) in the same run")
    pr = sub.add_parser("profile", help="py-spy every worker under a derpgen flood")
    pr.add_argument("--workers", type=int, default=2)
    pr.add_argument("--pairs", type=int, default=8)
    pr.add_argument("--size", type=int, default=1200)
    pr.add_argument("--duration", type=float, default=5)
    args = ap.parse_args()
    if args.mode == "profile":
        profile(args)
        return
    if args.mode == "cost":
        rows = cost(args)
        summary(rows, "placement", ("delivered_per_s", "cpu_us_per_packet", "server_cpu_pct", "p50_ms", "p99_ms", "p999_ms"))
    else:
        rows = flood(args)
        summary(rows, "workers", ("pps", "loss", "server_cpu_pct", "gen_cpu_pct", "cross_worker_share"))


if __name__ == "__main__":
    main()
