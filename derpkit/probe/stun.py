"""The STUN probe (``derp/<rc>/<node>/udp`` and ``…/udp6``): does the node answer STUN?

Built on :class:`derpkit.stun.client.StunEndpoint`. Like Go it retransmits the same
transaction every 2 s until the probe deadline; unlike Go (Q3, Q4) a node listed by
hostname only is resolved, ``"none"`` means no probe, and the reply's source address and
the mapped address are reported. ICMP port unreachable is told apart from silence, which is
the difference between "STUN is off" and "UDP is filtered".
"""

from __future__ import annotations

import socket
from typing import Any

from derpkit.gosyntax import join_host_port
from derpkit.stun.client import StunClientError, StunEndpoint, resolve

from .diagnose import stun_failure
from .dmap import Node
from .model import Failed

__all__ = ["probe_stun", "stun_target"]

#: Go's prober waits 2 s for each reply before it sends the request again.
RETRY_EVERY = 2.0


async def stun_target(node: Node, version: int) -> str:
    """The IP the probe sends to: the map's literal, else the HostName's DNS answer."""
    lit = node.literal(version)
    if lit is not None:
        return lit
    fam = socket.AF_INET if version == 4 else socket.AF_INET6
    try:
        _, ip = await resolve(node.host_name, node.stun_dest_port, fam)
    except StunClientError as e:
        raise Failed(
            f"lookup {node.host_name}: {e}",
            f"node {node.name} has no IPv{version} in the map and {node.host_name!r} has no "
            f"IPv{version} address in DNS",
        ) from None
    return ip


async def probe_stun(node: Node, version: int, timeout: float) -> dict[str, Any]:
    ip = await stun_target(node, version)
    port = node.stun_dest_port
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    retries = max(0, int(timeout // RETRY_EVERY))
    try:
        async with await StunEndpoint.open(family) as ep:
            r = await ep.request((ip, port), timeout=timeout, retries=retries, retry_interval=RETRY_EVERY)
    except StunClientError as e:
        raise stun_failure(e, ip, port, f"IPv{version}") from None
    details: dict[str, Any] = {
        "server": join_host_port(ip, port),
        "mapped": r.mapped,
        "rtt_seconds": r.rtt,
        "attempts": r.attempts,
    }
    if r.origin != (ip, port):
        details["reply_from"] = join_host_port(*r.origin)
        details["warning"] = (f"STUN reply came from {details['reply_from']}, not {details['server']}: "
                              "NAT or multi-homed server rewrites the source")
    return details
