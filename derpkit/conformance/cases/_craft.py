"""Malformed input, crafted with derpkit's scapy layers (derpkit.layers) rather than the core.

The protocol core's encoders refuse to write a wrong frame (a 65 537-byte packet, a 7-byte
Ping), which is right for clients and wrong for a conformance suite; scapy layers write
whatever they are told, including a length field that lies.
"""

from __future__ import annotations

from derpkit.layers import derp as L
from derpkit.layers import stun as S

__all__ = ["L", "S", "frame", "lying_header"]


def frame(ftype: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """A DERP frame of any type with any payload; ``length`` overrides the true length."""
    return bytes(L.DERPFrame(type=ftype, length=length) / L.Raw(payload)) if payload else bytes(L.DERPFrame(type=ftype, length=length))


def lying_header(ftype: int, length: int) -> bytes:
    """Only a 5-byte header announcing ``length`` bytes."""
    return bytes(L.DERPFrame(type=ftype, length=length))
