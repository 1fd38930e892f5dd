"""The first protocol on every accepted connection: read the request head, pick a path.

A DERP upgrade to ``/derp`` is taken straight from here to ``ClientConn`` on the same
transport, so relayed packets never pass through aiohttp's request machinery. Every other
request (probes, the home page, metrics, WebSocket DERP) is handed, with the bytes read
so far, to aiohttp's protocol on the same transport. See docs/protocol.md ("The packet
path") and docs/benchmarks.md for the numbers behind this choice.

A CONNECT is answered here as well, never by aiohttp (whose parser insists on a Host
header and would swallow the connection as an upgrade). On the TLS listener it goes to
derper's ACE rules (ace.py): 403 when disabled or for a bad target, 502 when the dial
fails, a byte tunnel otherwise. On a plain listener derper's mux answers an
authority-form CONNECT with 404. The port-80 listener of TLS mode passes ``plain_connect``
(port80.py), which answers every CONNECT there as derper's port-80 handler does. After an
error answer the connection stays open for the next request, as Go's server keeps it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from derpkit.gosyntax import go_quote
from derpkit.protocol import upgrade
from derpkit.server import metrics
from derpkit.server.relay.conn import ClientConn

from . import ace as acemod
from . import request
from .fdwatch import WATCH as FD_WATCH
from .goresponse import go_error

if TYPE_CHECKING:
    from derpkit.server.relay.derp import DerpServer

log = logging.getLogger("derpkit.server")

#: (request URI, headers keyed in lower case, HTTP/1.0, closing) -> response bytes or None.
PlainConnect = Callable[[bytes, dict[str, str], bool, bool], "bytes | None"]

#: derper's HTTP server read timeout; a connection that sends no request head is dropped.
HEAD_TIMEOUT = 30.0


class FrontDoor(asyncio.Protocol):
    """Reads one HTTP request head and hands the connection to DERP or to aiohttp."""

    __slots__ = (
        "server", "http_factory", "derp_enabled", "transport", "buf", "timer", "on_connect", "ace", "dialing", "skip",
        "plain_connect",
    )

    def __init__(
        self,
        server: DerpServer,
        http_factory: Callable[[], asyncio.Protocol],
        *,
        derp_enabled: bool = True,
        on_connect: Callable[[Any], bool] | None = None,
        ace: acemod.Ace | None = None,
        plain_connect: PlainConnect | None = None,
    ) -> None:
        self.server = server
        #: Answers a CONNECT on a plain listener (whole response bytes), or None to hand it
        #: to aiohttp; unset, the plain-mode rule applies (404 for the authority form).
        self.plain_connect = plain_connect
        #: The listener's CONNECT settings and counters; None answers CONNECT as -ace=false.
        self.ace = ace if ace is not None else acemod.Ace()
        #: The upstream dial of a CONNECT in progress (reading is paused meanwhile).
        self.dialing: asyncio.Task[None] | None = None
        #: Bytes of a refused CONNECT's body still to discard before the next request.
        self.skip = 0
        self.http_factory = http_factory
        self.derp_enabled = derp_enabled
        self.on_connect = on_connect
        self.transport: Any = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        FD_WATCH.ensure(loop)
        if self.on_connect is not None and not self.on_connect(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.timer = loop.call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.dialing is not None:
            self.dialing.cancel()
            self.dialing = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.dialing is None:
            self._next_request()

    def _next_request(self) -> None:
        # A loop because a refused CONNECT leaves the connection open for another request.
        while self.transport is not None:
            if self.skip:
                n = min(self.skip, len(self.buf))
                self.buf = self.buf[n:]
                self.skip -= n
                if self.skip:
                    return
            try:
                req = request.parse(self.buf)
            except request.Refused as e:
                self._refuse(e)
                return
            if req is None:
                return
            rest = self.buf[req.size:]
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if req.method == b"CONNECT":
                if self._connect(req, rest):
                    continue
                return
            self._request(req, rest)
            return

    def _refuse(self, e: request.Refused) -> None:
        """A head no two parsers would read alike: Go's answer, then hang up, reading nothing more."""
        log.debug("front door: refused a request head: %s", e.why)
        self.server.stats.http_heads_refused[e.reason] += 1
        self.buf = b""
        t = self.transport
        t.write(e.response)
        t.close()

    def _request(self, req: request.RequestHead, rest: bytes) -> None:
        if not self.derp_enabled:
            self._to_http()
            return
        path = req.target.split(b"?", 1)[0]
        if path != b"/derp":
            self._to_http()
            return
        decision = upgrade.decide(req.as_dict())
        if decision.kind is not upgrade.UpgradeKind.DERP:
            if decision.weird_upgrade:
                log.info("derp: weird upgrade: %r", decision.weird_upgrade)
            self._to_http()
            return
        peer = self.transport.get_extra_info("peername")
        remote = (peer[0], peer[1]) if peer else None
        conn = ClientConn(self.server, remote, not_ideal=decision.not_ideal)
        self.transport.set_protocol(conn)
        if decision.fast_start:
            self.server.stats.fast_start_accepts += 1
        preamble = b"" if decision.fast_start else upgrade.switching_protocols(self.server.public_key)
        conn.start(self.transport, rest, preamble)

    def _to_http(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        proto = self.http_factory()
        t = self.transport
        t.set_protocol(proto)
        proto.connection_made(t)
        buf, self.buf = self.buf, b""
        if buf:
            proto.data_received(buf)

    # ------------------------------------------------------------------ CONNECT

    def _connect(self, req: request.RequestHead, rest: bytes) -> bool:
        """Answer a CONNECT; True when the next request in the buffer should be read now."""
        uri, http10, headers = req.target, req.http10, req.lower_dict()
        t = self.transport
        tls_label = metrics.tls_version_label(t)
        tls = tls_label is not None
        if tls_label is not None:
            # derper counts every TLS request by version, CONNECT included (before any check).
            self.server.stats.tls_request_version[tls_label] += 1
        length = str(req.content_length)
        if not acemod.request_uri_ok(uri):
            # Go's server rejects these before any handler, and hangs up.
            self.server.stats.http_heads_refused["bad_request_target"] += 1
            t.write(acemod.GO_BAD_REQUEST)
            t.close()
            return False
        # A chunked body is not worth parsing on a refused CONNECT: answer, then hang up.
        close = req.wants_close or req.chunked
        if not tls and self.plain_connect is not None:
            answer = self.plain_connect(uri, headers, http10, close)
            if answer is None:
                self._to_http()
                return False
            self.buf = rest
            return self._answer(answer, close, int(length))
        if not tls and b"/" in uri:
            # derper's mux routes such a request by its path (home page, probes...);
            # aiohttp answers it instead, a difference listed in docs/compat.md.
            self._to_http()
            return False
        self.buf = rest
        if not tls:
            return self._answer(go_error(404, "404 page not found", http10=http10, close=close), close, int(length))
        ace = self.ace
        if not ace.enabled:
            ace.requests["disabled"] += 1
            return self._answer(go_error(403, "CONNECT not enabled", http10=http10, close=close), close, int(length))
        target = uri.decode("utf-8", "replace")
        try:
            host, port = acemod.check_target(target)
        except acemod.TargetError as e:
            log.info("CONNECT target %s not allowed: %s", go_quote(target), e)
            ace.requests["invalid_target"] += 1
            return self._answer(go_error(403, "Invalid CONNECT target", http10=http10, close=close), close, int(length))
        t.pause_reading()
        self.dialing = asyncio.get_running_loop().create_task(
            self._dial(ace, target, host, port, http10, close, int(length))
        )
        return False

    def _answer(self, response: bytes, close: bool, body_len: int) -> bool:
        t = self.transport
        t.write(response)
        if close:
            t.close()
            return False
        self.skip = body_len
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)
        return True

    async def _dial(self, ace: acemod.Ace, target: str, host: str, port: int, http10: bool, close: bool,
                    body_len: int) -> None:
        tunnel = acemod.Tunnel(ace)
        try:
            await tunnel.dial(host, port)
        except asyncio.CancelledError:
            tunnel.close()  # the client left while we dialled
            raise
        except (OSError, TimeoutError) as e:
            self.dialing = None
            log.info("error CONNECT dialing %s: %s", target, e or "timed out")
            ace.requests["dial_failed"] += 1
            t = self.transport
            if t is None or t.is_closing():
                return
            if self._answer(go_error(502, "Connect failure", http10=http10, close=close), close, body_len):
                t.resume_reading()
                self._next_request()
            return
        self.dialing = None
        t, self.transport = self.transport, None
        if t is None or t.is_closing():
            tunnel.close()
            return
        ace.requests["connected"] += 1
        label = metrics.tls_version_label(t)
        if label is not None:
            # A tunnel is a request in flight for its whole life, as in derper's handler.
            active = self.server.stats.tls_active_version
            active[label] += 1

            def done() -> None:
                active[label] -= 1

            tunnel.on_close = done
        pending, self.buf = self.buf, b""
        tunnel.attach(t, pending)

