"""Sans-IO STUN codec shared by the STUN server, ``derpkit stunc`` and the prober.

See :mod:`derpkit.stun.codec` for the wire rules; everything public is re-exported here.
"""

from derpkit.stun.codec import (
    ATTR_FINGERPRINT,
    ATTR_MAPPED_ADDRESS,
    ATTR_SOFTWARE,
    ATTR_XOR_MAPPED_ADDRESS,
    ATTR_XOR_MAPPED_ADDRESS_ALT,
    HEADER_LEN,
    MAGIC_COOKIE,
    REQUEST_LEN,
    RFC_UNDERSTOOD_REQUIRED_ATTRS,
    SOFTWARE,
    StunError,
    StunResponse,
    build_request,
    build_response,
    fingerprint,
    is_stun,
    new_txid,
    parse_binding_request,
    parse_response,
    parse_rfc_binding_request,
)

__all__ = [
    "ATTR_FINGERPRINT",
    "ATTR_MAPPED_ADDRESS",
    "ATTR_SOFTWARE",
    "ATTR_XOR_MAPPED_ADDRESS",
    "ATTR_XOR_MAPPED_ADDRESS_ALT",
    "HEADER_LEN",
    "MAGIC_COOKIE",
    "REQUEST_LEN",
    "RFC_UNDERSTOOD_REQUIRED_ATTRS",
    "SOFTWARE",
    "StunError",
    "StunResponse",
    "build_request",
    "build_response",
    "fingerprint",
    "is_stun",
    "new_txid",
    "parse_binding_request",
    "parse_response",
    "parse_rfc_binding_request",
]
