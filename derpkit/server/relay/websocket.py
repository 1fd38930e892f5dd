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


class WebSocketTransport(asyncio.Transport):
    """Just enough of asyncio.Transport for ClientConn: write, flow control, close."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request) -> None:
        super().__init__()
        self.ws = ws
        self.request = request
        self.protocol: ClientConn | None = None
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._wake = asyncio.Event()
        self._readable = asyncio.Event()
        self._readable.set()
        self._closing = False
        self._paused_proto = False
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            t = self.request.transport
            return t.get_extra_info("peername") if t is not None else default
        return default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        self._pending.append(bytes(data))
        self._pending_bytes += len(data)
        self._wake.set()
        if self._pending_bytes > _HIGH_WATER and not self._paused_proto and self.protocol is not None:
            self._paused_proto = True
            self.protocol.pause_writing()

    def writelines(self, chunks: Any) -> None:
        for c in chunks:
            self.write(c)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        return None

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._readable.clear()

    def resume_reading(self) -> None:
        self._readable.set()

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._wake.set()

    def abort(self) -> None:
        self._closing = True
        self._pending.clear()
        self._sender.cancel()
        asyncio.get_running_loop().create_task(self.ws.close())

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._pending:
                    data = b"".join(self._pending)
                    self._pending.clear()
                    self._pending_bytes = 0
                    for i in range(0, len(data), WEBSOCKET_MAX_MESSAGE):
                        await self.ws.send_bytes(data[i : i + WEBSOCKET_MAX_MESSAGE])
                    if self._paused_proto and self._pending_bytes < _LOW_WATER and self.protocol is not None:
                        self._paused_proto = False
                        self.protocol.resume_writing()
                if self._closing:
                    await self.ws.close()
                    return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self._closing = True


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
