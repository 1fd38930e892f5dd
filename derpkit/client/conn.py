"""The asyncio DERP client: one connection, upgrade + handshake, then frames both ways.

Design (see DESIGN.md): a thin shell around ``derpkit.protocol.connection.ClientConnection``,
which holds every rule. Over TCP/TLS one ``asyncio.Protocol`` feeds every chunk the loop
hands us straight into the core; nothing is parsed through streams and no task runs per
packet. Outgoing frames are
collected and written once per event-loop turn (or at once when 64 KiB are pending), so a
burst of ``send()`` calls costs one system call, not one per frame.

The WebSocket variant carries the same byte stream in binary messages; one reader and one
writer task per connection move bytes between aiohttp and the same frame logic.

Limits (Go client behaviour, spec §8): a frame over 1 MiB or 120 s of silence kills the
connection; any receive error is sticky. Fast start (no wait for the 101) is used when the
server key is known before the upgrade: passed by the caller (a DERP map, an earlier
connection) or read from the server's TLS 1.3 meta-certificate, as Go's client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse
from collections import deque
from dataclasses import dataclass
from typing import Any

from derpkit.protocol import handshake
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.constants import (
    CLIENT_READ_TIMEOUT,
    PING_DATA_LEN,
    PING_TIMEOUT,
    WEBSOCKET_MAX_MESSAGE,
    WEBSOCKET_SUBPROTOCOL,
)
from derpkit.protocol.events import (
    ConnectionFailed,
    Event,
    HandshakeComplete,
    PingAnswered,
    ServerKeyReceived,
    UpgradeRefused,
)
from derpkit.protocol.frames import Frame, RecvPacket
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic

from .errors import (
    DerpCertificateError,
    DerpClosedError,
    DerpConnectionError,
    DerpTimeoutError,
    DerpUpgradeError,
)
from .tls import check_after_handshake, check_name, meta_cert_server_key, peer_der, plan_tls

__all__ = ["DerpClient", "DerpURL", "parse_url"]

#: Pending outgoing bytes that trigger an immediate write instead of waiting for the loop.
_FLUSH_AT = 64 << 10
#: Received frames held for the application before we stop reading the socket.
_RECV_HIGH = 4096
_RECV_LOW = 1024
#: WebSocket send buffer above which ``send()`` waits for the writer task.
_WS_HIGH = 256 << 10


@dataclass(frozen=True, slots=True)
class DerpURL:
    """A parsed DERP server URL."""

    tls: bool
    host: str  # hostname or IP, without brackets
    port: int
    path: str  # path plus query, defaulting to /derp
    host_header: str  # what goes into the Host header (host[:port] as written)

    def http_url(self, dial_host: str | None = None) -> str:
        h = dial_host or self.host
        if ":" in h:
            h = f"[{h}]"
        return f"{'https' if self.tls else 'http'}://{h}:{self.port}{self.path}"


def parse_url(url: str) -> DerpURL:
    """Parse ``http://``, ``https://`` or ``derp://`` (= https) URLs; path defaults to /derp."""
    u = urllib.parse.urlsplit(url)
    scheme = u.scheme.lower()
    if scheme not in ("http", "https", "derp"):
        raise ValueError(f"DERP URL {url!r}: scheme must be http, https or derp")
    if not u.hostname:
        raise ValueError(f"DERP URL {url!r}: no host")
    tls = scheme != "http"
    try:
        port = u.port or (443 if tls else 80)
    except ValueError as e:
        raise ValueError(f"DERP URL {url!r}: {e}") from None
    path = u.path if u.path not in ("", "/") else "/derp"
    if u.query:
        path += "?" + u.query
    netloc = u.netloc.rpartition("@")[2]
    return DerpURL(tls, u.hostname, port, path, netloc)


