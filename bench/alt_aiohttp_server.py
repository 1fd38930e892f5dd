"""BENCHMARK-ONLY VARIANT, not shipped in ``derpkit/``: DERP read through aiohttp's body stream.

    python -m bench.alt_aiohttp_server serve -a 127.0.0.1:0 -c KEYFILE -stun=false

This is ``derpkit serve`` with one change, so that ``bench/upgrade_paths.py`` can measure
the packet path docs/benchmarks.md ("Why the front door") compares against ours:

- the front door no longer takes ``/derp`` itself: every connection goes to aiohttp;
- ``/derp`` upgrades are answered inside an aiohttp request handler, the way one writes a
  custom upgrade in aiohttp: a ``web.StreamResponse(status=101)`` with derper's headers,
  ``prepare()``, then a loop of ``await reader.readany()`` on an aiohttp ``StreamReader``
  whose bytes are handed to the very same ``ClientConn`` (``conn.data_received(chunk)``).

Routing, queues, batching and writing are ``ClientConn``'s own code writing to the same
transport; only the read path differs (transport → aiohttp ``RequestHandler.data_received``
→ payload parser → ``StreamReader`` → a handler task woken per chunk → ``ClientConn``).

Why not ``request.content.readany()`` literally: aiohttp 3.14's HTTP parser switches
protocols only for ``Upgrade: websocket`` (``ALLOWED_UPGRADES``); for ``Upgrade: DERP``
``request.content`` is the empty payload and later bytes would be parsed as the next HTTP
request. So the handler installs its own payload parser with ``request.protocol.set_parser``
before answering 101 — exactly how aiohttp's ``WebSocketResponse`` takes the stream over —
and that parser feeds an ``aiohttp.StreamReader``, the class behind ``request.content``.
Clients that use fast start (bytes right behind the request head) would not work here;
derpgen and tailscaled's default client wait for the 101.

aiohttp also considers the connection upgraded only for websocket, so the handler sets
the protocol's ``_upgraded`` flag itself (the state a websocket upgrade leaves behind);
without it the ``StreamReader``'s read backpressure calls the HTTP parser's
``pause_reading`` and dies on an assertion under load (found by this benchmark).

Flow control is kept equal: the transport's protocol is aiohttp's ``RequestHandler``, so
``pause_writing``/``resume_writing`` (and ``connection_lost``) are forwarded from it to the
``ClientConn`` (a small ``RequestHandler`` subclass); without that the alternative would
never queue or drop, and would write to closed transports.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from aiohttp import StreamReader, web, web_protocol, web_server

import derpkit.server.node as node_mod
from derpkit.cli import main as derpkit_main
from derpkit.protocol import upgrade
from derpkit.protocol.constants import DERP_PUBLIC_KEY_HEADER, DERP_VERSION_HEADER, PROTOCOL_VERSION
from derpkit.server.frontdoor.head import FrontDoor
from derpkit.server.relay.conn import ClientConn
from derpkit.server.relay.derp import DerpServer

READ_LIMIT = 2**16  # aiohttp's default read_bufsize for request bodies


class AllToAiohttp(FrontDoor):
    """The front door with its DERP branch removed: every request goes to aiohttp."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._to_http()


class DerpAwareRequestHandler(web_protocol.RequestHandler):
    """aiohttp's protocol, forwarding write flow control to a DERP connection it carries."""

    __slots__ = ("derp_conn",)

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.derp_conn: ClientConn | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.derp_conn is not None:
            self.derp_conn.pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.derp_conn is not None:
            self.derp_conn.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        # Tell the DERP connection at once (the handler task only wakes a turn later),
        # so it stops writing to the closed transport, as it does behind the front door.
        conn, self.derp_conn = self.derp_conn, None
        super().connection_lost(exc)
        if conn is not None:
            conn.connection_lost(exc if isinstance(exc, Exception) else None)


class _BodyFeed:
    """A payload parser for ``set_parser``: every byte after the head goes to a StreamReader."""

    def __init__(self, reader: StreamReader) -> None:
        self.reader = reader

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self.reader.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self.reader.feed_eof()


async def derp_upgrade(request: web.Request, server: DerpServer) -> web.StreamResponse:
    """Raw DERP on /derp as an aiohttp handler: 101, then read the body stream until EOF."""
    decision = upgrade.decide(dict(request.headers))
    proto = request.protocol
    transport = request.transport
    assert transport is not None
    reader = StreamReader(proto, READ_LIMIT, loop=asyncio.get_running_loop())
    # aiohttp marks a connection upgraded only for websocket; without this flag the
    # StreamReader's backpressure (pause_reading) trips an assertion in the paused HTTP
    # parser. The websocket path has exactly this state after its 101.
    proto._upgraded = True  # noqa: SLF001
    proto.set_parser(_BodyFeed(reader))  # type: ignore[arg-type]
    resp = web.StreamResponse(status=101, headers={
        "Upgrade": "DERP",
        "Connection": "Upgrade",
        DERP_VERSION_HEADER: str(PROTOCOL_VERSION),
        DERP_PUBLIC_KEY_HEADER: server.public_key.hex(),
    })
    await resp.prepare(request)
    peer = transport.get_extra_info("peername")
    conn = ClientConn(server, (peer[0], peer[1]) if peer else None, not_ideal=decision.not_ideal)
    if isinstance(proto, DerpAwareRequestHandler):
        proto.derp_conn = conn
    conn.start(transport, b"", b"")  # the 101 went out through aiohttp; ServerKey follows
    try:
        while True:
            chunk = await reader.readany()
            if not chunk:
                break
            conn.data_received(chunk)
    finally:
        conn.connection_lost(None)
        if not transport.is_closing():
            transport.close()
    return resp


def _build_app(server: DerpServer, opts: Any) -> web.Application:
    app = _original_build_app(server, opts)

    @web.middleware
    async def derp_first(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/derp" and opts.derp_enabled:
            if upgrade.decide(dict(request.headers)).kind is upgrade.UpgradeKind.DERP:
                return await derp_upgrade(request, server)
        return await handler(request)

    app.middlewares.insert(0, derp_first)
    return app


_original_build_app = node_mod.build_app


def install() -> None:
    """Patch derpkit's listener and app (in this process only) into the alternative."""
    node_mod.FrontDoor = AllToAiohttp  # type: ignore[misc]
    node_mod.build_app = _build_app
    web_server.RequestHandler = DerpAwareRequestHandler  # type: ignore[misc]


if __name__ == "__main__":
    install()
    sys.exit(derpkit_main())
