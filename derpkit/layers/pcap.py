"""Read a pcap of DERP over plain HTTP (dev mode) and STUN back into frames and messages.

TCP segments are put back in order per direction (by sequence number, retransmissions
dropped), the HTTP head is split off, and the rest is cut into ``DERPFrame``s. UDP
datagrams to or from the STUN port are dissected with scapy's STUN layer (extended in
``derpkit.layers.stun``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import scapy.layers.l2  # noqa: F401 - link types (Ethernet on Linux lo) for rdpcap
from scapy.contrib.stun import STUN
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.utils import rdpcap

from derpkit.layers import stun as _stun_ext  # noqa: F401 - registers SOFTWARE and 0x8020
from derpkit.layers.derp import DERPFrame, dissect_stream, split_http_head

Addr = tuple[str, int]


@dataclass
class Direction:
    head: bytes = b""
    frames: list[DERPFrame] = field(default_factory=list)
    rest: bytes = b""  # bytes of an incomplete last frame (capture cut short)


@dataclass
class Session:
    """One TCP connection to the DERP port: ``client`` is the client's (ip, port)."""

    client: Addr
    c2s: Direction
    s2c: Direction

    def types(self, direction: str) -> list[str]:
        from derpkit.layers.derp import frame_name

        return [frame_name(f) for f in getattr(self, direction).frames]


def _ip(pkt: object) -> tuple[str, str] | None:
    for layer in (IP, IPv6):
        if pkt.haslayer(layer):  # type: ignore[attr-defined]
            lay = pkt[layer]  # type: ignore[index]
            return lay.src, lay.dst
    return None


def _assemble(segments: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    nxt: int | None = None
    for seq, data in sorted(segments, key=lambda s: s[0]):
        if nxt is None:
            nxt = seq
        if seq + len(data) <= nxt:
            continue  # retransmission of what we have
        out += data[max(0, nxt - seq):]
        nxt = seq + len(data)
    return bytes(out)


def derp_sessions(path: str, port: int) -> list[Session]:
    """Every TCP connection to ``port`` in the capture, in order of first appearance."""
    streams: dict[tuple[Addr, Addr], list[tuple[int, bytes]]] = {}
    order: list[Addr] = []
    for pkt in rdpcap(path):
        if not pkt.haslayer(TCP):
            continue
        ips = _ip(pkt)
        if ips is None:
            continue
        t = pkt[TCP]
        src, dst = (ips[0], int(t.sport)), (ips[1], int(t.dport))
        if port not in (src[1], dst[1]):
            continue
        client = src if dst[1] == port else dst
        if client not in order:
            order.append(client)
        data = bytes(t.payload)
        if data:
            streams.setdefault((src, dst), []).append((int(t.seq), data))
    sessions = []
    for client in order:
        dirs = []
        for key in ((client, None), (None, client)):
            segs = [s for (a, b), v in streams.items() for s in v
                    if (key[0] == a and b[1] == port) or (key[1] == b and a[1] == port)]
            head, body = split_http_head(_assemble(segs))
            frames, rest = dissect_stream(body)
            dirs.append(Direction(head, frames, rest))
        sessions.append(Session(client, dirs[0], dirs[1]))
    return sessions


def stun_messages(path: str, port: int) -> list[tuple[Addr, Addr, STUN]]:
    """Every UDP datagram to or from ``port``, dissected as STUN: (src, dst, message)."""
    out = []
    for pkt in rdpcap(path):
        if not pkt.haslayer(UDP):
            continue
        u = pkt[UDP]
        if port not in (int(u.sport), int(u.dport)):
            continue
        ips = _ip(pkt)
        if ips is None:
            continue
        out.append(((ips[0], int(u.sport)), (ips[1], int(u.dport)), STUN(bytes(u.payload))))
    return out
