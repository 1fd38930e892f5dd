"""scapy's STUN layer (``scapy.contrib.stun``), extended with what Tailscale's STUN uses.

scapy ships STUN (RFC 8489) with XOR-MAPPED-ADDRESS, MAPPED-ADDRESS and FINGERPRINT but
no SOFTWARE attribute, no 0x8020 (the pre-RFC XOR-MAPPED-ADDRESS some servers still send)
and no FINGERPRINT computation. This module registers SOFTWARE and 0x8020 in scapy's own
attribute table (so dissection picks them up too) and adds ``finish()``, which fills in
the FINGERPRINT the way STUN defines it: CRC-32 of everything before it, xor 0x5354554E.
"""

from __future__ import annotations

import os
import zlib

from scapy.contrib import stun as _scapy_stun
from scapy.contrib.stun import (
    STUN,
    STUNFingerprint,
    STUNGenericTlv,
    STUNMappedAddress,
    STUNXorMappedAddress,
)
from scapy.fields import FieldLenField, PadField, StrLenField, XShortField

FINGERPRINT_XOR = 0x5354554E
TAILSCALE_SOFTWARE = b"tailnode"


class STUNSoftware(STUNGenericTlv):
    name = "STUN Software"
    fields_desc = [
        XShortField("type", 0x8022),
        FieldLenField("length", None, length_of="software"),
        PadField(StrLenField("software", b"", length_from=lambda pkt: pkt.length), align=4),
    ]


class STUNXorMappedAddressOld(STUNXorMappedAddress):
    """XOR-MAPPED-ADDRESS under its pre-RFC number 0x8020 (Tailscale's parser accepts it)."""

    name = "STUN XOR Mapped Address (0x8020)"
    fields_desc = [XShortField("type", 0x8020), *STUNXorMappedAddress.fields_desc[1:]]


_scapy_stun._stun_tlv_class.setdefault(0x8022, STUNSoftware)
_scapy_stun._stun_tlv_class.setdefault(0x8020, STUNXorMappedAddressOld)


def finish(pkt: STUN) -> bytes:
    """The datagram of ``pkt`` with its FINGERPRINT (if it has one, last) filled in."""
    raw = bytearray(bytes(pkt))
    if pkt.attributes and isinstance(pkt.attributes[-1], STUNFingerprint) and pkt.attributes[-1].crc_32 is None:
        crc = (zlib.crc32(bytes(raw[:-8])) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
        raw[-4:] = crc.to_bytes(4, "big")
    return bytes(raw)


def tailscale_binding_request(txid: bytes | None = None, *, software: bytes = TAILSCALE_SOFTWARE,
                              fingerprint: bool = True) -> STUN:
    """Tailscale's 40-byte Binding request (SOFTWARE then FINGERPRINT), as a scapy packet.

    Change ``software`` or drop the fingerprint to craft the requests a Tailscale server
    must ignore; ``finish()`` turns it into bytes.
    """
    txid = txid or os.urandom(12)
    attrs: list[STUNGenericTlv] = [STUNSoftware(software=software)]
    if fingerprint:
        attrs.append(STUNFingerprint(crc_32=None))
    return STUN(stun_message_type="Binding request", transaction_id=int.from_bytes(txid, "big"), attributes=attrs)


__all__ = [
    "STUN", "STUNFingerprint", "STUNMappedAddress", "STUNSoftware", "STUNXorMappedAddress",
    "STUNXorMappedAddressOld", "finish", "tailscale_binding_request",
]
