"""Connections a case opens: each logs every byte it writes and reads into the wire log.

``Conn`` is a DERP client driven by the sans-IO core (``ClientConnection``): upgrade,
fast start, handshake, frame decoding and Pong matching are the core's, as in every other
derpkit client; this shell adds the wire tap and the waits a case needs ("next frame",
"closed within", "nothing within"). ``RawConn`` speaks no protocol at all: it sends the
bytes a case gives it and cuts what comes back into the HTTP head and frames, for the
cases that must misbehave (a bad first frame, a short ClientInfo, a 70 KiB packet).

Both reach TCP, TLS (the target's trust settings, ``CertName`` pins included) or, for
``Conn``, WebSocket through aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import deque
from typing import TYPE_CHECKING, Any, TypeVar

from derpkit.client.tls import check_after_handshake, check_name, meta_cert_server_key, peer_der
from derpkit.protocol import frames as F
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.constants import WEBSOCKET_SUBPROTOCOL, FrameType
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import (
    ConnectionFailed,
    Event,
    HandshakeComplete,
    PingAnswered,
    ServerKeyReceived,
    UpgradeRefused,
)
from derpkit.protocol.handshake import ClientInfo, ServerInfo, client_info_frame, seal
from derpkit.protocol.keys import NodePrivate, NodePublic
from derpkit.protocol.upgrade import ResponseHead, build_request, parse_response_head, split_head

from .registry import Fail
from .wire import Tap, WireLog

if TYPE_CHECKING:
    from .target import Target

E = TypeVar("E", bound=Event)


def _name(ftype: int) -> str:
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"0x{ftype:02x}"


class _Link(asyncio.Protocol):
    """Socket glue: every chunk through the receive tap, then to the owner."""

    def __init__(self, owner: _Base) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.owner.rx_tap.feed(data)
        self.owner._on_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(exc)


async def open_stream(target: Target, link: _Link, timeout: float) -> asyncio.Transport:  # noqa: ASYNC109
    """TCP or TLS to the target, the CertName pin checked; failures become ``Fail``."""
    loop = asyncio.get_running_loop()
    u = target.derp
    plan = target.tls_plan() if u.tls else None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_connection(
                lambda: link, u.host, u.port,
                ssl=plan.context if plan else None,
                server_hostname=plan.server_name if plan else None,
            )
    except TimeoutError:
        raise Fail(f"cannot connect to {u.host}:{u.port}: timed out after {timeout:g} s") from None
    except ssl.SSLCertVerificationError as e:
        raise Fail(f"TLS verification failed: {e.verify_message or e}") from None
    except (OSError, ssl.SSLError) as e:
        raise Fail(f"cannot connect to {u.host}:{u.port}: {e.strerror or e}") from None
    if plan is not None:
        try:
            check_after_handshake(plan, transport.get_extra_info("ssl_object"), target.url)
        except Exception as e:
            transport.abort()
            raise Fail(str(e)) from None
    return transport  # type: ignore[return-value]


class _Base:
    """What both connection kinds share: the taps, the socket, the close bookkeeping."""

    def __init__(self, log: WireLog, label: str, target: Target) -> None:
        self.log = log
        self.label = label
        self.target = target
        self.rx_tap = Tap(log, label, "recv", http=True)
        self.tx_tap = Tap(log, label, "send", http=True)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.close_reason = ""
        self._changed = asyncio.Event()

    def _wake(self) -> None:
        self._changed.set()

    async def _wait_change(self, deadline: float) -> bool:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        self._changed.clear()
        try:
            async with asyncio.timeout(left):
                await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def _on_data(self, data: bytes) -> None:
        raise NotImplementedError

    def _on_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.closed = True
            self.close_reason = f"connection lost: {exc}" if exc else "closed by the server"
            self.log.note(self.label, self.close_reason)
        self._wake()

    def _write(self, data: bytes) -> None:
        if not data:
            return
        self.tx_tap.feed(data)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    @property
    def local_addr(self) -> tuple[str, int] | None:
        if self.transport is None:
            return None
        name = self.transport.get_extra_info("sockname")
        return (name[0], name[1]) if name else None

    @property
    def ssl_object(self) -> Any:
        return self.transport.get_extra_info("ssl_object") if self.transport else None

    async def wait_closed(self, timeout: float) -> bool:  # noqa: ASYNC109
        """True once the server closed (or reset) the connection within ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if not await self._wait_change(deadline):
                return self.closed
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.closed:
            self.closed = True
            self.close_reason = "closed by the suite"


