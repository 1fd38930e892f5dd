"""http/: the plain HTTP routes a DERP server answers next to /derp (probes, captive check)."""

from __future__ import annotations

from ..context import CaseContext
from ..registry import Fail, Info, Level, case

PROBE = "derp-protocol §1.7"
CLI = "derper-cli §3.5"
CACHE_CONTROL = "no-cache, no-store, must-revalidate, no-transform, max-age=0"


@case("http/1", "GET /derp/probe answers 200 with an empty body", level=Level.MUST, section=PROBE,
      quote="/derp/probe, /derp/latency-check: GET or HEAD: 200, empty body")
async def probe_get(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/derp/probe")
    if r.status != 200:
        raise Fail(f"GET /derp/probe answered {r.status} {r.reason}, want 200")
    if r.body:
        raise Fail(f"GET /derp/probe body is {len(r.body)} bytes, want empty")
    return "200, empty body"


@case("http/2", "HEAD /derp/probe answers 200", level=Level.MUST, section=PROBE,
      quote="/derp/probe: GET or HEAD: 200")
async def probe_head(ctx: CaseContext) -> str:
    r = await ctx.http("HEAD", "/derp/probe")
    if r.status != 200:
        raise Fail(f"HEAD /derp/probe answered {r.status} {r.reason}, want 200")
    return "200"


@case("http/3", "/derp/probe allows any origin (CORS)", level=Level.SHOULD, section=PROBE,
      quote="/derp/probe: 200, empty body, header Access-Control-Allow-Origin: *")
async def probe_cors(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/derp/probe")
    v = r.header("Access-Control-Allow-Origin")
    if v != "*":
        raise Fail(f"Access-Control-Allow-Origin is {v!r}, want '*' (browsers measure latency with it)")
    return "Access-Control-Allow-Origin: *"


@case("http/4", "/derp/probe refuses other methods with 405", level=Level.SHOULD, section=PROBE,
      quote="same path, any other method: 405 with body `bogus probe method`")
async def probe_post(ctx: CaseContext) -> str:
    r = await ctx.http("POST", "/derp/probe", {"Content-Length": "0"})
    if r.status != 405:
        raise Fail(f"POST /derp/probe answered {r.status} {r.reason}, want 405")
    return "405"


@case("http/5", "/derp/latency-check is the same probe", level=Level.SHOULD, section=PROBE,
      quote="/derp/probe, /derp/latency-check (identical)")
async def latency_check(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/derp/latency-check")
    if r.status != 200 or r.body:
        raise Fail(f"GET /derp/latency-check answered {r.status} with {len(r.body)} body bytes, want 200 and empty")
    return "200, empty body"


@case("http/6", "/generate_204 answers 204", level=Level.MUST, section=CLI,
      quote="/generate_204 (captive-portal check): Status 204, no body")
async def gen204(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/generate_204")
    if r.status != 204:
        raise Fail(f"GET /generate_204 answered {r.status} {r.reason}, want 204")
    return "204"


@case("http/7", "/generate_204 answers the X-Tailscale-Challenge", level=Level.MUST, section=CLI,
      quote="X-Tailscale-Challenge … the response adds X-Tailscale-Response: response <challenge>")
async def gen204_challenge(ctx: CaseContext) -> str:
    challenge = "ts_derp99b.tailscale.com"
    r = await ctx.http("GET", "/generate_204", {"X-Tailscale-Challenge": challenge})
    v = r.header("X-Tailscale-Response")
    if v != f"response {challenge}":
        raise Fail(f"X-Tailscale-Response is {v!r}, want 'response {challenge}'")
    return f"X-Tailscale-Response: {v}"


@case("http/8", "/generate_204 ignores a challenge with a bad character", level=Level.SHOULD, section=CLI,
      quote="When the header … has any other character (space, NUL, …), there is no response header")
async def gen204_bad_char(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/generate_204", {"X-Tailscale-Challenge": "foo bar"})
    if r.status != 204:
        raise Fail(f"answered {r.status}, want 204")
    v = r.header("X-Tailscale-Response")
    if v is not None:
        raise Fail(f"echoed an invalid challenge: X-Tailscale-Response: {v!r}")
    return "no X-Tailscale-Response for 'foo bar'"


@case("http/9", "/generate_204 ignores a challenge over 64 characters", level=Level.SHOULD, section=CLI,
      quote="a non-empty X-Tailscale-Challenge whose value is at most 64 bytes")
async def gen204_long(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/generate_204", {"X-Tailscale-Challenge": "x" * 65})
    v = r.header("X-Tailscale-Response")
    if v is not None:
        raise Fail(f"echoed a 65-character challenge: X-Tailscale-Response: {v[:30]!r}…")
    return "no X-Tailscale-Response for 65 × 'x'"


@case("http/10", "/generate_204 forbids caching", level=Level.SHOULD, section=CLI,
      quote=f"Cache-Control: {CACHE_CONTROL}")
async def gen204_cache(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/generate_204")
    v = r.header("Cache-Control")
    if v != CACHE_CONTROL:
        raise Fail(f"Cache-Control is {v!r}, want {CACHE_CONTROL!r}")
    return "Cache-Control as derper"


@case("http/11", "What / serves (home page)", level=Level.INFORMATIONAL, section="derper-cli §3.8",
      quote="-home \"\" (default): 200, Content-Type: text/html; charset=utf-8 … derpkit MAY word its own page")
async def home(ctx: CaseContext) -> str:
    r = await ctx.http("GET", "/")
    raise Info(f"GET / answered {r.status} {r.reason}, {r.header('Content-Type') or 'no Content-Type'}, {len(r.body)} bytes")
