"""Frame encoding and the incremental reader, driven by byte strings only."""

from __future__ import annotations

import ipaddress
import random

import pytest

from derpkit.protocol import frames as F
from derpkit.protocol.constants import MAX_PACKET_SIZE, FrameType, PeerGoneReason
from derpkit.protocol.errors import ProtocolError

K = bytes(range(32))
Y = bytes(range(100, 132))
X = bytes(range(200, 232))


# Appendix A of the spec (ping/pong/health/restarting are Go client_test.go vectors).
@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (F.ServerKey(K), "0100000028" + "44455250f09f9491" + K.hex()),
        (F.SendPacket(K, b"hi"), "0400000022" + K.hex() + "6869"),
        (F.RecvPacket(Y, b"hi"), "0500000022" + Y.hex() + "6869"),
        (F.KeepAlive(), "0600000000"),
        (F.NotePreferred(True), "070000000101"),
        (F.NotePreferred(False), "070000000100"),
        (F.PeerGone(K), "0800000021" + K.hex() + "00"),
        (F.PeerGone(K, PeerGoneReason.NOT_HERE), "0800000021" + K.hex() + "01"),
        (
            F.PeerPresent(K, ipaddress.ip_address("192.0.2.1"), 41641, 1),
            "0900000033" + K.hex() + "00000000000000000000ffffc0000201" + "a2a9" + "01",
        ),
        (F.ForwardPacket(Y, X, b"hi"), "0a00000042" + Y.hex() + X.hex() + "6869"),
        (F.WatchConns(), "1000000000"),
        (F.ClosePeer(K), "1100000020" + K.hex()),
        (F.Ping(bytes(range(1, 9))), "12000000080102030405060708"),
        (F.Pong(bytes(range(1, 9))), "13000000080102030405060708"),
        (F.Health("BAD"), "1400000003424144"),
        (F.Health(""), "1400000000"),
        (F.Restarting(1, 2), "15000000080000000100000002"),
    ],
)
def test_encode_matches_spec_bytes(frame: F.Frame, expected: str) -> None:
    assert frame.encode().hex() == expected


def test_header_vectors() -> None:
    assert F.header(FrameType.SEND_PACKET, 1024).hex() == "0400000400"
    assert F.header(FrameType.RECV_PACKET, 0xFFFFFFFF).hex() == "05ffffffff"


def test_recv_packet_zero_source_uses_v1_layout() -> None:
    assert F.encode_recv_packet(bytes(32), b"hi").hex() == "05000000026869"


def test_reader_accepts_any_split() -> None:
    stream = b"".join(
        f.encode()
        for f in (F.KeepAlive(), F.RecvPacket(Y, b"x" * 300), F.Ping(b"12345678"), F.Health("oops"))
    )
    whole = F.FrameReader().feed(stream)
    assert [t for t, _ in whole] == [6, 5, 0x12, 0x14]
    one = F.FrameReader()
    got: list[tuple[int, bytes]] = []
    for b in stream:
        got += one.feed(bytes([b]))
    assert got == whole
    rng = random.Random(7)
    for _ in range(50):
        r = F.FrameReader()
        out: list[tuple[int, bytes]] = []
        i = 0
        while i < len(stream):
            j = i + rng.randint(1, 40)
            out += r.feed(stream[i:j])
            i = j
        assert out == whole
        assert r.pending() == 0


def test_client_side_decoding() -> None:
    frames = F.FrameReader().feed(F.RecvPacket(Y, b"data").encode() + F.PeerGone(K).encode())
    decoded = [F.decode_client_side(t, p) for t, p in frames]
    assert decoded == [F.RecvPacket(Y, b"data"), F.PeerGone(K, 0)]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (K[:31], None),
        (K, F.PeerGone(K, 0)),  # old 32-byte form means Disconnected
        (K + b"\x01", F.PeerGone(K, 1)),
        (K + b"\xf0extra", F.PeerGone(K, 0xF0)),
    ],
)
def test_peer_gone_lengths(payload: bytes, expected: F.Frame | None) -> None:
    assert F.decode_client_side(FrameType.PEER_GONE, payload) == expected


def test_peer_present_lengths() -> None:
    ip16 = bytes(10) + b"\xff\xff" + bytes([192, 0, 2, 1])
    assert F.decode_client_side(9, K[:20]) is None
    assert F.decode_client_side(9, K) == F.PeerPresent(K)
    assert F.decode_client_side(9, K + ip16[:10]) == F.PeerPresent(K)
    v4 = ipaddress.ip_address("192.0.2.1")
    assert F.decode_client_side(9, K + ip16 + b"\xa2\xa9") == F.PeerPresent(K, v4, 41641, 0)
    assert F.decode_client_side(9, K + ip16 + b"\xa2\xa9\x02") == F.PeerPresent(K, v4, 41641, 2)
    assert F.decode_client_side(9, K + ip16 + b"\xa2\xa9\x04future") == F.PeerPresent(K, v4, 41641, 4)
    v6 = ipaddress.ip_address("2001:db8::1")
    assert F.decode_client_side(9, K + v6.packed + b"\x00\x50\x01") == F.PeerPresent(K, v6, 80, 1)


