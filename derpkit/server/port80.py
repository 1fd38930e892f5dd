"""The plain-HTTP side listener of TLS mode (``-http-port``, spec derper-cli §3.11).

In order:

1. ``/generate_204``: the captive-portal check, served here too;
2. ``/.well-known/acme-challenge/<token>``: the ACME HTTP-01 answer, when the certificate
   mode does ACME (403 for a host the provider does not serve, 404 for an unknown token);
3. a request whose raw URI starts with ``/debug``: handed to the main application, so the
   debug pages are reachable over plain HTTP behind the same access check;
4. any other method than GET/HEAD: 400 ``Use HTTPS``;
5. everything else: 302 to ``https://<Host header><raw URI>`` (``/`` from a requester allowed
   into debug goes to ``https://<Host>/debug/``). The Host header is copied as sent, port
   included, as derper does.
"""

from __future__ import annotations

import html
from collections.abc import Callable

from aiohttp import web

from .http import debug_allowed, go_error, no_content

#: (host header, path) -> (status, body) for ACME HTTP-01 paths, or None if not ACME.
AcmeResponder = Callable[[str, str], "tuple[int, str] | None"]


def build_port80_app(main_app: web.Application, acme: AcmeResponder | None = None) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        if request.path == "/generate_204":
            return no_content(request)
        if acme is not None and request.path.startswith("/.well-known/acme-challenge/"):
            answer = acme(request.host, request.path)
            if answer is not None:
                status, body = answer
                if status == 200:
                    return web.Response(text=body, content_type="text/plain")
                return go_error(status, body)
        raw = request.raw_path
        if raw.startswith("/debug"):
            match = await main_app.router.resolve(request)
            return await match.handler(request)
        if request.method not in ("GET", "HEAD"):
            return go_error(400, "Use HTTPS")
        target_path = "/debug/" if raw == "/" and debug_allowed(request) else raw
        target = "https://" + request.headers.get("Host", "") + target_path
        # Go's http.Redirect: Location as given, a short HTML body for GET.
        body = f'<a href="{html.escape(target)}">Found</a>.\n\n' if request.method == "GET" else None
        return web.Response(
            status=302, text=body, content_type="text/html", charset="utf-8",
            headers={"Location": target},
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app
