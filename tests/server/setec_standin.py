"""A STAND-IN for a setec server, speaking setec's real wire format on 127.0.0.1.

Why a stand-in: the real server (``github.com/tailscale/setec/cmd/setec server``, even with
``--dev``) only listens through tsnet, so it needs a Tailscale control server and a login
before it serves anything; it cannot run on a loopback-only test machine. This stand-in
reproduces what setec's ``server/server.go`` (``serveJSON`` and ``get``, revision
v0.0.0-20251203133219-2ab774e4129a, the one tailscale v1.102.3 pins) does for ``/api/get``:

- only POST, else 400 ``only POST requests allowed``;
- ``Content-Type`` exactly ``application/json``, else 400 ``request body must be json``;
- header ``Sec-X-Tailscale-No-Browsers: setec``, else 403 ``access denied``;
- a JSON body ``{"Name", "Version", "UpdateIfChanged"}`` (undecodable: 400 ``bad request``);
- unknown name or version: 404 ``not found``; ``Version`` 0 means the active version; with
  ``UpdateIfChanged`` and the active version equal to ``Version``: 304 and no body;
- success: 200, ``Content-Type: application/json``, body ``{"Value":"<base64>","Version":N}``.

What it leaves out: the caller's Tailscale identity and ACLs (every caller may read every
secret) and the other API calls. Every request is recorded so tests can compare what
derpkit and Go derper sent. ``fail_with`` makes it answer every request with that status
(``http.Error`` style text body), for "server error" tests. tests/server/setecserver runs
setec's own server code instead, for the checks that need no request recording.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    """One request as received: method, path, headers (lower-cased names), raw body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class SetecStandIn:
    """Secrets are ``name -> list of values``; version N is ``values[N-1]``, the last active."""

    secrets: dict[str, list[bytes]] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    fail_with: int | None = None
    port: int = 0
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def put(self, name: str, value: bytes) -> int:
        """Add a version and make it active (setec's put + activate); returns its number."""
        self.secrets.setdefault(name, []).append(value)
        return len(self.secrets[name])

    async def start(self, port: int = 0) -> SetecStandIn:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _error(status: int, text: str) -> web.Response:
        # Go's http.Error: text/plain, nosniff, the message and a newline.
        return web.Response(
            status=status, text=text + "\n", content_type="text/plain", charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(
            Recorded(request.method, request.path, {k.lower(): v for k, v in request.headers.items()}, body)
        )
        if self.fail_with is not None:
            return self._error(self.fail_with, "internal error")
        if request.path != "/api/get":
            return self._error(404, "404 page not found")
        if request.method != "POST":
            return self._error(400, "only POST requests allowed")
        if request.headers.get("Content-Type") != "application/json":
            return self._error(400, "request body must be json")
        if request.headers.get("Sec-X-Tailscale-No-Browsers") != "setec":
            return self._error(403, "access denied")
        try:
            req = json.loads(body)
            name, version = req.get("Name", ""), int(req.get("Version", 0))
            if_changed = bool(req.get("UpdateIfChanged", False))
        except (ValueError, TypeError, AttributeError):
            return self._error(400, "bad request")
        values = self.secrets.get(name)
        if not values:
            return self._error(404, "not found")
        active = len(values)
        if version == 0 or if_changed:
            if if_changed and version == active:
                return web.Response(status=304, content_type="application/json")
            version = active
        if not 1 <= version <= len(values):
            return self._error(404, "not found")
        out = {"Value": base64.b64encode(values[version - 1]).decode(), "Version": version}
        return web.Response(status=200, body=json.dumps(out, separators=(",", ":")).encode(),
                            content_type="application/json")
