"""The sans-IO STUN codec against every shared vector, round trips and the RFC parser."""

from __future__ import annotations

import ipaddress
import random
import struct
import zlib

import pytest

from derpkit.stun import (
    MAGIC_COOKIE,
    REQUEST_LEN,
    StunError,
    build_request,
    build_response,
    fingerprint,
    is_stun,
    parse_binding_request,
    parse_response,
    parse_rfc_binding_request,
)
from tests.stun.vectors import VECTORS, build_message

GO_ERRORS = {
    "ErrNotSTUN",
    "ErrNotSuccessResponse",
    "ErrMalformedAttrs",
    "ErrNotBindingRequest",
    "ErrWrongSoftware",
    "ErrNoFingerprint",
    "ErrWrongFingerprint",
}

ids = [v["name"] for v in VECTORS]
TX = bytes.fromhex("b7e7a701bc34d686fa87dfae")  # RFC 5769 sample transaction id


def test_all_58_vectors_loaded() -> None:
    assert len(VECTORS) == 58
    assert len(set(ids)) == 58


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_is_stun(v: dict) -> None:
    assert is_stun(bytes.fromhex(v["hex"])) is v["expect"]["is_stun"]


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_parse_response(v: dict) -> None:
    data = bytes.fromhex(v["hex"])
    want = v["expect"]["parse_response"]
    if want["ok"]:
        r = parse_response(data)
        assert r.txid.hex() == want["txid"]
        assert str(r.ip) == want["addr"]
        assert r.port == want["port"]
        assert f"0x{r.addr_attr:04x}" == want["addr_attr"]
    else:
        with pytest.raises(StunError) as ei:
            parse_response(data)
        assert ei.value.name == want["error"]
        assert ei.value.name in GO_ERRORS


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_parse_binding_request(v: dict) -> None:
    data = bytes.fromhex(v["hex"])
    want = v["expect"]["parse_binding_request"]
    if want["ok"]:
        assert parse_binding_request(data).hex() == want["txid"]
    else:
        with pytest.raises(StunError) as ei:
            parse_binding_request(data)
        assert ei.value.name == want["error"]


@pytest.mark.parametrize("v", VECTORS, ids=ids)
def test_kind_and_txid_fields_consistent(v: dict) -> None:
    """The vector's own summary fields agree with what the codec returns."""
    data = bytes.fromhex(v["hex"])
    if v["txid"] is not None:
        assert data[8:20].hex() == v["txid"]
    if v["kind"] == "request":
        assert parse_binding_request(data).hex() == v["txid"]
    elif v["kind"] == "response":
        r = parse_response(data)
        assert (str(r.ip), r.port, f"0x{r.addr_attr:04x}") == (v["addr"], v["port"], v["addr_attr"])
    else:
        fn = {"Is": is_stun, "ParseResponse": parse_response}.get(v["error_from"])
        if v["error_from"] == "ParseBindingRequest":
            fn = parse_binding_request
        if fn is is_stun:
            assert not is_stun(data)
        else:
            with pytest.raises(StunError) as ei:
                fn(data)
            assert ei.value.name == v["error"]


REQUEST_VECTORS = [v for v in VECTORS if v["file"] == "synthesized.json" and v["kind"] == "request"]


@pytest.mark.parametrize("v", REQUEST_VECTORS, ids=[v["name"] for v in REQUEST_VECTORS])
def test_build_request_matches_tailscale_bytes(v: dict) -> None:
    assert build_request(bytes.fromhex(v["txid"])).hex() == v["hex"]


RESPONSE_VECTORS = [
    v for v in VECTORS if v["file"] == "synthesized.json" and v["kind"] == "response"
]


