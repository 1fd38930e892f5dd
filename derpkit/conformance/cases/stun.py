"""stun/: the STUN listener next to the DERP server (Tailscale's binding requests)."""

from __future__ import annotations

import ipaddress
import os

from derpkit.stun import codec

from ..context import CaseContext
from ..registry import Fail, Info, Level, Need, case
from ._craft import S

S3 = "stun §3"
S5 = "stun §5"
STUN = [Need.STUN]


def _parse(data: bytes, txid: bytes) -> codec.StunResponse:
    try:
        r = codec.parse_response(data)
    except codec.StunError as e:
        raise Fail(f"reply does not parse as a Binding success: {e}") from None
    if r.txid != txid:
        raise Fail(f"reply transaction id {r.txid.hex()}, want {txid.hex()}")
    return r


async def _alive(ctx: CaseContext) -> None:
    txid = codec.new_txid()
    data, _ = await ctx.stun_exchange(codec.build_request(txid), label="stun-check")
    if data is None:
        raise Fail("the STUN server stopped answering valid requests")


@case("stun/1", "A Tailscale binding request gets our address back", level=Level.MUST, section=S3,
      quote="One attribute only: XOR-MAPPED-ADDRESS (0x0020) … Cookie and transaction id are copied from the request.", needs=STUN)
async def binding(ctx: CaseContext) -> str:
    txid = codec.new_txid()
    data, local = await ctx.stun_exchange(codec.build_request(txid))
    if data is None:
        raise Fail("no reply to Tailscale's 40-byte binding request")
    r = _parse(data, txid)
    want = ipaddress.ip_address(local[0])
    want = getattr(want, "ipv4_mapped", None) or want
    if r.ip != want or r.port != local[1]:
        raise Fail(f"mapped address {r.ip}:{r.port}, we are {local[0]}:{local[1]}")
    return f"{r.ip}:{r.port} via 0x{r.addr_attr:04x}"


@case("stun/2", "The reply is a Binding success with our transaction id", level=Level.MUST, section=S3,
      quote="01 01 | Binding success response … transaction id of the request", needs=STUN)
async def success_type(ctx: CaseContext) -> str:
    txid = codec.new_txid()
    data, _ = await ctx.stun_exchange(codec.build_request(txid))
    if data is None:
        raise Fail("no reply")
    if data[:2] != b"\x01\x01" or data[4:8] != b"\x21\x12\xa4\x42" or data[8:20] != txid:
        raise Fail(f"reply header {data[:20].hex()}, want 0101 …, the cookie and our transaction id")
    return "0x0101, cookie, transaction id"


@case("stun/3", "Which attributes the reply carries", level=Level.INFORMATIONAL, section=S3,
      quote="No MAPPED-ADDRESS, no SOFTWARE, no FINGERPRINT, no RESPONSE-ORIGIN/OTHER-ADDRESS.", needs=STUN)
async def reply_attrs(ctx: CaseContext) -> str:
    txid = codec.new_txid()
    data, _ = await ctx.stun_exchange(codec.build_request(txid))
    if data is None:
        raise Fail("no reply")
    attrs = codec.parse_attrs(data)
    fam = next((v[1] for t, v in attrs if t == codec.ATTR_XOR_MAPPED_ADDRESS and len(v) > 1), None)
    names = ", ".join(f"0x{t:04x}" for t, _ in attrs)
    raise Info(f"{len(data)} bytes, attributes {names}; family 0x{fam or 0:02x} for an IPv4 client "
               "(derper on a dual-stack socket: 0x02 ::ffff:…; derpkit: 0x01)")


@case("stun/4", "An RFC 5389 request without SOFTWARE=tailnode", level=Level.INFORMATIONAL, section=S5,
      quote="Some SOFTWARE (0x8022) attribute must have the value exactly the 8 bytes tailnode … else ErrWrongSoftware.", needs=STUN)
async def rfc_request(ctx: CaseContext) -> str:
    bare = S.STUN(stun_message_type="Binding request", transaction_id=int.from_bytes(os.urandom(12), "big"))
    data, _ = await ctx.stun_exchange(bytes(bare), timeout=0.7)
    await _alive(ctx)
    raise Info("answered a bare RFC 5389 request" if data else "dropped a bare RFC 5389 request (as derper)")


