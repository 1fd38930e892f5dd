"""derper's HTTP surface on aiohttp: probes, captive-portal check, home page, debug.

Routing follows Go's ServeMux as derper sets it up: exact paths for the DERP routes,
``/debug/`` as a subtree behind an access check, and everything unmatched falls to the
home page, for any method. DERP upgrades never reach this module (see frontdoor.py);
``/derp`` lands here only for WebSocket DERP or a request that is not an upgrade.
"""

from __future__ import annotations

import functools
import html
import inspect
import ipaddress
import logging
import os
import posixpath
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from derpkit import __version__
from derpkit.gosyntax import go_quote
from derpkit.protocol import upgrade
from derpkit.server import metrics
from derpkit.server.config import Knobs
from derpkit.server.relay.derp import DerpServer
from derpkit.server.relay.websocket import handle_websocket

from . import ace as acemod
from . import request

BROWSER_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'self'; "
        "block-all-mixed-content; object-src 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
log = logging.getLogger("derpkit.server")
ALL_FAMILIES = web.AppKey("all_families", Callable[[], Iterable[metrics.Family]])
ACE = web.AppKey("ace", acemod.Ace)
NO_CACHE = "no-cache, no-store, must-revalidate, no-transform, max-age=0"
_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")
_PROD_HOST_RE = re.compile(r"^derp([^.]*)\.tailscale\.com\.?$")
_TAILSCALE_V4 = ipaddress.ip_network("100.64.0.0/10")
_CHROMEOS_V4 = ipaddress.ip_network("100.115.92.0/23")
_TAILSCALE_V6 = ipaddress.ip_network("fd7a:115c:a1e0::/48")


def go_error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A response shaped like Go's http.Error: text/plain, nosniff, body ends in newline."""
    h = {"X-Content-Type-Options": "nosniff"}
    if headers:
        h.update(headers)
    return web.Response(
        status=status, text=message + "\n", content_type="text/plain", charset="utf-8", headers=h
    )


@dataclass
class HttpOptions:
    """What the HTTP surface needs to know beyond the DERP core."""

    hostname: str = "derp.tailscale.com"
    derp_enabled: bool = True
    home: str = ""
    dev: bool = False
    metrics_sources: list[Callable[[], Iterable[metrics.Family]]] = field(default_factory=list)
    debug_info: Callable[[], dict[str, str]] | None = None
    bootstrap_dns: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None
    #: Extra /debug/check problems; may be a coroutine function.
    consistency_check: Callable[[], Any] | None = None
    #: -ace: the front door proxies allowed CONNECT targets on the TLS listener (ace.py).
    ace: bool = False
    #: derper's debug-access knobs, resolved at start-up (``ServeConfig.knobs`` in serve).
    knobs: Knobs = field(default_factory=lambda: Knobs.from_environ(os.environ))


