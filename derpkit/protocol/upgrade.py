"""HTTP/1.1 upgrade rules for /derp, without any I/O.

The server side decides from the request headers what a request to /derp becomes; the
client side builds the request and checks the response head. Both ends keep any bytes
that arrived after the blank line: under fast start they are already DERP frames.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from .constants import (
    DERP_PUBLIC_KEY_HEADER,
    DERP_VERSION_HEADER,
    FAST_START_HEADER,
    IDEAL_NODE_HEADER,
    PROTOCOL_VERSION,
    WEBSOCKET_SUBPROTOCOL,
)
from .errors import ProtocolError
from .keys import NodePublic

UPGRADE_REQUIRED_BODY = b"DERP requires connection upgrade\n"
MAX_HEAD = 16 << 10


class UpgradeKind(enum.Enum):
    DERP = "derp"  # raw DERP after a 101 (or no response at all under fast start)
    WEBSOCKET = "websocket"  # RFC 6455 with the "derp" subprotocol
    REFUSE = "refuse"  # 426 Upgrade Required


@dataclass(frozen=True, slots=True)
class UpgradeDecision:
    kind: UpgradeKind
    fast_start: bool = False
    not_ideal: bool = False
    weird_upgrade: str = ""  # non-empty unexpected Upgrade value, for the log line


def _get(headers: Mapping[str, str], name: str) -> str:
    for k, v in headers.items():
        if k.lower() == name.lower():
            return v
    return ""


def decide(headers: Mapping[str, str]) -> UpgradeDecision:
    """Classify a request to /derp as Go's handler does (spec §1.3)."""
    upgrade = _get(headers, "Upgrade").lower()
    if upgrade == "websocket" and WEBSOCKET_SUBPROTOCOL in _get(headers, "Sec-WebSocket-Protocol"):
        return UpgradeDecision(UpgradeKind.WEBSOCKET)
    if upgrade not in ("derp", "websocket"):
        return UpgradeDecision(UpgradeKind.REFUSE, weird_upgrade=upgrade)
    return UpgradeDecision(
        UpgradeKind.DERP,
        fast_start=_get(headers, FAST_START_HEADER) == "1",
        not_ideal=bool(_get(headers, IDEAL_NODE_HEADER)),
    )


def switching_protocols(server_key: NodePublic) -> bytes:
    """The exact 101 response derper writes before the ServerKey frame."""
    return (
        "HTTP/1.1 101 Switching Protocols\r\n"
        "Upgrade: DERP\r\n"
        "Connection: Upgrade\r\n"
        f"{DERP_VERSION_HEADER}: {PROTOCOL_VERSION}\r\n"
        f"{DERP_PUBLIC_KEY_HEADER}: {server_key.hex()}\r\n"
        "\r\n"
    ).encode()


def build_request(host: str, path: str = "/derp", *, fast_start: bool = False, ideal_node: str = "") -> bytes:
    """The upgrade request a Go client sends (Host and User-Agent first)."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "User-Agent: derpkit",
        "Connection: Upgrade",
    ]
    if fast_start:
        lines.append(f"{FAST_START_HEADER}: 1")
    if ideal_node:
        lines.append(f"{IDEAL_NODE_HEADER}: {ideal_node}")
    lines.append("Upgrade: DERP")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]

    def header(self, name: str) -> str:
        return _get(self.headers, name)


def split_head(buf: bytes) -> tuple[bytes, bytes] | None:
    """Return (head, rest) once the blank line has arrived, else None."""
    i = buf.find(b"\r\n\r\n")
    if i < 0:
        if len(buf) > MAX_HEAD:
            raise ProtocolError("http_head_too_large", f"{len(buf)} bytes without a blank line")
        return None
    return buf[:i], buf[i + 4 :]


def parse_response_head(head: bytes) -> ResponseHead:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    # isascii: str.isdigit() also takes "²" (latin-1 0xb2), which int() refuses (fuzzing found it).
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isascii() and parts[1].isdigit()):
        raise ProtocolError("bad_http_response", repr(lines[0][:80]))
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip()] = value.strip()
    return ResponseHead(int(parts[1]), parts[2] if len(parts) > 2 else "", headers)