@pytest.mark.parametrize("v", RESPONSE_VECTORS, ids=[v["name"] for v in RESPONSE_VECTORS])
def test_build_response_matches_vectors(v: dict) -> None:
    txid = bytes.fromhex(v["txid"])
    if "4in6" in v["name"]:
        # Go derper's dual-stack quirk; ours unmaps unless told not to.
        mapped = ipaddress.IPv6Address("::ffff:" + v["addr"])
        assert build_response(txid, mapped, v["port"], unmap=False).hex() == v["hex"]
        unmapped = build_response(txid, mapped, v["port"])
        assert len(unmapped) == 32 and unmapped[25] == 0x01
        assert unmapped == build_response(txid, v["addr"], v["port"])
    else:
        assert build_response(txid, v["addr"], v["port"]).hex() == v["hex"]


def test_request_layout() -> None:
    req = build_request()
    assert len(req) == REQUEST_LEN
    assert req[:4] == b"\x00\x01\x00\x14" and req[4:8] == MAGIC_COOKIE
    assert req[20:32] == b"\x80\x22\x00\x08tailnode"
    assert req[32:36] == b"\x80\x28\x00\x04"
    assert struct.unpack("!I", req[36:])[0] == zlib.crc32(req[:32]) ^ 0x5354554E
    assert build_request() != build_request()  # fresh random ids


def test_build_request_rejects_bad_txid() -> None:
    with pytest.raises(ValueError):
        build_request(b"short")


@pytest.mark.parametrize(
    ("ip", "family", "size"),
    [
        ("127.0.0.1", 1, 32),
        ("203.0.113.9", 1, 32),
        ("::1", 2, 44),
        ("2001:db8::dead:beef", 2, 44),
        ("::ffff:198.51.100.1", 1, 32),
        ("fe80::1%eth0", 2, 44),
    ],
)
@pytest.mark.parametrize("port", [0, 1, 3478, 0x2112, 65535])
def test_response_round_trip(ip: str, family: int, size: int, port: int) -> None:
    txid = bytes(range(12))
    resp = build_response(txid, ip, port)
    assert len(resp) == size and resp[25] == family
    r = parse_response(resp)
    want = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    assert (r.txid, r.ip, r.port, r.addr_attr) == (txid, want, port, 0x0020)
    # A reply is never mistaken for a request by either request parser.
    with pytest.raises(StunError):
        parse_binding_request(resp)
    with pytest.raises(StunError):
        parse_rfc_binding_request(resp)


def test_request_round_trip_both_parsers() -> None:
    for _ in range(50):
        req = build_request()
        assert parse_binding_request(req) == req[8:20]
        assert parse_rfc_binding_request(req) == req[8:20]
        with pytest.raises(StunError) as ei:
            parse_response(req)
        assert ei.value.name == "ErrNotSuccessResponse" and ei.value.txid == req[8:20]


def test_every_single_bit_flip_of_a_request() -> None:
    """CRC-32 catches every one-bit error, so a corrupted request is not answered."""
    req = build_request(bytes.fromhex("000102030405060708090a0b"))
    for i in range(len(req) * 8):
        bad = bytearray(req)
        bad[i // 8] ^= 0x80 >> (i % 8)
        with pytest.raises(StunError):
            parse_binding_request(bytes(bad))
        if i // 8 in (32, 33) and bad[32] & 0x80:
            # FINGERPRINT's type became another comprehension-optional attribute: the RFC
            # makes FINGERPRINT optional, so that is a well-formed request without one.
            assert parse_rfc_binding_request(bytes(bad)) == req[8:20]
            continue
        with pytest.raises(StunError):
            parse_rfc_binding_request(bytes(bad))


@pytest.mark.parametrize("length", [0, 4, 16, 24, 0xFFFF])
def test_wrong_length_field_with_recomputed_fingerprint(length: int) -> None:
    """Go never reads the length field: a request whose CRC was computed over the bytes as sent
    is answered in strict mode; the RFC parser calls it malformed."""
    req = bytearray(build_request(TX))
    req[2:4] = length.to_bytes(2, "big")
    req[36:] = struct.pack("!I", fingerprint(bytes(req[:32])))
    assert parse_binding_request(bytes(req)) == TX
    with pytest.raises(StunError) as ei:
        parse_rfc_binding_request(bytes(req))
    assert ei.value.name == "ErrBadLength"


def test_fuzz_never_raises_anything_but_stunerror() -> None:
    rng = random.Random(5602)
    seeds = [bytes.fromhex(v["hex"]) for v in VECTORS]
    for n in range(4000):
        if n % 2:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 120)))
            if n % 4 == 1 and len(data) >= 8:
                data = data[:4] + MAGIC_COOKIE + data[8:]
                data = bytes([data[0] & 0x3F]) + data[1:]
        else:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 4)):
                if data:
                    data[rng.randrange(len(data))] = rng.getrandbits(8)
            data = bytes(data[: rng.randrange(0, len(data) + 1)]) if n % 6 == 0 else bytes(data)
        assert isinstance(is_stun(data), bool)
        for fn in (parse_response, parse_binding_request, parse_rfc_binding_request):
            try:
                fn(data)
            except StunError:
                pass


