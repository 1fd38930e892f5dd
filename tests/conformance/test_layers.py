"""The scapy layers (derpkit/layers) agree byte for byte with the protocol core and codec.

Mirrors derpkit/layers; kept under tests/conformance because the suite is their user.
"""

from __future__ import annotations

import ipaddress
import os

from derpkit.layers import derp as L
from derpkit.layers import stun as S
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerPresentFlags
from derpkit.stun import codec


def test_every_frame_type_builds_as_the_core_encodes() -> None:
    k, k2 = os.urandom(32), os.urandom(32)
    pairs = [
        (L.DERPFrame() / L.DERPSendPacket(dst=k, data=b"hi"), F.encode_send_packet(k, b"hi")),
        (L.DERPFrame() / L.DERPRecvPacket(src=k, data=b"hi"), F.encode_recv_packet(k, b"hi")),
        (L.DERPFrame() / L.DERPServerKey(key=k), F.ServerKey(k).encode()),
        (L.DERPFrame(type=6), F.KEEPALIVE_BYTES),
        (L.DERPFrame() / L.DERPNotePreferred(preferred=1), F.NotePreferred(True).encode()),
        (L.DERPFrame() / L.DERPPeerGone(key=k, reason=1), F.PeerGone(k, 1).encode()),
        (L.DERPFrame() / L.DERPPeerPresent(key=k, ip="::ffff:192.0.2.1", port=41641, flags=0x05),
         F.PeerPresent(k, ipaddress.ip_address("192.0.2.1"), 41641, PeerPresentFlags.IS_REGULAR | PeerPresentFlags.IS_PROBER).encode()),
        (L.DERPFrame() / L.DERPForwardPacket(src=k, dst=k2, data=b"x"), F.ForwardPacket(k, k2, b"x").encode()),
        (L.DERPFrame(type=0x10), F.WatchConns().encode()),
        (L.DERPFrame() / L.DERPClosePeer(key=k), F.ClosePeer(k).encode()),
        (L.DERPFrame() / L.DERPPing(data=b"12345678"), F.Ping(b"12345678").encode()),
        (L.DERPFrame() / L.DERPPong(data=b"12345678"), F.Pong(b"12345678").encode()),
        (L.DERPFrame() / L.DERPHealth(problem=b"BAD"), F.Health("BAD").encode()),
        (L.DERPFrame() / L.DERPRestarting(reconnect_in_ms=1, try_for_ms=2), F.Restarting(1, 2).encode()),
    ]
    for pkt, want in pairs:
        assert bytes(pkt) == want, pkt.summary()


def test_dissect_stream_cuts_frames_and_keeps_the_rest() -> None:
    k = os.urandom(32)
    data = F.encode_send_packet(k, b"hello") + F.PeerGone(k, 1).encode() + F.KEEPALIVE_BYTES + b"\x05\x00\x00"
    frames, rest = L.dissect_stream(data)
    assert [L.frame_name(f) for f in frames] == ["SendPacket", "PeerGone", "KeepAlive"]
    assert frames[0][L.DERPSendPacket].data == b"hello" and frames[0][L.DERPSendPacket].dst == k
    assert frames[1][L.DERPPeerGone].reason == 1
    assert rest == b"\x05\x00\x00"


def test_a_lying_length_is_kept_as_given() -> None:
    pkt = L.DERPFrame(type=4, length=0xFFFFFFFF) / L.DERPSendPacket(dst=bytes(32))
    assert bytes(pkt)[:5] == b"\x04\xff\xff\xff\xff"


def test_peer_present_dissects_the_address_and_flags() -> None:
    k = os.urandom(32)
    f = L.DERPFrame(F.PeerPresent(k, ipaddress.ip_address("192.0.2.1"), 41641, 0x03).encode())
    pp = f[L.DERPPeerPresent]
    assert (pp.key, pp.ip, pp.port, int(pp.flags)) == (k, "::ffff:192.0.2.1", 41641, 3)


def test_stun_request_is_tailscales_exact_bytes() -> None:
    txid = bytes(range(12))
    assert S.finish(S.tailscale_binding_request(txid)) == codec.build_request(txid)
    assert codec.parse_binding_request(S.finish(S.tailscale_binding_request(txid))) == txid


def test_stun_response_dissects_with_the_extended_layer() -> None:
    txid = os.urandom(12)
    m = S.STUN(codec.build_response(txid, "127.0.0.1", 54321))
    x = m.attributes[0]
    assert isinstance(x, S.STUNXorMappedAddress) and x.xip == "127.0.0.1" and x.xport == 54321
    req = S.STUN(codec.build_request(txid))
    assert isinstance(req.attributes[0], S.STUNSoftware) and req.attributes[0].software == b"tailnode"


def test_crafted_bad_requests_are_refused_by_the_codec() -> None:
    bad_sw = S.finish(S.tailscale_binding_request(software=b"notnode!"))
    no_fp = S.finish(S.tailscale_binding_request(fingerprint=False))
    for data, err in ((bad_sw, "ErrWrongSoftware"), (no_fp, "ErrNoFingerprint")):
        try:
            codec.parse_binding_request(data)
        except codec.StunError as e:
            assert e.name == err
        else:
            raise AssertionError(f"{err} request was accepted")
