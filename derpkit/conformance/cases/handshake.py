"""handshake/: ServerKey, ClientInfo, ServerInfo, and what the server does with bad ones."""

from __future__ import annotations

import asyncio
import json
import os
import time

from derpkit.protocol.constants import KEY_LEN, MAGIC, FrameType
from derpkit.protocol.keys import NodePrivate

from ..context import CaseContext
from ..registry import Fail, Info, Level, Need, case
from ._craft import L, frame, lying_header
from ._util import ftype_name

S41 = "derp-protocol §4.1"
S43 = "derp-protocol §4.3"
S45 = "derp-protocol §4.5"


@case("handshake/1", "ServerKey is type 0x01, 40 bytes, with the DERP magic", level=Level.MUST, section="derp-protocol §3.1",
      quote="Always the first frame the server sends … Go sends exactly 40 bytes: header 01 00 00 00 28")
async def server_key_frame(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    head = await raw.read_head()
    if head.status != 101:
        raise Fail(f"upgrade answered {head.status}")
    f = await raw.read_frame()
    if f is None:
        raise Fail(f"no frame after the 101 ({raw.close_reason or 'timed out'})")
    t, p = f
    if t != FrameType.SERVER_KEY:
        raise Fail(f"first frame is {ftype_name(t)}, want ServerKey (0x01)")
    if p[: len(MAGIC)] != MAGIC:
        raise Fail(f"ServerKey starts {p[:8].hex()}, want the magic {MAGIC.hex()}")
    if len(p) < 40:
        raise Fail(f"ServerKey is {len(p)} bytes, clients need at least 40")
    if p[8:40] == bytes(KEY_LEN):
        raise Fail("ServerKey carries the all-zero key")
    if len(p) != 40:
        raise Info(f"ServerKey is {len(p)} bytes (Go sends 40; clients ignore the rest up to 1024)")
    return "40 bytes, magic, non-zero key"


@case("handshake/2", "ServerInfo is the first frame after ClientInfo and opens", level=Level.MUST, section="derp-protocol §3.3",
      quote="It is the second frame the server sends, after ServerKey … always the first frame the client's receive loop sees")
async def server_info_first(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(raw.client_info())
    await raw.expect_server_info()
    return "ServerInfo first, sealed to our key"


@case("handshake/3", "What ServerInfo says", level=Level.INFORMATIONAL, section="derp-protocol §4.4",
      quote="The Go server always sends exactly {\"version\":2}; it never fills in the token-bucket fields.")
async def server_info_content(ctx: CaseContext) -> str:
    c = await ctx.conn("A")
    si = c.server_info
    assert si is not None
    extra = ""
    if si.token_bucket_bytes_per_second:
        extra = f", advisory send rate {si.token_bucket_bytes_per_second} B/s burst {si.token_bucket_bytes_burst}"
    raise Info(f"version {si.version}{extra}")


async def _refused(ctx: CaseContext, frame: bytes, what: str) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(frame)
    await ctx.closes(raw, what)
    return f"closed without a reply after {what}"


@case("handshake/4", "A first frame other than ClientInfo closes the connection", level=Level.MUST, section=S45,
      quote="First client frame is not ClientInfo | server | close; log \"bad frame type\"")
async def wrong_first_frame(ctx: CaseContext) -> str:
    return await _refused(ctx, bytes(L.DERPFrame() / L.DERPSendPacket(dst=os.urandom(32), data=b"hi")), "a SendPacket as the first frame")


@case("handshake/5", "A ClientInfo whose box does not open closes the connection", level=Level.MUST, section=S45,
      quote="Box does not open with the claimed client key | server | close")
async def bad_box(ctx: CaseContext) -> str:
    key = NodePrivate.generate().public().raw
    pkt = L.DERPFrame() / L.DERPClientInfo(key=key, nonce=os.urandom(24), sealed=os.urandom(16 + 30))
    return await _refused(ctx, bytes(pkt), "a ClientInfo of random bytes")


@case("handshake/6", "Sealed non-JSON in ClientInfo closes the connection", level=Level.MUST, section=S45,
      quote="JSON malformed, wrong types, or bad meshKey | server | close")
async def bad_json(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(raw.client_info(b"{not json"))
    await ctx.closes(raw, "a sealed ClientInfo holding '{not json'")
    return "closed without a reply"


@case("handshake/7", "A ClientInfo shorter than 56 bytes closes the connection", level=Level.MUST, section="derp-protocol §2.3",
      quote="ClientInfo frame, as read by the server | length ≥ 56 (32 key + 24 nonce) … Handshake fails and the connection closes.")
async def short_client_info(ctx: CaseContext) -> str:
    return await _refused(ctx, frame(FrameType.CLIENT_INFO, os.urandom(40)), "a 40-byte ClientInfo")


@case("handshake/8", "A ClientInfo over 256 KiB closes the connection", level=Level.SHOULD, section="derp-protocol §2.3",
      quote="ClientInfo frame, as read by the server | … ≤ 262 144 (256 KiB)")
async def long_client_info(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(lying_header(FrameType.CLIENT_INFO, (256 << 10) + 1) + raw.key.raw)
    await ctx.closes(raw, "a ClientInfo header announcing 262 145 bytes")
    return "closed on the header alone"


@case("handshake/9", "The all-zero client key is refused", level=Level.MUST, section="derp-protocol §0",
      quote="derpkit MUST reject such a client cleanly: close the connection")
async def zero_key(ctx: CaseContext) -> str:
    pkt = L.DERPFrame() / L.DERPClientInfo(key=bytes(32), nonce=os.urandom(24), sealed=os.urandom(16 + 13))
    return await _refused(ctx, bytes(pkt), "a ClientInfo from the zero key")


async def _admitted(ctx: CaseContext, js: bytes, what: str) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(raw.client_info(js))
    await raw.expect_server_info()
    return f"{what} admitted"


async def _rejected(ctx: CaseContext, js: bytes, what: str) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.write(raw.client_info(js))
    await ctx.closes(raw, f"ClientInfo {what}")
    return f"{what} rejected without a reply"


@case("handshake/10", "ClientInfo JSON keys match case-insensitively", level=Level.SHOULD, section=S43,
      quote="Key matching is case-insensitive … {\"Version\":5,\"MeshKey\":\"…\"} and {\"version\":5,\"meshKey\":\"…\"} both work")
async def json_case(ctx: CaseContext) -> str:
    return await _admitted(ctx, b'{"VERSION":2,"canackpings":true}', '{"VERSION":2,"canackpings":true}')


@case("handshake/11", "The client's version is not checked", level=Level.SHOULD, section=S43,
      quote="Version is not checked. The server never looks at version; any value, or none, is accepted.")
async def any_version(ctx: CaseContext) -> str:
    return await _admitted(ctx, b'{"version":99,"CanAckPings":false}', "version 99")


@case("handshake/12", "An empty JSON object is a valid ClientInfo", level=Level.SHOULD, section=S43,
      quote="Unknown keys are ignored. {} is valid: no mesh key, version 0, no flags.")
async def empty_json(ctx: CaseContext) -> str:
    return await _admitted(ctx, b'{"unknown":[1,2]}', "{} with an unknown key")


@case("handshake/13", "A malformed meshKey rejects the handshake", level=Level.SHOULD, section=S43,
      quote="meshKey, if present, must decode to exactly 32 bytes … A wrong length (\"abcdefg\" …) is a JSON error, and the handshake is rejected.")
async def bad_mesh_key(ctx: CaseContext) -> str:
    return await _rejected(ctx, b'{"meshKey":"abcdefg","version":2}', 'with meshKey "abcdefg"')


@case("handshake/14", "A JSON value of the wrong type rejects the handshake", level=Level.SHOULD, section=S43,
      quote="A value of the wrong JSON type (for example a string for version …) makes the decode fail, so the handshake is rejected.")
async def wrong_type(ctx: CaseContext) -> str:
    return await _rejected(ctx, json.dumps({"version": "2", "CanAckPings": True}).encode(), 'with "version":"2"')


@case("handshake/15", "A ClientInfo sealed to another server key is refused", level=Level.MUST, section=S45,
      quote="Box does not open with the claimed client key | server | close; log \"cannot open\"")
async def sealed_to_other(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    raw.server_key = NodePrivate.generate().public()  # seal to a key that is not the server's
    raw.write(raw.client_info())
    await ctx.closes(raw, "a ClientInfo sealed to a different key")
    return "closed without a reply"


@case("handshake/16", "A client that never sends ClientInfo is dropped", level=Level.INFORMATIONAL, section=S41,
      quote="Set a fresh deadline 10 s ahead. Read one frame; it must be ClientInfo.", needs=[Need.LONG], timeout=25.0)
async def handshake_timeout(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    t0 = time.monotonic()
    if not await raw.wait_closed(20.0):
        raise Info("still open 20 s after ServerKey without a ClientInfo (derper closes after 10 s)")
    raise Info(f"closed {time.monotonic() - t0:.1f} s after ServerKey (derper: 10 s)")


@case("handshake/17", "ClientInfo dribbled one byte per write is assembled", level=Level.MUST, section="derp-protocol §2.1",
      quote="There is no padding, checksum or alignment. Frames follow one another back to back.")
async def dribble(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    hello = raw.client_info()
    for i in range(len(hello)):
        raw.write(hello[i : i + 1])
        if i % 16 == 0:
            await asyncio.sleep(0.002)
    await raw.expect_server_info()
    return f"{len(hello)} single-byte writes, then ServerInfo"
