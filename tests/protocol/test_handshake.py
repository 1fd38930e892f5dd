"""ClientInfo/ServerInfo JSON rules and the NaCl box, without sockets."""

from __future__ import annotations

import pytest

from derpkit.protocol import handshake as H
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.frames import FrameReader, server_header_check
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic

MESH = "ab" * 32


def test_client_info_json_matches_go_field_order() -> None:
    assert H.ClientInfo(can_ack_pings=True).to_json() == b'{"version":2,"CanAckPings":true}'
    mesh = H.ClientInfo(mesh_key=MeshKey.parse(MESH), can_ack_pings=False).to_json()
    assert mesh == ('{"meshKey":"' + MESH + '","version":2,"CanAckPings":false}').encode()
    full = H.ClientInfo(is_prober=True, app_name="probe").to_json()
    assert full == b'{"version":2,"CanAckPings":false,"IsProber":true,"AppName":"probe"}'


def test_client_info_frame_length_is_104_for_tailscaled_json() -> None:
    c, s = NodePrivate.generate(), NodePrivate.generate()
    f = H.client_info_frame(c, s.public(), H.ClientInfo(can_ack_pings=True))
    assert f[:5].hex() == "0200000068"
    (t, payload), = FrameReader(server_header_check).feed(f)
    key, info = H.open_client_info(s, payload)
    assert key == c.public()
    assert info == H.ClientInfo(can_ack_pings=True)


def test_server_info_frame_length_is_53() -> None:
    c, s = NodePrivate.generate(), NodePrivate.generate()
    f = H.server_info_frame(s, c.public())
    assert f[:5].hex() == "0300000035"
    assert H.open_server_info(c, s.public(), f[5:]) == H.ServerInfo(version=2)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{}", H.ClientInfo(version=0)),
        (b'{"Version":5,"MeshKey":"' + MESH.upper().encode() + b'"}', H.ClientInfo(mesh_key=MeshKey.parse(MESH), version=5)),
        (b'{"version":7,"VERSION":9}', H.ClientInfo(version=7)),  # exact match wins
        (b'{"canackpings":true,"isprober":true,"appname":"x"}', H.ClientInfo(version=0, can_ack_pings=True, is_prober=True, app_name="x")),
        (b'{"version":null,"CanAckPings":null}', H.ClientInfo(version=0)),
        (b'{"unknown":{"a":[1,2]}}', H.ClientInfo(version=0)),
    ],
)
def test_client_info_parsing_like_go(raw: bytes, expected: H.ClientInfo) -> None:
    assert H.ClientInfo.from_json(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"[]",
        b'{"version":"2"}',
        b'{"version":2.5}',
        b'{"CanAckPings":1}',
        b'{"AppName":5}',
        b'{"meshKey":"abcdefg"}',
        b'{"meshKey":"' + b"ab" * 34 + b'"}',
        b'{"meshKey":""}',
        b'{"meshKey":null}',
        b'{"meshKey":"' + b"zz" * 32 + b'"}',
    ],
)
def test_client_info_rejects_like_go(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        H.ClientInfo.from_json(raw)


def test_box_failures_are_protocol_errors() -> None:
    c, s, other = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    sealed = H.seal(c, s.public(), b"{}")
    with pytest.raises(ProtocolError) as e:
        H.open_box(other, c.public(), sealed)  # wrong recipient
    assert e.value.reason == "bad_box"
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(ProtocolError):
        H.open_box(s, c.public(), tampered)
    with pytest.raises(ProtocolError):
        H.open_box(s, c.public(), sealed[:10])


def test_zero_and_low_order_keys_are_rejected_cleanly() -> None:
    s = NodePrivate.generate()
    with pytest.raises(ProtocolError) as e:
        H.open_client_info(s, bytes(32) + bytes(24) + bytes(20))
    assert e.value.reason == "zero_key"
    low_order = NodePublic(bytes([1]) + bytes(31))  # the point of order 1... libsodium refuses
    with pytest.raises(ProtocolError) as e:
        H.open_box(s, low_order, bytes(24) + bytes(20))
    assert e.value.reason == "bad_box"


def test_server_info_token_bucket_fields() -> None:
    info = H.ServerInfo(token_bucket_bytes_per_second=1000, token_bucket_bytes_burst=5000)
    assert info.to_json() == b'{"version":2,"TokenBucketBytesPerSecond":1000,"TokenBucketBytesBurst":5000}'
    assert H.ServerInfo.from_json(b'{"tokenbucketbytespersecond":7}').token_bucket_bytes_per_second == 7
