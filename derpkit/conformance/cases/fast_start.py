"""fast-start/: a client that knows the server key skips the 101 (Derp-Fast-Start: 1)."""

from __future__ import annotations

from derpkit.protocol import frames as F
from derpkit.protocol.frames import RecvPacket
from derpkit.protocol.upgrade import build_request

from ..context import CaseContext
from ..registry import Fail, Level, case
from ._util import plain, server_key

S = "derp-protocol §1.5"


@case("fast-start/1", "Derp-Fast-Start: 1 gets no HTTP response, only the ServerKey", level=Level.MUST, section=S,
      quote="What fast start changes on the server. Only one thing: no HTTP response is written at all. The server still sends the ServerKey frame first.")
async def no_response(ctx: CaseContext) -> str:
    key = await server_key(ctx)
    raw = await ctx.raw("A", fast_start=True)
    first = await raw.read_body(5, 5.0)
    if first.startswith(b"HTTP/"):
        raise Fail(f"server answered fast start with an HTTP response: {bytes(raw.buf[:40])!r}")
    raw.buf[0:0] = first
    got = await raw.read_server_key()
    if got != key:
        raise Fail("the ServerKey under fast start differs from the one of an ordinary upgrade")
    return "no HTTP response; ServerKey first"


@case("fast-start/2", "A fast-start ClientInfo sent with the request is admitted", level=Level.MUST, section=S,
      quote="This flush carries the HTTP request and the ClientInfo frame together.")
async def hello_with_request(ctx: CaseContext) -> str:
    key = await server_key(ctx)
    c = await ctx.conn("A", server_key=key)
    if not c.core.fast_start:
        raise Fail("the client did not use fast start")
    return "ServerInfo came back"


@case("fast-start/3", "Frames pipelined behind a fast-start ClientInfo are handled", level=Level.MUST, section="derp-protocol §1.3",
      quote="Those bytes MUST be treated as the start of the DERP byte stream; they must not be discarded.")
async def pipelined_send(ctx: CaseContext) -> str:
    from derpkit.protocol.keys import NodePrivate

    key = await server_key(ctx)
    me = NodePrivate.generate()
    data = plain(50)
    c = await ctx.conn("A", key=me, server_key=key, pipeline=F.encode_send_packet(me.public().raw, data))
    pkt = await c.expect(RecvPacket, where=lambda p: p.data == data, what="RecvPacket of the pipelined packet to self")
    if pkt.src != me.public().raw:
        raise Fail("the pipelined packet came back with the wrong source key")
    return "request + ClientInfo + SendPacket in one write: packet delivered"


@case("fast-start/4", "Derp-Fast-Start other than 1 gets the ordinary 101", level=Level.SHOULD, section="derp-protocol §1.3",
      quote="fastStart is true when the Derp-Fast-Start header equals exactly 1")
async def not_one(ctx: CaseContext) -> str:
    req = build_request(ctx.target.derp.host_header, ctx.target.derp.path).replace(
        b"Upgrade: DERP", b"Derp-Fast-Start: 0\r\nUpgrade: DERP")
    raw = await ctx.raw("A", request=req)
    head = await raw.read_head()
    if head.status != 101:
        raise Fail(f"Derp-Fast-Start: 0 answered {head.status}, want the ordinary 101")
    return "101"


@case("fast-start/5", "Frames pipelined behind an ordinary ClientInfo are handled after admission", level=Level.MUST,
      section="derp-protocol §4.1", quote="[NotePreferred] [WatchConns] (pipelined) -> (buffered, handled after registration)")
async def pipelined_after_hello(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    data = plain(33)
    raw.write(raw.client_info() + F.NotePreferred(True).encode() + F.encode_send_packet(raw.key.raw, data))
    await raw.expect_server_info()
    f = await raw.read_frame(3.0)
    while f is not None and f[0] != 0x05:
        f = await raw.read_frame(3.0)
    if f is None:
        raise Fail(f"no RecvPacket for the packet pipelined behind ClientInfo ({raw.close_reason or 'nothing in 3 s'})")
    if f[1] != raw.key.raw + data:
        raise Fail("the pipelined packet came back changed")
    return "ClientInfo + NotePreferred + SendPacket in one write: ServerInfo, then the packet"
