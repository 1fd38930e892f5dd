"""framing/: frame sizes, splits and types the server must accept, skip or refuse."""

from __future__ import annotations

import asyncio
import os

from derpkit.protocol import frames as F
from derpkit.protocol.constants import MAX_PACKET_SIZE, FrameType
from derpkit.protocol.frames import RecvPacket

from ..context import CaseContext
from ..registry import Fail, Level, case
from ._craft import L, frame, lying_header
from ._util import plain

S52 = "derp-protocol §5.2"
S23 = "derp-protocol §2.3"


def _oversized(dst: bytes, packet_len: int) -> bytes:
    """A SendPacket no honest client writes (the core's encoder refuses it)."""
    return bytes(L.DERPFrame() / L.DERPSendPacket(dst=dst, data=os.urandom(packet_len)))


@case("framing/1", "An unknown frame type is skipped", level=Level.MUST, section=S52,
      quote="anything else (including … unknown values) | none | Read and discard length bytes; no reply.")
async def unknown_type(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(frame(0x7F, b"\xaa" * 100))
    data = plain(20)
    a.send(a.key, data)
    await a.expect(RecvPacket, where=lambda p: p.data == data, what="the packet sent after the unknown frame")
    return "0x7f with 100 bytes skipped; the next frame was handled"


@case("framing/2", "A 65 536-byte packet is relayed intact", level=Level.MUST, section=S23,
      quote="SendPacket frame | length ≥ 32; packet part ≤ 65 536")
async def max_packet(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    data = os.urandom(MAX_PACKET_SIZE)
    a.send(b.key, data)
    p = await b.expect(RecvPacket, timeout=5.0, what="the 65 536-byte packet")
    if p.data != data:
        raise Fail(f"the 65 536-byte packet arrived as {len(p.data)} different bytes")
    return "65 536 bytes delivered"


@case("framing/3", "A 65 537-byte packet closes the connection", level=Level.MUST, section=S23,
      quote="SendPacket frame | … packet part ≤ 65 536 (so the frame is ≤ 65 568) | server | Connection closed.")
async def over_max(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send_raw(_oversized(b.key.raw, MAX_PACKET_SIZE + 1))
    await ctx.closes(a, "a 65 537-byte packet")
    return "closed"


@case("framing/4", "A 70 KiB frame is not delivered and closes the sender", level=Level.MUST, section=S23,
      quote="Packet passed to client Send/ForwardPacket | ≤ 65 536 … SendPacket … Connection closed.")
async def seventy_k(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    a.send_raw(_oversized(b.key.raw, 70 << 10))
    closed = await a.wait_closed(ctx.target.patience)
    got = [e for e in await b.collect(ctx.target.quiet) if isinstance(e, RecvPacket)]
    if got:
        raise Fail(f"the receiver got a {len(got[0].data)}-byte packet from a 70 KiB frame")
    if not closed:
        raise Fail(f"sender still connected {ctx.target.patience:g} s after a 70 KiB frame")
    if b.closed:
        raise Fail(f"the receiver's connection died too ({b.close_reason})")
    await b.ping()
    return "sender closed, nothing delivered"


@case("framing/5", "A SendPacket shorter than a key closes the connection", level=Level.MUST, section=S52,
      quote="SendPacket 0x04 | length ≥ 32 …  (violation ⇒ close connection, log, no reply)")
async def short_send(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(frame(FrameType.SEND_PACKET, os.urandom(20)))
    await ctx.closes(a, "a 20-byte SendPacket")
    return "closed"


@case("framing/6", "NotePreferred with one byte is accepted", level=Level.MUST, section="derp-protocol §3.7",
      quote="Exactly 1 byte. Go clients send 0x01 … or 0x00.")
async def note_preferred(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(F.NotePreferred(True).encode() + F.NotePreferred(False).encode())
    await a.ping()
    return "0x01 then 0x00, connection alive"


@case("framing/7", "NotePreferred with two bytes closes the connection", level=Level.SHOULD, section="derp-protocol §3.7",
      quote="Any other length → the server closes the connection.")
async def note_preferred_long(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(frame(FrameType.NOTE_PREFERRED, b"\x01\x01"))
    await ctx.closes(a, "a 2-byte NotePreferred")
    return "closed"


@case("framing/8", "A frame split over many writes is reassembled", level=Level.MUST, section="derp-protocol §2.1",
      quote="After the upgrade, both directions carry a sequence of frames")
async def split_frame(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    data = plain(500)
    frame = F.encode_send_packet(a.key.raw, data)
    for i in range(0, len(frame), 3):
        a.send_raw(frame[i : i + 3])
        if i % 60 == 0:
            await asyncio.sleep(0.001)
    await a.expect(RecvPacket, where=lambda p: p.data == data, what="the packet written 3 bytes at a time")
    return f"{len(frame)} bytes in 3-byte writes"


@case("framing/9", "Many frames in one write are all handled", level=Level.MUST, section="derp-protocol §2.1",
      quote="Frames follow one another back to back.")
async def many_in_one(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    b = await ctx.conn("B")
    packets = [plain(30) for _ in range(20)]
    a.send_raw(b"".join(F.encode_send_packet(b.key.raw, p) for p in packets))
    got: list[bytes] = []
    while len(got) < len(packets):
        p = await b.expect(RecvPacket, what=f"packet {len(got) + 1} of 20")
        got.append(p.data)
    if got != packets:
        raise Fail("the 20 packets arrived out of order or changed")
    return "20 SendPackets in one write, all delivered in order"


@case("framing/10", "Server-to-client frame types sent by a client are ignored", level=Level.SHOULD, section=S52,
      quote="anything else (including KeepAlive, Pong, ServerKey, ClientInfo, Health, Restarting, unknown values) | none | Read and discard")
async def client_sends_server_frames(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    junk = b"".join(bytes(p) for p in (
        L.DERPFrame(type=FrameType.KEEP_ALIVE), L.DERPFrame() / L.DERPPong(data=b"12345678"),
        L.DERPFrame() / L.DERPHealth(problem=b"x"), L.DERPFrame() / L.DERPRestarting(reconnect_in_ms=1, try_for_ms=2),
        L.DERPFrame() / L.DERPServerKey(key=os.urandom(32)), L.DERPFrame() / L.DERPClientInfo(key=os.urandom(32), sealed=os.urandom(40)),
        L.DERPFrame() / L.DERPRecvPacket(src=os.urandom(32), data=b"x"),
    ))
    a.send_raw(junk)
    await a.ping()
    return "KeepAlive, Pong, Health, Restarting, ServerKey, ClientInfo, RecvPacket skipped"


@case("framing/11", "An unknown frame of 100 KiB is skipped", level=Level.SHOULD, section="derp-protocol §2.3",
      quote="Unknown frame types at the server | no limit; payload read and thrown away")
async def big_unknown(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(frame(0x42, os.urandom(100 << 10)))
    await a.ping(5.0)
    return "100 KiB of type 0x42 skipped"


@case("framing/12", "An impossible length is refused from the header alone", level=Level.SHOULD, section="derp-protocol §2.3",
      quote="The length field can hold any value up to 0xFFFFFFFF. The limits in §2.3 are enforced by the reader.")
async def huge_header(ctx: CaseContext) -> str:
    a = await ctx.conn("A")
    a.send_raw(lying_header(FrameType.SEND_PACKET, 0xFFFFFFFF) + os.urandom(64))
    await ctx.closes(a, "a SendPacket header announcing 4 GiB")
    return "closed without waiting for the payload"
