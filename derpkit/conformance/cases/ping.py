"""ping/: Ping from the client, Pong echo from the server, and the size limits."""

from __future__ import annotations

import os

from derpkit.protocol import frames as F
from derpkit.protocol.constants import FrameType
from derpkit.protocol.frames import Pong

from ..context import CaseContext
from ..registry import Fail, Info, Level, case
from ._craft import L, frame

S = "derp-protocol §5.11"


@case("ping/1", "A Ping is answered by a Pong with the same 8 bytes", level=Level.MUST, section="derp-protocol §3.13",
      quote="The receiver of a Ping answers with a Pong carrying the same 8 bytes.")
async def echo(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    rtt = await a.ping()
    return f"echoed in {rtt * 1000:.1f} ms"


@case("ping/2", "A 1000-byte Ping gets a Pong of its first 8 bytes", level=Level.SHOULD, section=S,
      quote="the length must be 8 … 1 000 … the first 8 bytes are the ping data, and the rest is read and discarded")
async def long_ping(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    data = os.urandom(1000)
    a.send_raw(bytes(L.DERPFrame() / L.DERPPing(data=data[:8], extra=data[8:])))
    p = await a.expect(Pong, what="Pong for a 1000-byte Ping")
    if p.data != data[:8]:
        raise Fail(f"Pong carries {p.data.hex()}, want the first 8 bytes {data[:8].hex()}")
    return "Pong of the first 8 bytes"


@case("ping/3", "A Ping shorter than 8 bytes closes the connection", level=Level.SHOULD, section=S,
      quote="the length must be 8 … 1 000, otherwise the connection is closed")
async def short_ping(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(frame(FrameType.PING, b"1234567"))
    await ctx.closes(a, "a 7-byte Ping")
    return "closed"


@case("ping/4", "A Ping over 1000 bytes closes the connection", level=Level.SHOULD, section=S,
      quote="Ping frame, as read by the server | 8 ≤ length ≤ 1 000 | server | Connection closed.")
async def huge_ping(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(bytes(L.DERPFrame() / L.DERPPing(data=os.urandom(8), extra=os.urandom(993))))
    await ctx.closes(a, "a 1001-byte Ping")
    return "closed"


@case("ping/5", "How many of 5 Pings in one write are answered", level=Level.INFORMATIONAL, section=S,
      quote="if a pong is already waiting, the new ping is silently ignored (\"pinging too fast\")")
async def flood(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    pings = [os.urandom(8) for _ in range(5)]
    a.send_raw(b"".join(F.Ping(p).encode() for p in pings))
    evs = await a.collect(0.5)
    echoed = [e.data for e in evs if isinstance(e, Pong)]
    if any(d not in pings for d in echoed):
        raise Fail("a Pong echoed bytes that no Ping carried")
    raise Info(f"{len(echoed)} of 5 pipelined Pings answered (derper: 2)")


@case("ping/6", "Pong is exactly 8 bytes", level=Level.SHOULD, section="derp-protocol §3.13",
      quote="Pong 13 00 00 00 08 01 02 03 04 05 06 07 08")
async def pong_len(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_frame(FrameType.PING, bytes(range(1, 9)))
    await a.expect(Pong, what="Pong")
    lens = [e["len"] for e in ctx.log.entries if e.get("conn") == "A" and e.get("type") == "Pong"]
    if lens[:1] != [8]:
        raise Fail(f"Pong payload is {lens[:1]} bytes, want 8")
    return "8 bytes"
