"""Small things several areas need: packets of a given shape, names, a server's key."""

from __future__ import annotations

import os

from derpkit.protocol.constants import DISCO_MAGIC, DISCO_MIN_LEN, FrameType
from derpkit.protocol.keys import NodePrivate, NodePublic

from ..context import CaseContext


def disco(n: int = DISCO_MIN_LEN) -> bytes:
    """A packet the server classifies as disco (magic + at least 62 bytes)."""
    return DISCO_MAGIC + os.urandom(max(n, DISCO_MIN_LEN) - len(DISCO_MAGIC))


def plain(n: int = 40) -> bytes:
    """A packet that is not disco (does not start with the magic)."""
    return b"\x00" + os.urandom(max(n, 1) - 1)


def stranger() -> NodePublic:
    """A key no server has seen."""
    return NodePrivate.generate().public()


def ftype_name(t: int) -> str:
    try:
        return FrameType(t).name
    except ValueError:
        return f"0x{t:02x}"


async def server_key(ctx: CaseContext) -> NodePublic:
    """The server's key, from an ordinary upgrade (for the fast-start cases)."""
    raw = await ctx.raw("keyfetch")
    try:
        return await raw.upgrade()
    finally:
        raw.close()


__all__ = ["disco", "ftype_name", "plain", "server_key", "stranger"]
