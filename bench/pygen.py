"""The Python load generator: same modes, flags and JSON as ``derpgen`` (the Go one).

Used by ``python -m bench --generator python`` and whenever Go is not installed. It runs on
uvloop with ``derpkit.client`` (one asyncio Protocol per connection, writes batched per
loop turn), so one process moves a lot of packets, but it is Python: on a 2-core machine
it cannot outrun Go derper, which is why derpgen exists. See docs/benchmarks.md.

    python -m bench.pygen flood -url U -pairs N -size B -duration 5s [-rate PPS]
    python -m bench.pygen handshake -url U -duration 5s -concurrency 8
    python -m bench.pygen idle -url U -conns N -src 127.0.1.1,...
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import struct
import sys
import time
from collections import Counter

from derpkit.client import DerpClient
from derpkit.gosyntax import parse_duration_seconds
from derpkit.protocol import handshake
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.events import ConnectionFailed
from derpkit.protocol.frames import RecvPacket
from derpkit.protocol.keys import NodePrivate, NodePublic

_STAMP = struct.Struct("<Qq")
HIST_BUCKETS = 400


def bucket(ns: int) -> int:
    """Same buckets as derpgen: floor(8*log2(us+1)), capped."""
    return min(HIST_BUCKETS - 1, int(8 * math.log2(max(0.0, ns / 1e3) + 1)))


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def duration(text: str) -> float:
    """A ``-duration``/``-drain`` value in Go syntax (``5s``, ``1.0s``, ``500ms``), as derpgen's
    Go ``flag.Duration`` reads it, so both generators take the same command lines."""
    return parse_duration_seconds(text)


async def flood(a: argparse.Namespace) -> dict:
    size = max(_STAMP.size, a.size)
    pairs = []
    for _ in range(a.pairs):
        s = await DerpClient.connect(a.url)
        r = await DerpClient.connect(a.url)
        pairs.append((s, r))
    sent = 0
    received = 0
    rbytes = 0
    hist: Counter[int] = Counter()
    stop = False
    base = time.perf_counter_ns()
    cpu0 = cpu_seconds()

    async def sender(s: DerpClient, dst: NodePublic) -> None:
        nonlocal sent
        pad = b"\0" * (size - _STAMP.size)
        pack = _STAMP.pack
        seq = 0
        per = a.rate / a.pairs if a.rate > 0 else 0.0
        t0 = time.monotonic()
        clock = time.perf_counter_ns
        while not stop:
            if per:
                due = int((time.monotonic() - t0) * per) - seq
                if due <= 0:
                    await asyncio.sleep(0.001)
                    continue
            else:
                due = 64
            for _ in range(due):
                seq += 1
                await s.send(dst, pack(seq, clock() - base) + pad)
            sent += due
            await asyncio.sleep(0)

    async def receiver(r: DerpClient) -> None:
        nonlocal received, rbytes
        unpack = _STAMP.unpack_from
        clock = time.perf_counter_ns
        while True:
            f = await r.recv()
            if isinstance(f, RecvPacket) and len(f.data) >= _STAMP.size:
                _, ts = unpack(f.data)
                hist[bucket(clock() - base - ts)] += 1
                received += 1
                rbytes += len(f.data)

    readers = [asyncio.create_task(receiver(r)) for _, r in pairs]
    t0 = time.monotonic()
    senders = [asyncio.create_task(sender(s, r.public_key)) for s, r in pairs]
    await asyncio.sleep(a.duration)
    stop = True
    await asyncio.gather(*senders, return_exceptions=True)
    wall = time.monotonic() - t0
    await asyncio.sleep(a.drain)
    cpu = cpu_seconds() - cpu0
    for t in readers:
        t.cancel()
    for s, r in pairs:
        s.abort()
        r.abort()
    return {
        "mode": "flood", "pairs": a.pairs, "size": size, "seconds": wall, "sent": sent,
        "received": received, "received_bytes": rbytes, "pps": received / wall,
        "loss": 1 - received / max(sent, 1), "hist": {str(k): v for k, v in hist.items()},
        "cpu_seconds": cpu, "wall_seconds": wall + a.drain,
    }


async def handshakes(a: argparse.Namespace) -> dict:
    ok = fail = 0
    keys = [NodePrivate.generate() for _ in range(64)]
    deadline = time.monotonic() + a.duration
    cpu0 = cpu_seconds()
    t0 = time.monotonic()

    async def loop(w: int) -> None:
        nonlocal ok, fail
        i = w
        while time.monotonic() < deadline:
            try:
                c = await DerpClient.connect(a.url, private_key=keys[i % len(keys)])
            except Exception:
                fail += 1
                await asyncio.sleep(0.01)
                continue
            c.abort()
            ok += 1
            i += a.concurrency

    await asyncio.gather(*(loop(w) for w in range(a.concurrency)))
    wall = time.monotonic() - t0
    return {"mode": "handshake", "ok": ok, "failed": fail, "seconds": wall,
            "per_second": ok / wall, "cpu_seconds": cpu_seconds() - cpu0, "wall_seconds": wall}


async def _idle_conn(host: str, port: int, path: str, src: str | None) -> asyncio.StreamWriter:
    """One admitted, idle DERP connection, driven by the same core as ``DerpClient``.

    ``ClientConnection`` checks the 101, the ServerKey and the sealed ServerInfo, so a
    refused or broken upgrade counts as failed instead of as an idle connection; and since
    it declares CanAckPings, the core answers the server's liveness Pings while idling.
    """
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(src, 0) if src else None
    )
    clock = asyncio.get_running_loop().time
    conn = ClientConnection(
        NodePrivate.generate(), info=handshake.ClientInfo(can_ack_pings=True),
        host=f"{host}:{port}", path=path, read_timeout=None,
    )

    def feed(chunk: bytes) -> None:
        events = conn.receive_data(chunk, clock()) if chunk else conn.connection_lost(clock())
        if out := conn.data_to_send():
            writer.write(out)  # ClientInfo after ServerKey; Pongs later
        for ev in events:
            if isinstance(ev, ConnectionFailed):
                writer.transport.abort()
                raise ConnectionError(str(ev.error))

    conn.start(clock())
    writer.write(conn.data_to_send())
    try:
        while conn.server_info is None:  # ServerInfo: admitted and registered
            feed(await reader.read(4096))
    except BaseException:
        writer.transport.abort()
        raise

    async def drain() -> None:  # keep reading keepalives (and answering pings)
        try:
            while True:
                feed(await reader.read(4096))
        except (OSError, ConnectionError):
            pass

    writer._derpkit_reader = asyncio.ensure_future(drain())  # type: ignore[attr-defined]
    return writer


async def idle(a: argparse.Namespace) -> dict:
    from derpkit.client.conn import parse_url

    u = parse_url(a.url)
    srcs = [s for s in a.src.split(",") if s]
    sem = asyncio.Semaphore(64)
    conns: list[asyncio.StreamWriter] = []
    failed = 0
    cpu0 = cpu_seconds()
    t0 = time.monotonic()

    async def one(i: int) -> None:
        nonlocal failed
        async with sem:
            try:
                conns.append(await _idle_conn(u.host, u.port, u.path,
                                              srcs[i % len(srcs)] if srcs else None))
            except (OSError, ConnectionError, ValueError):
                failed += 1

    await asyncio.gather(*(one(i) for i in range(a.conns)))
    wall = time.monotonic() - t0
    print(f"READY {len(conns)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in conns:
        w.transport.abort()
    return {"mode": "idle", "conns": len(conns), "failed": failed, "connect_seconds": wall,
            "cpu_seconds": cpu_seconds() - cpu0}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("flood", "handshake", "idle"):
        sys.exit("usage: python -m bench.pygen flood|handshake|idle [flags]")
    mode = argv.pop(0)
    p = argparse.ArgumentParser(prog=f"pygen {mode}", prefix_chars="-")
    p.add_argument("-url", required=True)
    p.add_argument("-pairs", type=int, default=4)
    p.add_argument("-size", type=int, default=1200)
    p.add_argument("-duration", type=duration, default=5.0)
    p.add_argument("-rate", type=float, default=0.0)
    p.add_argument("-src", default="")
    p.add_argument("-conns", type=int, default=1000)
    p.add_argument("-concurrency", type=int, default=8)
    p.add_argument("-drain", type=duration, default=0.5)
    a = p.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    fn = {"flood": flood, "handshake": handshakes, "idle": idle}[mode]
    out = run(fn(a))
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
    os._exit(0)  # do not wait for the stdin reader thread


if __name__ == "__main__":
    main()