class _TcpProtocol(asyncio.Protocol):
    """Socket glue: hands bytes to the client and tracks write flow control."""

    __slots__ = ("client", "transport", "write_paused", "_drain")

    def __init__(self, client: DerpClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client._on_data(data)

    def eof_received(self) -> bool:
        return False  # close; DERP has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self.resume_writing()
        self.client._on_lost(exc)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        d, self._drain = self._drain, None
        if d is not None and not d.done():
            d.set_result(None)

    # backend interface ---------------------------------------------------------------
    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    async def drain(self) -> None:
        if self.write_paused:
            if self._drain is None:
                self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    def pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def aclose(self) -> None:
        self.close()


class _WsBackend:
    """DERP over WebSocket: one reader task, one writer task, 32 KiB messages at most."""

    def __init__(self, client: DerpClient, session: Any, ws: Any) -> None:
        self.client = client
        self.session = session
        self.ws = ws
        self._buf = bytearray()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closed = False
        self._reader = asyncio.ensure_future(self._read_loop())
        self._writer = asyncio.ensure_future(self._write_loop())

    @property
    def write_paused(self) -> bool:
        return len(self._buf) > _WS_HIGH

    def write(self, data: bytes) -> None:
        self._buf += data
        self._wake.set()

    async def drain(self) -> None:
        while len(self._buf) > _WS_HIGH and not self._closed:
            self._drained.clear()
            await self._drained.wait()

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def _read_loop(self) -> None:
        import aiohttp

        exc: Exception | None = None
        try:
            async for msg in self.ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.client._on_data(msg.data)
                    if not self._reading.is_set():
                        await self._reading.wait()
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    exc = DerpConnectionError("server sent a WebSocket text message")
                    break
                elif msg.type == aiohttp.WSMsgType.ERROR:
                    exc = msg.data if isinstance(msg.data, Exception) else None
                    break
        except Exception as e:  # aiohttp raises assorted errors on broken sockets
            exc = e
        if exc is None and self.ws.close_code not in (None, 1000, 1001):
            exc = DerpConnectionError(f"WebSocket closed with code {self.ws.close_code}")
        self.client._on_lost(exc)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._buf:
                    chunk = bytes(self._buf[:WEBSOCKET_MAX_MESSAGE])
                    del self._buf[:WEBSOCKET_MAX_MESSAGE]
                    await self.ws.send_bytes(chunk)
                    if len(self._buf) <= _WS_HIGH:
                        self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.client._on_lost(e)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drained.set()
        self._writer.cancel()
        self._reader.cancel()
        asyncio.ensure_future(self._shutdown())

    close = abort

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await self.session.close()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            # Let queued bytes go out before the close frame.
            with contextlib.suppress(Exception):
                while self._buf and not self._writer.done():
                    self._wake.set()
                    await asyncio.sleep(0)
            self._writer.cancel()
            self._reader.cancel()
        await self._shutdown()


class DerpClient:
    """One DERP connection. Create it with ``await DerpClient.connect(url, ...)``.

    ``recv()`` returns frame values from ``derpkit.protocol.frames``: ``RecvPacket``,
    ``PeerGone``, ``PeerPresent``, ``KeepAlive``, ``Ping``, ``Pong``, ``Health``,
    ``Restarting``. ServerInfo is consumed (see ``server_info``), Pongs answering our own
    ``ping()`` are consumed, unknown frame types (a late ServerKey too) are skipped.
    Every rule lives in ``derpkit.protocol.connection.ClientConnection``; this class moves
    bytes between it and a socket and turns its events into futures and a queue.
    """

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        url: str = "",
        can_ack_pings: bool = True,
        read_timeout: float = CLIENT_READ_TIMEOUT,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._key = private_key
        self.public_key: NodePublic = private_key.public()
        self.url = url
        self._can_ack_pings = can_ack_pings
        self._read_timeout = read_timeout
        self._core: ClientConnection | None = None
        self._backend: _TcpProtocol | _WsBackend | None = None
        self._info: handshake.ClientInfo = handshake.ClientInfo(can_ack_pings=can_ack_pings)
        self._preferred = False
        self._watch_conns = False
        self._queue: deque[Frame] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._read_paused = False
        self._error: DerpConnectionError | None = None
        self._hello_sent: asyncio.Future[None] = self._loop.create_future()
        self._server_info: asyncio.Future[handshake.ServerInfo] = self._loop.create_future()
        self._pings: dict[bytes, asyncio.Future[float]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._stage = ""  # the connect step in progress, for timeout messages

    # ------------------------------------------------------------------ core state

    @property
    def server_key(self) -> NodePublic | None:
        return self._core.server_key if self._core is not None else None

    @property
    def fast_start(self) -> bool:
        """Whether this connection skipped waiting for the 101 (server key known up front)."""
        return self._core is not None and self._core.fast_start

    @property
    def server_key_received(self) -> bool:
        """Whether the server's ServerKey frame arrived: the DERP upgrade really happened.

        (With fast start ``server_key`` is known before the server says anything.)
        """
        return self._core is not None and self._core.server_key_received

    @property
    def rate_limited_drops(self) -> int:
        """Packets dropped by the advisory send limiter from ServerInfo."""
        return self._core.rate_limited_drops if self._core is not None else 0

    def _new_core(self, u: DerpURL, server_key: NodePublic | None, websocket: bool, ideal_node: str) -> ClientConnection:
        core = self._core = ClientConnection(
            self._key,
            info=self._info,
            host=u.host_header,
            path=u.path,
            server_key=server_key,
            websocket=websocket,
            ideal_node=ideal_node,
            preferred=self._preferred,
            watch_conns=self._watch_conns,
            read_timeout=self._read_timeout if self._read_timeout > 0 else None,
        )
        core.start(time.monotonic())
        return core

    # ------------------------------------------------------------------ connecting

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        private_key: NodePrivate | None = None,
        mesh_key: MeshKey | None = None,
        is_prober: bool = False,
        can_ack_pings: bool = True,
        app_name: str = "",
        preferred: bool = False,
        watch_conns: bool = False,
        websocket: bool = False,
        cert_name: str | None = None,
        insecure_tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        dial_host: str | None = None,
        server_key: NodePublic | None = None,
        ideal_node: str = "",
        timeout: float = 10.0,  # noqa: ASYNC109 (one budget for the whole handshake)
        wait_for_server_info: bool = True,
        read_timeout: float = CLIENT_READ_TIMEOUT,
    ) -> DerpClient:
        """Connect, upgrade and run the handshake within ``timeout`` seconds.

        ClientInfo, NotePreferred and WatchConns are written together without waiting for
        ServerInfo (Go pipelines them too). With ``wait_for_server_info`` (the default)
        this returns only once ServerInfo arrived, i.e. once the server has admitted and
        registered us, so tests can send to this client right away.
        """
        u = parse_url(url)
        self = cls(
            private_key or NodePrivate.generate(),
            url=url,
            can_ack_pings=can_ack_pings,
            read_timeout=read_timeout,
        )
        self._info = handshake.ClientInfo(
            mesh_key=mesh_key, can_ack_pings=can_ack_pings, is_prober=is_prober, app_name=app_name
        )
        self._preferred = preferred
        self._watch_conns = watch_conns
        stage = "connecting"
        try:
            async with asyncio.timeout(timeout):
                if websocket:
                    stage = "WebSocket upgrade"
                    await self._open_ws(
                        u, cert_name, insecure_tls, ssl_context, dial_host, ideal_node
                    )
                else:
                    stage = self._stage = "TCP connect"
                    await self._open_tcp(
                        u, cert_name, insecure_tls, ssl_context, dial_host, server_key, ideal_node
                    )
                stage = "DERP upgrade"
                await asyncio.shield(self._hello_sent)
                if wait_for_server_info:
                    stage = "waiting for ServerInfo (admission)"
                    await asyncio.shield(self._server_info)
        except TimeoutError:
            if stage == "TCP connect":
                stage = self._stage  # TLS handshake, once TCP was up
            where = self._core.state.value if self._core is not None else stage
            self.abort()
            detail = where if stage == "DERP upgrade" else stage
            raise DerpTimeoutError(
                f"connect to {url}: timed out after {timeout:g} s ({detail})"
            ) from None
        except DerpConnectionError:
            self.abort()
            raise
        except ssl.SSLCertVerificationError as e:
            self.abort()
            raise DerpCertificateError(
                f"connect to {url}: TLS verification failed: {e.verify_message or e}"
            ) from e
        except (OSError, ssl.SSLError) as e:
            self.abort()
            raise DerpConnectionError(f"connect to {url}: {e}") from e
        except BaseException:
            self.abort()
            raise
        self._arm_timer()
        return self

    async def _open_tcp(
        self,
        u: DerpURL,
        cert_name: str | None,
        insecure: bool,
        ctx: ssl.SSLContext | None,
        dial_host: str | None,
        server_key: NodePublic | None,
        ideal_node: str,
    ) -> None:
        plan = (
            plan_tls(u.host, cert_name=cert_name, insecure=insecure, context=ctx) if u.tls else None
        )
        # TCP first, then TLS on it, so a timeout or failure names the step that failed
        # ("TCP connect" means packets dropped; "TLS handshake" means something answered
        # TCP but not TLS, such as a plain-HTTP server waiting for a request line).
        raw, proto = await self._loop.create_connection(
            lambda: _TcpProtocol(self), dial_host or u.host, u.port
        )
        self._backend = proto
        if plan is not None:
            self._stage = "TLS handshake"
            tls = await self._loop.start_tls(
                raw, proto, plan.context, server_hostname=plan.server_name  # type: ignore[arg-type]
            )
            if tls is None:  # the peer closed during the handshake
                raise DerpConnectionError(f"connect to {self.url}: closed during the TLS handshake")
            proto.transport = tls
            sslobj = tls.get_extra_info("ssl_object")
            check_after_handshake(plan, sslobj, self.url)
            if server_key is None or server_key.is_zero():
                server_key = meta_cert_server_key(sslobj)
        core = self._new_core(u, server_key, False, ideal_node)
        self._flush()
        if core.fast_start:
            self._hello_sent.set_result(None)

    async def _open_ws(
        self,
        u: DerpURL,
        cert_name: str | None,
        insecure: bool,
        ctx: ssl.SSLContext | None,
        dial_host: str | None,
        ideal_node: str,
    ) -> None:
        import aiohttp

        sslarg: Any = False
        server_hostname = None
        verify_name: str | None = None
        if u.tls:
            plan = plan_tls(u.host, cert_name=cert_name, insecure=insecure, context=ctx)
            sslarg = aiohttp.Fingerprint(plan.pin_sha256) if plan.pin_sha256 else plan.context
            if plan.server_name != u.host or dial_host:
                server_hostname = plan.server_name
            verify_name = plan.verify_name
        headers = {"Host": u.host_header} if dial_host else {}
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                u.http_url(dial_host),
                protocols=(WEBSOCKET_SUBPROTOCOL,),
                ssl=sslarg,
                server_hostname=server_hostname,
                headers=headers,
                compress=0,
                autoping=True,
            )
        except aiohttp.ServerFingerprintMismatch as e:
            await session.close()
            raise DerpCertificateError(
                f"{self.url}: TLS certificate does not match the CertName pin: "
                f"want sha256-raw:{e.expected.hex()}, server presented sha256-raw:{e.got.hex()}"
            ) from None
        except aiohttp.WSServerHandshakeError as e:
            await session.close()
            raise DerpUpgradeError(e.status, e.message, b"") from None
        except aiohttp.ClientConnectorCertificateError as e:
            await session.close()
            raise DerpCertificateError(
                f"connect to {self.url}: TLS verification failed: {e}"
            ) from None
        except (aiohttp.ClientError, OSError) as e:
            await session.close()
            raise DerpConnectionError(f"connect to {self.url}: {e}") from e
        except BaseException:
            await session.close()
            raise
        if verify_name is not None:
            # aiohttp has no hook between its TLS handshake and the upgrade, so the CertName
            # of a fronted WebSocket node is checked right after; a mismatch still refuses.
            try:
                check_name(peer_der(ws.get_extra_info("ssl_object")), verify_name, self.url)
            except DerpCertificateError:
                await ws.close()
                await session.close()
                raise
        if ws.protocol != WEBSOCKET_SUBPROTOCOL:
            await ws.close()
            await session.close()
            raise DerpConnectionError(
                f"{self.url}: server did not accept the 'derp' WebSocket subprotocol"
            )
        self._new_core(u, None, True, ideal_node)
        self._backend = _WsBackend(self, session, ws)

    # ------------------------------------------------------------------ receive side

    def _on_data(self, data: bytes) -> None:
        """Every received chunk passes here; the core says what it meant."""
        core = self._core
        if core is None or self._error is not None:
            return
        events = core.receive_data(data, time.monotonic())
        if core.pending_output:
            self._kick()
        if not events:
            return
        queue = self._queue
        before = len(queue)
        for ev in events:
            if isinstance(ev, RecvPacket):
                queue.append(ev)
            else:
                self._on_event(ev)
        if len(queue) != before:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)
            if len(queue) >= _RECV_HIGH and not self._read_paused and self._backend is not None:
                self._read_paused = True
                core.set_reading_paused(True, time.monotonic())
                self._backend.pause_reading()

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, ServerKeyReceived):
            if not self._hello_sent.done():
                self._hello_sent.set_result(None)
        elif isinstance(ev, HandshakeComplete):
            if not self._server_info.done():
                self._server_info.set_result(ev.server_info)
        elif isinstance(ev, PingAnswered):
            fut = self._pings.pop(ev.data, None)
            if fut is not None and not fut.done():
                fut.set_result(ev.rtt)
        elif isinstance(ev, ConnectionFailed):
            self._fail(self._error_for(ev))
        elif isinstance(ev, UpgradeRefused):
            pass  # the ConnectionFailed that follows carries it (see _error_for)
        else:
            self._queue.append(ev)  # type: ignore[arg-type]

    def _error_for(self, ev: ConnectionFailed) -> DerpConnectionError:
        err = ev.error
        core = self._core
        if err.reason == "upgrade_refused" and core is not None:
            refused = core.refusal
            if refused is not None:
                return DerpUpgradeError(refused.status, refused.reason, refused.body)
        if err.reason in ("read_timeout", "handshake_timeout"):
            return DerpTimeoutError(f"{self.url}: {err.detail}")
        if err.reason in ("eof", "connection_lost", "server_key_mismatch"):
            return DerpConnectionError(f"{self.url}: {err.detail}")
        return DerpConnectionError(f"{self.url}: {err}")

    def _on_lost(self, exc: BaseException | None) -> None:
        if self._error is not None:
            return
        if self._core is None:
            self._fail(DerpConnectionError(f"{self.url}: connection lost before the upgrade"))
            return
        for ev in self._core.connection_lost(time.monotonic(), str(exc) if exc is not None else ""):
            self._on_event(ev)
        if self._error is not None and exc is not None and self._error.__cause__ is None:
            self._error.__cause__ = exc

    def _arm_timer(self) -> None:
        core = self._core
        if self._error is not None or core is None:
            return
        d = core.next_deadline()
        if d is not None:
            self._timer = self._loop.call_later(max(0.0, d - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._error is not None or self._core is None:
            return
        for ev in self._core.handle_timer(time.monotonic()):
            self._on_event(ev)
        self._arm_timer()

    def _fail(self, err: DerpConnectionError) -> None:
        """Make ``err`` the sticky error, drop the socket and wake everyone waiting."""
        if self._error is not None:
            return
        self._error = err
        if self._core is not None:
            self._core.close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._backend is not None:
            self._backend.abort()
        for fut in (self._waiter, self._hello_sent, self._server_info):
            if fut is not None and not fut.done():
                if fut is self._waiter:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)
        # Nobody may be waiting on these; don't let asyncio log "never retrieved".
        for fut in (self._hello_sent, self._server_info):
            if fut.done() and not fut.cancelled():
                fut.exception()
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(err)
                fut.exception()
        self._pings.clear()

    def _raise(self) -> None:
        assert self._error is not None
        raise self._error.with_traceback(None)

    async def recv(self, timeout: float | None = None) -> Frame:  # noqa: ASYNC109
        """Next frame from the server. ``TimeoutError`` if none within ``timeout``.

        Queued frames are returned even after the connection failed; then the sticky
        ``DerpConnectionError`` is raised.
        """
        queue = self._queue
        while True:
            if queue:
                f = queue.popleft()
                if self._read_paused and len(queue) <= _RECV_LOW:
                    self._read_paused = False
                    if self._core is not None:
                        self._core.set_reading_paused(False, time.monotonic())
                    if self._backend is not None and self._error is None:
                        self._backend.resume_reading()
                return f
            if self._error is not None:
                self._raise()
            w = self._waiter
            if w is None or w.done():
                w = self._waiter = self._loop.create_future()
            if timeout is None:
                await asyncio.shield(w)
            else:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(w)

    def __aiter__(self) -> DerpClient:
        return self

    async def __anext__(self) -> Frame:
        try:
            return await self.recv()
        except DerpClosedError:
            raise StopAsyncIteration from None

    async def wait_server_info(self, timeout: float | None = None) -> handshake.ServerInfo:  # noqa: ASYNC109
        """Wait for ServerInfo, which the server sends once it admitted and registered us."""
        async with asyncio.timeout(timeout):
            return await asyncio.shield(self._server_info)

    @property
    def server_info(self) -> handshake.ServerInfo | None:
        f = self._server_info
        return f.result() if f.done() and not f.exception() else None

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def local_address(self) -> tuple[str, int] | None:
        """Our (ip, port) on a TCP/TLS connection: what the server reports in PeerPresent."""
        b = self._backend
        if isinstance(b, _TcpProtocol) and b.transport is not None:
            name = b.transport.get_extra_info("sockname")
            return (name[0], name[1]) if name else None
        return None

    @property
    def error(self) -> DerpConnectionError | None:
        """Why the connection ended (None while it is alive)."""
        return self._error

    # ------------------------------------------------------------------ send side

    def _ready(self) -> ClientConnection:
        """The core, or the sticky error when the connection is over."""
        if self._error is not None:
            self._raise()
        core = self._core
        if core is None:
            raise DerpConnectionError(f"{self.url}: not connected")
        return core

    def _kick(self) -> None:
        """Output is waiting in the core: write it now if a batch is full, else this turn."""
        core = self._core
        if core is not None and core.pending_output >= _FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        core = self._core
        if core is None or self._backend is None or self._error is not None:
            return
        data = core.data_to_send()
        if data:
            self._backend.write(data)

    async def _drain(self) -> None:
        b = self._backend
        if b is not None and b.write_paused:
            await b.drain()
            if self._error is not None:
                self._raise()

    async def send(self, dst: NodePublic | bytes, data: bytes) -> None:
        """Send one packet (≤ 65 536 bytes) to the client with public key ``dst``.

        Over the server's advisory ServerInfo budget the packet is dropped silently, as a
        Go client does (counted in ``rate_limited_drops``).
        """
        if self._ready().send_packet(dst, data, time.monotonic()):
            self._kick()
        await self._drain()

    async def forward_packet(
        self, src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes
    ) -> None:
        """Mesh only: deliver ``data`` to ``dst`` as if ``src`` had sent it to that server."""
        self.forward_packet_nowait(src, dst, data)
        await self._drain()

    def forward_packet_nowait(
        self, src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes
    ) -> None:
        """``forward_packet`` without waiting for the socket to drain.

        For a server's mesh link, which forwards from synchronous routing code and must not
        block it; check ``write_stalled`` to notice a peer that stopped reading.
        """
        self._ready().forward_packet(src, dst, data)
        self._kick()

    @property
    def write_stalled(self) -> bool:
        """True while the transport refuses more data (the peer is not reading)."""
        b = self._backend
        return b is not None and b.write_paused

    async def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether it is our home DERP (statistics only)."""
        self._ready().note_preferred(preferred)
        self._kick()
        await self._drain()

    async def watch_conns(self) -> None:
        """Mesh only: subscribe to PeerPresent/PeerGone for the server's local clients."""
        self._ready().watch_conns()
        self._kick()
        await self._drain()

    async def close_peer(self, key: NodePublic | bytes) -> None:
        """Mesh only: ask the server to close every connection of ``key``."""
        self._ready().close_peer(key)
        self._kick()
        await self._drain()

    async def send_ping(self, data: bytes) -> None:
        """Send a Ping with 8 bytes of our choosing (``ping()`` does the bookkeeping)."""
        if len(data) != PING_DATA_LEN:
            raise ValueError("ping data must be 8 bytes")
        self._ready().send_ping(data)
        self._kick()
        await self._drain()

    async def send_pong(self, data: bytes) -> None:
        if len(data) != PING_DATA_LEN:
            raise ValueError("pong data must be 8 bytes")
        self._ready().send_pong(data)
        self._kick()
        await self._drain()

    async def send_raw(self, data: bytes) -> None:
        """Bytes exactly as given (conformance tests send malformed frames with this)."""
        self._ready().send_raw(data)
        self._kick()
        await self._drain()

    async def ping(self, timeout: float = PING_TIMEOUT) -> float:  # noqa: ASYNC109
        """Round-trip time in seconds of a Ping to the server; its Pong is not delivered.

        Works without anyone calling ``recv()``: the Pong is matched as soon as it is read.
        """
        core = self._ready()
        fut: asyncio.Future[float] = self._loop.create_future()
        # time.monotonic(), not loop.time(): uvloop's clock has millisecond resolution.
        data = core.ping(time.monotonic())
        self._pings[data] = fut
        try:
            self._flush()
            await self._drain()
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pings.pop(data, None)
            if self._core is not None:
                self._core.forget_ping(data)

    # ------------------------------------------------------------------ closing

    def abort(self) -> None:
        """Drop the connection at once, without flushing (used after errors)."""
        if self._error is None:
            self._fail(DerpClosedError(f"{self.url}: client closed"))
        elif self._backend is not None:
            self._backend.abort()

    async def close(self) -> None:
        """Flush what was sent and close; later calls raise ``DerpClosedError``."""
        if self._error is not None:
            if isinstance(self._backend, _WsBackend):
                await self._backend._shutdown()
            return
        self._flush()
        backend = self._backend
        self._backend = None  # so _fail does not abort before the flush completes
        self._fail(DerpClosedError(f"{self.url}: client closed"))
        if backend is not None:
            await backend.aclose()

    async def __aenter__(self) -> DerpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "closed" if self._error else "open"
        return f"<DerpClient {self.public_key.short()} -> {self.url} {state}>"
