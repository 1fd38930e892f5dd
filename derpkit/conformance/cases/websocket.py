"""websocket/: DERP carried in binary WebSocket messages (subprotocol "derp")."""

from __future__ import annotations

from derpkit.protocol.frames import RecvPacket

from ..context import CaseContext
from ..registry import Fail, Info, Level, case
from ._util import plain

S = "derp-protocol §1.6"


@case("websocket/1", "WebSocket with subprotocol derp hand-shakes", level=Level.SHOULD, section=S,
      quote="Trigger: Upgrade: websocket and Sec-WebSocket-Protocol containing derp … the normal DERP server on a stream built from the WebSocket")
async def ws_handshake(ctx: CaseContext) -> str:
    await ctx.conn("ws", websocket=True)
    return "ServerKey and ServerInfo over WebSocket"


@case("websocket/2", "Packets flow between a WebSocket and a TCP client", level=Level.SHOULD, section=S,
      quote="DERP frames are a byte stream carried in binary messages")
async def ws_relay(ctx: CaseContext) -> str:
    w = await ctx.conn("ws", websocket=True)
    t = await ctx.conn("tcp")
    d1, d2 = plain(100), plain(200)
    w.send(t.key, d1)
    p = await t.expect(RecvPacket, where=lambda p: p.data == d1, what="the packet from the WebSocket client")
    if p.src != w.key.raw:
        raise Fail("wrong source key on the packet from the WebSocket client")
    t.send(w.key, d2)
    await w.expect(RecvPacket, where=lambda p: p.data == d2, what="the packet to the WebSocket client")
    return "both directions"


@case("websocket/3", "Message boundaries mean nothing (frames split over 7-byte messages)", level=Level.SHOULD, section=S,
      quote="One DERP frame may span several messages, and one message may hold several frames or pieces of frames.")
async def ws_split(ctx: CaseContext) -> str:
    w = await ctx.conn("ws", websocket=True, ws_chunk=7)
    data = plain(300)
    w.send(w.key, data)
    await w.expect(RecvPacket, where=lambda p: p.data == data, what="the packet sent in 7-byte messages")
    return "ClientInfo and a 300-byte packet in 7-byte messages"


@case("websocket/4", "A text message ends the connection", level=Level.SHOULD, section=S,
      quote="A text message is a protocol error. The Go side closes with status 1003 (unsupported data)")
async def ws_text(ctx: CaseContext) -> str:
    w = await ctx.conn("ws", websocket=True)
    await w.ws_send_text("hello")
    if not await w.wait_closed(ctx.target.patience):
        raise Fail(f"connection still open {ctx.target.patience:g} s after a text message")
    code = getattr(w, "ws_close_code", None)
    if code != 1003:
        raise Info(f"closed with WebSocket code {code} (Go closes with 1003)")
    return "closed with 1003"
