"""DERP frames as small immutable values, their encoders, and an incremental reader.

The reader is sans-IO: ``FrameReader.feed(data)`` accepts bytes in any split and returns
the complete frames found so far. What counts as a legal frame differs between the two
ends of a connection, so each end passes its own *policy*: the server is strict (Go closes
the connection on any malformed known frame), the client lenient (Go logs and skips).

Keys inside frames are raw 32-byte ``bytes``: this module sits on the packet hot path and
wrapping every address in an object would cost an allocation per packet.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass

from .constants import (
    FRAME_HEADER_LEN,
    KEY_LEN,
    MAGIC,
    MAX_CLIENT_INFO_LEN,
    MAX_CLIENT_RECV_FRAME,
    MAX_PACKET_SIZE,
    MAX_PING_LEN,
    MAX_SERVER_KEY_LEN,
    MAX_WRITE_FRAME,
    MIN_CLIENT_INFO_LEN,
    PING_DATA_LEN,
    SERVER_KEY_LEN,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
)
from .errors import ProtocolError
from .events import Event

_HEADER = struct.Struct(">BI")
_U32X2 = struct.Struct(">II")
_ZERO_KEY = bytes(KEY_LEN)


def header(ftype: int, length: int) -> bytes:
    """The 5-byte frame header."""
    return _HEADER.pack(ftype, length)


def _key(key: bytes, what: str) -> bytes:
    """A raw key for the wire; a wrong length would shift every later byte of the stream."""
    if len(key) != KEY_LEN:
        raise ValueError(f"{what} must be a {KEY_LEN}-byte key, got {len(key)} bytes")
    return key


def _packet(data: bytes) -> bytes:
    if len(data) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(data)} bytes exceeds the DERP maximum of {MAX_PACKET_SIZE}")
    return data


def _eight(data: bytes, what: str) -> bytes:
    if len(data) != PING_DATA_LEN:
        raise ValueError(f"{what} data must be {PING_DATA_LEN} bytes, got {len(data)}")
    return data


def frame(ftype: int, payload: bytes = b"") -> bytes:
    if not 0 <= ftype <= 0xFF:
        raise ValueError(f"frame type {ftype} does not fit in a byte")
    if len(payload) > MAX_WRITE_FRAME:
        raise ValueError(f"frame of {len(payload)} bytes exceeds the {MAX_WRITE_FRAME} write cap")
    return _HEADER.pack(ftype, len(payload)) + payload


# --------------------------------------------------------------------------- frame values


@dataclass(frozen=True, slots=True)
class ServerKey(Event):
    key: bytes
    extra: bytes = b""

    def encode(self) -> bytes:
        return frame(FrameType.SERVER_KEY, MAGIC + _key(self.key, "ServerKey key") + self.extra)


@dataclass(frozen=True, slots=True)
class ClientInfoFrame(Event):
    """Client key plus the sealed JSON (nonce || tag || ciphertext); see handshake.py."""

    key: bytes
    sealed: bytes

    def encode(self) -> bytes:
        return frame(FrameType.CLIENT_INFO, _key(self.key, "ClientInfo key") + self.sealed)


@dataclass(frozen=True, slots=True)
class ServerInfoFrame(Event):
    sealed: bytes

    def encode(self) -> bytes:
        return frame(FrameType.SERVER_INFO, self.sealed)


@dataclass(frozen=True, slots=True)
class SendPacket(Event):
    dst: bytes
    data: bytes

    def encode(self) -> bytes:
        return encode_send_packet(self.dst, self.data)


@dataclass(frozen=True, slots=True)
class RecvPacket(Event):
    """``src`` is None for the legacy v1 layout (a forwarded packet with a zero source)."""

    src: bytes | None
    data: bytes

    def encode(self) -> bytes:
        return encode_recv_packet(_ZERO_KEY if self.src is None else self.src, self.data)


@dataclass(frozen=True, slots=True)
class KeepAlive(Event):
    def encode(self) -> bytes:
        return KEEPALIVE_BYTES


@dataclass(frozen=True, slots=True)
class NotePreferred(Event):
    preferred: bool

    def encode(self) -> bytes:
        return frame(FrameType.NOTE_PREFERRED, b"\x01" if self.preferred else b"\x00")


@dataclass(frozen=True, slots=True)
class PeerGone(Event):
    key: bytes
    reason: int = PeerGoneReason.DISCONNECTED

    def encode(self) -> bytes:
        if not 0 <= self.reason <= 0xFF:
            raise ValueError(f"PeerGone reason {self.reason} does not fit in a byte")
        return frame(FrameType.PEER_GONE, _key(self.key, "PeerGone key") + bytes([self.reason]))


@dataclass(frozen=True, slots=True)
class PeerPresent(Event):
    """A peer connected to the server; ``ip``/``port`` are None from old servers.

    ``flags`` 0 means the server sent none (an old server).
    """

    key: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    port: int = 0
    flags: int = 0

    def encode(self) -> bytes:
        ip16 = _ip16(self.ip)
        flags = self.flags or PeerPresentFlags.IS_REGULAR
        return frame(
            FrameType.PEER_PRESENT,
            _key(self.key, "PeerPresent key") + ip16 + struct.pack(">HB", self.port, flags),
        )


@dataclass(frozen=True, slots=True)
class ForwardPacket(Event):
    src: bytes
    dst: bytes
    data: bytes

    def encode(self) -> bytes:
        return frame(
            FrameType.FORWARD_PACKET,
            _key(self.src, "ForwardPacket source") + _key(self.dst, "ForwardPacket destination")
            + _packet(self.data),
        )


@dataclass(frozen=True, slots=True)
class WatchConns(Event):
    def encode(self) -> bytes:
        return frame(FrameType.WATCH_CONNS)


@dataclass(frozen=True, slots=True)
class ClosePeer(Event):
    key: bytes

    def encode(self) -> bytes:
        return frame(FrameType.CLOSE_PEER, _key(self.key, "ClosePeer key"))


@dataclass(frozen=True, slots=True)
class Ping(Event):
    data: bytes

    def encode(self) -> bytes:
        return frame(FrameType.PING, _eight(self.data, "Ping"))


@dataclass(frozen=True, slots=True)
class Pong(Event):
    data: bytes

    def encode(self) -> bytes:
        return frame(FrameType.PONG, _eight(self.data, "Pong"))


@dataclass(frozen=True, slots=True)
class Health(Event):
    """Problem text from the server; empty means healthy again."""

    problem: str

    def encode(self) -> bytes:
        return frame(FrameType.HEALTH, self.problem.encode())


@dataclass(frozen=True, slots=True)
class Restarting(Event):
    """Advisory: reconnect after ``reconnect_in_ms``, keep trying for ``try_for_ms``."""

    reconnect_in_ms: int
    try_for_ms: int

    def encode(self) -> bytes:
        return frame(FrameType.RESTARTING, _U32X2.pack(self.reconnect_in_ms, self.try_for_ms))


@dataclass(frozen=True, slots=True)
class Unknown(Event):
    """A frame type this end does not act on; kept so callers can count it."""

    ftype: int
    payload: bytes

    def encode(self) -> bytes:
        return frame(self.ftype, self.payload)


Frame = (
    ServerKey | ClientInfoFrame | ServerInfoFrame | SendPacket | RecvPacket | KeepAlive
    | NotePreferred | PeerGone | PeerPresent | ForwardPacket | WatchConns | ClosePeer | Ping
    | Pong | Health | Restarting | Unknown
)

KEEPALIVE_BYTES = header(FrameType.KEEP_ALIVE, 0)
_SEND_HDR = FrameType.SEND_PACKET
_RECV_HDR = FrameType.RECV_PACKET


def encode_send_packet(dst: bytes, data: bytes) -> bytes:
    if len(dst) != KEY_LEN:
        raise ValueError(f"SendPacket destination must be a {KEY_LEN}-byte key, got {len(dst)} bytes")
    if len(data) > MAX_PACKET_SIZE:
        raise ValueError(f"packet of {len(data)} bytes exceeds the DERP maximum of {MAX_PACKET_SIZE}")
    return _HEADER.pack(_SEND_HDR, KEY_LEN + len(data)) + dst + data


def encode_recv_packet(src: bytes, data: bytes) -> bytes:
    """RecvPacket in the v2 layout, or v1 (no key) when the source is the zero key."""
    if len(src) != KEY_LEN:
        raise ValueError(f"RecvPacket source must be a {KEY_LEN}-byte key, got {len(src)} bytes")
    if src == _ZERO_KEY:
        return _HEADER.pack(_RECV_HDR, len(data)) + data
    return _HEADER.pack(_RECV_HDR, KEY_LEN + len(data)) + src + data


def _ip16(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bytes:
    if ip is None:
        return bytes(16)
    if isinstance(ip, ipaddress.IPv4Address):
        return b"\x00" * 10 + b"\xff\xff" + ip.packed
    return ip.packed


def _unmap(raw16: bytes) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip6 = ipaddress.IPv6Address(raw16)
    return ip6.ipv4_mapped or ip6


# --------------------------------------------------------------------------- decoding


def decode_server_side(ftype: int, payload: bytes, *, first: bool = False) -> Frame:
    """Decode a frame the server received, with Go's strict rules (§5.2).

    Known frames with a bad size raise ``ProtocolError``; everything the server does not
    act on (KeepAlive, Pong, Health, unknown values...) comes back as ``Unknown``.
    Mesh privilege is the caller's business: it must check it *before* calling for
    ForwardPacket, as Go does.
    """
    n = len(payload)
    if first:
        if ftype != FrameType.CLIENT_INFO:
            raise ProtocolError("bad_first_frame", f"bad frame type {ftype:#x}, want 0x2")
        if n < MIN_CLIENT_INFO_LEN:
            raise ProtocolError("short_client_info", f"{n} bytes")
        if n > MAX_CLIENT_INFO_LEN:
            raise ProtocolError("long_client_info", f"{n} bytes")
        return ClientInfoFrame(payload[:KEY_LEN], payload[KEY_LEN:])
    if ftype == FrameType.SEND_PACKET:
        if n < KEY_LEN:
            raise ProtocolError("short_send_packet", f"{n} bytes")
        if n - KEY_LEN > MAX_PACKET_SIZE:
            raise ProtocolError("oversized_packet", f"{n - KEY_LEN} bytes")
        return SendPacket(payload[:KEY_LEN], payload[KEY_LEN:])
    if ftype == FrameType.NOTE_PREFERRED:
        if n != 1:
            raise ProtocolError("bad_note_preferred", f"{n} bytes")
        return NotePreferred(payload[0] != 0)
    if ftype == FrameType.PING:
        if n < PING_DATA_LEN or n > MAX_PING_LEN:
            raise ProtocolError("bad_ping", f"{n} bytes")
        return Ping(payload[:PING_DATA_LEN])
    if ftype == FrameType.FORWARD_PACKET:
        if n < 2 * KEY_LEN:
            raise ProtocolError("short_forward_packet", f"{n} bytes")
        if n - 2 * KEY_LEN > MAX_PACKET_SIZE:
            raise ProtocolError("oversized_packet", f"{n - 2 * KEY_LEN} bytes")
        return ForwardPacket(payload[:KEY_LEN], payload[KEY_LEN : 2 * KEY_LEN], payload[2 * KEY_LEN :])
    if ftype == FrameType.WATCH_CONNS:
        if n != 0:
            raise ProtocolError("bad_watch_conns", f"{n} bytes")
        return WatchConns()
    if ftype == FrameType.CLOSE_PEER:
        if n != KEY_LEN:
            raise ProtocolError("bad_close_peer", f"{n} bytes")
        return ClosePeer(payload)
    return Unknown(ftype, payload)


def server_header_check(ftype: int, length: int) -> bool:
    """Reject impossible lengths from a client as soon as the header arrives.

    Go reads the payload of a known frame only after checking its size, so an oversized
    SendPacket is refused without buffering 4 GiB. Unknown frames are discarded without
    buffering (returns False: skip the payload).
    """
    if ftype == FrameType.SEND_PACKET:
        if length > KEY_LEN + MAX_PACKET_SIZE:
            raise ProtocolError("oversized_packet", f"SendPacket frame of {length} bytes")
        return True
    if ftype == FrameType.FORWARD_PACKET:
        if length > 2 * KEY_LEN + MAX_PACKET_SIZE:
            raise ProtocolError("oversized_packet", f"ForwardPacket frame of {length} bytes")
        return True
    if ftype == FrameType.PING:
        if length > MAX_PING_LEN:
            raise ProtocolError("bad_ping", f"{length} bytes")
        return True
    if ftype == FrameType.CLIENT_INFO:
        if length > MAX_CLIENT_INFO_LEN:
            raise ProtocolError("long_client_info", f"{length} bytes")
        return True
    if ftype in (FrameType.NOTE_PREFERRED, FrameType.WATCH_CONNS, FrameType.CLOSE_PEER):
        if length > KEY_LEN:
            raise ProtocolError(f"bad_{FrameType(ftype).name.lower()}", f"{length} bytes")
        return True
    return False


def client_header_check(ftype: int, length: int) -> bool:
    """A client reads any frame up to 1 MiB and treats larger ones as fatal (§8.3)."""
    if length > MAX_CLIENT_RECV_FRAME:
        raise ProtocolError("frame_too_large", f"unexpectedly large frame of {length} bytes")
    return True


def decode_server_key(ftype: int, payload: bytes) -> ServerKey:
    """The first frame a (non fast-start) client reads; anything else is fatal."""
    if ftype != FrameType.SERVER_KEY or len(payload) < SERVER_KEY_LEN:
        raise ProtocolError("invalid_server_greeting", f"type {ftype:#x}, {len(payload)} bytes")
    if len(payload) > MAX_SERVER_KEY_LEN:
        raise ProtocolError("invalid_server_greeting", f"ServerKey of {len(payload)} bytes")
    if payload[: len(MAGIC)] != MAGIC:
        raise ProtocolError("invalid_server_greeting", "bad magic")
    return ServerKey(payload[len(MAGIC) : SERVER_KEY_LEN], payload[SERVER_KEY_LEN:])


def decode_client_side(ftype: int, payload: bytes) -> Frame | None:
    """Decode a frame the client received, with Go's lenient rules (§3, §8.3).

    Returns None for frames a Go client logs and ignores (a short PeerGone, say).
    Frame types a client does not act on come back as ``Unknown`` so callers may count
    them; a late ServerKey under fast start is one of those.
    """
    n = len(payload)
    if ftype == FrameType.RECV_PACKET:
        if n < KEY_LEN:
            return None
        return RecvPacket(payload[:KEY_LEN], payload[KEY_LEN:])
    if ftype == FrameType.KEEP_ALIVE:
        return KeepAlive()
    if ftype == FrameType.SERVER_INFO:
        return ServerInfoFrame(payload)
    if ftype == FrameType.PEER_GONE:
        if n < KEY_LEN:
            return None
        reason = payload[KEY_LEN] if n > KEY_LEN else PeerGoneReason.DISCONNECTED
        return PeerGone(payload[:KEY_LEN], reason)
    if ftype == FrameType.PEER_PRESENT:
        if n < KEY_LEN:
            return None
        key = payload[:KEY_LEN]
        if n < KEY_LEN + 18:
            return PeerPresent(key)
        ip = _unmap(payload[KEY_LEN : KEY_LEN + 16])
        port = int.from_bytes(payload[KEY_LEN + 16 : KEY_LEN + 18], "big")
        flags = payload[KEY_LEN + 18] if n > KEY_LEN + 18 else 0
        return PeerPresent(key, ip, port, flags)
    if ftype == FrameType.PING:
        return Ping(payload[:PING_DATA_LEN]) if n >= PING_DATA_LEN else None
    if ftype == FrameType.PONG:
        return Pong(payload[:PING_DATA_LEN]) if n >= PING_DATA_LEN else None
    if ftype == FrameType.HEALTH:
        return Health(payload.decode("utf-8", "replace"))
    if ftype == FrameType.RESTARTING:
        if n < 8:
            return None
        a, b = _U32X2.unpack_from(payload)
        return Restarting(a, b)
    return Unknown(ftype, payload)


# --------------------------------------------------------------------------- reader

HeaderCheck = Callable[[int, int], bool]


class FrameReader:
    """Incremental frame splitter: bytes in, ``(type, payload)`` pairs out.

    ``check(type, length)`` runs as soon as a header is complete. It may raise
    ``ProtocolError`` (nothing more is buffered; the complete frames that preceded the
    bad header in this chunk are on the exception as ``frames``), return True to keep the payload, or
    False to skip it without buffering (the frame is then reported with an empty payload
    and ``skipped`` counts it).
    """

    __slots__ = ("_buf", "_check", "_skip", "skipped")

    def __init__(self, check: HeaderCheck = client_header_check) -> None:
        self._buf = bytearray()
        self._check = check
        self._skip = 0
        self.skipped = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        if self._skip:
            take = min(self._skip, len(data))
            self._skip -= take
            data = data[take:]
            if not data:
                return out
        buf = self._buf
        if buf:
            buf += data
            view = buf
        else:
            view = data
        off = 0
        end = len(view)
        check = self._check
        unpack = _HEADER.unpack_from
        while end - off >= FRAME_HEADER_LEN:
            ftype, length = unpack(view, off)
            try:
                keep = check(ftype, length)
            except ProtocolError as e:
                # Frames before the bad one are valid and Go acts on them before closing;
                # hand them over on the exception so the caller can do the same.
                e.frames = out  # type: ignore[attr-defined]
                raise
            if not keep:
                self.skipped += 1
                out.append((ftype, b""))
                avail = end - off - FRAME_HEADER_LEN
                if avail >= length:
                    off += FRAME_HEADER_LEN + length
                    continue
                self._skip = length - avail
                off = end
                break
            stop = off + FRAME_HEADER_LEN + length
            if stop > end:
                break
            out.append((ftype, bytes(view[off + FRAME_HEADER_LEN : stop])))
            off = stop
        if view is buf:
            del buf[:off]
        else:
            self._buf = bytearray(view[off:]) if off < end else bytearray()
        return out

    def pending(self) -> int:
        """Bytes held waiting for the rest of a frame."""
        return len(self._buf)

    def take_buffered(self) -> bytes:
        """Hand the unparsed bytes to another reader (a handshake stage ending)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data
