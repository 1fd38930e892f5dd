"""Sans-IO STUN codec: the bytes Tailscale sends and accepts, plus a plain RFC 5389/8489 parser.

No sockets and no event loop live here, so the server, ``derpkit stunc`` and the prober share
one byte-exact implementation and tests can drive it with byte strings alone.

Two request parsers exist on purpose:

* :func:`parse_binding_request` mirrors Tailscale's own server-side check step by step
  (SOFTWARE ``tailnode`` + trailing FINGERPRINT, header length ignored). Its verdicts match the
  shared test vectors exactly, error name for error name.
* :func:`parse_rfc_binding_request` accepts any well-formed RFC 5389/8489 Binding request, so a
  derpkit server can also answer ordinary STUN tools (Go derper stays silent for them, which makes
  operators believe the port is blocked).

The wire contract these functions implement is ``shared/spec/stun.md``.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ATTR_CHANGE_REQUEST",
    "ATTR_ERROR_CODE",
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_MESSAGE_INTEGRITY",
    "ATTR_MESSAGE_INTEGRITY_SHA256",
    "ATTR_OTHER_ADDRESS",
    "ATTR_PADDING",
    "ATTR_RESPONSE_ORIGIN",
    "ATTR_RESPONSE_PORT",
    "ATTR_SOFTWARE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "BINDING_ERROR",
    "BINDING_REQUEST",
    "BINDING_SUCCESS",
    "CHANGE_IP",
    "CHANGE_PORT",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "REQUEST_LEN",
    "SOFTWARE",
    "RFC_UNDERSTOOD_REQUIRED_ATTRS",
    "StunError",
    "RfcRequest",
    "StunResponse",
    "build_plain_request",
    "build_request",
    "build_response",
    "build_rfc5780_response",
    "change_request",
    "decode_address",
    "decode_error_code",
    "encode_address",
    "fingerprint",
    "is_stun",
    "new_txid",
    "parse_attrs",
    "parse_binding_request",
    "parse_response",
    "parse_rfc_binding_request",
    "parse_rfc_request",
]

# --- wire constants (one comment each) -------------------------------------------------------

HEADER_LEN: Final = 20  # type(2) length(2) cookie(4) transaction id(12)
TXID_LEN: Final = 12  # RFC 5389 transaction id length
MAGIC_COOKIE: Final = b"\x21\x12\xa4\x42"  # RFC 5389 magic cookie, fixed on every message
_COOKIE_PORT_XOR: Final = 0x2112  # top 16 bits of the cookie, xored into the port
BINDING_REQUEST: Final = b"\x00\x01"  # Binding method, request class
BINDING_INDICATION: Final = b"\x00\x11"  # Binding method, indication class
BINDING_SUCCESS: Final = b"\x01\x01"  # Binding method, success-response class
BINDING_ERROR: Final = b"\x01\x11"  # Binding method, error-response class (never sent by us)
SOFTWARE: Final = b"tailnode"  # the SOFTWARE value every Tailscale client sends
FINGERPRINT_XOR: Final = 0x5354554E  # "STUN", xored into the CRC-32 (RFC 5389 §15.5)
FINGERPRINT_ATTR_LEN: Final = 8  # FINGERPRINT header (4) + CRC (4)
REQUEST_LEN: Final = 40  # Tailscale's request: header + SOFTWARE(4+8) + FINGERPRINT(4+4)

ATTR_MAPPED_ADDRESS: Final = 0x0001  # plain address (fallback only)
ATTR_CHANGE_REQUEST: Final = 0x0003  # RFC 5780 "answer from another address/port"
ATTR_USERNAME: Final = 0x0006  # short/long-term credential user name
ATTR_ERROR_CODE: Final = 0x0009  # class/number/reason of an error response
ATTR_MESSAGE_INTEGRITY: Final = 0x0008  # HMAC-SHA1 over the message
ATTR_REALM: Final = 0x0014  # long-term credential realm
ATTR_NONCE: Final = 0x0015  # long-term credential nonce
ATTR_MESSAGE_INTEGRITY_SHA256: Final = 0x001C  # RFC 8489 HMAC-SHA256
ATTR_PASSWORD_ALGORITHM: Final = 0x001D  # RFC 8489
ATTR_USERHASH: Final = 0x001E  # RFC 8489
ATTR_XOR_MAPPED_ADDRESS: Final = 0x0020  # the standard mapped address
ATTR_PADDING: Final = 0x0026  # RFC 5780: filler to test fragmentation (content ignored)
ATTR_RESPONSE_PORT: Final = 0x0027  # RFC 5780: "send the response to this port instead"
ATTR_PRIORITY: Final = 0x0024  # ICE (RFC 8445) candidate priority
ATTR_USE_CANDIDATE: Final = 0x0025  # ICE nomination flag
ATTR_XOR_MAPPED_ADDRESS_ALT: Final = 0x8020  # pre-RFC draft number some old servers still send
ATTR_SOFTWARE: Final = 0x8022  # free-text agent name
ATTR_FINGERPRINT: Final = 0x8028  # CRC-32 xor "STUN"; must be the last attribute
ATTR_RESPONSE_ORIGIN: Final = 0x802B  # RFC 5780: the address the server answered from
ATTR_OTHER_ADDRESS: Final = 0x802C  # RFC 5780: the server's alternate IP:port

CHANGE_IP: Final = 0x04  # CHANGE-REQUEST flag: answer from the other IP address
CHANGE_PORT: Final = 0x02  # CHANGE-REQUEST flag: answer from the other port

FAMILY_IPV4: Final = 0x01  # address family byte for IPv4
FAMILY_IPV6: Final = 0x02  # address family byte for IPv6

#: Comprehension-required attributes (0x0000-0x7FFF) that :func:`parse_rfc_binding_request`
#: accepts in a Binding request. They are all safe to ignore for an unauthenticated server that
#: only reports the source address: credentials we do not check (we have none to check) and ICE
#: connectivity-check fields. CHANGE-REQUEST is handled separately: accepted only when it asks
#: for no change. Anything else comprehension-required makes the request unanswerable (an RFC
#: server would send 420 Unknown Attribute; we never send error responses, so we stay silent).
RFC_UNDERSTOOD_REQUIRED_ATTRS: Final = frozenset(
    {
        ATTR_USERNAME,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_REALM,
        ATTR_NONCE,
        ATTR_MESSAGE_INTEGRITY_SHA256,
        ATTR_PASSWORD_ALGORITHM,
        ATTR_USERHASH,
        ATTR_PRIORITY,
        ATTR_USE_CANDIDATE,
    }
)

_HEADER = struct.Struct("!2sH4s12s")
_ATTR_HDR = struct.Struct("!HH")
_U32 = struct.Struct("!I")


class StunError(ValueError):
    """A datagram was rejected.

    ``name`` is a stable label: for the Tailscale-compatible parsers it is exactly the Go error
    variable name (``ErrNotSTUN``, ``ErrNotSuccessResponse``, ``ErrMalformedAttrs``,
    ``ErrNotBindingRequest``, ``ErrWrongSoftware``, ``ErrNoFingerprint``,
    ``ErrWrongFingerprint``) so tests and metrics map one-to-one to Tailscale's behaviour. The
    RFC parser adds ``ErrBadLength`` and ``ErrUnknownAttribute``. ``txid`` is set when the
    failing parser had already read a transaction id (Go returns it alongside
    ``ErrNotSuccessResponse``), else ``None``.
    """

    def __init__(self, name: str, detail: str = "", txid: bytes | None = None) -> None:
        self.name = name
        self.detail = detail
        self.txid = txid
        super().__init__(f"{name}: {detail}" if detail else name)


@dataclass(frozen=True, slots=True)
class StunResponse:
    """A decoded Binding success response.

    ``ip`` is an :mod:`ipaddress` object, already unmapped (``::ffff:a.b.c.d`` becomes IPv4).
    ``addr_attr`` is the attribute type that supplied it (0x0020, 0x8020 or 0x0001), which a
    diagnostics tool can report ("this server only sends legacy MAPPED-ADDRESS").
    """

    txid: bytes
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    addr_attr: int


# --- helpers ---------------------------------------------------------------------------------


def new_txid() -> bytes:
    """A fresh 12-byte transaction id from the OS CSPRNG (unguessable ids stop spoofed replies)."""
    return os.urandom(TXID_LEN)


def fingerprint(data: bytes | bytearray | memoryview) -> int:
    """FINGERPRINT value for ``data`` (every byte before the FINGERPRINT attribute)."""
    return (zlib.crc32(data) ^ FINGERPRINT_XOR) & 0xFFFFFFFF


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """Cheap demultiplexing test: 20+ bytes, top two bits zero, magic cookie at bytes 4-7.

    Nothing else is checked (not the length field), exactly like Tailscale's ``Is``.
    """
    return len(data) >= HEADER_LEN and data[0] & 0xC0 == 0 and bytes(data[4:8]) == MAGIC_COOKIE


def _walk_attrs(body: bytes) -> list[tuple[int, bytes]]:
    """Split ``body`` into (type, unpadded value) pairs.

    Every attribute, including the last, must have its padding present: a value whose padded
    length runs past the end is ``ErrMalformedAttrs``, as is a dangling partial header.
    """
    attrs: list[tuple[int, bytes]] = []
    off, end = 0, len(body)
    while off < end:
        if end - off < 4:
            raise StunError("ErrMalformedAttrs", "truncated attribute header")
        atype, alen = _ATTR_HDR.unpack_from(body, off)
        off += 4
        padded = (alen + 3) & ~3
        if padded > end - off:
            raise StunError("ErrMalformedAttrs", f"attribute 0x{atype:04x} overruns the message")
        attrs.append((atype, body[off : off + alen]))
        off += padded
    return attrs


def _family_len(family: int) -> int:
    return {FAMILY_IPV4: 4, FAMILY_IPV6: 16}.get(family, 0)


def _decode_address(
    value: bytes, txid: bytes, xor: bool
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode a (XOR-)MAPPED-ADDRESS value; extra value bytes are ignored like Go does."""
    if len(value) < 4:
        raise StunError("ErrMalformedAttrs", "address attribute shorter than 4 bytes")
    family = value[1]
    alen = _family_len(family)
    if alen == 0:
        raise StunError("ErrMalformedAttrs", f"unknown address family {family}")
    if len(value) - 4 < alen:
        raise StunError("ErrMalformedAttrs", "address attribute too short for its family")
    port = int.from_bytes(value[2:4], "big")
    raw = value[4 : 4 + alen]
    if xor:
        port ^= _COOKIE_PORT_XOR
        key = MAGIC_COOKIE + txid
        raw = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, port