class Conn(_Base):
    """A DERP client over the core; ``open`` returns once ServerInfo arrived (by default)."""

    def __init__(self, log: WireLog, label: str, target: Target, core: ClientConnection) -> None:
        super().__init__(log, label, target)
        self.core = core
        self.private_key = core.private_key
        self.key: NodePublic = core.public_key
        self.events: deque[Event] = deque()
        self.refusal: UpgradeRefused | None = None
        self.server_info: ServerInfo | None = None
        self._pongs: dict[bytes, float] = {}
        self._ws: Any = None
        self._ws_session: Any = None
        self._ws_tasks: list[asyncio.Task[None]] = []
        self._ws_out: asyncio.Queue[bytes] | None = None
        self.ws_chunk = 0  # split every write into messages of this many bytes (0: one message)

    # ------------------------------------------------------------------ opening

    @classmethod
    async def open(
        cls,
        log: WireLog,
        label: str,
        target: Target,
        *,
        key: NodePrivate | None = None,
        info: ClientInfo | None = None,
        mesh: bool = False,
        server_key: NodePublic | None = None,
        use_meta_cert: bool = False,
        preferred: bool = False,
        watch_conns: bool = False,
        ideal_node: str = "",
        websocket: bool = False,
        ws_chunk: int = 0,
        pipeline: bytes = b"",
        wait: bool = True,
        timeout: float | None = None,  # noqa: ASYNC109
    ) -> Conn:
        """Connect and hand-shake. ``mesh`` sends the target's mesh key.

        ``server_key`` (or ``use_meta_cert`` over TLS) makes it a fast-start connection;
        ``pipeline`` is written in the same flush as the opening bytes.
        """
        if info is None:
            info = ClientInfo(mesh_key=target.mesh_key if mesh else None, can_ack_pings=True)
        core = ClientConnection(
            key or NodePrivate.generate(), info=info, host=target.derp.host_header, path=target.derp.path,
            server_key=server_key, websocket=websocket, ideal_node=ideal_node, preferred=preferred,
            watch_conns=watch_conns, read_timeout=None,
        )
        self = cls(log, label, target, core)
        timeout = target.connect_timeout if timeout is None else timeout
        self.ws_chunk = ws_chunk
        self._hello = asyncio.get_running_loop().create_future()
        if websocket:
            await self._open_ws(timeout)
        else:
            link = _Link(self)
            self.transport = await open_stream(target, link, timeout)
            if use_meta_cert and server_key is None:
                mk = meta_cert_server_key(self.ssl_object)
                if mk is None:
                    self.close()
                    raise Fail("no meta-certificate with the server key in the TLS chain (or not TLS 1.3)")
                core.server_key = mk
        core.start(time.monotonic())
        if pipeline:
            core.send_raw(pipeline)
        self._flush()
        if wait:
            await self.handshake(timeout)
        return self

    async def handshake(self, timeout: float | None = None) -> ServerInfo:  # noqa: ASYNC109
        timeout = self.target.connect_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while self.server_info is None:
            if self.closed:
                raise Fail(f"{self.label}: no ServerInfo: {self.close_reason}")
            if not await self._wait_change(deadline):
                raise Fail(f"{self.label}: no ServerInfo within {timeout:g} s ({self.core.state.value})")
        return self.server_info

    async def _open_ws(self, timeout: float) -> None:  # noqa: ASYNC109
        import aiohttp

        u = self.target.derp
        sslarg: Any = False
        if u.tls:
            plan = self.target.tls_plan()
            sslarg = aiohttp.Fingerprint(plan.pin_sha256) if plan.pin_sha256 else plan.context
        session = aiohttp.ClientSession()
        self.log.add(self.label, "send", "http", line=f"GET {u.path} HTTP/1.1 (WebSocket, subprotocol derp)", headers=[])
        try:
            async with asyncio.timeout(timeout):
                ws = await session.ws_connect(
                    u.http_url(), protocols=(WEBSOCKET_SUBPROTOCOL,), ssl=sslarg, compress=0, autoping=True,
                )
        except TimeoutError:
            await session.close()
            raise Fail(f"WebSocket upgrade timed out after {timeout:g} s") from None
        except aiohttp.WSServerHandshakeError as e:
            await session.close()
            raise Fail(f"WebSocket upgrade refused: HTTP {e.status} {e.message}") from None
        except (aiohttp.ClientError, OSError) as e:
            await session.close()
            raise Fail(f"WebSocket connect failed: {e}") from None
        if u.tls and plan.verify_name is not None:  # a DNS CertName: aiohttp checked the chain only
            try:
                check_name(peer_der(ws.get_extra_info("ssl_object")), plan.verify_name, self.target.url)
            except Exception as e:
                await ws.close()
                await session.close()
                raise Fail(str(e)) from None
        self.log.add(self.label, "recv", "http", line=f"HTTP/1.1 101 (WebSocket, subprotocol {ws.protocol!r})", headers=[])
        self.rx_tap = Tap(self.log, self.label, "recv", http=False)
        self.tx_tap = Tap(self.log, self.label, "send", http=False)
        if ws.protocol != WEBSOCKET_SUBPROTOCOL:
            await ws.close()
            await session.close()
            raise Fail(f"server did not select the 'derp' subprotocol (got {ws.protocol!r})")
        self._ws, self._ws_session = ws, session
        self._ws_out = asyncio.Queue()
        self._ws_tasks = [asyncio.ensure_future(self._ws_reader()), asyncio.ensure_future(self._ws_writer())]

    async def _ws_reader(self) -> None:
        import aiohttp

        ws = self._ws
        exc: Exception | None = None
        try:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    self.rx_tap.feed(msg.data)
                    self._on_data(msg.data)
                elif msg.type == aiohttp.WSMsgType.TEXT:
                    self.rx_tap.raw(msg.data.encode(), "ws-text")
                else:
                    break
        except Exception as e:  # noqa: BLE001 - aiohttp raises many kinds on a broken socket
            exc = e
        self.ws_close_code = ws.close_code
        self.log.note(self.label, f"WebSocket closed, code {ws.close_code}")
        self._on_lost(exc)

    async def _ws_writer(self) -> None:
        assert self._ws_out is not None
        with contextlib.suppress(Exception):
            while True:
                data = await self._ws_out.get()
                step = self.ws_chunk or len(data)
                for i in range(0, len(data), step):
                    await self._ws.send_bytes(data[i : i + step])

    async def ws_send_text(self, text: str) -> None:
        """A WebSocket text message: a protocol error for DERP."""
        self.tx_tap.raw(text.encode(), "ws-text")
        await self._ws.send_str(text)

    # ------------------------------------------------------------------ bytes

    def _flush(self) -> None:
        data = self.core.data_to_send()
        if not data:
            return
        if self._ws is not None or self._ws_out is not None:
            self.tx_tap.feed(data)
            if self._ws_out is not None:
                self._ws_out.put_nowait(data)
            return
        self._write(data)

    def _on_data(self, data: bytes) -> None:
        now = time.monotonic()
        for ev in self.core.receive_data(data, now):
            self._on_event(ev)
        self._flush()
        self._wake()

    def _on_event(self, ev: Event) -> None:
        if isinstance(ev, HandshakeComplete):
            self.server_info = ev.server_info
        elif isinstance(ev, ServerKeyReceived):
            if not self._hello.done():
                self._hello.set_result(None)
        elif isinstance(ev, PingAnswered):
            self._pongs[ev.data] = ev.rtt
        elif isinstance(ev, UpgradeRefused):
            self.refusal = ev
        elif isinstance(ev, ConnectionFailed):
            if not self.closed:
                self.closed = True
                self.close_reason = ev.error.detail or ev.error.reason
                self.log.note(self.label, f"connection failed: {self.close_reason}")
            if self.transport is not None:
                self.transport.abort()
        else:
            self.events.append(ev)

    def _on_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            for ev in self.core.connection_lost(time.monotonic(), str(exc) if exc else ""):
                self._on_event(ev)
        super()._on_lost(exc)

    # ------------------------------------------------------------------ sending

    def _need_open(self) -> None:
        if self.closed:
            raise Fail(f"{self.label}: connection already closed ({self.close_reason})")

    def send(self, dst: NodePublic | bytes, data: bytes) -> None:
        self._need_open()
        self.core.send_packet(dst, data, time.monotonic())
        self._flush()

    def send_raw(self, data: bytes) -> None:
        self._need_open()
        self.core.send_raw(data)
        self._flush()

    def send_frame(self, ftype: int, payload: bytes = b"") -> None:
        self.send_raw(F.header(ftype, len(payload)) + payload)

    # ------------------------------------------------------------------ receiving

    async def next(self, timeout: float = 3.0) -> Event | None:  # noqa: ASYNC109
        """The next frame from the server, or None when none arrives (or it closed)."""
        deadline = time.monotonic() + timeout
        while not self.events:
            if self.closed or not await self._wait_change(deadline):
                if not self.events:
                    return None
        return self.events.popleft()

    async def expect(self, kind: type[E], timeout: float = 3.0, where: Any = None, what: str = "") -> E:  # noqa: ASYNC109
        """The next frame of type ``kind`` (matching ``where``); others are passed over.

        Raises ``Fail`` naming what was awaited and why it did not come.
        """
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            left = deadline - time.monotonic()
            ev = await self.next(max(left, 0.0)) if left > 0 or self.events else None
            if ev is None:
                name = what or kind.__name__
                why = f"connection closed ({self.close_reason})" if self.closed else f"nothing within {timeout:g} s"
                other = f"; got only {', '.join(seen[:5])}" if seen else ""
                raise Fail(f"{self.label}: no {name}: {why}{other}")
            if isinstance(ev, kind) and (where is None or where(ev)):
                return ev
            seen.append(type(ev).__name__)

    async def collect(self, seconds: float) -> list[Event]:
        """Every frame that arrives within ``seconds`` (plus those already queued)."""
        deadline = time.monotonic() + seconds
        out: list[Event] = []
        while True:
            while self.events:
                out.append(self.events.popleft())
            if self.closed or not await self._wait_change(deadline):
                while self.events:
                    out.append(self.events.popleft())
                return out

    async def ping(self, timeout: float = 3.0) -> float:  # noqa: ASYNC109
        """RTT of a Ping answered by a matching Pong; ``Fail`` when none comes."""
        self._need_open()
        data = self.core.ping(time.monotonic())
        self._flush()
        deadline = time.monotonic() + timeout
        while data not in self._pongs:
            if self.closed:
                raise Fail(f"{self.label}: no Pong: connection closed ({self.close_reason})")
            if not await self._wait_change(deadline):
                self.core.forget_ping(data)
                raise Fail(f"{self.label}: no Pong within {timeout:g} s")
        return self._pongs.pop(data)

    async def alive(self, timeout: float = 3.0) -> bool:  # noqa: ASYNC109
        """Whether a Ping still gets its Pong: proves a "nothing arrived" wait saw a live link."""
        try:
            await self.ping(timeout)
        except Fail:
            return False
        return True

    def close(self) -> None:
        super().close()
        self.core.close()
        for t in self._ws_tasks:
            t.cancel()
        if self._ws_session is not None:
            session, self._ws_session = self._ws_session, None
            ws = self._ws

            async def _shutdown() -> None:
                with contextlib.suppress(Exception):
                    await ws.close()
                with contextlib.suppress(Exception):
                    await session.close()

            asyncio.ensure_future(_shutdown())


