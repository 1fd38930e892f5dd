"""relay/: SendPacket in, RecvPacket out, to the right client and nobody else."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from derpkit.protocol import frames as F
from derpkit.protocol.frames import RecvPacket
from derpkit.protocol.keys import NodePrivate

from ..context import CaseContext
from ..registry import Fail, Info, Level, case
from ._util import disco, plain, stranger

S53 = "derp-protocol §5.3"
S34 = "derp-protocol §3.4"


@case("relay/1", "A packet reaches its destination with the sender's key", level=Level.MUST, section=S53,
      quote="Local active connection for D → queue P to it with source = c's key")
async def send_recv(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    data = plain(64)
    a.send(b.key, data)
    p = await b.expect(RecvPacket, what="the packet from A")
    if p.src != a.key.raw:
        raise Fail(f"RecvPacket source is {p.src.hex()[:16] if p.src else 'absent (v1 layout)'}…, want A's key")
    if p.data != data:
        raise Fail("the packet arrived changed")
    return "B got A's packet with A's key"


@case("relay/2", "A packet is not delivered to a third client", level=Level.MUST, section=S53,
      quote="Local active connection for D → queue P to it (and to no one else)")
async def no_leak(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    c = await ctx.conn("C")
    data = plain(64)
    a.send(b.key, data)
    await b.expect(RecvPacket, what="the packet from A")
    await ctx.quiet(c, "nothing (the packet was for B)")
    return "only B got it; C stayed silent and alive"


@case("relay/3", "An empty packet is relayed", level=Level.MUST, section=S34,
      quote="An empty packet (frame length exactly 32) is legal and is relayed as an empty packet.")
async def empty_packet(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send(b.key, b"")
    p = await b.expect(RecvPacket, what="the empty packet")
    if p.data:
        raise Fail(f"the empty packet arrived with {len(p.data)} bytes")
    return "0-byte packet delivered"


@case("relay/4", "A packet to one's own key comes back", level=Level.MUST, section=S34,
      quote="Sending to your own key is legal; the server delivers it back to you.")
async def to_self(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    data = plain(30)
    a.send(a.key, data)
    p = await a.expect(RecvPacket, what="the packet to self")
    if p.src != a.key.raw or p.data != data:
        raise Fail("the packet to self came back changed")
    return "delivered back"


@case("relay/5", "A packet to an unknown key is dropped and the sender stays", level=Level.MUST, section=S53,
      quote="Otherwise drop P: … reason unknown_dest")
async def unknown_dest(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send(stranger(), plain(40))
    await ctx.quiet(a, "nothing back for a non-disco packet to an unknown key")
    return "dropped silently, sender still connected"


@case("relay/6", "Packets between two clients keep their order", level=Level.MUST, section="derp-protocol §5.4",
      quote="Enqueue algorithm … take the oldest packet from the head of the queue and drop it (order is kept; loss is allowed)")
async def order(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    n = 100
    for i in range(n):
        a.send(b.key, i.to_bytes(4, "big") + os.urandom(60))
        if i % 10 == 9:
            await asyncio.sleep(0.005)
    seen: list[int] = []
    while True:
        p = await b.next(1.0)
        if p is None:
            break
        if isinstance(p, RecvPacket):
            seen.append(int.from_bytes(p.data[:4], "big"))
            if seen[-1] == n - 1:
                break
    if not seen:
        raise Fail(f"none of {n} packets arrived")
    if seen != sorted(seen) or len(set(seen)) != len(seen):
        raise Fail(f"packets arrived out of order: {seen[:12]}…")
    lost = n - len(seen)
    return f"{len(seen)}/{n} in order" + (f" ({lost} dropped)" if lost else "")


@case("relay/7", "A stalled receiver does not block other receivers", level=Level.MUST, section="derp-protocol §5.4",
      quote="The sender's reader is never blocked by a slow receiver … a frozen receiver must not stall traffic to other receivers.",
      timeout=25.0)
async def stalled_receiver(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    slow = await ctx.conn("slow")
    c = await ctx.conn("C")
    assert slow.transport is not None
    sock = slow.transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    slow.transport.pause_reading()
    chunk = os.urandom(1200)
    frame = F.encode_send_packet(slow.key.raw, chunk)
    for _ in range(40):  # 40 × 200 × 1.2 KB ≈ 10 MB at the frozen client
        a.send_raw(frame * 200)
        await asyncio.sleep(0)
    assert a.transport is not None
    deadline = time.monotonic() + 8.0
    while a.transport.get_write_buffer_size() > 0:
        await asyncio.sleep(0.01)
        if a.closed:
            raise Fail(f"the sender was disconnected while the receiver was frozen ({a.close_reason})")
        if time.monotonic() > deadline:
            left = a.transport.get_write_buffer_size()
            raise Fail(f"the server stopped reading the sender while a receiver was frozen ({left} bytes stuck)")
    t0 = time.monotonic()
    data = plain(50)
    a.send(c.key, data)
    await c.expect(RecvPacket, timeout=5.0, where=lambda p: p.data == data, what="the packet to C while 'slow' is frozen")
    took = time.monotonic() - t0
    await a.ping(5.0)
    slow.transport.resume_reading()
    return f"10 MB queued at a frozen client; C got its packet in {took * 1000:.0f} ms"


@case("relay/8", "The receiver can answer the sender", level=Level.MUST, section=S53,
      quote="SendPacket→RecvPacket carries the sender's key.")
async def reply(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send(b.key, b"ping?")
    p = await b.expect(RecvPacket, what="A's packet")
    assert p.src is not None
    b.send(p.src, b"pong!")
    q = await a.expect(RecvPacket, what="B's answer")
    if q.src != b.key.raw:
        raise Fail(f"A's first packet is not B's answer but one from {q.src.hex()[:16] if q.src else '?'}… ({q.data[:8]!r})")
    if q.data != b"pong!":
        raise Fail("B's answer arrived changed")
    return "round trip through the source key"


@case("relay/9", "Which duplicate connection of one key receives", level=Level.INFORMATIONAL, section="derp-protocol §5.6",
      quote="Policy in effect: \"last writer is active\" … A newly registered connection for a key becomes active at once.")
async def duplicates(ctx: CaseContext) -> str:
    key = NodePrivate.generate()
    a = await ctx.conn("A")
    d1 = await ctx.conn("dup1", key=key)
    d2 = await ctx.conn("dup2", key=key)

    async def who(tag: bytes) -> str:
        a.send(key.public(), tag)
        got = []
        for d in (d1, d2):
            evs = await d.collect(0.4)
            if any(isinstance(e, RecvPacket) and e.data == tag for e in evs):
                got.append(d.label)
        return "+".join(got) or "none"

    first = await who(b"after-dup2-connected")
    await d1.ping()
    second = await who(b"after-dup1-wrote")
    alive = [d.label for d in (d1, d2) if not d.closed]
    raise Info(f"newest connection: {first} received; after dup1 wrote: {second} received; still open: {', '.join(alive)} "
               "(derper: dup2, then dup1, both open)")


@case("relay/10", "A disco packet is relayed unchanged", level=Level.MUST, section="derp-protocol §5.4",
      quote="Disco classification (used for queue choice, metrics and PeerGone(NotHere)) … Nothing else is inspected.")
async def disco_relayed(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    data = disco(120)
    a.send(b.key, data)
    p = await b.expect(RecvPacket, what="the disco packet")
    if p.data != data:
        raise Fail("the disco packet arrived changed")
    return "delivered byte for byte"


@case("relay/11", "How many of a 200-packet burst arrive", level=Level.INFORMATIONAL, section="derp-protocol §5.4",
      quote="Two queues per connection … each with capacity 32 packets … head-drop then tail-drop")
async def burst(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    n = 200
    a.send_raw(b"".join(F.encode_send_packet(b.key.raw, os.urandom(1000)) for _ in range(n)))
    got = 0
    while True:
        p = await b.next(0.7)
        if p is None:
            break
        got += isinstance(p, RecvPacket)
    raise Info(f"{got}/{n} packets of 1000 bytes sent in one write arrived at a reading client")


@case("relay/12", "What an inactive duplicate is told (Health)", level=Level.INFORMATIONAL, section="derp-protocol §5.12",
      quote="derpkit's server MAY implement it (for example to tell duplicates they are inactive) only as an opt-in extension.")
async def duplicate_health(ctx: CaseContext) -> str:
    from derpkit.protocol.frames import Health

    key = NodePrivate.generate()
    d1 = await ctx.conn("dup1", key=key)
    await ctx.conn("dup2", key=key)
    evs = await d1.collect(0.5)
    health = [e.problem for e in evs if isinstance(e, Health)]
    alive = await d1.alive()
    state = "still open" if alive else f"closed ({d1.close_reason})"
    if health:
        raise Info(f"the older duplicate got Health {health[0]!r} and is {state}")
    raise Info(f"no Health frame to the older duplicate, which is {state} (derper: none, open)")
