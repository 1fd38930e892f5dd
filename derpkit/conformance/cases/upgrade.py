"""upgrade/: how a request to /derp becomes (or does not become) a DERP connection."""

from __future__ import annotations

from derpkit.protocol.upgrade import build_request

from ..context import CaseContext
from ..registry import Fail, Info, Level, case

S = "derp-protocol §1.3"
S101 = "derp-protocol §1.4"


def _req(ctx: CaseContext, method: str = "GET", headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {ctx.target.derp.path} HTTP/1.1", f"Host: {ctx.target.derp.host_header}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@case("upgrade/1", "GET /derp without Upgrade gets 426", level=Level.MUST, section=S,
      quote="If [Upgrade] is neither exactly derp nor exactly websocket … the response is 426 Upgrade Required")
async def no_upgrade_426(ctx: CaseContext) -> str:
    r = await ctx.http("GET", ctx.target.derp.path)
    if r.status != 426:
        raise Fail(f"GET /derp without Upgrade answered {r.status} {r.reason}, want 426")
    return "426"


@case("upgrade/2", "The 426 says DERP requires an upgrade", level=Level.SHOULD, section=S,
      quote="426 Upgrade Required with body `DERP requires connection upgrade\\n`")
async def body_426(ctx: CaseContext) -> str:
    r = await ctx.http("GET", ctx.target.derp.path)
    if r.status != 426:
        raise Fail(f"answered {r.status}, want 426")
    if r.body != b"DERP requires connection upgrade\n":
        raise Fail(f"426 body is {r.body[:60]!r}, want b'DERP requires connection upgrade\\n'")
    return "body as derper"


@case("upgrade/3", "Upgrade: DERP gets 101 and the ServerKey unprompted", level=Level.MUST, section=S101,
      quote="The DERP ServerKey frame follows immediately … the server sends its ServerKey frame without waiting for the client")
async def upgrade_101(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    await raw.upgrade()
    return "101 then ServerKey, before the client wrote a frame"


@case("upgrade/4", "The 101 carries Upgrade: DERP and Connection: Upgrade", level=Level.SHOULD, section=S101,
      quote="HTTP/1.1 101 Switching Protocols / Upgrade: DERP / Connection: Upgrade")
async def headers_101(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    head = await raw.read_head()
    if head.status != 101:
        raise Fail(f"answered {head.status}, want 101")
    up, conn = head.header("Upgrade"), head.header("Connection")
    if up.lower() != "derp" or conn.lower() != "upgrade":
        raise Fail(f"Upgrade: {up!r}, Connection: {conn!r}; want DERP and Upgrade")
    return f"Upgrade: {up}, Connection: {conn}"


@case("upgrade/5", "The 101 carries Derp-Version: 2", level=Level.SHOULD, section=S101,
      quote="Derp-Version: 2")
async def version_101(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    head = await raw.read_head()
    v = head.header("Derp-Version")
    if v != "2":
        raise Fail(f"Derp-Version is {v!r}, want '2'")
    return "Derp-Version: 2"


@case("upgrade/6", "Derp-Public-Key in the 101 is the ServerKey's key", level=Level.SHOULD, section=S101,
      quote="Derp-Public-Key: <server public key, 64 lowercase hex>")
async def pubkey_101(ctx: CaseContext) -> str:
    raw = await ctx.raw("A")
    key = await raw.upgrade()
    assert raw.head is not None
    v = raw.head.header("Derp-Public-Key")
    if v != key.hex():
        raise Fail(f"Derp-Public-Key is {v[:16] or 'absent'!r}…, the ServerKey frame says {key.hex()[:16]}…")
    return "header matches the ServerKey frame"


@case("upgrade/7", "An unexpected Upgrade value gets 426", level=Level.MUST, section=S,
      quote="a non-empty, unexpected value is logged (\"weird upgrade\"); the response is 426")
async def weird_upgrade(ctx: CaseContext) -> str:
    r = await ctx.http("GET", ctx.target.derp.path, {"Upgrade": "h2c", "Connection": "Upgrade"})
    if r.status != 426:
        raise Fail(f"Upgrade: h2c answered {r.status} {r.reason}, want 426")
    return "426 for Upgrade: h2c"


@case("upgrade/8", "The Upgrade value is matched case-insensitively", level=Level.SHOULD, section=S,
      quote="Lowercase the Upgrade header value. If it is neither exactly derp nor exactly websocket …")
async def upgrade_case(ctx: CaseContext) -> str:
    raw = await ctx.raw("A", request=_req(ctx, headers={"Connection": "Upgrade", "Upgrade": "dErP"}))
    await raw.upgrade()
    return "Upgrade: dErP upgraded"


@case("upgrade/9", "Upgrade: websocket without the derp subprotocol", level=Level.INFORMATIONAL, section=S,
      quote="Upgrade: websocket without a derp subprotocol is accepted here as a plain DERP upgrade")
async def legacy_websocket(ctx: CaseContext) -> str:
    raw = await ctx.raw("A", request=_req(ctx, headers={"Connection": "Upgrade", "Upgrade": "websocket"}))
    head = await raw.read_head()
    if head.status == 101:
        await raw.read_server_key()
        raise Info("101 and raw DERP framing (derper's legacy behaviour)")
    raise Info(f"answered {head.status} {head.reason} (derper upgrades to raw DERP)")


@case("upgrade/10", "The method of the upgrade request", level=Level.INFORMATIONAL, section=S,
      quote="The HTTP method is not checked. The server handles the connection whatever the method.")
async def upgrade_post(ctx: CaseContext) -> str:
    raw = await ctx.raw("A", request=_req(ctx, "POST", {"Connection": "Upgrade", "Upgrade": "DERP", "Content-Length": "0"}))
    head = await raw.read_head()
    raise Info(f"POST with Upgrade: DERP answered {head.status} {head.reason} (derper: 101)")


@case("upgrade/11", "DERP bytes pipelined after the request head are kept", level=Level.MUST, section=S,
      quote="Buffered-bytes rule (MUST): … bytes MUST be treated as the start of the DERP byte stream; they must not be discarded")
async def pipelined_garbage_free(ctx: CaseContext) -> str:
    # The ordinary upgrade request plus a ClientInfo in one write needs the key first:
    # learn it from one connection, then pipeline on a second.
    probe = await ctx.raw("keyfetch")
    key = await probe.upgrade()
    probe.close()
    raw = await ctx.raw("A", request=b"")
    raw.server_key = key
    raw.write(build_request(ctx.target.derp.host_header, ctx.target.derp.path) + raw.client_info())
    head = await raw.read_head()
    if head.status != 101:
        raise Fail(f"answered {head.status}, want 101")
    await raw.read_server_key()
    await raw.expect_server_info()
    return "ClientInfo written with the request head was read: ServerInfo came back"

