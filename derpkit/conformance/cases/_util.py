"""Small things several areas need: packets of a given shape, names, a server's key."""

from __future__ import annotations

import os

from derpkit.protocol.constants import DISCO_MAGIC, DISCO_MIN_LEN, KEY_LEN, FrameType
from derpkit.protocol.keys import NodePrivate, NodePublic

from ..context import CaseContext
from ..registry import Fail


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


def short(b: bytes, n: int = 8) -> str:
    return b[:n].hex() + ("…" if len(b) > n else "")


def must_equal(what: str, got: object, want: object) -> None:
    if got != want:
        raise Fail(f"{what} is {got!r}, want {want!r}")


__all__ = ["KEY_LEN", "disco", "ftype_name", "must_equal", "plain", "server_key", "short", "stranger"]
