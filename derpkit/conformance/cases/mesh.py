"""mesh/: WatchConns, ForwardPacket and ClosePeer, with and without the mesh key."""

from __future__ import annotations

import ipaddress

from derpkit.protocol import frames as F
from derpkit.protocol.constants import FrameType, PeerGoneReason, PeerPresentFlags
from derpkit.protocol.frames import PeerGone, PeerPresent, RecvPacket
from derpkit.protocol.handshake import ClientInfo
from derpkit.protocol.keys import MeshKey

from ..context import CaseContext
from ..registry import Fail, Level, Need, case
from ._craft import frame
from ._util import plain

S52 = "derp-protocol §5.2"
S515 = "derp-protocol §5.15"
MESH = [Need.MESH_KEY]


@case("mesh/1", "WatchConns without the mesh key closes the connection", level=Level.MUST, section="derp-protocol §3.11",
      quote="Length ≠ 0, or a sender without mesh privilege → the connection is closed.")
async def watch_no_key(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(F.WatchConns().encode())
    await ctx.closes(a, "WatchConns without the mesh key")
    return "closed"


@case("mesh/2", "ClosePeer without the mesh key closes the sender, not the target", level=Level.MUST, section="derp-protocol §5.16",
      quote="Only mesh-privileged connections may send it; anyone else is disconnected.")
async def closepeer_no_key(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send_raw(F.ClosePeer(b.key.raw).encode())
    await ctx.closes(a, "ClosePeer without the mesh key")
    if b.closed:
        raise Fail(f"the ClosePeer target was closed by an unprivileged client ({b.close_reason})")
    await b.ping()
    return "sender closed, target alive"


@case("mesh/3", "ForwardPacket without the mesh key closes and delivers nothing", level=Level.MUST, section="derp-protocol §6.4",
      quote="Reject the frame if the sender is not mesh-privileged (close).")
async def forward_no_key(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send_raw(F.ForwardPacket(a.key.raw, b.key.raw, b"forged").encode())
    closed = await a.wait_closed(ctx.target.patience)
    got = [e for e in await b.collect(ctx.target.quiet) if isinstance(e, RecvPacket)]
    if got:
        raise Fail("an unprivileged ForwardPacket was delivered")
    if not closed:
        raise Fail(f"sender still connected {ctx.target.patience:g} s after ForwardPacket without the key")
    return "sender closed, nothing delivered"


@case("mesh/4", "A wrong mesh key still connects as a regular client", level=Level.SHOULD, section="derp-protocol §12",
      quote="A wrong key still connects as a regular client.")
async def wrong_key(ctx: CaseContext) -> str:
    a = await ctx.conn("A", info=ClientInfo(mesh_key=MeshKey.generate(), can_ack_pings=True))
    await a.ping()
    return "admitted without mesh privilege"


@case("mesh/5", "WatchConns floods PeerPresent for present clients, the watcher included", level=Level.MUST, section=S515,
      quote="the server queues one PeerPresent for every key that currently has an active local connection. That includes the watcher itself",
      needs=MESH)
async def flood_self(ctx: CaseContext) -> str:
    b = await ctx.conn("B")
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    seen: set[bytes] = set()
    while not {w.key.raw, b.key.raw} <= seen:
        p = await w.expect(PeerPresent, what="PeerPresent for " + ("the watcher" if b.key.raw in seen else "B"))
        seen.add(p.key)
    return "PeerPresent for B and for the watcher itself"


@case("mesh/6", "A watcher sees PeerPresent then PeerGone for a client that comes and goes", level=Level.MUST, section=S515,
      quote="every registration of a local connection sends PeerPresent to all watchers … when a key's last local connection leaves, all watchers get PeerGone(key, 0x00)",
      needs=MESH)
async def present_then_gone(ctx: CaseContext) -> str:
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    await w.expect(PeerPresent, where=lambda p: p.key == w.key.raw, what="the watcher's own PeerPresent")
    c = await ctx.conn("C")
    await w.expect(PeerPresent, where=lambda p: p.key == c.key.raw, what="PeerPresent for C")
    c.close()
    g = await w.expect(PeerGone, where=lambda g: g.key == c.key.raw, what="PeerGone for C")
    if g.reason != PeerGoneReason.DISCONNECTED:
        raise Fail(f"PeerGone reason 0x{g.reason:02x}, want 0x00")
    return "PeerPresent(C), then PeerGone(C, Disconnected)"


async def _present_of_c(ctx: CaseContext) -> tuple[PeerPresent, tuple[str, int] | None]:
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    await w.expect(PeerPresent, where=lambda p: p.key == w.key.raw, what="the watcher's own PeerPresent")
    c = await ctx.conn("C")
    p = await w.expect(PeerPresent, where=lambda p: p.key == c.key.raw, what="PeerPresent for C")
    return p, c.local_addr


@case("mesh/7", "PeerPresent carries flags and marks a plain client IsRegular", level=Level.SHOULD, section="derp-protocol §3.9",
      quote="The current Go server always sends 51 bytes … ≥ 51: key + IP + port + flags; bytes after 51 ignored (future servers may send more) … IsRegular 0x01",
      needs=MESH)
async def present_fields(ctx: CaseContext) -> str:
    p, _ = await _present_of_c(ctx)
    lens = sorted({e["len"] for e in ctx.log.entries if e.get("conn") == "watcher" and e.get("type") == "PeerPresent"})
    if not lens or min(lens) < 51:
        raise Fail(f"PeerPresent payload lengths {lens}: under 51 bytes there are no flags")
    if p.flags != PeerPresentFlags.IS_REGULAR:
        raise Fail(f"flags 0x{p.flags:02x}, want 0x01 (IsRegular)")
    return f"{'/'.join(map(str, lens))} bytes, IsRegular" + (" (bytes after 51 are a newer server's extension)" if max(lens) > 51 else "")


@case("mesh/15", "PeerPresent carries the client's address as the server sees it", level=Level.SHOULD, section="derp-protocol §3.9",
      quote="IP: the client's remote address in 16-byte form. IPv4 is written IPv4-mapped … Port: big-endian uint16 remote port.",
      needs=MESH)
async def present_address(ctx: CaseContext) -> str:
    p, local = await _present_of_c(ctx)
    if local is not None and (p.ip != ipaddress.ip_address(local[0]) or p.port != local[1]):
        raise Fail(f"PeerPresent says {p.ip}:{p.port}, C is at {local[0]}:{local[1]}")
    return f"{p.ip}:{p.port}"


@case("mesh/8", "ForwardPacket with the mesh key delivers with the original source", level=Level.MUST, section="derp-protocol §6.4",
      quote="Active local X → queue with source = Y (the original sender), so X sees RecvPacket(src = Y).",
      needs=MESH)
async def forward(ctx: CaseContext) -> str:
    m = await ctx.conn("mesh", mesh=True)
    x = await ctx.conn("X")
    from derpkit.protocol.keys import NodePrivate

    y = NodePrivate.generate().public()
    data = plain(40)
    m.send_raw(F.ForwardPacket(y.raw, x.key.raw, data).encode())
    p = await x.expect(RecvPacket, what="the forwarded packet")
    if p.src != y.raw:
        raise Fail("the forwarded packet names the mesh peer, not the original sender")
    if p.data != data:
        raise Fail("the forwarded packet arrived changed")
    return "RecvPacket(src = original sender)"


@case("mesh/9", "ClosePeer with the mesh key closes the target", level=Level.MUST, section="derp-protocol §5.16",
      quote="The server closes every local connection for the target key, duplicates included.",
      needs=MESH)
async def closepeer(ctx: CaseContext) -> str:
    m = await ctx.conn("mesh", mesh=True)
    t = await ctx.conn("target")
    m.send_raw(F.ClosePeer(t.key.raw).encode())
    await ctx.closes(t, "ClosePeer for it from a mesh peer")
    await m.ping()
    return "target closed, mesh peer still connected"


@case("mesh/10", "PeerPresent marks probers", level=Level.SHOULD, section="derp-protocol §3.9",
      quote="IsProber 0x04: ClientInfo had IsProber: true", needs=MESH)
async def prober_flag(ctx: CaseContext) -> str:
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    await w.expect(PeerPresent, where=lambda p: p.key == w.key.raw, what="the watcher's own PeerPresent")
    c = await ctx.conn("prober", info=ClientInfo(is_prober=True, can_ack_pings=True))
    p = await w.expect(PeerPresent, where=lambda p: p.key == c.key.raw, what="PeerPresent for the prober")
    if not p.flags & PeerPresentFlags.IS_PROBER:
        raise Fail(f"flags 0x{p.flags:02x} lack IsProber (0x04)")
    return f"flags 0x{p.flags:02x}"


@case("mesh/11", "PeerPresent marks mesh peers", level=Level.SHOULD, section="derp-protocol §3.9",
      quote="IsMeshPeer 0x02: the connection presented the correct mesh key", needs=MESH)
async def mesh_flag(ctx: CaseContext) -> str:
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    p = await w.expect(PeerPresent, where=lambda p: p.key == w.key.raw, what="the watcher's own PeerPresent")
    if not p.flags & PeerPresentFlags.IS_MESH_PEER:
        raise Fail(f"the watcher's own flags 0x{p.flags:02x} lack IsMeshPeer (0x02)")
    return f"flags 0x{p.flags:02x}"


@case("mesh/12", "WatchConns with a payload closes even a mesh peer", level=Level.SHOULD, section="derp-protocol §3.11",
      quote="Length ≠ 0 … → the connection is closed.", needs=MESH)
async def watch_payload(ctx: CaseContext) -> str:
    m = await ctx.conn("mesh", mesh=True)
    m.send_raw(frame(FrameType.WATCH_CONNS, b"\x00"))
    await ctx.closes(m, "a 1-byte WatchConns")
    return "closed"


@case("mesh/13", "PeerPresent marks clients that sent Ideal-Node", level=Level.SHOULD, section="derp-protocol §5.14",
      quote="A non-empty Ideal-Node request header marks the connection as not ideal. This feeds … flag 0x08.", needs=MESH)
async def not_ideal(ctx: CaseContext) -> str:
    w = await ctx.conn("watcher", mesh=True, watch_conns=True)
    await w.expect(PeerPresent, where=lambda p: p.key == w.key.raw, what="the watcher's own PeerPresent")
    c = await ctx.conn("C", ideal_node="elsewhere-1a")
    p = await w.expect(PeerPresent, where=lambda p: p.key == c.key.raw, what="PeerPresent for C")
    if not p.flags & PeerPresentFlags.NOT_IDEAL:
        raise Fail(f"flags 0x{p.flags:02x} lack NotIdeal (0x08)")
    return f"flags 0x{p.flags:02x}"


@case("mesh/14", "ForwardPacket to an unknown disco destination gets NotHere", level=Level.SHOULD, section="derp-protocol §6.4",
      quote="else unknown_dest_on_fwd. If the packet looks like disco, also send a rate-limited PeerGone(X, NotHere) to B's mesh connection.",
      needs=MESH)
async def forward_not_here(ctx: CaseContext) -> str:
    from ._util import disco, stranger

    m = await ctx.conn("mesh", mesh=True)
    x = stranger()
    m.send_raw(F.ForwardPacket(stranger().raw, x.raw, disco()).encode())
    g = await m.expect(PeerGone, where=lambda g: g.key == x.raw, what="PeerGone(NotHere) for the unknown destination")
    if g.reason != PeerGoneReason.NOT_HERE:
        raise Fail(f"reason 0x{g.reason:02x}, want 0x01")
    return "PeerGone(X, NotHere) to the mesh peer"
