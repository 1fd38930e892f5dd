"""The queuing-delay probe (``derp/<rc>/<from>/<to>/qd``), continuous as in derpprobe.

260-byte packets (a CallMeMaybe's size) at ``-qd-packets-per-second``, the first 8 bytes a
sequence number; each arrival's one-way delay (both clients share this process's clock) goes
into a histogram with derpprobe's buckets; packets not back within ``-qd-packet-timeout``
count as dropped. A run lasts until something breaks; the scheduler restarts it.
"""

from __future__ import annotations

import asyncio
import math
import os
import struct
import time
from collections import OrderedDict
from typing import Any

from derpkit.client import DerpConnectionError
from derpkit.protocol.frames import RecvPacket

from .derpconn import ProbeEnv
from .dmap import Node
from .mesh import MESH_SETTLE, pair_clients
from .model import Failed, Probe

__all__ = ["BUCKETS", "probe_qd"]

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
PACKET = 260


def _hist(probe: Probe) -> dict[str, Any]:
    h = probe.extra.get("qd")
    if h is None:
        h = probe.extra["qd"] = {"buckets": [0] * len(BUCKETS), "count": 0, "sum": 0.0, "dropped": 0}
    return h


def observe(probe: Probe, delay: float) -> None:
    h = _hist(probe)
    for i, le in enumerate(BUCKETS):
        if delay <= le:
            h["buckets"][i] += 1
    h["count"] += 1
    h["sum"] += delay


async def probe_qd(a_node: Node, b_node: Node, env: ProbeEnv, rate: int, packet_timeout: float,
                   probe: Probe, *, duration: float | None = None) -> dict[str, Any]:
    """Run until an error (or for ``duration`` seconds, for tests and -once)."""
    h = _hist(probe)
    a, b = await pair_clients(a_node, b_node, env, is_prober=False, timeout=10.0)
    tag = f"{a.public_key.short()} -> {b.public_key.short()}"
    outstanding: OrderedDict[int, float] = OrderedDict()
    cap = math.ceil(rate * packet_timeout) + 1
    try:
        if a_node.name != b_node.name:
            await asyncio.sleep(MESH_SETTLE)

        async def receive() -> None:
            while True:
                f = await b.recv()
                if not isinstance(f, RecvPacket):
                    continue
                if f.src != a.public_key.raw:
                    raise Failed(f"{tag}: packet from unexpected source", "another sender's packet arrived")
                seq = struct.unpack(">Q", f.data[:8])[0]
                sent = outstanding.pop(seq, None)
                if sent is not None:
                    observe(probe, time.monotonic() - sent)

        receiver = asyncio.ensure_future(receive())
        body = os.urandom(PACKET - 8)
        seq = 0
        end = None if duration is None else time.monotonic() + duration
        try:
            while end is None or time.monotonic() < end:
                now = time.monotonic()
                while outstanding and now - next(iter(outstanding.values())) > packet_timeout:
                    outstanding.popitem(last=False)
                    h["dropped"] += 1
                if len(outstanding) >= cap:
                    outstanding.popitem(last=False)
                    h["dropped"] += 1
                outstanding[seq] = now
                await a.send(b.public_key, struct.pack(">Q", seq) + body)
                seq += 1
                if receiver.done():
                    receiver.result()
                await asyncio.sleep(1.0 / rate)
        except DerpConnectionError as e:
            raise Failed(f"{tag}: {e}", f"queuing-delay connection dropped: {e}") from None
        finally:
            receiver.cancel()
        return {"sent": seq, "received": h["count"], "dropped": h["dropped"]}
    finally:
        a.abort()
        b.abort()
