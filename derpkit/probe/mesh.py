"""The mesh probe (``derp/<rc>/<from>/<to>/mesh``): does a packet get from one node to another?

One client on ``<from>``, one on ``<to>`` (both with the mesh key, if any, and the prober flag),
8 random bytes from the first to the second, as derpprobe does. For ``from == to`` it proves
the node relays; otherwise that the two nodes are meshed. A lost packet is explained: two
clients on the *same* node that got different server keys were spread over two derpers by a
load balancer; across nodes, the mesh between them is missing.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol.frames import RecvPacket

from .derpconn import ProbeEnv, connect_node
from .dmap import Node
from .model import Failed

__all__ = ["probe_mesh", "pair_clients"]

#: derpprobe waits this long between connecting B and sending, so <from> hears of B.
MESH_SETTLE = 0.1


async def pair_clients(a_node: Node, b_node: Node, env: ProbeEnv, *, is_prober: bool,
                       timeout: float) -> tuple[DerpClient, DerpClient]:
    """Connect A to ``a_node`` and B to ``b_node`` concurrently; both or neither."""
    ra, rb = await asyncio.gather(
        connect_node(a_node, env, is_prober=is_prober, timeout=timeout),
        connect_node(b_node, env, is_prober=is_prober, timeout=timeout),
        return_exceptions=True,
    )
    for r, other in ((ra, rb), (rb, ra)):
        if isinstance(r, BaseException):
            if isinstance(other, DerpClient):
                other.abort()
            raise r
    assert isinstance(ra, DerpClient) and isinstance(rb, DerpClient)
    return ra, rb


def lost_packet(a_node: Node, b_node: Node, a: DerpClient, b: DerpClient, waited: float) -> Failed:
    tag = f"{a.public_key.short()} -> {b.public_key.short()}"
    ka, kb = a.server_key, b.server_key
    if a_node.name == b_node.name and ka is not None and kb is not None and ka != kb:
        return Failed(
            f"{tag}: timeout: context deadline exceeded",
            f"two connections to {a_node.name} reached different servers (server keys "
            f"{ka.raw.hex()[:16]}… and {kb.raw.hex()[:16]}…): a load balancer spreads this "
            "HostName over derpers that are not meshed",
            server_keys=[ka.raw.hex(), kb.raw.hex()],
        )
    if a_node.name != b_node.name:
        return Failed(
            f"{tag}: timeout: context deadline exceeded",
            f"{a_node.name} did not forward to {b_node.name} within {waited:.1f} s: the two nodes "
            "are not meshed (same -mesh-psk-file on both, and -mesh-with naming each other?)",
        )
    return Failed(
        f"{tag}: timeout: context deadline exceeded",
        f"{a_node.name} accepted both clients but did not relay a packet between them "
        f"within {waited:.1f} s",
    )


async def probe_mesh(a_node: Node, b_node: Node, env: ProbeEnv, timeout: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    a, b = await pair_clients(a_node, b_node, env, is_prober=True, timeout=timeout)
    tag = f"{a.public_key.short()} -> {b.public_key.short()}"
    try:
        if a_node.name != b_node.name:
            await asyncio.sleep(MESH_SETTLE)
        payload = os.urandom(8)
        sent_at = loop.time()
        try:
            await a.send(b.public_key, payload)
        except DerpConnectionError as e:
            raise Failed(f"{tag}: error sending via {a_node.name!r}: {e}",
                         f"{a_node.name} closed the connection when we sent: {e}") from None
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise lost_packet(a_node, b_node, a, b, loop.time() - sent_at)
            try:
                f = await b.recv(left)
            except TimeoutError:
                raise lost_packet(a_node, b_node, a, b, loop.time() - sent_at) from None
            except DerpConnectionError as e:
                raise Failed(f"{tag}: error receiving from {b_node.name!r}: {e}",
                             f"{b_node.name} closed the connection while we waited: {e}") from None
            if not isinstance(f, RecvPacket):
                continue
            if f.src != a.public_key.raw:
                raise Failed(f"{tag}: got data packet 0 from unexpected source",
                             "a packet from someone else arrived first")
            if f.data != payload:
                raise Failed(f"{tag}: unexpected data packet 0 (out of 1)",
                             "the relayed packet was altered on the way")
            return {"relay_seconds": loop.time() - sent_at,
                    "server_keys": sorted({k.raw.hex() for k in (a.server_key, b.server_key) if k})}
    finally:
        a.abort()
        b.abort()
