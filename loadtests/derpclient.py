"""A blocking DERP client over ``derpkit.protocol``, for locust's gevent world.

Plain ``socket`` and ``ssl`` calls, looked up at call time, so that once gevent has
monkey-patched them (locust does so on import) every wait yields to other greenlets.
Everything DERP-specific is decided by the sans-IO ``ClientConnection`` (the same core
the asyncio ``DerpClient`` runs on): the HTTP upgrade and its refusal, ServerKey, the
sealed ClientInfo/ServerInfo, which frames mean what, and whether a server Ping gets a
Pong (only when this client declared CanAckPings). This module adds only reads, writes
and timeouts, so the load test measures the same client behaviour the library ships.

One client serves one greenlet at a time for reading; ``send`` may be called from another
greenlet (a sender and a receiver loop sharing a connection). Writes go through one lock
because both greenlets may flush the core's output (a packet, an automatic Pong), and
gevent sockets allow only one writer at a time.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable

from derpkit.client.conn import parse_url
from derpkit.client.errors import DerpError
from derpkit.client.tls import check_pin, plan_tls
from derpkit.protocol import handshake
from derpkit.protocol.connection import ClientConnection, ClientState
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import (
    ConnectionFailed,
    Event,
    HandshakeComplete,
    PingAnswered,
    ServerKeyReceived,
    UpgradeRefused,
)
from derpkit.protocol.frames import Frame
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic

__all__ = ["BlockingDerpClient", "DerpLoadError"]

#: Events the core concludes on its own; everything else it returns is a frame value.
_CONN_EVENTS = (ServerKeyReceived, HandshakeComplete, PingAnswered, UpgradeRefused, ConnectionFailed)


class DerpLoadError(Exception):
    """Connecting, the handshake or a read/write failed; the message says which.

    The one error type the locust users catch: any failure of the network, TLS (including a
    CertName pin mismatch), the DERP handshake or a malformed option surfaces as this, so it
    is counted as a failed request rather than killing the user.
    """


def _now() -> float:
    """The core's clock: monotonic, and fine-grained enough for ping round trips."""
    return time.perf_counter()


def _describe(err: ProtocolError | None) -> str:
    """"upgrade refused: HTTP 403 Forbidden: ...": the core's reason label, then its detail."""
    if err is None:
        return "connection closed"
    return f"{err.reason.replace('_', ' ')}: {err.detail}" if err.detail else err.reason.replace("_", " ")


