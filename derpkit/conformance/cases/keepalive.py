"""keepalive/: the server keeps idle connections open and sends KeepAlive frames."""

from __future__ import annotations

import asyncio
import time

from derpkit.protocol.frames import KeepAlive, RecvPacket

from ..context import CaseContext
from ..registry import Fail, Info, Level, Need, case
from ._util import plain

S = "derp-protocol §5.10"


@case("keepalive/1", "An idle connection stays open and usable", level=Level.MUST, section="derp-protocol §5.1",
      quote="Read timeout on clients | none after the handshake")
async def idle(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    await asyncio.sleep(2.0)
    if a.closed or b.closed:
        raise Fail("an idle connection was closed within 2 s")
    data = plain(10)
    a.send(b.key, data)
    await b.expect(RecvPacket, where=lambda p: p.data == data, what="a packet after 2 s idle")
    return "2 s idle, then a packet went through"


@case("keepalive/2", "When the first KeepAlive arrives", level=Level.INFORMATIONAL, section=S,
      quote="each connection's writer sends a KeepAlive (06 00 00 00 00) every 60 s + J, where J is random in [0, 5 s)",
      needs=[Need.LONG], timeout=80.0)
async def cadence(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    t0 = time.monotonic()
    try:
        await a.expect(KeepAlive, timeout=70.0, what="KeepAlive")
    except Fail as e:
        raise Info(f"{e.reason} (derper: 60-65 s)") from None
    took = time.monotonic() - t0
    raise Info(f"first KeepAlive after {took:.1f} s (derper: 60-65 s)")


@case("keepalive/3", "No KeepAlive storm on a fresh connection", level=Level.SHOULD, section=S,
      quote="the first one arrives 60–65 s after the writer starts")
async def no_storm(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    evs = [e for e in await a.collect(1.5) if isinstance(e, KeepAlive)]
    if len(evs) > 1:
        raise Fail(f"{len(evs)} KeepAlives within 1.5 s of connecting")
    return "at most one KeepAlive in the first 1.5 s"
