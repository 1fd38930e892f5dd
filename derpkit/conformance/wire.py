"""The per-case wire log: every frame sent and received, with timestamps (as Autobahn's).

Each connection a case opens gets a label ("A", "B", "watcher"…) and a ``Tap`` per
direction. A tap sees the raw byte stream exactly as it crossed the socket, splits off the
HTTP head (request or response) and then cuts DERP frames with the protocol core's
``FrameReader``, so what is logged is what was on the wire, not what a parser made of it.
"""

from __future__ import annotations

import time
from typing import Any

from derpkit.protocol.constants import FrameType
from derpkit.protocol.frames import FrameReader
from derpkit.protocol.upgrade import split_head

#: Payload bytes kept (hex) per logged frame; enough for a key and a bit.
PREVIEW = 48
#: Entries kept per case; a flood case would otherwise log megabytes.
MAX_ENTRIES = 400


def frame_name(ftype: int) -> str:
    try:
        return FrameType(ftype).name.title().replace("_", "")
    except ValueError:
        return f"Unknown(0x{ftype:02x})"


class WireLog:
    """Entries ``{"t", "conn", "dir", "kind", ...}``; ``t`` is seconds since the case began."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.entries: list[dict[str, Any]] = []
        self.dropped = 0

    def add(self, conn: str, direction: str, kind: str, **fields: Any) -> None:
        if len(self.entries) >= MAX_ENTRIES:
            self.dropped += 1
            return
        e: dict[str, Any] = {"t": round(time.monotonic() - self.t0, 6), "conn": conn, "dir": direction, "kind": kind}
        e.update(fields)
        self.entries.append(e)

    def note(self, conn: str, text: str) -> None:
        """A non-wire event worth seeing in the log: a close, a timeout, a TLS fact."""
        self.add(conn, "-", "event", text=text)

    def to_json(self) -> list[dict[str, Any]]:
        out = list(self.entries)
        if self.dropped:
            out.append({"t": round(time.monotonic() - self.t0, 6), "conn": "-", "dir": "-",
                        "kind": "event", "text": f"{self.dropped} more entries not logged"})
        return out


def _keep_all(ftype: int, length: int) -> bool:
    return True


class Tap:
    """One direction of one connection: bytes in, log entries out. Never raises."""

    def __init__(self, log: WireLog, conn: str, direction: str, *, http: bool) -> None:
        self.log = log
        self.conn = conn
        self.direction = direction
        self._http = http  # an HTTP head comes first (unless the bytes show otherwise)
        self._head = bytearray()
        self._reader = FrameReader(_keep_all)
        self.frames = 0

    def feed(self, data: bytes) -> None:
        if not data:
            return
        if self._http:
            self._head += data
            if self.direction == "recv" and len(self._head) >= 5 and not self._head.startswith(b"HTTP/"):
                # Fast start: no response head at all, frames straight away.
                self._http = False
                data, self._head = bytes(self._head), bytearray()
            else:
                try:
                    parts = split_head(bytes(self._head))
                except Exception:  # noqa: BLE001 - a huge head is logged, not fatal here
                    parts = (bytes(self._head), b"")
                if parts is None:
                    return
                head, data = parts
                self._http = False
                self._head = bytearray()
                lines = head.decode("latin-1", "replace").split("\r\n")
                self.log.add(self.conn, self.direction, "http", line=lines[0], headers=lines[1:])
                if not data:
                    return
        try:
            frames = self._reader.feed(data)
        except Exception as e:  # noqa: BLE001 - the tap must never break a case
            self.log.add(self.conn, self.direction, "bytes", len=len(data), error=str(e))
            return
        for ftype, payload in frames:
            self.frames += 1
            self.log.add(
                self.conn, self.direction, "frame", type=frame_name(ftype), type_byte=ftype,
                len=len(payload), hex=payload[:PREVIEW].hex(),
            )

    def raw(self, data: bytes, what: str) -> None:
        """Bytes that are not DERP frames (a WebSocket text message, say)."""
        self.log.add(self.conn, self.direction, what, len=len(data), hex=data[:PREVIEW].hex())


__all__ = ["MAX_ENTRIES", "Tap", "WireLog", "frame_name"]