def test_huge_datagram() -> None:
    big = build_request()[:20] + b"\x80\x00\xff\xfc" + b"\x00" * 65532
    big = big[:2] + b"\xff\xff" + big[4:]
    for fn in (parse_response, parse_binding_request, parse_rfc_binding_request):
        with pytest.raises(StunError):
            fn(big)


# --- RFC 5389/8489 parser -------------------------------------------------------------------


def by_name(name: str) -> bytes:
    return bytes.fromhex(next(v["hex"] for v in VECTORS if v["name"] == name))


def test_rfc5769_sample_request_accepted() -> None:
    assert parse_rfc_binding_request(by_name("rfc5769-2.1-sample-request")) == TX
    # ...while Tailscale's parser refuses it: that is the gap RFC mode closes.
    with pytest.raises(StunError) as ei:
        parse_binding_request(by_name("rfc5769-2.1-sample-request"))
    assert ei.value.name == "ErrWrongSoftware"


def test_rfc5769_sample_request_with_broken_fingerprint() -> None:
    data = bytearray(by_name("rfc5769-2.1-sample-request"))
    data[-1] ^= 1
    with pytest.raises(StunError) as ei:
        parse_rfc_binding_request(bytes(data))
    assert ei.value.name == "ErrWrongFingerprint"


@pytest.mark.parametrize(
    "attrs",
    [
        [],
        [(0x8022, b"coturn-like client")],
        [(0x8022, b"x")],  # value needs 3 padding bytes
        [(0x8029, b"\x00" * 8), (0x0024, b"\x6e\x00\x01\xff"), (0x0025, b"")],  # ICE check
        [(0x0003, b"\x00\x00\x00\x00")],  # CHANGE-REQUEST without flags
        [(0xC001, b"unknown but optional")],
        [(0x0006, b"user"), (0x0008, b"\x00" * 20), (0x7777, b"ignored after MI")],
    ],
)
@pytest.mark.parametrize("fp", [False, True])
def test_rfc_requests_accepted(attrs: list, fp: bool) -> None:
    msg = build_message(0x0001, TX, attrs, with_fingerprint=fp)
    assert parse_rfc_binding_request(msg) == TX


