"""The bandwidth probe (``derp/<rc>/<from>/<to>/bw``, direct mode): move N bytes through DERP.

As derpprobe: payloads up to 64 KiB each, at most 30 in flight (the derper's per-client
queue would drop more), received in order and byte-identical; the transfer time is added to
``derp_bw_transfer_time_seconds_total`` even when the run fails. Clients connect without the
prober flag, as Go's do. Throughput is reported in the result (Go leaves it to be derived).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from derpkit.client import DerpConnectionError
from derpkit.protocol.frames import RecvPacket

from .derpconn import ProbeEnv
from .dmap import Node
from .mesh import MESH_SETTLE, pair_clients
from .model import Failed, Probe

__all__ = ["IN_FLIGHT", "packets_for_size", "probe_bw"]

CHUNK = 64 << 10
IN_FLIGHT = 30


def packets_for_size(size: int) -> list[bytes]:
    """Random packets adding up to ``size`` bytes (65 536 each, the last one shorter)."""
    out = [os.urandom(CHUNK) for _ in range(size // CHUNK)]
    if size % CHUNK:
        out.append(os.urandom(size % CHUNK))
    return out


async def probe_bw(a_node: Node, b_node: Node, env: ProbeEnv, size: int, timeout: float,
                   probe: Probe) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    a, b = await pair_clients(a_node, b_node, env, is_prober=False, timeout=timeout)
    probe.extra["bw_size"] = size
    tag = f"{a.public_key.short()} -> {b.public_key.short()}"
    start = loop.time()
    try:
        if a_node.name != b_node.name:
            await asyncio.sleep(MESH_SETTLE)
        start = loop.time()
        packets = packets_for_size(size)
        slots = asyncio.Semaphore(IN_FLIGHT)

        async def send_all() -> None:
            for p in packets:
                await slots.acquire()
                await a.send(b.public_key, p)

        sender = asyncio.ensure_future(send_all())
        try:
            for i, want in enumerate(packets):
                left = deadline - loop.time()
                while True:
                    try:
                        f = await b.recv(max(0.0, left))
                    except TimeoutError:
                        raise Failed(f"{tag}: timeout: context deadline exceeded",
                                     f"only {i} of {len(packets)} packets ({i * CHUNK} bytes) arrived "
                                     f"within {timeout:g} s") from None
                    if isinstance(f, RecvPacket):
                        break
                    left = deadline - loop.time()
                if f.src != a.public_key.raw or f.data != want:
                    raise Failed(f"{tag}: unexpected data packet {i} (out of {len(packets)})",
                                 "packets arrived out of order, altered, or from another sender")
                slots.release()
            if sender.done() and sender.exception() is not None:
                raise sender.exception()  # type: ignore[misc]
        except DerpConnectionError as e:
            raise Failed(f"{tag}: {e}", f"the connection dropped during the transfer: {e}") from None
        finally:
            sender.cancel()
        took = loop.time() - start
        return {"bytes": size, "transfer_seconds": took, "bytes_per_second": size / took if took else 0.0}
    finally:
        probe.extra["bw_transfer_seconds"] = probe.extra.get("bw_transfer_seconds", 0.0) + (loop.time() - start)
        a.abort()
        b.abort()
