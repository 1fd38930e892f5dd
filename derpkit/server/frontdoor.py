"""The first protocol on every accepted connection: read the request head, pick a path.

A DERP upgrade to ``/derp`` is taken straight from here to ``ClientConn`` on the same
transport, so relayed packets never pass through aiohttp's request machinery. Every other
request (probes, the home page, metrics, WebSocket DERP) is handed, with the bytes read
so far, to aiohttp's protocol on the same transport. See docs/protocol.md ("The packet
path") and docs/benchmarks.md for the numbers behind this choice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from derpkit.protocol import upgrade
from derpkit.protocol.errors import ProtocolError

from .conn import ClientConn

if TYPE_CHECKING:
    from .derp import DerpServer

log = logging.getLogger("derpkit.server")

#: derper's HTTP server read timeout; a connection that sends no request head is dropped.
HEAD_TIMEOUT = 30.0


class FrontDoor(asyncio.Protocol):
    """Reads one HTTP request head and hands the connection to DERP or to aiohttp."""

    __slots__ = ("server", "http_factory", "derp_enabled", "transport", "buf", "timer", "on_connect")

    def __init__(
        self,
        server: DerpServer,
        http_factory: Callable[[], asyncio.Protocol],
        *,
        derp_enabled: bool = True,
        on_connect: Callable[[Any], bool] | None = None,
    ) -> None:
        self.server = server
        self.http_factory = http_factory
        self.derp_enabled = derp_enabled
        self.on_connect = on_connect
        self.transport: Any = None
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.on_connect is not None and not self.on_connect(transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        self.timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            parts = upgrade.split_head(self.buf)
        except ProtocolError:
            self._to_http()
            return
        if parts is None:
            return
        head, rest = parts
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        request_line, _, header_block = head.partition(b"\r\n")
        fields = request_line.split(b" ")
        if len(fields) != 3 or not self.derp_enabled:
            self._to_http()
            return
        path = fields[1].split(b"?", 1)[0]
        if path != b"/derp":
            self._to_http()
            return
        headers: dict[str, str] = {}
        for line in header_block.split(b"\r\n"):
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().decode("latin-1")] = value.strip().decode("latin-1")
        decision = upgrade.decide(headers)
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
