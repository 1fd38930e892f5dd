"""DERP over WebSocket: a transport adapter so ``ClientConn`` runs unchanged.

Browsers (and Tailscale's wasm client) cannot speak raw DERP, so they carry the DERP byte
stream in binary WebSocket messages; message boundaries mean nothing. Go servers read at
most 32 KiB per message, so we never send larger ones either.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import WSMsgType, web

from derpkit.protocol.constants import WEBSOCKET_MAX_MESSAGE, WEBSOCKET_SUBPROTOCOL

from .conn import ClientConn
from .derp import DerpServer

log = logging.getLogger("derpkit.server")

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


def binary_frames(data: bytes) -> list[bytes]:
    """Server-to-client binary WebSocket frames (unmasked, FIN set) carrying ``data``.

    Split at WEBSOCKET_MAX_MESSAGE: Go reads at most 32 KiB per message.
    """
    out: list[bytes] = []
    for i in range(0, len(data), WEBSOCKET_MAX_MESSAGE):
        chunk = data[i : i + WEBSOCKET_MAX_MESSAGE]
        n = len(chunk)
        out.append((bytes((0x82, n)) if n < 126 else b"\x82\x7e" + n.to_bytes(2, "big")) + chunk)
    return out


class WebSocketTransport(asyncio.Transport):
    """Just enough of asyncio.Transport for ClientConn: write, flow control, close.

    Writes are framed here and handed to the connection's own transport in the same loop
    turn, as the plain-TCP path writes to its socket. (They used to go through a sender task
    awaiting aiohttp's ``send_bytes`` per 32 KiB message; under load that task got one
    message out per loop turn while the senders' readers brought in two, and the receivers'
    queues head-dropped nearly half of a flood at 70 % CPU.) aiohttp still answers pings and
    does the close handshake on the same transport; each side writes whole frames in one
    call, so frames never interleave.
    """

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        super().__init__()
        self.ws = ws
        self.request = request
        self.protocol: ClientConn | None = None
        self._raw: Any = request.transport
        self._readable = asyncio.Event()
        self._readable.set()
        self._closing = False
        self._paused_proto = False
        self._poll: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            t = self._raw
            return t.get_extra_info("peername") if t is not None else default
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        raw = self._raw
        if self._closing or raw is None or raw.is_closing():
            return
        frames = binary_frames(bytes(data))
        if len(frames) == 1:
            raw.write(frames[0])
        else:
            raw.writelines(frames)
        self._check_backlog()

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def _check_backlog(self) -> None:
        """Pause the connection above the high-water mark; resume it below the low one.

        The underlying transport's own pause_writing goes to aiohttp's protocol, not to us,
        so while paused we look at its buffer every millisecond (only a stuck or slow reader
        is ever paused, and the core's write deadline still runs meanwhile).
        """
        raw = self._raw
        size = raw.get_write_buffer_size() if raw is not None else 0
        proto = self.protocol
        if not self._paused_proto:
            if size > _HIGH_WATER and proto is not None:
                self._paused_proto = True
                proto.pause_writing()
                self._poll = self._loop.call_later(0.001, self._recheck)
        elif size < _LOW_WATER:
            self._paused_proto = False
            if proto is not None:
                proto.resume_writing()

    def _recheck(self) -> None:
        self._poll = None
        if self._closing or not self._paused_proto:
            return
        self._check_backlog()
        if self._paused_proto:
            self._poll = self._loop.call_later(0.001, self._recheck)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def _stop_polling(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._stop_polling()
            self._loop.create_task(self._close_ws())

    def abort(self) -> None:
        self._closing = True
        self._stop_polling()
        raw = self._raw
        if raw is not None:
            raw.abort()

    async def _close_ws(self) -> None:
        try:
            await self.ws.close()
        except (ConnectionError, RuntimeError):
            pass


async def handle_websocket(request: web.Request, server: DerpServer) -> web.StreamResponse:
    """Serve one DERP-over-WebSocket connection until either side closes."""
    ws = web.WebSocketResponse(protocols=(WEBSOCKET_SUBPROTOCOL,), compress=False, max_msg_size=4 << 20)
    await ws.prepare(request)
    if ws.ws_protocol != WEBSOCKET_SUBPROTOCOL:
        await ws.close(code=1008, message=b"client must speak the derp subprotocol")
        return ws
    server.stats.websocket_accepts += 1
    transport = WebSocketTransport(ws, request)
    peer = transport.get_extra_info("peername")
    conn = ClientConn(server, (peer[0], peer[1]) if peer else None, websocket=True)
    transport.protocol = conn
    conn.start(transport, b"")
    try:
        while not transport.is_closing():
            await transport._readable.wait()  # noqa: SLF001
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                conn.data_received(msg.data)
            elif msg.type == WSMsgType.TEXT:
                server.stats.conn_errors["websocket_text"] += 1
                # Leave the relay first: the close handshake below waits for the client's
                # Close (up to aiohttp's timeout), and a client that never answers must not
                # keep its key registered meanwhile.
                conn.close_reason = "websocket_text"
                conn.connection_lost(None)
                await ws.close(code=1003, message=b"DERP needs binary messages")
                break
            else:
                break
    finally:
        conn.connection_lost(None)
        transport.close()
    return ws