def decode_address(
    value: bytes, txid: bytes, *, xor: bool
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode one address attribute value (MAPPED-ADDRESS layout), unmapping IPv4-in-IPv6.

    ``xor=True`` for XOR-MAPPED-ADDRESS (0x0020/0x8020); ``xor=False`` for MAPPED-ADDRESS and
    the RFC 5780 RESPONSE-ORIGIN/OTHER-ADDRESS, which a NAT-discovery client reads from
    :func:`parse_attrs` output. Raises ``ErrMalformedAttrs`` like :func:`parse_response`.
    """
    return _decode_address(value, txid, xor)


def decode_error_code(value: bytes) -> tuple[int, str]:
    """ERROR-CODE value -> (code, reason), e.g. ``(420, "Unknown Attribute")``.

    Tailscale servers never send error responses, but RFC servers do (420 for a CHANGE-REQUEST
    they do not support), and a client should say so instead of reporting garbage.
    """
    if len(value) < 4:
        raise StunError("ErrMalformedAttrs", "ERROR-CODE shorter than 4 bytes")
    code = (value[2] & 0x07) * 100 + value[3]
    return code, value[4:].decode("utf-8", "replace")


# --- builders --------------------------------------------------------------------------------


def build_request(txid: bytes | None = None) -> bytes:
    """Tailscale's exact 40-byte Binding request: SOFTWARE ``tailnode`` then FINGERPRINT.

    The attribute order is fixed because Tailscale's kernel (XDP) responder matches the
    SOFTWARE attribute at a fixed offset. ``txid`` defaults to a fresh random id.
    """
    if txid is None:
        txid = new_txid()
    if len(txid) != TXID_LEN:
        raise ValueError(f"transaction id must be {TXID_LEN} bytes, got {len(txid)}")
    head = (
        _HEADER.pack(BINDING_REQUEST, REQUEST_LEN - HEADER_LEN, MAGIC_COOKIE, txid)
        + _ATTR_HDR.pack(ATTR_SOFTWARE, len(SOFTWARE))
        + SOFTWARE
    )
    return head + _ATTR_HDR.pack(ATTR_FINGERPRINT, 4) + _U32.pack(fingerprint(head))


def build_plain_request(
    txid: bytes | None = None,
    attrs: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]] = (),
    *,
    with_fingerprint: bool = False,
) -> bytes:
    """An RFC 5389/8489 Binding request with ``attrs`` (padded with zeros), not Tailscale's.

    With no attributes it is the bare 20-byte header that generic STUN tools send; Go derper and
    ``derpkit serve`` (unless ``-stun-strict=false``) ignore it. RFC 5780 NAT discovery adds CHANGE-REQUEST here.
    ``with_fingerprint`` appends a FINGERPRINT, which some servers require.
    """
    if txid is None:
        txid = new_txid()
    if len(txid) != TXID_LEN:
        raise ValueError(f"transaction id must be {TXID_LEN} bytes, got {len(txid)}")
    body = b"".join(
        _ATTR_HDR.pack(atype, len(value)) + value + b"\x00" * (-len(value) % 4)
        for atype, value in attrs
    )
    if not with_fingerprint:
        return _HEADER.pack(BINDING_REQUEST, len(body), MAGIC_COOKIE, txid) + body
    head = _HEADER.pack(BINDING_REQUEST, len(body) + FINGERPRINT_ATTR_LEN, MAGIC_COOKIE, txid)
    head += body
    return head + _ATTR_HDR.pack(ATTR_FINGERPRINT, 4) + _U32.pack(fingerprint(head))


def build_response(
    txid: bytes,
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    *,
    unmap: bool = True,
) -> bytes:
    """A Binding success response carrying only XOR-MAPPED-ADDRESS, as Tailscale servers send.

    IPv4-mapped IPv6 sources (what a dual-stack socket reports for IPv4 clients) are unmapped and
    answered with family 0x01, which is what the RFC intends. ``unmap=False`` reproduces Go
    derper's dual-stack quirk (family 0x02 ``::ffff:a.b.c.d``) for conformance tests only.
    A zone (``fe80::1%eth0``) is dropped: it is local to the server and not on the wire.
    """
    if len(txid) != TXID_LEN:
        raise ValueError(f"transaction id must be {TXID_LEN} bytes, got {len(txid)}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if unmap and isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    raw = ip.packed
    family = FAMILY_IPV4 if len(raw) == 4 else FAMILY_IPV6
    key = MAGIC_COOKIE + txid
    xaddr = bytes(a ^ b for a, b in zip(raw, key, strict=False))
    value = struct.pack("!BBH", 0, family, port ^ _COOKIE_PORT_XOR) + xaddr
    attr = _ATTR_HDR.pack(ATTR_XOR_MAPPED_ADDRESS, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(attr), MAGIC_COOKIE, txid) + attr


def encode_address(
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    txid: bytes | None = None,
) -> bytes:
    """An address attribute value; XOR-encoded with ``txid`` (XOR-MAPPED-ADDRESS) when given.

    Plain (``txid=None``) is the layout of MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS.
    IPv4-mapped IPv6 is unmapped first, as everywhere in this codec.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    raw = ip.packed
    family = FAMILY_IPV4 if len(raw) == 4 else FAMILY_IPV6
    if txid is not None:
        raw = bytes(a ^ b for a, b in zip(raw, MAGIC_COOKIE + txid, strict=False))
        port ^= _COOKIE_PORT_XOR
    return struct.pack("!BBH", 0, family, port) + raw


def change_request(*, change_ip: bool = False, change_port: bool = False) -> tuple[int, bytes]:
    """The CHANGE-REQUEST attribute as a (type, value) pair for :func:`build_plain_request`."""
    flags = (CHANGE_IP if change_ip else 0) | (CHANGE_PORT if change_port else 0)
    return ATTR_CHANGE_REQUEST, _U32.pack(flags)


def build_rfc5780_response(
    txid: bytes,
    ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    *,
    response_origin: tuple[str, int],
    other_address: tuple[str, int],
) -> bytes:
    """A Binding success response as an RFC 5780 server sends it to an RFC-shaped request.

    XOR-MAPPED-ADDRESS, then MAPPED-ADDRESS (RFC 3489-era clients such as coturn's tools read
    either), RESPONSE-ORIGIN (the address this reply leaves from) and OTHER-ADDRESS (the
    alternate IP and port a client may ask for with CHANGE-REQUEST).
    """
    if len(txid) != TXID_LEN:
        raise ValueError(f"transaction id must be {TXID_LEN} bytes, got {len(txid)}")
    body = b""
    for atype, value in (
        (ATTR_XOR_MAPPED_ADDRESS, encode_address(ip, port, txid)),
        (ATTR_MAPPED_ADDRESS, encode_address(ip, port)),
        (ATTR_RESPONSE_ORIGIN, encode_address(*response_origin)),
        (ATTR_OTHER_ADDRESS, encode_address(*other_address)),
    ):
        body += _ATTR_HDR.pack(atype, len(value)) + value
    return _HEADER.pack(BINDING_SUCCESS, len(body), MAGIC_COOKIE, txid) + body


# --- parsers ---------------------------------------------------------------------------------


def parse_response(data: bytes | bytearray | memoryview) -> StunResponse:
    """Decode a Binding success response the way Tailscale clients do (spec §4).

    XOR-MAPPED-ADDRESS (0x0020, or the old 0x8020) wins over MAPPED-ADDRESS whatever the order;
    among several of one kind the last wins. FINGERPRINT and MESSAGE-INTEGRITY are not checked.
    Bytes after the declared length are ignored. The caller must compare ``txid`` itself.
    """
    data = bytes(data)
    if not is_stun(data):
        raise StunError("ErrNotSTUN", "not a STUN message")
    txid = data[8:HEADER_LEN]
    if data[0:2] != BINDING_SUCCESS:
        raise StunError(
            "ErrNotSuccessResponse", f"message type 0x{data[0:2].hex()} is not 0x0101", txid
        )
    length = int.from_bytes(data[2:4], "big")
    body = data[HEADER_LEN:]
    if length > len(body):
        raise StunError("ErrMalformedAttrs", "header length exceeds the datagram")
    body = body[:length]
    xor_addr: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int] | None = None
    fallback: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int] | None = None
    for atype, value in _walk_attrs(body):
        if atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT):
            ip, port = _decode_address(value, txid, xor=True)
            xor_addr = (ip, port, atype)
        elif atype == ATTR_MAPPED_ADDRESS:
            ip, port = _decode_address(value, txid, xor=False)
            fallback = (ip, port, atype)
    chosen = xor_addr or fallback
    if chosen is None:
        raise StunError("ErrMalformedAttrs", "no (XOR-)MAPPED-ADDRESS attribute")
    return StunResponse(txid, chosen[0], chosen[1], chosen[2])