class BlockingDerpClient:
    """One DERP connection; create it with ``BlockingDerpClient.connect(url, ...)``."""

    def __init__(self, sock: socket.socket, conn: ClientConnection, url: str) -> None:
        self.sock = sock
        self.url = url
        self.conn = conn
        self.private_key: NodePrivate = conn.private_key
        self.public_key: NodePublic = conn.public_key
        self.public_raw = self.public_key.raw
        self.server_info: handshake.ServerInfo | None = None
        self._events: deque[Event] = deque()
        self._wlock = threading.Lock()  # gevent's lock once locust has monkey-patched
        self.closed = False

    @property
    def server_key(self) -> NodePublic | None:
        return self.conn.server_key

    # ------------------------------------------------------------------ connecting

    @classmethod
    def connect(
        cls,
        url: str,
        *,
        private_key: NodePrivate | None = None,
        mesh_key: MeshKey | None = None,
        cert_name: str | None = None,
        insecure_tls: bool = False,
        timeout: float = 10.0,
        can_ack_pings: bool = True,
        app_name: str = "derpkit-locust",
        source_address: tuple[str, int] | None = None,
        wait_for_server_info: bool = True,
    ) -> BlockingDerpClient:
        """TCP (+TLS) connect, HTTP upgrade, ServerKey, ClientInfo and ServerInfo.

        ``url`` is ``http://``, ``https://`` or ``derp://`` (= https); the path defaults to
        /derp. ``cert_name`` is a DERP-map CertName: a ``sha256-raw:`` pin or a TLS name.
        ``wait_for_server_info=False`` returns once ClientInfo is written (admission not
        awaited); the ServerInfo is then taken in by the first ``recv``.
        """
        u = parse_url(url)
        priv = private_key or NodePrivate.generate()
        deadline = time.monotonic() + timeout
        try:
            sock = socket.create_connection((u.host, u.port), timeout, source_address)
        except OSError as e:
            raise DerpLoadError(f"connect to {url}: {e}") from e
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if u.tls:
                plan = plan_tls(u.host, cert_name=cert_name, insecure=insecure_tls)
                sock = plan.context.wrap_socket(sock, server_hostname=plan.server_name)
                if plan.pin_sha256 is not None:
                    check_pin(sock.getpeercert(binary_form=True), plan.pin_sha256, url)
            info = handshake.ClientInfo(mesh_key=mesh_key, can_ack_pings=can_ack_pings, app_name=app_name)
            # Timeouts are this shell's (socket deadlines), so the core runs no timers.
            conn = ClientConnection(priv, info=info, host=u.host_header, path=u.path, read_timeout=None)
            self = cls(sock, conn, url)
            self._handshake(wait_for_server_info, deadline)
        except BaseException as e:
            sock.close()
            if isinstance(e, DerpLoadError):
                raise
            # DerpError: the shared TLS helpers raise DerpCertificateError on a CertName pin
            # mismatch. Everything that stops this one connection becomes a DerpLoadError,
            # so the locust user reports a failed request instead of dying in on_start.
            if isinstance(e, ssl.SSLError | OSError | ProtocolError | ValueError | DerpError):
                raise DerpLoadError(f"connect to {url}: {e}") from e
            raise
        sock.settimeout(None)
        return self

    def _handshake(self, wait_for_server_info: bool, deadline: float) -> None:
        conn = self.conn
        conn.start(_now())
        self._flush()
        held: list[Event] = []
        try:
            while True:
                try:
                    ev = self._next_event(deadline)
                except TimeoutError:
                    raise DerpLoadError(f"connect to {self.url}: timed out {conn.state.value}") from None
                except DerpLoadError as e:
                    raise DerpLoadError(f"connect to {e}") from None
                if isinstance(ev, ServerKeyReceived):
                    self._flush()  # the core answered it with our sealed ClientInfo
                    if not wait_for_server_info:
                        return
                elif isinstance(ev, HandshakeComplete):
                    return
                elif not isinstance(ev, _CONN_EVENTS):
                    held.append(ev)
                    if len(held) > 1024:
                        raise DerpLoadError(f"connect to {self.url}: no ServerInfo among 1024 frames")
        finally:
            # Frames that came ahead of ServerInfo (a Ping, say) stay for recv(), in order.
            self._events.extendleft(reversed(held))

    # ------------------------------------------------------------------ I/O

    def _flush(self) -> None:
        """Write whatever the core queued (request, ClientInfo, packets, Pongs)."""
        with self._wlock:
            data = self.conn.data_to_send()
            if data:
                self.sock.sendall(data)

    def _next_event(self, deadline: float | None) -> Event:
        """The next event from the core, reading the socket when none is pending.

        Raises ``TimeoutError`` at ``deadline`` (monotonic) and ``DerpLoadError`` once the
        core reports the connection over (its message says why: EOF, refusal, bad frame).
        """
        events = self._events
        while True:
            while events:
                ev = events.popleft()
                if isinstance(ev, ConnectionFailed):
                    self.closed = True
                    raise DerpLoadError(f"{self.url}: {_describe(ev.error)}")
                if isinstance(ev, HandshakeComplete):
                    self.server_info = ev.server_info
                return ev
            if self.conn.state is ClientState.CLOSED:
                # Already over (the failure was reported, or close() was called).
                self.closed = True
                raise DerpLoadError(f"{self.url}: {_describe(self.conn.error)}")
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.sock.settimeout(left)
            else:
                self.sock.settimeout(None)
            try:
                data = self.sock.recv(256 << 10)
            except TimeoutError:
                raise
            except OSError as e:
                events.extend(self.conn.connection_lost(_now(), str(e)))
                continue
            got = self.conn.receive_data(data, _now()) if data else self.conn.connection_lost(_now())
            events.extend(got)
            if self.conn.pending_output:
                try:
                    self._flush()  # the core's Pongs to server Pings (only with CanAckPings)
                except OSError:
                    pass  # the read side will see the connection go

    # ------------------------------------------------------------------ traffic

    def _send(self, what: str, queue: Callable[[], object]) -> None:
        """Queue through the core, then write; a dead socket or closed core is a DerpLoadError."""
        try:
            queue()
            self._flush()
        except (OSError, ProtocolError) as e:
            self.closed = True
            raise DerpLoadError(f"{self.url}: {what}: {e}") from e

    def send(self, dst: bytes | NodePublic, data: bytes) -> int:
        """Write one SendPacket frame; returns the bytes written.

        0 when the server's advisory ServerInfo rate said no: the core drops the packet as
        a Go client does (``conn.rate_limited_drops`` counts them).
        """
        with self._wlock:
            try:
                if not self.conn.send_packet(dst, data, _now()):
                    return 0
                out = self.conn.data_to_send()
                self.sock.sendall(out)
            except (OSError, ProtocolError) as e:
                self.closed = True
                raise DerpLoadError(f"{self.url}: send: {e}") from e
        return len(out)

    def send_ping(self, data: bytes) -> None:
        self._send("send ping", lambda: self.conn.send_ping(data))

    def recv(self, timeout: float | None = None) -> Frame:
        """The next frame the server sent (RecvPacket, Pong, Ping, KeepAlive, PeerGone...).

        Server Pings are answered with a Pong by the core when this client declared
        CanAckPings (and returned either way). Raises ``TimeoutError`` after ``timeout``
        seconds without a frame, ``DerpLoadError`` when the connection is gone.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ev = self._next_event(deadline)
            if not isinstance(ev, _CONN_EVENTS):
                return ev  # type: ignore[return-value]

    def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time (seconds) of a Ping, as the core measured it.

        Frames other than our Pong that arrive meanwhile are discarded: use this on
        connections nobody else reads (Pinger, Idler), not on a packet receiver.
        """
        box: list[bytes] = []
        self._send("send ping", lambda: box.append(self.conn.ping(_now())))
        data = box[0]
        deadline = time.monotonic() + timeout
        try:
            while True:
                ev = self._next_event(deadline)
                if isinstance(ev, PingAnswered) and ev.data == data:
                    return ev.rtt
        finally:
            self.conn.forget_ping(data)

    def close(self) -> None:
        self.closed = True
        self.conn.close()
        try:
            self.sock.close()
        except OSError:
            pass