def debug_allowed(request: web.Request, knobs: Knobs) -> bool:
    """derper's debug access rule: loopback, Tailscale IPs, or explicitly allowed."""
    key_path = knobs.debug_key_path
    want = request.query.get("debugkey", "")
    if request.method == "GET" and want and key_path:
        try:
            with open(key_path) as f:
                if f.read().strip() == want:
                    return True
        except OSError:
            pass
    if "X-Forwarded-For" in request.headers:
        return False
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        ip = ipaddress.ip_address(peer[0].split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True
    if isinstance(ip, ipaddress.IPv4Address) and ip in _TAILSCALE_V4 and ip not in _CHROMEOS_V4:
        return True
    if isinstance(ip, ipaddress.IPv6Address) and ip in _TAILSCALE_V6:
        return True
    if knobs.allow_debug_ip == str(ip):
        return True
    raw = knobs.debug_trusted_cidrs
    try:
        trusted = trusted_cidrs(raw)
    except ValueError as e:
        # derper's log.Fatalf at the first check that gets this far: exit 1 at once, no
        # clean shutdown (Go's os.Exit runs no deferred code either).
        log.critical("%s", e)
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(1)
    return any(ip in net for net in trusted)


@functools.cache
def trusted_cidrs(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """TS_DEBUG_TRUSTED_CIDRS parsed as derper does: comma-separated, spaces trimmed, empty
    entries skipped, each entry an ``addr/bits`` prefix (host bits may be set). Any other
    entry raises ValueError with derper's fatal message; derper exits on it."""
    out = []
    for entry in raw.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            out.append(_parse_prefix(entry))
        except ValueError as e:
            raise ValueError(f"invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: {go_quote(entry)}: {e}") from None
    return tuple(out)


def _parse_prefix(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """Go's netip.ParsePrefix rules, and its error text: a '/' is required, no IPv6 zone,
    bits in decimal without sign or leading zero and within the family's length. (Python
    alone would take a bare address as a /32 or /128, or a zone, where derper stops.)"""

    def bad(msg: str) -> ValueError:
        return ValueError(f"netip.ParsePrefix({go_quote(text)}): {msg}")

    addr_text, slash, bits = text.rpartition("/")
    if not slash:
        raise bad("no '/'")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError as e:
        raise bad(str(e)) from None
    if "%" in addr_text:
        raise bad("IPv6 zones cannot be present in a prefix")
    if not (bits.isascii() and bits.isdigit()) or (len(bits) > 1 and bits[0] == "0"):
        raise bad("bad bits after slash: " + go_quote(bits))
    if int(bits) > addr.max_prefixlen:
        raise bad("prefix length out of range")
    return ipaddress.ip_network(f"{addr}/{bits}", strict=False)


def warn_if_bad_trusted_cidrs(knobs: Knobs) -> None:
    """At start-up, say what derper would only find out at the first outside debug check."""
    try:
        trusted_cidrs(knobs.debug_trusted_cidrs)
    except ValueError as e:
        log.warning("%s; derper and derpkit exit at the first /debug/ or home-page access check "
                    "from an address that is not loopback, Tailscale or TS_ALLOW_DEBUG_IP", e)


def home_page(opts: HttpOptions, debug_link: bool) -> str:
    prod = bool(_PROD_HOST_RE.match(opts.hostname))
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>DERP</title></head><body>",
        "<h1>DERP</h1>",
        '<p>This is a <a href="https://tailscale.com/">Tailscale</a> DERP server, run with derpkit.</p>',
        "<p>It helps Tailscale clients find each other (STUN) and relays their end-to-end "
        "encrypted traffic when no direct path works.</p>",
    ]
    if prod:
        parts.append(
            '<p>If you suspect abuse, please contact <a href="mailto:security@tailscale.com">'
            "security@tailscale.com</a>.</p>"
        )
    parts.append("<p>Documentation:</p><ul>")
    if prod:
        parts.append('<li><a href="https://tailscale.com/security-policies">Tailscale Security Policies</a></li>')
        parts.append('<li><a href="https://tailscale.com/tailscale-aup">Tailscale Acceptable Use Policy</a></li>')
    for url in (
        "https://tailscale.com/kb/1232/derp-servers",
        "https://pkg.go.dev/tailscale.com/derp",
        "https://github.com/tailscale/tailscale/tree/main/cmd/derper#derp",
    ):
        parts.append(f'<li><a href="{url}">{url}</a></li>')
    parts.append("</ul>")
    if not opts.derp_enabled:
        parts.append("<p>Status: <b>disabled</b></p>")
    if debug_link:
        parts.append('<p>Debug info at <a href="/debug/">/debug/</a>.</p>')
    parts.append("</body></html>\n")
    return "\n".join(parts)


def build_app(server: DerpServer, opts: HttpOptions) -> web.Application:
    started = time.time()
    warn_if_bad_trusted_cidrs(opts.knobs)
    # CONNECT never reaches aiohttp: the front door gets this Ace (app[ACE]) from the node.
    ace = acemod.Ace(opts.ace)

    async def derp(request: web.Request) -> web.StreamResponse:
        if not opts.derp_enabled:
            return go_error(404, "derp server disabled")
        decision = upgrade.decide(dict(request.headers))
        if decision.kind is upgrade.UpgradeKind.WEBSOCKET:
            return await handle_websocket(request, server)
        if decision.kind is upgrade.UpgradeKind.DERP:
            # A DERP upgrade after another request on a kept-alive connection: the front
            # door only takes over fresh connections. Go clients always dial anew.
            return go_error(400, "DERP upgrade must be the first request on a connection")
        return go_error(426, upgrade.UPGRADE_REQUIRED_BODY.decode().rstrip("\n"))

    async def probe(request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            return go_error(405, "bogus probe method")
        return web.Response(status=200, headers={"Access-Control-Allow-Origin": "*"})

    async def generate_204(request: web.Request) -> web.Response:
        return no_content(request)

    async def robots(request: web.Request) -> web.Response:
        return web.Response(
            text="User-agent: *\nDisallow: /\n", content_type="text/plain", charset="utf-8",
            headers=BROWSER_HEADERS,
        )

    async def bootstrap_dns(request: web.Request) -> web.StreamResponse:
        if opts.bootstrap_dns is not None:
            resp = await opts.bootstrap_dns(request)
        else:
            # derper with no names configured: 200, an empty JSON body.
            resp = web.Response(body=b"", headers={"Content-Type": "application/json", "Connection": "close"})
        resp.headers.update(BROWSER_HEADERS)
        return resp

    async def home(request: web.Request) -> web.StreamResponse:
        if opts.home == "blank":
            return web.Response(status=200, content_type="text/html", charset="utf-8", headers=BROWSER_HEADERS)
        if opts.home.startswith(("http://", "https://")):
            raise web.HTTPFound(opts.home, headers=BROWSER_HEADERS)
        return web.Response(
            text=home_page(opts, debug_allowed(request, opts.knobs)), content_type="text/html", charset="utf-8",
            headers=BROWSER_HEADERS,
        )

    async def debug(request: web.Request) -> web.StreamResponse:
        if not debug_allowed(request, opts.knobs):
            msg = "debug access denied"
            if opts.dev and request.path != "/debug/":
                peer = request.transport.get_extra_info("peername") if request.transport else None
                msg += f"; to permit access, set TS_ALLOW_DEBUG_IP={peer[0] if peer else '<ip>'}"
            return go_error(403, msg)
        sub = request.path[len("/debug/") :]
        hdrs = dict(BROWSER_HEADERS)
        if sub:
            hdrs["Content-Security-Policy"] += "; style-src 'self' 'unsafe-inline'"
        if sub == "":
            return web.Response(text=debug_index(), content_type="text/html", charset="utf-8", headers=hdrs)
        if sub == "varz":
            body = metrics.render(all_families())
            return web.Response(text=body, content_type="text/plain", charset="utf-8", headers=hdrs)
        if sub == "vars":
            return web.json_response(vars_json(), headers=hdrs)
        if sub == "check":
            problems = registry_problems(server)
            if opts.consistency_check is not None:
                more = opts.consistency_check()
                if inspect.isawaitable(more):
                    more = await more
                problems += list(more)
            if problems:
                return go_error(500, ", ".join(problems))
            return web.Response(text="derp.Server ConsistencyCheck okay", content_type="text/plain", headers=hdrs)
        if sub == "gc":
            import gc

            gc.collect()
            return web.Response(text="running GC...\nDone.\n", content_type="text/plain", headers=hdrs)
        return go_error(404, "404 page not found")

    rss0 = metrics.rss_bytes()

    def all_families() -> Iterable[metrics.Family]:
        yield from metrics.derp_families(server, rss0)
        yield from metrics.process_families(started)
        yield from ace.families()
        yield from request.families(server.stats.http_heads_refused)
        for src in opts.metrics_sources:
            yield from src()

    def vars_json() -> dict[str, object]:
        out: dict[str, object] = {}
        for fam in all_families():
            for labels, value in fam.samples:
                if labels:
                    d = out.setdefault(fam.name, {})
                    assert isinstance(d, dict)
                    d["/".join(labels.values())] = value
                else:
                    out[fam.name] = value
        out["version"] = __version__
        return dict(sorted(out.items()))

    def debug_index() -> str:
        info = {
            "Uptime": f"{int(time.time() - started)}s",
            "Version": __version__,
            "Machine": os.uname().nodename,
            "TLS hostname": opts.hostname,
            "Mesh key": str(server.mesh_key is not None).lower(),
        }
        if opts.debug_info:
            info.update(opts.debug_info())
        rows = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>" for k, v in info.items())
        links = "".join(
            f'<li><a href="/debug/{p}">/debug/{p}</a> {html.escape(d)}</li>'
            for p, d in (
                ("vars", "Metrics (JSON)"), ("varz", "Metrics (Prometheus)"),
                # derper's Go-runtime pages: linked as derper does, 404 here (spec §11 Q6).
                ("pprof/", "pprof (index; Go only)"), ("pprof/goroutine?debug=1", "Goroutines (collapsed; Go only)"),
                ("pprof/goroutine?debug=2", "Goroutines (full; Go only)"), ("gc", "force GC"),
                ("check", "Consistency check"), ("traffic", "Traffic check (not in derpkit)"),
                ("set-mutex-profile-fraction", "SetMutexProfileFraction (Go only)"),
            )
        )
        return f"<html><body><h1>derpkit debug</h1><ul>{rows}</ul><ul>{links}</ul></body></html>\n"

    app = web.Application(middlewares=[go_mux_cleanup])
    app.on_response_prepare.append(set_server_header)
    app.router.add_route("*", "/derp", derp)
    app.router.add_route("*", "/derp/probe", probe)
    app.router.add_route("*", "/derp/latency-check", probe)
    app.router.add_route("*", "/generate_204", generate_204)
    app.router.add_route("*", "/robots.txt", robots)
    app.router.add_route("*", "/bootstrap-dns", bootstrap_dns)
    app.router.add_route("*", "/debug", debug_redirect)
    app.router.add_route("*", "/debug/{tail:.*}", debug)
    app.router.add_route("*", "/{tail:.*}", home)
    app[ALL_FAMILIES] = all_families
    app[ACE] = ace
    return app


def registry_problems(server: DerpServer) -> list[str]:
    """/debug/check: the client map and the connections agree (derper's ConsistencyCheck)."""
    problems = []
    empty = sum(1 for cs in server.clients.values() if not cs.conns)
    if empty:
        problems.append(f"{empty} s.clients keys with no connection")
    missing = sum(1 for cs in server.clients.values() for c in cs.conns if c not in server.conns)
    if missing:
        problems.append(f"{missing} s.clients connections not in the connection set")
    return problems


def go_redirect(request: web.Request, location: str, status: int = 307) -> web.Response:
    """Go's http.Redirect: an HTML link body for GET, Content-Type for GET/HEAD only."""
    headers = {"Location": location}
    if request.method in ("GET", "HEAD"):
        headers["Content-Type"] = "text/html; charset=utf-8"
    body = b""
    if request.method == "GET":
        reason = {301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect"}.get(status, "")
        body = f'<a href="{html.escape(location)}">{reason}</a>.\n\n'.encode()
    return web.Response(status=status, body=body, headers=headers)


async def debug_redirect(request: web.Request) -> web.Response:
    # Go's ServeMux: /debug -> /debug/ with 307 (as the real derper answers).
    return go_redirect(request, "/debug/" + (f"?{request.query_string}" if request.query_string else ""))


def clean_path(p: str) -> str:
    """Go's ServeMux cleanPath: rooted, ``path.Clean``-ed, trailing slash kept."""
    if not p:
        return "/"
    if not p.startswith("/"):
        p = "/" + p
    out = posixpath.normpath(p)
    if out.startswith("//"):
        out = "/" + out.lstrip("/")
    if p.endswith("/") and out != "/":
        out += "/"
    return out


@web.middleware
async def go_mux_cleanup(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Non-canonical paths (``//x``, ``/a/../b``) get Go's 307 to the cleaned path."""
    path = request.path
    if request.method != "CONNECT":
        cleaned = clean_path(path)
        if cleaned != path:
            q = request.query_string
            return go_redirect(request, cleaned + (f"?{q}" if q else ""))
    return await handler(request)


async def set_server_header(request: web.Request, response: web.StreamResponse) -> None:
    # derper sends no Server header; aiohttp only adds its own when none is set.
    response.headers["Server"] = "derpkit"


def no_content(request: web.Request) -> web.Response:
    """/generate_204: the captive-portal check with Tailscale's challenge/response."""
    return web.Response(status=204, headers=no_content_headers(request.headers.get("X-Tailscale-Challenge", "")))


def no_content_headers(challenge: str) -> dict[str, str]:
    """derper's ServeNoContent headers: the challenge echoed only when short and plain."""
    headers = {"Cache-Control": NO_CACHE}
    if challenge and _CHALLENGE_RE.match(challenge):
        headers["X-Tailscale-Response"] = "response " + challenge
    return headers