def parse_attrs(data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """Every attribute of any STUN message as (type, unpadded value), in wire order.

    The same framing rules as :func:`parse_response` (bytes after the declared length ignored,
    padding required), but any message class, so a client can hand callers the raw attributes
    (SOFTWARE, RESPONSE-ORIGIN, OTHER-ADDRESS, ERROR-CODE) the Tailscale parser skips.
    """
    data = bytes(data)
    if not is_stun(data):
        raise StunError("ErrNotSTUN", "not a STUN message")
    length = int.from_bytes(data[2:4], "big")
    if length > len(data) - HEADER_LEN:
        raise StunError("ErrMalformedAttrs", "header length exceeds the datagram")
    return _walk_attrs(data[HEADER_LEN : HEADER_LEN + length])


def parse_binding_request(data: bytes | bytearray | memoryview) -> bytes:
    """Tailscale's strict server-side check (spec §5); returns the transaction id.

    Deliberately quirky to stay byte-compatible with Go derper: the header length field is never
    consulted (attributes are walked over every byte after the header), SOFTWARE ``tailnode`` may
    sit anywhere, the datagram's last attribute must be FINGERPRINT, and the CRC covers the
    datagram minus its last 8 bytes.
    """
    data = bytes(data)
    if not is_stun(data):
        raise StunError("ErrNotSTUN", "not a STUN message")
    if data[0:2] != BINDING_REQUEST:
        raise StunError("ErrNotBindingRequest", f"message type 0x{data[0:2].hex()} is not 0x0001")
    txid = data[8:HEADER_LEN]
    software_ok = False
    last_attr = None
    got_fp = 0
    for atype, value in _walk_attrs(data[HEADER_LEN:]):
        last_attr = atype
        if atype == ATTR_SOFTWARE and value == SOFTWARE:
            software_ok = True
        if atype == ATTR_FINGERPRINT and len(value) == 4:
            # Go keeps the last 4-byte FINGERPRINT value seen; a later odd-length one does not
            # reset it. Mirror that so every verdict matches.
            got_fp = _U32.unpack(value)[0]
    if not software_ok:
        raise StunError("ErrWrongSoftware", 'no SOFTWARE attribute equal to "tailnode"')
    if last_attr != ATTR_FINGERPRINT:
        raise StunError("ErrNoFingerprint", "last attribute is not FINGERPRINT")
    if got_fp != fingerprint(data[: len(data) - FINGERPRINT_ATTR_LEN]):
        raise StunError("ErrWrongFingerprint", "FINGERPRINT does not match the CRC-32")
    return txid


@dataclass(frozen=True, slots=True)
class RfcRequest:
    """A well-formed RFC 5389/8489 Binding request and the RFC 5780 asks it carries.

    ``change_ip``/``change_port`` come from CHANGE-REQUEST, ``response_port`` from RESPONSE-PORT
    (``None`` when absent). Only an RFC 5780 server may honour them; any other server must not
    answer a request that asks for a change (see :func:`parse_rfc_binding_request`).
    """

    txid: bytes
    change_ip: bool = False
    change_port: bool = False
    response_port: int | None = None

    @property
    def asks_rfc5780(self) -> bool:
        """True when answering correctly needs an RFC 5780 server (a change or another port)."""
        return self.change_ip or self.change_port or self.response_port is not None


def parse_rfc_request(data: bytes | bytearray | memoryview) -> RfcRequest:
    """Accept any well-formed RFC 5389/8489 Binding request; return it with its RFC 5780 asks.

    Checks: magic cookie and top bits (RFC 3489 cookie-less requests are refused), type 0x0001,
    header length equal to the bytes after the header and a multiple of 4, every attribute
    padded and inside the message, FINGERPRINT (if present) last and correct.

    Attributes after MESSAGE-INTEGRITY(-SHA256) other than FINGERPRINT are ignored, as RFC 8489
    requires. Credentials are not verified: this server authenticates nobody and only reflects
    the source address, which the sender already knows. CHANGE-REQUEST must carry 4 bytes,
    RESPONSE-PORT at least 2; PADDING is ignored.

    Unknown comprehension-required attributes (outside :data:`RFC_UNDERSTOOD_REQUIRED_ATTRS`)
    raise ``ErrUnknownAttribute``: an RFC server would answer 420, but a Tailscale-style server
    never sends error responses, so the caller stays silent.
    """
    data = bytes(data)
    if not is_stun(data):
        raise StunError("ErrNotSTUN", "not a STUN message (missing magic cookie)")
    if data[0:2] != BINDING_REQUEST:
        raise StunError("ErrNotBindingRequest", f"message type 0x{data[0:2].hex()} is not 0x0001")
    txid = data[8:HEADER_LEN]
    length = int.from_bytes(data[2:4], "big")
    if length != len(data) - HEADER_LEN:
        raise StunError(
            "ErrBadLength",
            f"header length {length} but {len(data) - HEADER_LEN} bytes follow the header",
        )
    if length % 4:
        raise StunError("ErrBadLength", f"header length {length} is not a multiple of 4")
    attrs = _walk_attrs(data[HEADER_LEN:])
    protected = False  # seen MESSAGE-INTEGRITY: later attributes (bar FINGERPRINT) are ignored
    change = 0
    response_port: int | None = None
    offset = HEADER_LEN
    for i, (atype, value) in enumerate(attrs):
        if atype == ATTR_FINGERPRINT:
            if i != len(attrs) - 1:
                raise StunError("ErrMalformedAttrs", "FINGERPRINT is not the last attribute")
            if len(value) != 4:
                raise StunError("ErrMalformedAttrs", "FINGERPRINT value is not 4 bytes")
            if _U32.unpack(value)[0] != fingerprint(data[:offset]):
                raise StunError("ErrWrongFingerprint", "FINGERPRINT does not match the CRC-32")
        elif protected:
            pass
        elif atype in (ATTR_MESSAGE_INTEGRITY, ATTR_MESSAGE_INTEGRITY_SHA256):
            protected = True
        elif atype == ATTR_CHANGE_REQUEST:
            if len(value) != 4:
                raise StunError("ErrMalformedAttrs", "CHANGE-REQUEST value is not 4 bytes")
            change = _U32.unpack(value)[0]
        elif atype == ATTR_RESPONSE_PORT:
            if len(value) < 2:
                raise StunError("ErrMalformedAttrs", "RESPONSE-PORT value shorter than 2 bytes")
            response_port = int.from_bytes(value[:2], "big")
        elif atype == ATTR_PADDING:
            pass
        elif atype < 0x8000 and atype not in RFC_UNDERSTOOD_REQUIRED_ATTRS:
            raise StunError(
                "ErrUnknownAttribute", f"unknown comprehension-required attribute 0x{atype:04x}"
            )
        offset += 4 + ((len(value) + 3) & ~3)
    return RfcRequest(txid, bool(change & CHANGE_IP), bool(change & CHANGE_PORT), response_port)


def parse_rfc_binding_request(data: bytes | bytearray | memoryview) -> bytes:
    """:func:`parse_rfc_request` for a server *without* RFC 5780 support; the transaction id.

    A CHANGE-REQUEST asking for a different source IP or port, or a RESPONSE-PORT, is refused
    as ``ErrUnknownAttribute``: answering from the same address would mislead an RFC 5780
    NAT-behaviour test into "endpoint-independent filtering". A CHANGE-REQUEST with no flags
    set is harmless and accepted.
    """
    req = parse_rfc_request(data)
    if req.change_ip or req.change_port:
        raise StunError("ErrUnknownAttribute", "CHANGE-REQUEST asks for another address or port")
    if req.response_port is not None:
        raise StunError("ErrUnknownAttribute", "RESPONSE-PORT needs an RFC 5780 server")
    return req.txid
