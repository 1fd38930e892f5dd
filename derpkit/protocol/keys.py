"""Node keys and mesh keys, with the text forms operators see in logs, files and JSON.

A DERP address is a Curve25519 public key. Tailscale writes it as ``nodekey:<64 hex>``,
private keys as ``privkey:<64 hex>``, and the mesh pre-shared key as bare hex.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult_base

from .constants import KEY_LEN

NODE_PUBLIC_PREFIX = "nodekey:"
NODE_PRIVATE_PREFIX = "privkey:"


class KeyError_(ValueError):
    """A key could not be parsed; the message says which form was expected."""


def _parse_hex32(text: str, what: str) -> bytes:
    if len(text) != 2 * KEY_LEN:
        raise KeyError_(f"{what}: want {2 * KEY_LEN} hex digits, got {len(text)} characters")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise KeyError_(f"{what}: not hexadecimal: {text!r}") from None


def clamp(raw: bytes) -> bytes:
    """Clamp an X25519 scalar the way WireGuard and Tailscale store fresh keys."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


@dataclass(frozen=True, slots=True)
class NodePublic:
    """A 32-byte public key: the address of a DERP client or server."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyError_(f"public key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> NodePublic:
        """Accept ``nodekey:<hex>`` or bare hex (the Derp-Public-Key header form)."""
        text = text.strip()
        if text.startswith(NODE_PUBLIC_PREFIX):
            text = text[len(NODE_PUBLIC_PREFIX) :]
        return cls(_parse_hex32(text, "node public key"))

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def hex(self) -> str:
        return self.raw.hex()

    def __str__(self) -> str:
        return NODE_PUBLIC_PREFIX + self.raw.hex()

    def short(self) -> str:
        """The bracketed 5-character form derper logs use."""
        return "[" + base64.b64encode(self.raw).decode()[:5] + "]"


@dataclass(frozen=True, slots=True)
class NodePrivate:
    """A 32-byte Curve25519 private key (clients, servers and mesh links all use this)."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyError_(f"private key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def generate(cls) -> NodePrivate:
        return cls(clamp(os.urandom(KEY_LEN)))

    @classmethod
    def parse(cls, text: str) -> NodePrivate:
        text = text.strip()
        if not text.startswith(NODE_PRIVATE_PREFIX):
            raise KeyError_(f"private key must start with {NODE_PRIVATE_PREFIX!r}")
        return cls(_parse_hex32(text[len(NODE_PRIVATE_PREFIX) :], "node private key"))

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def public(self) -> NodePublic:
        return NodePublic(crypto_scalarmult_base(self.raw))

    def __str__(self) -> str:
        return NODE_PRIVATE_PREFIX + self.raw.hex()

    def __repr__(self) -> str:  # never print secrets by accident
        return f"NodePrivate(public={self.public()})"


@dataclass(frozen=True, slots=True)
class MeshKey:
    """The mesh pre-shared key: 32 bytes, written as 64 hex digits."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) != KEY_LEN:
            raise KeyError_(f"mesh key must be {KEY_LEN} bytes, got {len(self.raw)}")

    @classmethod
    def parse(cls, text: str) -> MeshKey:
        """Parse the key file / env form: surrounding whitespace trimmed, either hex case."""
        return cls(_parse_hex32(text.strip(), "invalid mesh key"))

    @classmethod
    def generate(cls) -> MeshKey:
        return cls(os.urandom(KEY_LEN))

    def is_zero(self) -> bool:
        return self.raw == bytes(KEY_LEN)

    def matches(self, other: MeshKey | None) -> bool:
        """Constant-time comparison; a zero or absent key never matches."""
        if other is None or other.is_zero() or self.is_zero():
            return False
        return hmac.compare_digest(self.raw, other.raw)

    def hex(self) -> str:
        return self.raw.hex()

    def __repr__(self) -> str:
        return "MeshKey(<redacted>)"
