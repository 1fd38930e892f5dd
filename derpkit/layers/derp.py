"""DERP frames as scapy layers: ``DERPFrame`` (type + big-endian length) and one payload
layer per frame type, bound on the type byte.

Build a frame with ``DERPFrame()/DERPSendPacket(dst=key, data=b"hi")`` (the length is
filled in), or set ``length`` yourself to craft a lie. ``dissect_stream(data)`` turns the
bytes of one direction of a connection, after the HTTP upgrade, into ``DERPFrame``s;
``split_http_head`` separates the upgrade request or response first. Field layouts follow
derp-protocol.md §3 (byte for byte; PeerPresent is read at any of its lengths).
"""

from __future__ import annotations

from typing import Any

from scapy.fields import (
    ByteEnumField,
    ByteField,
    FlagsField,
    IntField,
    IP6Field,
    LenField,
    ShortField,
    StrField,
    StrFixedLenField,
    XStrFixedLenField,
)
from scapy.packet import Packet, Raw, bind_layers

from derpkit.protocol.constants import MAGIC, FrameType

FRAME_TYPES = {int(t): t.name.title().replace("_", "") for t in FrameType}
PEER_GONE_REASONS = {0x00: "Disconnected", 0x01: "NotHere", 0xF0: "MeshConnBroke"}
ZERO_KEY = b"\x00" * 32


def _key(name: str) -> XStrFixedLenField:
    return XStrFixedLenField(name, ZERO_KEY, 32)


class DERPFrame(Packet):
    """The 5-byte frame header; the payload layer is chosen by ``type``."""

    name = "DERP frame"
    fields_desc = [ByteEnumField("type", 0, FRAME_TYPES), LenField("length", None, fmt="!I")]

    def extract_padding(self, s: bytes) -> tuple[bytes, bytes]:
        return s[: self.length], s[self.length :]

    def mysummary(self) -> str:
        return self.sprintf("DERP %type% len=%length%")


class DERPServerKey(Packet):
    name = "DERP ServerKey"
    fields_desc = [StrFixedLenField("magic", MAGIC, 8), _key("key"), StrField("extra", b"")]


class DERPClientInfo(Packet):
    name = "DERP ClientInfo"
    fields_desc = [_key("key"), XStrFixedLenField("nonce", b"\x00" * 24, 24), StrField("sealed", b"")]


class DERPServerInfo(Packet):
    name = "DERP ServerInfo"
    fields_desc = [XStrFixedLenField("nonce", b"\x00" * 24, 24), StrField("sealed", b"")]


class DERPSendPacket(Packet):
    name = "DERP SendPacket"
    fields_desc = [_key("dst"), StrField("data", b"")]


class DERPRecvPacket(Packet):
    name = "DERP RecvPacket"
    fields_desc = [_key("src"), StrField("data", b"")]


class DERPKeepAlive(Packet):
    name = "DERP KeepAlive"
    fields_desc: list[Any] = []


class DERPNotePreferred(Packet):
    name = "DERP NotePreferred"
    fields_desc = [ByteField("preferred", 1)]


class DERPPeerGone(Packet):
    name = "DERP PeerGone"
    fields_desc = [_key("key"), ByteEnumField("reason", 0, PEER_GONE_REASONS)]


class DERPPeerPresent(Packet):
    """Key, IPv4-mapped or IPv6 address, port and flags (51 bytes from current servers)."""

    name = "DERP PeerPresent"
    fields_desc = [
        _key("key"),
        IP6Field("ip", "::"),
        ShortField("port", 0),
        FlagsField("flags", 0x01, 8, ["IsRegular", "IsMeshPeer", "IsProber", "NotIdeal"]),
    ]


class DERPForwardPacket(Packet):
    name = "DERP ForwardPacket"
    fields_desc = [_key("src"), _key("dst"), StrField("data", b"")]


class DERPWatchConns(Packet):
    name = "DERP WatchConns"
    fields_desc: list[Any] = []


class DERPClosePeer(Packet):
    name = "DERP ClosePeer"
    fields_desc = [_key("key")]


class DERPPing(Packet):
    name = "DERP Ping"
    fields_desc = [XStrFixedLenField("data", b"\x00" * 8, 8), StrField("extra", b"")]


class DERPPong(Packet):
    name = "DERP Pong"
    fields_desc = [XStrFixedLenField("data", b"\x00" * 8, 8), StrField("extra", b"")]


class DERPHealth(Packet):
    name = "DERP Health"
    fields_desc = [StrField("problem", b"")]


class DERPRestarting(Packet):
    name = "DERP Restarting"
    fields_desc = [IntField("reconnect_in_ms", 0), IntField("try_for_ms", 0)]


LAYERS: dict[int, type[Packet]] = {
    FrameType.SERVER_KEY: DERPServerKey,
    FrameType.CLIENT_INFO: DERPClientInfo,
    FrameType.SERVER_INFO: DERPServerInfo,
    FrameType.SEND_PACKET: DERPSendPacket,
    FrameType.RECV_PACKET: DERPRecvPacket,
    FrameType.KEEP_ALIVE: DERPKeepAlive,
    FrameType.NOTE_PREFERRED: DERPNotePreferred,
    FrameType.PEER_GONE: DERPPeerGone,
    FrameType.PEER_PRESENT: DERPPeerPresent,
    FrameType.FORWARD_PACKET: DERPForwardPacket,
    FrameType.WATCH_CONNS: DERPWatchConns,
    FrameType.CLOSE_PEER: DERPClosePeer,
    FrameType.PING: DERPPing,
    FrameType.PONG: DERPPong,
    FrameType.HEALTH: DERPHealth,
    FrameType.RESTARTING: DERPRestarting,
}
for _t, _cls in LAYERS.items():
    bind_layers(DERPFrame, _cls, type=int(_t))


def frame_name(p: DERPFrame) -> str:
    return FRAME_TYPES.get(p.type, f"0x{p.type:02x}")


def split_http_head(data: bytes) -> tuple[bytes, bytes]:
    """(HTTP head with its blank line, the DERP bytes after it); no head under fast start.

    A response stream that does not start with ``HTTP/`` (fast start) and a request stream
    that does not start with a method have no head.
    """
    if data[:5] == b"HTTP/" or data[:4] in (b"GET ", b"POST", b"HEAD", b"PUT "):
        i = data.find(b"\r\n\r\n")
        if i >= 0:
            return data[: i + 4], data[i + 4 :]
        return data, b""
    return b"", data


def dissect_stream(data: bytes) -> tuple[list[DERPFrame], bytes]:
    """Every complete frame in ``data`` (one direction, after the HTTP head), and the rest."""
    out: list[DERPFrame] = []
    off = 0
    while len(data) - off >= 5:
        length = int.from_bytes(data[off + 1 : off + 5], "big")
        end = off + 5 + length
        if end > len(data):
            break
        out.append(DERPFrame(data[off:end]))
        off = end
    return out, data[off:]


__all__ = ["DERPFrame", "LAYERS", "Raw", "dissect_stream", "frame_name", "split_http_head"] + [c.__name__ for c in LAYERS.values()]
