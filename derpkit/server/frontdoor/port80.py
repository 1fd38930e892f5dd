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

A CONNECT never reaches aiohttp here (its parser takes CONNECT for an upgrade): the front
door asks ``connect_answer`` instead, which applies the same order to the path Go's URL
parser finds in the CONNECT target (none for ``host:port``: Go's mux then answers 404).
Checked side by side with Go derper in tests/interop/test_port80_go.py.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Callable

from aiohttp import web

from derpkit.server.config import Knobs

from .goresponse import go_error as go_error_bytes
from .goresponse import go_response
from .head import PlainConnect
from .http import debug_allowed, go_error, no_content, no_content_headers, set_server_header

#: (host header, path) -> (status, body) for ACME HTTP-01 paths, or None if not ACME.
AcmeResponder = Callable[[str, str], "tuple[int, str] | None"]


def build_port80_app(
    main_app: web.Application, knobs: Knobs, acme: AcmeResponder | None = None
) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        resp = await answer(request)
        tokens = {t.strip().lower() for t in request.headers.get("Connection", "").split(",")}
        if "upgrade" in tokens and "Upgrade" in request.headers:
            # aiohttp reads whatever follows an upgrade request as that request's stream,
            # so a next request on this connection would never be answered: hang up after
            # the answer instead (Go keeps the connection; docs/operations.md).
            resp.force_close()
        return resp

    async def answer(request: web.Request) -> web.StreamResponse:
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
        target_path = "/debug/" if raw == "/" and debug_allowed(request, knobs) else raw
        target = "https://" + request.headers.get("Host", "") + target_path
        # Go's http.Redirect: Location as given, a short HTML body for GET.
        body = f'<a href="{html.escape(target)}">Found</a>.\n\n' if request.method == "GET" else None
        return web.Response(
            status=302, text=body, content_type="text/html", charset="utf-8",
            headers={"Location": target},
        )

    app = web.Application()
    app.on_response_prepare.append(set_server_header)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def connect_answer(acme: AcmeResponder | None = None) -> PlainConnect:
    """The front door's CONNECT hook for the port-80 listener (see the module docstring)."""

    def answer(uri: bytes, headers: dict[str, str], http10: bool, close: bool) -> bytes | None:
        target = uri.decode("utf-8", "replace")
        if target.startswith("/"):
            path = target.split("?", 1)[0]
        else:
            # Go reads "host:port/p?q" as http://host:port/p?q: the path is "/p".
            rest = target.split("?", 1)[0]
            slash = rest.find("/")
            path = rest[slash:] if slash >= 0 else ""
        path = urllib.parse.unquote(path)
        if path == "":
            return go_error_bytes(404, "404 page not found", http10=http10, close=close)
        if path == "/generate_204":
            return go_response(204, no_content_headers(headers.get("x-tailscale-challenge", "")), b"", http10=http10, close=close)
        if acme is not None and path.startswith("/.well-known/acme-challenge/"):
            got = acme(headers.get("host", ""), path)
            if got is not None:
                status, body = got
                if status == 200:
                    return go_response(200, {"Content-Type": "text/plain; charset=utf-8"}, body.encode(), http10=http10, close=close)
                return go_error_bytes(status, body, http10=http10, close=close)
        if target.startswith("/debug"):
            return None  # the main application's routes, as for any other method
        return go_error_bytes(400, "Use HTTPS", http10=http10, close=close)

    return answer