class RawConn(_Base):
    """Bytes in, bytes out: the HTTP head and frames are cut but nothing is answered."""

    def __init__(self, log: WireLog, label: str, target: Target) -> None:
        super().__init__(log, label, target)
        self.buf = bytearray()
        self.head: ResponseHead | None = None
        self._reader = F.FrameReader(lambda t, n: True)
        self._frames: deque[tuple[int, bytes]] = deque()
        self.server_key: NodePublic | None = None
        self.private_key = NodePrivate.generate()
        self.key = self.private_key.public()

    @classmethod
    async def open(
        cls, log: WireLog, label: str, target: Target, *, request: bytes | None = None,
        fast_start: bool = False, timeout: float | None = None,  # noqa: ASYNC109
    ) -> RawConn:
        """Connect and send ``request`` (default: the ordinary DERP upgrade)."""
        self = cls(log, label, target)
        timeout = target.connect_timeout if timeout is None else timeout
        self.transport = await open_stream(target, _Link(self), timeout)
        if request is None:
            request = build_request(target.derp.host_header, target.derp.path, fast_start=fast_start)
        self._write(request)
        return self

    def _on_data(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def _t(self, timeout: float | None) -> float:
        return self.target.io_timeout if timeout is None else timeout

    def write(self, data: bytes) -> None:
        self._write(data)

    async def read_head(self, timeout: float | None = None) -> ResponseHead:  # noqa: ASYNC109
        """The HTTP response head; the bytes after it stay for ``read_frame``."""
        timeout = self._t(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                parts = split_head(bytes(self.buf))
            except ProtocolError as e:
                raise Fail(f"{self.label}: bad HTTP response: {e}") from None
            if parts is not None:
                head, rest = parts
                try:
                    self.head = parse_response_head(head)
                except ProtocolError as e:
                    raise Fail(f"{self.label}: bad HTTP response: {e.detail}") from None
                self.buf = bytearray(rest)
                return self.head
            if self.closed and not self.buf:
                raise Fail(f"{self.label}: no HTTP response: {self.close_reason}")
            if self.closed:
                raise Fail(f"{self.label}: connection closed inside the HTTP response head")
            if not await self._wait_change(deadline):
                raise Fail(f"{self.label}: no HTTP response within {timeout:g} s")

    async def read_body(self, n: int, timeout: float = 3.0) -> bytes:  # noqa: ASYNC109
        """Up to ``n`` bytes after the head (all of them once the server closes)."""
        deadline = time.monotonic() + timeout
        while len(self.buf) < n and not self.closed:
            if not await self._wait_change(deadline):
                break
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    async def read_frame(self, timeout: float | None = None) -> tuple[int, bytes] | None:  # noqa: ASYNC109
        """The next frame after the head, or None (closed, or nothing in time)."""
        timeout = self._t(timeout)
        deadline = time.monotonic() + timeout
        while True:
            if self.buf:
                data, self.buf = bytes(self.buf), bytearray()
                self._frames.extend(self._reader.feed(data))
            if self._frames:
                return self._frames.popleft()
            if self.closed or not await self._wait_change(deadline):
                if self.buf:
                    continue
                return None

    async def read_server_key(self, timeout: float | None = None) -> NodePublic:  # noqa: ASYNC109
        timeout = self._t(timeout)
        f = await self.read_frame(timeout)
        if f is None:
            raise Fail(f"{self.label}: no ServerKey frame ({self.close_reason or 'timed out'})")
        ftype, payload = f
        try:
            sk = F.decode_server_key(ftype, payload)
        except ProtocolError as e:
            raise Fail(f"{self.label}: first frame is not a valid ServerKey: {e.detail}") from None
        self.server_key = NodePublic(sk.key)
        return self.server_key

    async def upgrade(self, timeout: float | None = None) -> NodePublic:  # noqa: ASYNC109
        """Read the 101 and the ServerKey; ``Fail`` if the server did not upgrade."""
        timeout = self._t(timeout)
        head = await self.read_head(timeout)
        if head.status != 101:
            raise Fail(f"{self.label}: upgrade answered HTTP {head.status} {head.reason}")
        return await self.read_server_key(timeout)

    def client_info(self, json_bytes: bytes | None = None, info: ClientInfo | None = None) -> bytes:
        """A ClientInfo frame sealed to the server key, with any JSON the case wants."""
        assert self.server_key is not None, "read the ServerKey first"
        if json_bytes is None:
            return client_info_frame(self.private_key, self.server_key, info or ClientInfo(can_ack_pings=True))
        sealed = seal(self.private_key, self.server_key, json_bytes)
        return F.frame(FrameType.CLIENT_INFO, self.key.raw + sealed)

    async def expect_server_info(self, timeout: float | None = None) -> ServerInfo:  # noqa: ASYNC109
        from derpkit.protocol.handshake import open_server_info

        timeout = self._t(timeout)
        f = await self.read_frame(timeout)
        if f is None:
            raise Fail(f"{self.label}: no ServerInfo ({self.close_reason or f'nothing within {timeout:g} s'})")
        ftype, payload = f
        if ftype != FrameType.SERVER_INFO:
            raise Fail(f"{self.label}: first frame after ClientInfo is {_name(ftype)}, not ServerInfo")
        assert self.server_key is not None
        try:
            return open_server_info(self.private_key, self.server_key, payload)
        except ProtocolError as e:
            raise Fail(f"{self.label}: ServerInfo does not open: {e.detail}") from None

    async def closed_without_reply(self, timeout: float) -> str | None:  # noqa: ASYNC109
        """None when the server closed without sending a frame; else what went wrong."""
        f = await self.read_frame(timeout)
        if f is not None:
            return f"server sent a {_name(f[0])} frame instead of closing"
        if not self.closed:
            return f"connection still open after {timeout:g} s"
        return None


__all__ = ["Conn", "RawConn", "open_stream"]
