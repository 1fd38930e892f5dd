"""peer-gone/: PeerGone(Disconnected) to past receivers, PeerGone(NotHere) to senders."""

from __future__ import annotations

from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerGoneReason
from derpkit.protocol.frames import PeerGone, RecvPacket
from derpkit.protocol.keys import NodePrivate

from ..context import CaseContext
from ..registry import Fail, Info, Level, case
from ._util import disco, plain, stranger

S57 = "derp-protocol §5.7"


@case("peer-gone/1", "A receiver hears PeerGone(Disconnected) when its sender leaves", level=Level.MUST, section=S57,
      quote="When S becomes unreachable in the whole region, every subscribed connection gets PeerGone(S, 0x00)")
async def disconnected(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send(b.key, plain(20))
    await b.expect(RecvPacket, what="A's packet")
    a.close()
    g = await b.expect(PeerGone, where=lambda g: g.key == a.key.raw, what="PeerGone for A")
    if g.reason != PeerGoneReason.DISCONNECTED:
        raise Fail(f"PeerGone reason is 0x{g.reason:02x}, want 0x00 (Disconnected)")
    return "PeerGone(A, Disconnected)"


@case("peer-gone/2", "A disco packet to an unknown key gets PeerGone(NotHere)", level=Level.MUST, section=S57,
      quote="Sent when a SendPacket … is dropped as unknown_dest … and the packet looks like disco … PeerGone(D, 0x01)")
async def not_here(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    d = stranger()
    a.send(d, disco())
    g = await a.expect(PeerGone, what="PeerGone(NotHere)")
    if g.key != d.raw:
        raise Fail("PeerGone names a different key than the destination")
    if g.reason != PeerGoneReason.NOT_HERE:
        raise Fail(f"PeerGone reason is 0x{g.reason:02x}, want 0x01 (NotHere)")
    return "PeerGone(D, NotHere)"


@case("peer-gone/3", "A non-disco packet to an unknown key gets no PeerGone", level=Level.MUST, section=S57,
      quote="Non-disco packets never produce NotHere.")
async def no_not_here(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send(stranger(), plain(80))
    await ctx.quiet(a, "no PeerGone for a non-disco packet")
    return "no PeerGone"


@case("peer-gone/4", "NotHere is rate-limited to a burst of 3", level=Level.SHOULD, section=S57,
      quote="a token bucket of 1 per second with a burst of 3. In the test, 6 rapid disco sends to an unknown key produce exactly 3 NotHere frames.")
async def not_here_limit(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    d = stranger()
    a.send_raw(b"".join(F.encode_send_packet(d.raw, disco()) for _ in range(6)))
    evs = await a.collect(0.6)
    n = sum(isinstance(e, PeerGone) and e.reason == PeerGoneReason.NOT_HERE for e in evs)
    if n != 3:
        raise Fail(f"6 rapid disco sends gave {n} NotHere frames, want exactly 3")
    return "6 sends, 3 NotHere"


@case("peer-gone/5", "PeerGone goes only to those who received from the leaver", level=Level.MUST, section=S57,
      quote="This goes only to connections that received from S, not to connections that sent to S.")
async def only_receivers(ctx: CaseContext) -> str:
    c0 = await ctx.conn("c0")
    c1 = await ctx.conn("c1")
    c2 = await ctx.conn("c2")
    c0.send(c1.key, plain(10))
    await c1.expect(RecvPacket, what="c0's packet")
    c1.send(c2.key, plain(10))
    await c2.expect(RecvPacket, what="c1's packet")
    c1.close()
    await c2.expect(PeerGone, where=lambda g: g.key == c1.key.raw, what="PeerGone for c1 at c2")
    await ctx.quiet(c0, "no PeerGone at c0 (it only sent to c1)")
    return "c2 (a receiver) heard it, c0 (a sender) did not"


@case("peer-gone/6", "PeerGone is 33 bytes: key and reason", level=Level.SHOULD, section="derp-protocol §3.8",
      quote="The Go server always sends 33 bytes (header 08 00 00 00 21).")
async def pg_len(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send(stranger(), disco())
    await a.expect(PeerGone, what="PeerGone(NotHere)")
    lens = [e["len"] for e in ctx.log.entries if e.get("conn") == "A" and e.get("type") == "PeerGone"]
    if lens != [33]:
        raise Fail(f"PeerGone payload length {lens}, want 33")
    return "33 bytes"


@case("peer-gone/7", "Losing one of two duplicate connections", level=Level.INFORMATIONAL, section=S57,
      quote="It is sent only for the last connection of a key: losing one duplicate does not trigger it.")
async def dup_leaves(ctx: CaseContext) -> str:
    key = NodePrivate.generate()
    d1 = await ctx.conn("dup1", key=key)
    d2 = await ctx.conn("dup2", key=key)
    b = await ctx.conn("B")
    d2.send(b.key, plain(10))
    await b.expect(RecvPacket, what="the duplicate's packet")
    d1.close()
    evs = [e for e in await b.collect(0.6) if isinstance(e, PeerGone)]
    raise Info("PeerGone after one duplicate left (derper sends none)" if evs else "no PeerGone while one duplicate remains (as derper)")
