"""``python -m bench.packet_path``: derpkit's relay path in one process, without sockets.

SendPacket frames go into one server connection's ``data_received`` in 64 KiB chunks, and
the RecvPacket frames for the other connection are written to a transport that only counts
bytes; each chunk is followed by one event-loop turn, so the per-turn write batch is
flushed as in the server. The figure is CPU nanoseconds per relayed packet, best of
``--rounds``. It has no Go counterpart (Go derper cannot be driven this way), so it is for
comparing derpkit with itself across a change: run it alternately in two checkouts (with
``PYTHONPATH`` set to each), as recorded in docs/benchmarks.md. Loopback-free, so the
host's network noise is out, but CPU contention is not: alternate and repeat.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from typing import Any

from derpkit.protocol import frames as F
from derpkit.protocol import handshake
from derpkit.protocol.keys import NodePrivate
from derpkit.server.relay.conn import ClientConn
from derpkit.server.relay.derp import DerpServer


class CountingTransport:
    """Takes every write and counts its bytes; never full, never closed by the peer."""

    def __init__(self) -> None:
        self.bytes = 0
        self._closing = False

    def write(self, data: bytes) -> None:
        self.bytes += len(data)

    def writelines(self, chunks: Any) -> None:
        for d in chunks:
            self.bytes += len(d)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def set_write_buffer_limits(self, **_: int) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _logged_in(server: DerpServer) -> tuple[ClientConn, NodePrivate, CountingTransport]:
    key = NodePrivate.generate()
    conn = ClientConn(server, ("127.0.0.1", 1))
    transport = CountingTransport()
    conn.start(transport, b"")
    conn.data_received(handshake.client_info_frame(key, server.public_key, handshake.ClientInfo()))
    await asyncio.sleep(0)
    return conn, key, transport


async def ns_per_packet(size: int, chunks: int, rounds: int) -> tuple[float, int]:
    """Best CPU ns per packet over ``rounds`` runs of ``chunks`` 64 KiB reads, and the
    number of packets in one run."""
    server = DerpServer(NodePrivate.generate())
    server.rtt.enabled = False
    sender, _, _ = await _logged_in(server)
    _, receiver_key, out = await _logged_in(server)
    frame = F.SendPacket(receiver_key.public().raw, os.urandom(size)).encode()
    per_chunk = max(1, 65536 // len(frame))
    chunk = frame * per_chunk
    best = float("inf")
    for _ in range(rounds):
        before = out.bytes
        t0 = time.process_time()
        for _ in range(chunks):
            sender.data_received(chunk)
            await asyncio.sleep(0)  # one loop turn: the write batch is flushed
        best = min(best, time.process_time() - t0)
        # Every packet must have been relayed, or the figure means nothing.
        assert out.bytes - before >= per_chunk * chunks * (size + 37), "packets were not relayed"
    packets = per_chunk * chunks
    return best / packets * 1e9, packets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100,1200", help="payload sizes in bytes")
    p.add_argument("--chunks", type=int, default=400, help="64 KiB reads per round")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    for size in (int(s) for s in a.sizes.split(",")):
        ns, packets = run(ns_per_packet(size, a.chunks, a.rounds))
        print(f"{size:5d} B: {ns:7.0f} ns/packet (best of {a.rounds} rounds of {packets} packets)")


if __name__ == "__main__":
    main()