@case("stun/5", "A request with a wrong FINGERPRINT is dropped", level=Level.SHOULD, section=S5,
      quote="The FINGERPRINT value must equal CRC32(datagram minus its last 8 bytes) XOR 0x5354554E, else ErrWrongFingerprint.", needs=STUN)
async def bad_fingerprint(ctx: CaseContext) -> str:
    pkt = S.tailscale_binding_request()
    pkt.attributes[-1].crc_32 = 0xDEADBEEF
    data, _ = await ctx.stun_exchange(S.finish(pkt), timeout=0.7)
    if data is not None:
        raise Fail("answered a request whose FINGERPRINT is wrong")
    await _alive(ctx)
    return "dropped; valid requests still answered"


@case("stun/6", "Garbage is not answered and does not stop the server", level=Level.MUST, section=S5,
      quote="Any datagram failing Is or ParseBindingRequest is dropped silently … no input may crash the server.", needs=STUN)
async def garbage(ctx: CaseContext) -> str:
    for blob in (os.urandom(100), b"\xff" * 20, os.urandom(1400)):
        data, _ = await ctx.stun_exchange(blob, timeout=0.4)
        if data is not None:
            raise Fail(f"answered {len(blob)} bytes of garbage with {len(data)} bytes")
    await _alive(ctx)
    return "3 garbage datagrams dropped; valid requests still answered"


@case("stun/7", "An empty datagram is ignored", level=Level.MUST, section=S5,
      quote="derpkit must likewise survive any datagram (zero-length, 64 KiB, random) and never answer garbage.", needs=STUN)
async def empty(ctx: CaseContext) -> str:
    data, _ = await ctx.stun_exchange(b"", timeout=0.4)
    if data is not None:
        raise Fail("answered an empty datagram")
    await _alive(ctx)
    return "dropped; valid requests still answered"


@case("stun/8", "A retransmitted request is answered again", level=Level.SHOULD, section=S5,
      quote="No state, no rate limit, no retransmission handling (a retransmitted request simply gets another reply).", needs=STUN)
async def retransmit(ctx: CaseContext) -> str:
    txid = codec.new_txid()
    req = codec.build_request(txid)
    for i in range(2):
        data, _ = await ctx.stun_exchange(req)
        if data is None:
            raise Fail(f"copy {i + 1} of the same transaction got no reply")
        _parse(data, txid)
    return "both copies answered"


@case("stun/9", "A request whose header length is wrong", level=Level.INFORMATIONAL, section=S5,
      quote="a request whose header length is wrong but whose fingerprint was computed over the bytes as sent is accepted", needs=STUN)
async def wrong_length(ctx: CaseContext) -> str:
    pkt = S.tailscale_binding_request()
    pkt.length = 16  # 4 short of the attributes that follow; FINGERPRINT covers the bytes as sent
    data, _ = await ctx.stun_exchange(S.finish(pkt), timeout=0.7)
    await _alive(ctx)
    raise Info("answered (as derper's net/stunserver)" if data else "dropped (as strict RFC servers and Tailscale's XDP responder)")


@case("stun/10", "A request with SOFTWARE other than tailnode", level=Level.INFORMATIONAL, section="stun §11",
      quote="request without SOFTWARE=tailnode | RFC 8489 server: answer | Tailscale server: drop", needs=STUN)
async def wrong_software(ctx: CaseContext) -> str:
    data, _ = await ctx.stun_exchange(S.finish(S.tailscale_binding_request(software=b"notnode!")), timeout=0.7)
    await _alive(ctx)
    raise Info("answered SOFTWARE 'notnode!' (an RFC server)" if data else "dropped SOFTWARE 'notnode!' (Tailscale's rule)")


@case("stun/11", "A request without FINGERPRINT", level=Level.INFORMATIONAL, section="stun §11",
      quote="request without FINGERPRINT / bad FINGERPRINT | RFC 8489 server: answer / drop | Tailscale server: drop", needs=STUN)
async def no_fingerprint(ctx: CaseContext) -> str:
    data, _ = await ctx.stun_exchange(S.finish(S.tailscale_binding_request(fingerprint=False)), timeout=0.7)
    await _alive(ctx)
    raise Info("answered a request without FINGERPRINT (an RFC server)" if data else "dropped it (Tailscale's rule)")
