"""Our codec against bytes recorded from Tailscale's Go derper (tests/vectors/go_derper.json).

The vectors were captured by tests/interop/record_vectors.py from a real derper (see the
file's provenance); these tests need no Go: they decode Go's bytes with our code and, where
the bytes are deterministic, check that our encoder writes exactly the same bytes.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from derpkit.protocol import frames as F
from derpkit.protocol import handshake, upgrade
from derpkit.protocol.constants import FrameType, PeerGoneReason, PeerPresentFlags
from derpkit.protocol.keys import NodePrivate, NodePublic
from derpkit.stun import codec

DATA = json.loads((Path(__file__).parents[1] / "vectors" / "go_derper.json").read_text())
V = {k: bytes.fromhex(v["hex"]) for k, v in DATA["vectors"].items()}
P = DATA["provenance"]
SERVER = NodePublic.parse(P["server_public"])
A = NodePrivate.parse(P["client_a"]["private"])
B = NodePublic.parse(P["client_b"]["public"])
W = NodePublic.parse(P["watcher"]["public"])
TXID = bytes.fromhex(P["stun_txid"])


def one_frame(raw: bytes) -> tuple[int, bytes]:
    frames = F.FrameReader().feed(raw)
    assert len(frames) == 1, frames
    return frames[0]


def test_provenance_names_the_go_release() -> None:
    assert P["go_program"] == "derper"
    assert P["tailscale_version"].startswith("v1.")
    assert "Restarting" in P["restarting"]


def test_101_head_is_byte_identical_to_ours() -> None:
    head = V["head_101"]
    assert head == upgrade.switching_protocols(SERVER)
    parts = upgrade.split_head(head)
    assert parts is not None and parts[1] == b""
    h = upgrade.parse_response_head(parts[0])
    assert h.status == 101 and h.header("Upgrade") == "DERP" and h.header("Derp-Version") == "2"
    assert h.header("Derp-Public-Key") == SERVER.hex()


def test_server_key_frame() -> None:
    ftype, payload = one_frame(V["server_key"])
    sk = F.decode_server_key(ftype, payload)
    assert sk.key == SERVER.raw and sk.extra == b""
    assert V["server_key"][:5] == bytes.fromhex("0100000028")
    assert F.ServerKey(SERVER.raw).encode() == V["server_key"]


def test_server_info_frame_shape_and_box_opens_with_our_codec() -> None:
    raw = V["server_info"]
    assert raw[:5] == bytes.fromhex("0300000035")  # 24 nonce + 16 tag + len('{"version":2}')
    ftype, payload = one_frame(raw)
    f = F.decode_client_side(ftype, payload)
    assert isinstance(f, F.ServerInfoFrame)
    info = handshake.open_server_info(A, SERVER, f.sealed)
    assert info.version == 2 and info.token_bucket_bytes_per_second == 0
    # Ours has the same length (the bytes differ: a random nonce).
    ours = handshake.server_info_frame(NodePrivate.generate(), A.public())
    assert len(ours) == len(raw)


@pytest.mark.parametrize(
    ("name", "key", "flags"),
    [
        ("present_self_mesh", W, PeerPresentFlags.IS_MESH_PEER),
        ("present_regular", A.public(), PeerPresentFlags.IS_REGULAR),
        ("present_prober", B, PeerPresentFlags.IS_PROBER),
    ],
)
def test_peer_present(name: str, key: NodePublic, flags: int) -> None:
    raw = V[name]
    assert raw[:5] == bytes.fromhex("0900000033")  # 51 bytes, not the 41 of derp.go's comment
    f = F.decode_client_side(*one_frame(raw))
    assert isinstance(f, F.PeerPresent)
    assert f.key == key.raw and f.flags == flags
    assert f.ip == ipaddress.ip_address("127.0.0.1")  # sent IPv4-mapped, decoded to IPv4
    assert raw[5 + 32 : 5 + 48] == bytes(10) + b"\xff\xff" + bytes([127, 0, 0, 1])
    assert 0 < f.port < 65536
    assert F.PeerPresent(f.key, f.ip, f.port, f.flags).encode() == raw


def test_pong_echoes_ping() -> None:
    f = F.decode_client_side(*one_frame(V["pong"]))
    assert f == F.Pong(bytes(range(1, 9)))
    assert f.encode() == V["pong"] == bytes.fromhex("13000000080102030405060708")


def test_recv_packet_carries_the_sender() -> None:
    f = F.decode_client_side(*one_frame(V["recv_packet"]))
    assert isinstance(f, F.RecvPacket)
    assert f.src == A.public().raw and f.data == b"hi"
    assert F.encode_recv_packet(A.public().raw, b"hi") == V["recv_packet"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("peer_gone_disconnected", PeerGoneReason.DISCONNECTED),
        ("peer_gone_to_watcher", PeerGoneReason.DISCONNECTED),
        ("peer_gone_not_here", PeerGoneReason.NOT_HERE),
    ],
)
def test_peer_gone(name: str, reason: int) -> None:
    raw = V[name]
    assert raw[:5] == bytes.fromhex("0800000021")
    f = F.decode_client_side(*one_frame(raw))
    assert isinstance(f, F.PeerGone) and f.reason == reason
    if name != "peer_gone_not_here":
        assert f.key == B.raw
    assert F.PeerGone(f.key, f.reason).encode() == raw


def test_keep_alive() -> None:
    raw = V["keep_alive"]
    assert raw == bytes.fromhex("0600000000")
    assert F.decode_client_side(*one_frame(raw)) == F.KeepAlive()
    assert F.KeepAlive().encode() == raw


def test_restarting_and_health_are_not_sent_by_go() -> None:
    # Nothing to decode from Go: its derper never writes these frame types.
    assert "restarting" not in V and "health" not in V
    assert FrameType.RESTARTING == 0x15 and FrameType.HEALTH == 0x14


def _http(raw: bytes) -> upgrade.ResponseHead:
    parts = upgrade.split_head(raw)
    assert parts is not None
    return upgrade.parse_response_head(parts[0])


def test_http_426_headers() -> None:
    h = _http(V["http_426"])
    assert h.status == 426
    assert h.header("Content-Type") == "text/plain; charset=utf-8"
    assert h.header("X-Content-Type-Options") == "nosniff"
    assert V["http_426"].endswith(b"\r\n\r\nDERP requires connection upgrade\n")


def test_http_probe_headers() -> None:
    h = _http(V["http_probe"])
    assert h.status == 200 and h.header("Access-Control-Allow-Origin") == "*"
    assert h.header("Content-Length") == "0"


def test_stun_ipv4_reply_is_byte_identical_to_ours() -> None:
    r = codec.parse_response(V["stun_ipv4"])
    assert r.txid == TXID and r.ip == ipaddress.ip_address("127.0.0.1")
    assert r.addr_attr == codec.ATTR_XOR_MAPPED_ADDRESS
    assert codec.build_response(TXID, r.ip, r.port) == V["stun_ipv4"]


def test_stun_ipv4_client_on_dual_stack_socket_gets_4in6() -> None:
    """Go derper on ':3478' answers an IPv4 client with family 0x02 and ::ffff:a.b.c.d."""
    raw = V["stun_v4_on_dual_stack"]
    assert len(raw) == 44
    assert raw[20:24] == bytes.fromhex("00200014")  # XOR-MAPPED-ADDRESS, 20-byte value
    assert raw[24:26] == bytes.fromhex("0002")  # family IPv6
    r = codec.parse_response(raw)
    assert r.ip == ipaddress.ip_address("127.0.0.1")  # our parser unmaps it, like Go's
    mapped = ipaddress.ip_address("::ffff:127.0.0.1")
    assert codec.build_response(TXID, mapped, r.port, unmap=False) == raw
    # derpkit's server answers family 0x01 on purpose (docs/compat.md).
    assert codec.build_response(TXID, mapped, r.port)[24:26] == bytes.fromhex("0001")


def test_stun_ipv6_reply() -> None:
    r = codec.parse_response(V["stun_ipv6"])
    assert r.ip == ipaddress.ip_address("::1")
    assert codec.build_response(TXID, r.ip, r.port) == V["stun_ipv6"]