def test_client_skips_unknown_and_short_frames() -> None:
    assert F.decode_client_side(FrameType.SERVER_KEY, b"x" * 40) == F.Unknown(1, b"x" * 40)
    assert F.decode_client_side(0x42, b"") == F.Unknown(0x42, b"")
    assert F.decode_client_side(FrameType.PING, b"1234567") is None
    assert F.decode_client_side(FrameType.PONG, b"123456789") == F.Pong(b"12345678")
    assert F.decode_client_side(FrameType.RESTARTING, b"\x00" * 7) is None
    assert F.decode_client_side(FrameType.RECV_PACKET, b"\x00" * 31) is None


def test_client_rejects_frames_over_one_mebibyte() -> None:
    r = F.FrameReader(F.client_header_check)
    with pytest.raises(ProtocolError) as e:
        r.feed(F.header(5, (1 << 20) + 1))
    assert e.value.reason == "frame_too_large"
    assert F.FrameReader().feed(F.header(5, 1 << 20)) == []  # exactly 1 MiB is fine (waits)


def test_server_key_greeting_rules() -> None:
    good = F.ServerKey(K).encode()
    (t, p), = F.FrameReader().feed(good)
    assert F.decode_server_key(t, p).key == K
    assert F.decode_server_key(t, p + b"future").extra == b"future"
    for bad_type, bad_payload in ((1, p[:39]), (2, p), (1, b"XERP" + p[4:]), (1, p + b"\0" * 1000)):
        with pytest.raises(ProtocolError) as e:
            F.decode_server_key(bad_type, bad_payload)
        assert e.value.reason == "invalid_server_greeting"


@pytest.mark.parametrize(
    ("ftype", "length", "reason"),
    [
        (FrameType.SEND_PACKET, 32 + MAX_PACKET_SIZE + 1, "oversized_packet"),
        (FrameType.FORWARD_PACKET, 64 + MAX_PACKET_SIZE + 1, "oversized_packet"),
        (FrameType.PING, 1001, "bad_ping"),
        (FrameType.CLIENT_INFO, (256 << 10) + 1, "long_client_info"),
        (FrameType.CLOSE_PEER, 33, "bad_close_peer"),
    ],
)
def test_server_rejects_oversized_headers_before_payload(ftype: int, length: int, reason: str) -> None:
    r = F.FrameReader(F.server_header_check)
    with pytest.raises(ProtocolError) as e:
        r.feed(F.header(ftype, length))  # no payload needed: refused on the header alone
    assert e.value.reason == reason


def test_server_accepts_limits_exactly() -> None:
    r = F.FrameReader(F.server_header_check)
    (t, p), = r.feed(F.SendPacket(K, b"\0" * MAX_PACKET_SIZE).encode())
    assert F.decode_server_side(t, p) == F.SendPacket(K, b"\0" * MAX_PACKET_SIZE)
    (t, p), = r.feed(F.SendPacket(K, b"").encode())
    assert F.decode_server_side(t, p) == F.SendPacket(K, b"")


def test_server_skips_unknown_frames_without_buffering() -> None:
    r = F.FrameReader(F.server_header_check)
    # A huge unknown frame followed by a ping, fed in pieces: the unknown payload is
    # skipped, never buffered, and the ping still comes out.
    huge = 50_000_000
    out = r.feed(F.header(0x7F, huge) + b"\0" * 1000)
    assert out == [(0x7F, b"")]
    assert r.pending() == 0
    remaining = huge - 1000
    chunk = b"\0" * 1_000_000
    while remaining > len(chunk):
        assert r.feed(chunk) == []
        remaining -= len(chunk)
    out = r.feed(b"\0" * remaining + F.Ping(b"abcdefgh").encode())
    assert out == [(0x12, b"abcdefgh")]
    assert r.skipped == 1


@pytest.mark.parametrize(
    ("ftype", "payload", "reason"),
    [
        (FrameType.SEND_PACKET, b"\0" * 31, "short_send_packet"),
        (FrameType.FORWARD_PACKET, b"\0" * 63, "short_forward_packet"),
        (FrameType.NOTE_PREFERRED, b"", "bad_note_preferred"),
        (FrameType.NOTE_PREFERRED, b"\1\1", "bad_note_preferred"),
        (FrameType.PING, b"1234567", "bad_ping"),
        (FrameType.WATCH_CONNS, b"\0", "bad_watch_conns"),
        (FrameType.CLOSE_PEER, b"\0" * 31, "bad_close_peer"),
    ],
)
def test_server_side_validation(ftype: int, payload: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as e:
        F.decode_server_side(ftype, payload)
    assert e.value.reason == reason


def test_server_side_first_frame_must_be_client_info() -> None:
    with pytest.raises(ProtocolError) as e:
        F.decode_server_side(FrameType.SEND_PACKET, b"\0" * 100, first=True)
    assert e.value.reason == "bad_first_frame"
    with pytest.raises(ProtocolError) as e:
        F.decode_server_side(FrameType.CLIENT_INFO, b"\0" * 55, first=True)
    assert e.value.reason == "short_client_info"


def test_note_preferred_any_nonzero_is_preferred() -> None:
    assert F.decode_server_side(FrameType.NOTE_PREFERRED, b"\x07") == F.NotePreferred(True)


def test_ping_extra_bytes_ignored() -> None:
    assert F.decode_server_side(FrameType.PING, b"12345678" + b"z" * 992) == F.Ping(b"12345678")
