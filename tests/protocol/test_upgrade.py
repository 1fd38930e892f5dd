"""HTTP upgrade decisions, as derper's /derp handler makes them."""

from __future__ import annotations

import pytest

from derpkit.protocol import upgrade as U
from derpkit.protocol.keys import NodePrivate


@pytest.mark.parametrize(
    ("headers", "kind", "fast", "not_ideal"),
    [
        ({}, U.UpgradeKind.REFUSE, False, False),
        ({"Upgrade": "DERP"}, U.UpgradeKind.DERP, False, False),
        ({"upgrade": "derp", "Derp-Fast-Start": "1"}, U.UpgradeKind.DERP, True, False),
        ({"Upgrade": "DERP", "Derp-Fast-Start": "true"}, U.UpgradeKind.DERP, False, False),
        ({"Upgrade": "DERP", "Ideal-Node": "1a"}, U.UpgradeKind.DERP, False, True),
        ({"Upgrade": "websocket", "Sec-WebSocket-Protocol": "derp"}, U.UpgradeKind.WEBSOCKET, False, False),
        ({"Upgrade": "WebSocket"}, U.UpgradeKind.DERP, False, False),  # legacy raw DERP
        ({"Upgrade": "h2c"}, U.UpgradeKind.REFUSE, False, False),
    ],
)
def test_decide(headers: dict[str, str], kind: U.UpgradeKind, fast: bool, not_ideal: bool) -> None:
    d = U.decide(headers)
    assert (d.kind, d.fast_start, d.not_ideal) == (kind, fast, not_ideal)


def test_weird_upgrade_is_reported() -> None:
    assert U.decide({"Upgrade": "h2c"}).weird_upgrade == "h2c"


def test_switching_protocols_bytes() -> None:
    pub = NodePrivate.generate().public()
    assert U.switching_protocols(pub) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
        b"Derp-Version: 2\r\nDerp-Public-Key: " + pub.hex().encode() + b"\r\n\r\n"
    )


def test_split_head_keeps_pipelined_bytes() -> None:
    assert U.split_head(b"HTTP/1.1 101 X\r\nA: b\r\n") is None
    head, rest = U.split_head(b"HTTP/1.1 101 X\r\nA: b\r\n\r\n\x01\x00")  # type: ignore[misc]
    assert rest == b"\x01\x00"
    r = U.parse_response_head(head)
    assert r.status == 101 and r.header("a") == "b"


def test_request_has_fast_start_header_only_when_asked() -> None:
    assert b"Derp-Fast-Start: 1" in U.build_request("h", fast_start=True)
    assert b"Derp-Fast-Start" not in U.build_request("h")
    assert U.build_request("h").endswith(b"Upgrade: DERP\r\n\r\n")