@pytest.mark.parametrize("pad", [b"\x00", b"\x20", b"\xff"])
def test_rfc_padding_content_is_arbitrary(pad: bytes) -> None:
    msg = build_message(0x0001, TX, [(0x8022, b"abcde")], with_fingerprint=True, pad=pad)
    assert parse_rfc_binding_request(msg) == TX


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"", "ErrNotSTUN"),
        (b"\x00" * 19, "ErrNotSTUN"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "ErrNotSTUN"),
        (build_message(0x0001, TX, [])[:4] + b"\x00" * 4 + TX, "ErrNotSTUN"),
        (build_message(0x0011, TX, []), "ErrNotBindingRequest"),
        (build_message(0x0101, TX, []), "ErrNotBindingRequest"),
        (build_message(0x0003, TX, []), "ErrNotBindingRequest"),  # TURN Allocate
        (build_message(0x0001, TX, []) + b"\x00" * 4, "ErrBadLength"),
        (build_message(0x0001, TX, [(0x8022, b"abcd")])[:-4], "ErrBadLength"),
        (
            b"\x00\x01\x00\x06" + MAGIC_COOKIE + TX + b"\x80\x22\x00\x02ab",
            "ErrBadLength",
        ),
        (
            b"\x00\x01\x00\x04" + MAGIC_COOKIE + TX + b"\x80\x22\x00\x08",
            "ErrMalformedAttrs",
        ),
        (
            build_message(0x0001, TX, [(0x8028, b"\x00\x00\x00\x00"), (0x8022, b"ab")]),
            "ErrMalformedAttrs",
        ),
        (build_message(0x0001, TX, [(0x8028, b"\x00\x00")]), "ErrMalformedAttrs"),
        (build_message(0x0001, TX, [(0x0019, b"\x11\x00\x00\x00")]), "ErrUnknownAttribute"),
        (build_message(0x0001, TX, [(0x0003, b"\x00\x00\x00\x06")]), "ErrUnknownAttribute"),
        (build_message(0x0001, TX, [(0x0003, b"\x00\x00\x00\x02")]), "ErrUnknownAttribute"),
        (build_message(0x0001, TX, [(0x0027, b"\x12\x34\x00\x00")]), "ErrUnknownAttribute"),
    ],
)
def test_rfc_garbage_refused(data: bytes, err: str) -> None:
    with pytest.raises(StunError) as ei:
        parse_rfc_binding_request(data)
    assert ei.value.name == err


def test_rfc3489_classic_request_refused() -> None:
    data = by_name("debian-stun-client-0.97-request")
    with pytest.raises(StunError) as ei:
        parse_rfc_binding_request(data)
    assert ei.value.name == "ErrNotSTUN"


def test_fingerprint_helper() -> None:
    req = build_request(bytes(12))
    assert struct.pack("!I", fingerprint(req[:32])) == req[36:]


# --- builders/parsers the asyncio client needs -----------------------------------------------


def test_build_plain_request_is_a_bare_rfc_request() -> None:
    from derpkit.stun.codec import build_plain_request

    bare = build_plain_request(TX)
    assert bare == b"\x00\x01\x00\x00" + MAGIC_COOKIE + TX
    assert parse_rfc_binding_request(bare) == TX
    with pytest.raises(StunError, match="ErrWrongSoftware"):
        parse_binding_request(bare)  # Go derper's parser refuses it
    odd = build_plain_request(TX, [(0x8022, b"abc")], with_fingerprint=True)
    assert len(odd) == 20 + 8 + 8 and odd[27] == 0  # value padded to 4 bytes
    assert parse_rfc_binding_request(odd) == TX  # FINGERPRINT last and correct


def test_parse_attrs_and_error_code() -> None:
    from derpkit.stun.codec import (
        ATTR_ERROR_CODE,
        ATTR_XOR_MAPPED_ADDRESS,
        decode_address,
        decode_error_code,
        parse_attrs,
    )

    resp = build_response(TX, "192.0.2.9", 1234) + b"junk after the message"
    ((atype, value),) = parse_attrs(resp)
    assert atype == ATTR_XOR_MAPPED_ADDRESS
    assert decode_address(value, TX, xor=True) == (ipaddress.ip_address("192.0.2.9"), 1234)
    assert decode_error_code(b"\x00\x00\x04\x14Unknown Attribute") == (420, "Unknown Attribute")
    assert ATTR_ERROR_CODE == 0x0009
    with pytest.raises(StunError, match="ErrNotSTUN"):
        parse_attrs(b"hello")
    with pytest.raises(StunError, match="ErrMalformedAttrs"):
        parse_attrs(resp[:2] + b"\x01\x00" + resp[4:32])
