"""The two ends of a DERP connection as state machines: bytes and time in, events out.

``ClientConnection`` and ``ServerConnection`` hold every rule a DERP peer follows once
bytes arrive: the upgrade response, fast start, the ServerKey / ClientInfo / ServerInfo
handshake, what each frame may contain, the pong slot, keepalives, liveness pings, the
NotHere budget, -rate-config and the advisory ServerInfo bucket. They never touch a socket
or a clock: the shell passes ``now`` (any monotonic seconds) into every call, asks
``next_deadline()`` when to call ``handle_timer(now)``, and moves bytes. So a test drives
both ends in memory and jumps time forward instead of sleeping; the asyncio client, the
server's connection, the blocking locust client, the bench generator, the prober and the
conformance suite are thin shells over this one file (h11 and aioquic work the same way).

One concession to speed on the server: a SendPacket is not turned into an event. The
server's core hands its payload (destination key + packet) straight to the
``on_packet`` callable it was built with, and a mesh ForwardPacket to ``on_forward``;
that is the relay's whole job and an object per packet would halve its rate.
"""

from __future__ import annotations

import enum
import os
import random
from collections.abc import Callable
from typing import Protocol

from . import frames as F
from . import handshake
from .constants import (
    CLIENT_READ_TIMEOUT,
    DEFAULT_WRITE_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    HOME_MOVE_GRACE,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    KEY_LEN,
    MAGIC,
    MAX_PACKET_SIZE,
    MESH_WRITE_TIMEOUT,
    MIN_RATE_BURST,
    NOT_HERE_BURST,
    NOT_HERE_RATE,
    PING_DATA_LEN,
    FrameType,
)
from .errors import ProtocolError
from .events import (
    ClientInfoReceived,
    ConnectionFailed,
    Event,
    HandshakeComplete,
    PingAnswered,
    ReadingPaused,
    ReadingResumed,
    ServerKeyReceived,
    UpgradeRefused,
)
from .keys import MeshKey, NodePrivate, NodePublic
from .upgrade import build_request, parse_response_head, split_head

__all__ = [
    "ClientConnection",
    "ClientState",
    "ConnectionCounters",
    "ServerConnection",
    "ServerPolicy",
    "ServerState",
]

_HEADER = F._HEADER  # noqa: SLF001 - shared struct for inline header encoding
_T_SEND = int(FrameType.SEND_PACKET)
_T_RECV = int(FrameType.RECV_PACKET)
_T_PING = int(FrameType.PING)
_T_NOTE = int(FrameType.NOTE_PREFERRED)
_T_FWD = int(FrameType.FORWARD_PACKET)
_T_WATCH = int(FrameType.WATCH_CONNS)
_T_CLOSE = int(FrameType.CLOSE_PEER)
_T_SERVER_KEY = int(FrameType.SERVER_KEY)
_T_SERVER_INFO = int(FrameType.SERVER_INFO)
_T_PONG = int(FrameType.PONG)
_T_KEEPALIVE = int(FrameType.KEEP_ALIVE)
_PONG_HDR = F.header(FrameType.PONG, PING_DATA_LEN)
_PING_HDR = F.header(FrameType.PING, PING_DATA_LEN)
#: Bytes of an error body kept for the UpgradeRefused event (enough for any message).
_MAX_ERROR_BODY = 4096
#: Pongs answered per write batch while the peer's socket takes data. derper has a
#: one-slot pong queue drained by its writer: an idle writer takes the first Pong at once,
#: the second waits in the slot, later Pings are ignored until the writer comes back
#: (against Go derper, 5 Pings in one write get exactly 2 Pongs). While the socket is full
#: only the slot is left: 1.
PONGS_WRITABLE = 2


def _raw_key(key: NodePublic | bytes, what: str) -> bytes:
    raw = key.raw if isinstance(key, NodePublic) else key
    if len(raw) != KEY_LEN:
        raise ValueError(f"{what} must be a {KEY_LEN}-byte key, got {len(raw)} bytes")
    return raw


# =========================================================================== client


class ClientState(enum.Enum):
    """Where a client is; the value is the phrase used in "timed out while …" messages."""

    IDLE = "not started"
    AWAIT_RESPONSE = "waiting for the HTTP 101 response"
    AWAIT_FIRST_BYTES = "fast start: waiting for the first server bytes"
    READ_ERROR_BODY = "reading the HTTP error body"
    AWAIT_SERVER_KEY = "waiting for the ServerKey frame"
    AWAIT_SERVER_INFO = "waiting for ServerInfo (admission)"
    CONNECTED = "connected"
    CLOSED = "closed"


_FRAMES_FLOW = (ClientState.AWAIT_SERVER_INFO, ClientState.CONNECTED)


class ClientConnection:
    """The client end: upgrade, handshake, frames, pings and the read deadline.

    ``start(now)`` queues the upgrade request (and, under fast start or over WebSocket,
    what follows it); ``receive_data(data, now)`` returns events; ``data_to_send()`` drains
    what to write. ``ClientInfo``'s ``can_ack_pings`` decides whether server Pings are
    answered: a client that did not promise to answer does not (a Go client's behaviour
    follows the flag it sent, and derpkit's server closes promised-but-silent clients).
    """

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        info: handshake.ClientInfo | None = None,
        host: str = "localhost",
        path: str = "/derp",
        server_key: NodePublic | None = None,
        websocket: bool = False,
        ideal_node: str = "",
        preferred: bool = False,
        watch_conns: bool = False,
        read_timeout: float | None = CLIENT_READ_TIMEOUT,
        handshake_timeout: float | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public()
        self.info = info or handshake.ClientInfo()
        self._host = host
        self._path = path
        #: The server's key: given up front (fast start) or read from ServerKey.
        self.server_key: NodePublic | None = None if server_key is None or server_key.is_zero() else server_key
        self._websocket = websocket
        self._ideal_node = ideal_node
        self._hello_extra = (F.NotePreferred(True).encode() if preferred else b"") + (
            F.WatchConns().encode() if watch_conns else b""
        )
        self._read_timeout = read_timeout
        self._handshake_timeout = handshake_timeout
        self.state = ClientState.IDLE
        #: Whether this connection skipped waiting for the 101 (server key known up front).
        self.fast_start = False
        #: Whether the server's ServerKey frame arrived: the DERP upgrade really happened.
        self.server_key_received = False
        self.server_info: handshake.ServerInfo | None = None
        self.error: ProtocolError | None = None
        #: The non-101 answer, once the whole error body (or EOF) arrived.
        self.refusal: UpgradeRefused | None = None
        self._reader = F.FrameReader()
        self._head = bytearray()
        self._refusal: tuple[int, str, dict[str, str]] | None = None
        self._body_want = 0
        self._out: list[bytes] = []
        self._out_len = 0
        self._pings: dict[bytes, float] = {}
        self._started = 0.0
        self._last_rx = 0.0
        self._reading_paused = False
        # Advisory send bucket from ServerInfo (spec §8.6); rate 0 means unlimited.
        self._bucket_rate = 0.0
        self._bucket_burst = 0.0
        self._bucket_tokens = 0.0
        self._bucket_time = 0.0
        #: Packets this end dropped because the server's advisory bucket was empty.
        self.rate_limited_drops = 0
        #: Frames the server sent that this end does not act on (Unknown, short ones).
        self.ignored_frames = 0

    # ------------------------------------------------------------------ output

    def _write(self, data: bytes) -> None:
        if self.state is ClientState.CLOSED:
            raise ProtocolError("closed", "the connection is closed")
        self._out.append(data)
        self._out_len += len(data)

    def data_to_send(self) -> bytes:
        """Everything queued for the wire since the last call, in order."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_len = 0
        return data

    @property
    def pending_output(self) -> int:
        """Bytes queued and not yet taken by ``data_to_send``."""
        return self._out_len

    def _hello(self) -> bytes:
        assert self.server_key is not None
        return handshake.client_info_frame(self.private_key, self.server_key, self.info) + self._hello_extra

    # ------------------------------------------------------------------ start

    def start(self, now: float) -> None:
        """Queue the opening bytes: the upgrade request, plus ClientInfo under fast start.

        Over WebSocket the HTTP exchange belongs to the WebSocket library, so the first
        thing expected is the ServerKey frame.
        """
        if self.state is not ClientState.IDLE:
            raise RuntimeError("start() called twice")
        self._started = self._last_rx = now
        if self._websocket:
            self.state = ClientState.AWAIT_SERVER_KEY
            return
        self.fast_start = self.server_key is not None
        self._write(build_request(self._host, self._path, fast_start=self.fast_start, ideal_node=self._ideal_node))
        if self.fast_start:
            self._write(self._hello())
            self.state = ClientState.AWAIT_FIRST_BYTES
        else:
            self.state = ClientState.AWAIT_RESPONSE

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Feed bytes from the server; returns what they meant, a fault last."""
        st = self.state
        if st is ClientState.CLOSED or not data:
            return []
        self._last_rx = now
        events: list[Event] = []
        if st not in _FRAMES_FLOW and st is not ClientState.AWAIT_SERVER_KEY:
            data = self._receive_http(data, events)
            if not data or self.state is ClientState.CLOSED:
                return events
        fatal: ProtocolError | None = None
        try:
            frames = self._reader.feed(data)
        except ProtocolError as e:
            fatal, frames = e, getattr(e, "frames", [])
        for ftype, payload in frames:
            if ftype == _T_RECV and self.state is ClientState.CONNECTED:
                if len(payload) >= KEY_LEN:
                    events.append(F.RecvPacket(payload[:KEY_LEN], payload[KEY_LEN:]))
                else:
                    self.ignored_frames += 1
                continue
            self._on_frame(ftype, payload, now, events)
            if self.state is ClientState.CLOSED:
                return events
        if fatal is not None:
            self._close(fatal, events)
        return events

    def _receive_http(self, data: bytes, events: list[Event]) -> bytes:
        """The HTTP response to the upgrade; returns the DERP bytes after its head."""
        self._head += data
        if self.state is ClientState.READ_ERROR_BODY:
            if len(self._head) >= min(self._body_want, _MAX_ERROR_BODY):
                self._refused(events)
            return b""
        if self.state is ClientState.AWAIT_FIRST_BYTES:
            if len(self._head) < 5:
                return b""
            if not self._head.startswith(b"HTTP/"):
                # Fast start worked: the server skipped the 101 and frames follow at once.
                self.state = ClientState.AWAIT_SERVER_INFO
                rest = bytes(self._head)
                self._head.clear()
                return rest
            # The server answered with HTTP anyway (an old server, or an error): read it.
        try:
            parts = split_head(bytes(self._head))
            if parts is None:
                return b""
            head, rest = parts
            resp = parse_response_head(head)
        except ProtocolError as e:
            self._close(e, events)
            return b""
        self._head = bytearray()
        if resp.status != 101:
            self._refusal = (resp.status, resp.reason, resp.headers)
            self.state = ClientState.READ_ERROR_BODY
            self._head = bytearray(rest)
            cl = resp.header("Content-Length")
            self._body_want = int(cl) if cl.isascii() and cl.isdigit() else 0  # "²".isdigit() is True
            if len(self._head) >= min(self._body_want, _MAX_ERROR_BODY):
                self._refused(events)
            return b""
        self.state = ClientState.AWAIT_SERVER_INFO if self.fast_start else ClientState.AWAIT_SERVER_KEY
        return rest

    def _refused(self, events: list[Event]) -> None:
        assert self._refusal is not None
        status, reason, headers = self._refusal
        body = bytes(self._head[:_MAX_ERROR_BODY])
        self.refusal = UpgradeRefused(status, reason, tuple(headers.items()), body)
        events.append(self.refusal)
        text = body.decode("utf-8", "replace").strip()[:200]
        self._close(ProtocolError("upgrade_refused", f"HTTP {status} {reason}" + (f": {text}" if text else "")), events)

    def _on_frame(self, ftype: int, payload: bytes, now: float, events: list[Event]) -> None:
        """Every frame except a well-formed RecvPacket once connected."""
        if self.state is ClientState.AWAIT_SERVER_KEY:
            try:
                sk = F.decode_server_key(ftype, payload)
            except ProtocolError as e:
                self._close(e, events)
                return
            self.server_key = NodePublic(sk.key)
            self.server_key_received = True
            self.state = ClientState.AWAIT_SERVER_INFO
            try:
                hello = self._hello()
            except ProtocolError as e:  # a key nothing can be sealed to
                self._close(e, events)
                return
            self._write(hello)
            events.append(ServerKeyReceived(self.server_key, sk.extra))
            return
        if ftype == _T_SERVER_KEY:
            # Fast start: the server sends ServerKey anyway. A wrong key would otherwise
            # show only as the server silently closing on us, so say it here.
            if not self.fast_start:
                self.ignored_frames += 1  # a second ServerKey: nothing to act on
                return
            assert self.server_key is not None
            if len(payload) >= len(MAGIC) + KEY_LEN and payload[len(MAGIC) : len(MAGIC) + KEY_LEN] != self.server_key.raw:
                got = NodePublic(payload[len(MAGIC) : len(MAGIC) + KEY_LEN])
                self._close(
                    ProtocolError(
                        "server_key_mismatch",
                        f"fast start used server key {self.server_key} but the server's key is {got}",
                    ),
                    events,
                )
                return
            if not self.server_key_received:
                self.server_key_received = True
                events.append(ServerKeyReceived(self.server_key, payload[len(MAGIC) + KEY_LEN :]))
            return
        f = F.decode_client_side(ftype, payload)
        if f is None or isinstance(f, F.Unknown):
            self.ignored_frames += 1
            return
        if isinstance(f, F.ServerInfoFrame):
            self._on_server_info(f, now, events)
            return
        if isinstance(f, F.Pong):
            sent = self._pings.pop(f.data, None)
            if sent is not None:
                events.append(PingAnswered(f.data, now - sent))
                return
        elif isinstance(f, F.Ping) and self.info.can_ack_pings:
            self._write(_PONG_HDR + f.data)
        events.append(f)

    def _on_server_info(self, f: F.ServerInfoFrame, now: float, events: list[Event]) -> None:
        assert self.server_key is not None
        try:
            info = handshake.open_server_info(self.private_key, self.server_key, f.sealed)
        except ProtocolError as e:
            self._close(ProtocolError(e.reason, f"bad ServerInfo: {e.detail}"), events)
            return
        if info.token_bucket_bytes_per_second > 0:
            self._bucket_rate = float(info.token_bucket_bytes_per_second)
            self._bucket_burst = self._bucket_tokens = float(info.token_bucket_bytes_burst)
            self._bucket_time = now
        else:
            self._bucket_rate = 0.0
        first = self.server_info is None
        self.server_info = info
        if self.state is ClientState.AWAIT_SERVER_INFO:
            self.state = ClientState.CONNECTED
        if first:
            events.append(HandshakeComplete(info))

    def connection_lost(self, now: float, detail: str = "") -> list[Event]:
        """The transport ended; returns the event that says what that meant here."""
        if self.state is ClientState.CLOSED:
            return []
        events: list[Event] = []
        if self.state is ClientState.READ_ERROR_BODY:
            self._refused(events)
            return events
        where = "" if self.state is ClientState.CONNECTED else f" while {self.state.value}"
        if detail:
            self._close(ProtocolError("connection_lost", f"connection lost{where}: {detail}"), events)
        else:
            self._close(ProtocolError("eof", f"connection closed by the server{where}"), events)
        return events

    def _close(self, err: ProtocolError, events: list[Event]) -> None:
        self.state = ClientState.CLOSED
        self.error = err
        self._out.clear()
        self._out_len = 0
        self._pings.clear()
        events.append(ConnectionFailed(err))

    def close(self) -> None:
        """This end is done; later sends raise, input is ignored, queued output is dropped."""
        if self.state is not ClientState.CLOSED:
            self.state = ClientState.CLOSED
            self.error = ProtocolError("closed", "client closed")
            self._out.clear()
            self._out_len = 0
            self._pings.clear()

    # ------------------------------------------------------------------ timers

    def set_reading_paused(self, paused: bool, now: float) -> None:
        """The application is behind and the shell stopped reading: not the server's fault."""
        self._reading_paused = paused
        if not paused:
            self._last_rx = now

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` must run next (None: no timer needed)."""
        st = self.state
        if st is ClientState.CLOSED or st is ClientState.IDLE:
            return None
        best: float | None = None
        if self._handshake_timeout is not None and st is not ClientState.CONNECTED:
            best = self._started + self._handshake_timeout
        if self._read_timeout and not self._reading_paused:
            t = self._last_rx + self._read_timeout
            best = t if best is None or t < best else best
        return best

    def handle_timer(self, now: float) -> list[Event]:
        """Run the deadlines that have passed: the handshake budget, then read silence."""
        st = self.state
        events: list[Event] = []
        if st is ClientState.CLOSED or st is ClientState.IDLE:
            return events
        if (
            self._handshake_timeout is not None
            and st is not ClientState.CONNECTED
            and now >= self._started + self._handshake_timeout
        ):
            self._close(
                ProtocolError("handshake_timeout", f"timed out after {self._handshake_timeout:g} s ({st.value})"),
                events,
            )
            return events
        if self._read_timeout and not self._reading_paused and now - self._last_rx >= self._read_timeout:
            self._close(
                ProtocolError("read_timeout", f"no frame from the server for {now - self._last_rx:.0f} s"),
                events,
            )
        return events

    # ------------------------------------------------------------------ sending

    @property
    def connected(self) -> bool:
        return self.state in _FRAMES_FLOW

    def send_packet(self, dst: NodePublic | bytes, data: bytes, now: float) -> bool:
        """Queue one packet for ``dst``; False when the server's advisory bucket is empty.

        Over budget the packet is dropped silently, as a Go client does: the server would
        only slow the whole connection down otherwise.
        """
        raw = _raw_key(dst, "destination")
        n = len(data)
        if n > MAX_PACKET_SIZE:
            raise ValueError(f"packet of {n} bytes exceeds the DERP maximum of {MAX_PACKET_SIZE}")
        if self._bucket_rate and not self._allow(5 + KEY_LEN + n, now):
            return False
        self._write(_HEADER.pack(_T_SEND, KEY_LEN + n) + raw)
        if n:
            self._out.append(data)
            self._out_len += n
        return True

    def _allow(self, nbytes: int, now: float) -> bool:
        self._bucket_tokens = min(
            self._bucket_burst, self._bucket_tokens + (now - self._bucket_time) * self._bucket_rate
        )
        self._bucket_time = now
        if self._bucket_tokens < nbytes:
            self.rate_limited_drops += 1
            return False
        self._bucket_tokens -= nbytes
        return True

    def forward_packet(self, src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes) -> None:
        """Mesh only: deliver ``data`` to ``dst`` as if ``src`` had sent it to that server."""
        self._write(F.ForwardPacket(_raw_key(src, "source"), _raw_key(dst, "destination"), data).encode())

    def note_preferred(self, preferred: bool) -> None:
        self._write(F.NotePreferred(preferred).encode())

    def watch_conns(self) -> None:
        self._write(F.WatchConns().encode())

    def close_peer(self, key: NodePublic | bytes) -> None:
        self._write(F.ClosePeer(_raw_key(key, "ClosePeer key")).encode())

    def send_ping(self, data: bytes) -> None:
        """A Ping with 8 bytes of the caller's choosing; its Pong comes back as a ``Pong``."""
        self._write(F.Ping(data).encode())

    def send_pong(self, data: bytes) -> None:
        self._write(F.Pong(data).encode())

    def ping(self, now: float, data: bytes | None = None) -> bytes:
        """Send a Ping whose Pong comes back as ``PingAnswered`` with the round trip."""
        data = os.urandom(PING_DATA_LEN) if data is None else data
        self.send_ping(data)
        self._pings[data] = now
        return data

    def forget_ping(self, data: bytes) -> None:
        """The caller stopped waiting; a late Pong is then delivered as a plain ``Pong``."""
        self._pings.pop(data, None)

    def send_raw(self, data: bytes) -> None:
        """Bytes exactly as given: for conformance tests that must send malformed frames."""
        self._write(data)


# =========================================================================== server


class ServerState(enum.Enum):
    AWAIT_CLIENT_INFO = "waiting for ClientInfo"
    ADMITTING = "admission check"
    RUNNING = "running"
    CLOSED = "closed"


class ConnectionCounters(Protocol):
    """The server-wide counters the core bumps (derpkit.server.metrics.Stats has them)."""

    got_ping: int
    sent_pong: int
    unknown_frames: int
    rate_limit_waited: int
    home_moves_in: int
    home_moves_out: int
    server_pings_sent: int


class SimpleCounters:
    """Counters for a core used outside the server (tests, stand-alone tools)."""

    def __init__(self) -> None:
        self.got_ping = 0
        self.sent_pong = 0
        self.unknown_frames = 0
        self.rate_limit_waited = 0
        self.home_moves_in = 0
        self.home_moves_out = 0
        self.server_pings_sent = 0


class ServerPolicy:
    """The settings every connection of one server shares; a reload changes them in place.

    ``rate_limit`` is ``(bytes per second, burst bytes)`` from -rate-config or None;
    ``server_pings`` turns on the liveness rule (Ping a silent client that promised to
    answer, close it when it stays silent).
    """

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        mesh_key: MeshKey | None = None,
        server_info: handshake.ServerInfo | None = None,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_jitter: float = KEEPALIVE_JITTER,
        server_pings: bool = True,
        write_timeout: float = DEFAULT_WRITE_TIMEOUT,
        mesh_write_timeout: float = MESH_WRITE_TIMEOUT,
        rate_limit: tuple[float, int] | None = None,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        rng: random.Random | None = None,
    ) -> None:
        self.private_key = private_key
        self.public_key = private_key.public()
        self.mesh_key = mesh_key
        self.server_info = server_info or handshake.ServerInfo()
        self.keepalive_interval = keepalive_interval
        self.keepalive_jitter = keepalive_jitter
        self.server_pings = server_pings
        self.write_timeout = write_timeout
        self.mesh_write_timeout = mesh_write_timeout
        self.rate_limit = rate_limit
        self.handshake_timeout = handshake_timeout
        self.rng = rng or random.Random()
        self.server_key_frame = F.ServerKey(self.public_key.raw).encode()


class ServerConnection:
    """The server end of one client connection.

    ``start(now)`` writes ServerKey and starts the handshake clock. ``receive_data``
    returns events (``ClientInfoReceived`` once, then control frames and rule breaks),
    calling ``on_packet(payload)`` for each SendPacket (payload = destination key +
    packet) and ``on_forward(src, dst, data)`` for a mesh ForwardPacket. Output goes to
    the ``write`` callable when one is given (the shell's per-turn batch), else into a
    buffer drained by ``data_to_send()``.
    """

    __slots__ = (
        "policy", "counters", "state", "key", "info", "is_mesh", "preferred", "created",
        "last_recv", "on_packet", "on_forward", "on_activity", "_write_fn", "_out", "_reader",
        "_deadline_hs", "_deadline_ka", "_deadline_write", "_deadline_rate", "_jitter",
        "_ping_sent", "_pongs", "_writing_paused", "_early", "_nh_tokens", "_nh_last",
        "_rate_tokens", "_rate_last",
    )

    def __init__(
        self,
        policy: ServerPolicy,
        *,
        on_packet: Callable[[bytes], object],
        on_forward: Callable[[bytes, bytes, bytes], object] | None = None,
        write: Callable[[bytes], object] | None = None,
        counters: ConnectionCounters | None = None,
    ) -> None:
        self.policy = policy
        self.counters: ConnectionCounters = counters if counters is not None else SimpleCounters()
        self.state = ServerState.AWAIT_CLIENT_INFO
        self.key: NodePublic | None = None
        self.info: handshake.ClientInfo | None = None
        self.is_mesh = False
        self.preferred = False
        self.created = 0.0
        self.last_recv = 0.0
        self.on_packet = on_packet
        self.on_forward = on_forward
        #: Called before each frame while set (the relay's duplicate-client activity rule).
        self.on_activity: Callable[[], object] | None = None
        self._out: list[bytes] = []
        self._write_fn = write if write is not None else self._out.append
        self._reader = F.FrameReader(F.server_header_check)
        self._deadline_hs: float | None = None
        self._deadline_ka: float | None = None
        self._deadline_write: float | None = None
        self._deadline_rate: float | None = None
        self._jitter = 0.0
        self._ping_sent = 0.0
        self._pongs = 0
        self._writing_paused = False
        self._early: list[tuple[int, bytes]] | None = None
        self._nh_tokens = float(NOT_HERE_BURST)
        self._nh_last = 0.0
        self._rate_tokens = 0.0
        self._rate_last = 0.0

    # ------------------------------------------------------------------ output

    def data_to_send(self) -> bytes:
        """Drain the buffer (only when no ``write`` callable was given)."""
        out = self._out
        data = b"".join(out)
        out.clear()
        return data

    # ------------------------------------------------------------------ lifecycle

    def start(self, now: float) -> None:
        """Write ServerKey; ClientInfo must arrive within the handshake timeout."""
        self.created = self.last_recv = self._nh_last = now
        self._write_fn(self.policy.server_key_frame)
        self._deadline_hs = now + self.policy.handshake_timeout

    def close(self) -> None:
        self.state = ServerState.CLOSED
        self._early = None
        self._deadline_hs = self._deadline_ka = self._deadline_write = self._deadline_rate = None

    def _fail(self, err: ProtocolError, events: list[Event]) -> None:
        self.close()
        events.append(ConnectionFailed(err))

    @property
    def running(self) -> bool:
        return self.state is ServerState.RUNNING

    @property
    def holding_frames(self) -> bool:
        """Frames wait in the core (admission or a rate-limit pause): keep reading paused."""
        return self._early is not None

    # ------------------------------------------------------------------ input

    def receive_data(self, data: bytes, now: float) -> list[Event]:
        """Bytes from the client. The returned list is usually empty: packets went to the sink."""
        st = self.state
        if st is ServerState.CLOSED:
            return []
        events: list[Event] = []
        try:
            frames = self._reader.feed(data)
        except ProtocolError as e:
            # Frames that arrived before the bad header are acted on first, as Go does.
            before = getattr(e, "frames", None)
            if before and st is ServerState.RUNNING and self._early is None:
                self._handle_frames(before, now, events)
            if self.state is not ServerState.CLOSED:
                self._fail(e, events)
            return events
        if not frames:
            return events
        self.last_recv = now
        if st is ServerState.RUNNING:
            if self._early is not None:
                self._early.extend(frames)  # still waiting out a rate-limit pause
            else:
                self._handle_frames(frames, now, events)
        elif st is ServerState.AWAIT_CLIENT_INFO:
            self._handshake(frames, events)
        else:
            assert self._early is not None
            self._early.extend(frames)
        return events

    def _handshake(self, frames: list[tuple[int, bytes]], events: list[Event]) -> None:
        ftype, payload = frames[0]
        policy = self.policy
        try:
            F.decode_server_side(ftype, payload, first=True)
            if ftype == FrameType.CLIENT_INFO and not payload and self._reader.skipped:
                raise ProtocolError("bad_first_frame", "empty ClientInfo")
            key, info = handshake.open_client_info(policy.private_key, payload)
        except ProtocolError as e:
            self._fail(e, events)
            return
        self.key = key
        self.info = info
        self.is_mesh = policy.mesh_key is not None and policy.mesh_key.matches(info.mesh_key)
        self._early = frames[1:]
        self.state = ServerState.ADMITTING
        events.append(ClientInfoReceived(key, info, self.is_mesh))

    def admit(self, now: float, server_info: handshake.ServerInfo | None = None) -> list[Event]:
        """The shell admitted the client: send ServerInfo, start keepalives, run held frames.

        The shell registers the client with the relay *before* calling this, so packets
        the client pipelined behind ClientInfo find their peers.
        """
        if self.state is not ServerState.ADMITTING:
            return []
        assert self.key is not None
        policy = self.policy
        self.state = ServerState.RUNNING
        self._deadline_hs = None
        if policy.rate_limit is not None and not self.is_mesh:
            self._rate_tokens = float(policy.rate_limit[1])
            self._rate_last = now
        self._write_fn(handshake.server_info_frame(policy.private_key, self.key, server_info or policy.server_info))
        # Jitter is drawn once per connection, as derper does, so the period stays fixed.
        self._jitter = policy.rng.random() * policy.keepalive_jitter
        self._deadline_ka = now + policy.keepalive_interval + self._jitter
        events: list[Event] = []
        early, self._early = self._early, None
        if early:
            self._handle_frames(early, now, events)
        return events

    def refuse(self) -> None:
        """The shell refused the client (admission): nothing more is read or written."""
        self.close()

    def _handle_frames(
        self, frames: list[tuple[int, bytes]], now: float, events: list[Event], precharged: bool = False
    ) -> None:
        counters = self.counters
        on_packet = self.on_packet
        for i, (ftype, payload) in enumerate(frames):
            if self.state is not ServerState.RUNNING:
                return
            if self._rate_last and not (precharged and i == 0):
                wait = self._charge(len(payload), now)
                if wait > 0:
                    # Like derper, hold this frame and everything after it until the bucket
                    # refills; not reading is what slows the sender down.
                    self._early = frames[i:]
                    counters.rate_limit_waited += 1
                    self._deadline_rate = now + wait
                    events.append(ReadingPaused(now + wait))
                    return
            if self.on_activity is not None:
                self.on_activity()
            if ftype == _T_SEND:
                if len(payload) < KEY_LEN:
                    self._fail(ProtocolError("short_send_packet", f"{len(payload)} bytes"), events)
                    return
                on_packet(payload)
            elif ftype == _T_PING:
                counters.got_ping += 1
                try:
                    ping = F.decode_server_side(ftype, payload)
                except ProtocolError as e:
                    self._fail(e, events)
                    return
                assert isinstance(ping, F.Ping)
                if self._pongs >= (1 if self._writing_paused else PONGS_WRITABLE):
                    # derper's pong queue holds one; a Ping while it is taken is ignored
                    # ("pinging too fast"), so a ping flood cannot pile Pongs up here.
                    continue
                self._pongs += 1
                self._write_fn(_PONG_HDR + ping.data)
                counters.sent_pong += 1
            elif ftype in (_T_NOTE, _T_FWD, _T_WATCH, _T_CLOSE):
                if ftype == _T_FWD and not self.is_mesh:
                    self._fail(ProtocolError("not_mesh_peer", "ForwardPacket without the mesh key"), events)
                    return
                try:
                    f = F.decode_server_side(ftype, payload)
                except ProtocolError as e:
                    self._fail(e, events)
                    return
                if isinstance(f, F.NotePreferred):
                    self._note_preferred(f.preferred, now)
                elif not self.is_mesh:
                    self._fail(
                        ProtocolError("not_mesh_peer", f"{FrameType(ftype).name} without the mesh key"), events
                    )
                    return
                elif isinstance(f, F.ForwardPacket):
                    if self.on_forward is not None:
                        self.on_forward(f.src, f.dst, f.data)
                else:
                    events.append(f)  # WatchConns / ClosePeer: the relay acts on them
            elif ftype != _T_PONG and ftype != _T_KEEPALIVE:
                counters.unknown_frames += 1

    def _note_preferred(self, preferred: bool, now: float) -> None:
        if preferred == self.preferred:
            return
        self.preferred = preferred
        if now - self.created > HOME_MOVE_GRACE:
            if preferred:
                self.counters.home_moves_in += 1
            else:
                self.counters.home_moves_out += 1

    # ------------------------------------------------------------------ -rate-config

    def _charge(self, nbytes: int, now: float) -> float:
        """Take a frame's cost from the bucket; return how long the reader must wait."""
        limit = self.policy.rate_limit
        if limit is None or self.is_mesh:
            self._rate_last = 0.0
            return 0.0
        rate, burst = limit
        self._rate_tokens = min(float(burst), self._rate_tokens + (now - self._rate_last) * rate)
        self._rate_last = now
        self._rate_tokens -= min(nbytes, MIN_RATE_BURST)
        return -self._rate_tokens / rate if self._rate_tokens < 0 else 0.0

    def apply_rate_limit(self, now: float) -> None:
        """A reload changed ``policy.rate_limit``: start or stop limiting this connection."""
        if self.policy.rate_limit is None or self.is_mesh:
            self._rate_last = 0.0
        elif not self._rate_last:
            self._rate_tokens = float(self.policy.rate_limit[1])
            self._rate_last = now

    # ------------------------------------------------------------------ write side state

    def writing_paused(self, now: float) -> None:
        """The transport is full: start the write deadline (derper -tcp-write-timeout)."""
        self._writing_paused = True
        timeout = self.policy.mesh_write_timeout if self.is_mesh else self.policy.write_timeout
        if timeout and self._deadline_write is None and self.state is ServerState.RUNNING:
            self._deadline_write = now + timeout

    def writing_resumed(self) -> None:
        self._writing_paused = False
        self._pongs = 0  # the Pongs held back went out with the buffer
        self._deadline_write = None

    def output_flushed(self) -> None:
        """The shell handed a batch to the transport: the pong slot is free again."""
        if self._pongs and not self._writing_paused:
            self._pongs = 0

    def not_here_allowed(self, now: float) -> bool:
        """PeerGone(NotHere) budget: 1 per second, burst 3, per sending connection."""
        self._nh_tokens = min(float(NOT_HERE_BURST), self._nh_tokens + (now - self._nh_last) * NOT_HERE_RATE)
        self._nh_last = now
        if self._nh_tokens >= 1.0:
            self._nh_tokens -= 1.0
            return True
        return False

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        best: float | None = None
        for t in (self._deadline_hs, self._deadline_ka, self._deadline_write, self._deadline_rate):
            if t is not None and (best is None or t < best):
                best = t
        return best

    def handle_timer(self, now: float) -> list[Event]:
        """Run every deadline that has passed, in the order derper would notice them."""
        events: list[Event] = []
        if self.state is ServerState.CLOSED:
            return events
        if self._deadline_hs is not None and now >= self._deadline_hs:
            self._fail(
                ProtocolError("handshake_timeout", f"no ClientInfo within {self.policy.handshake_timeout:g}s"), events
            )
            return events
        if self._deadline_write is not None and now >= self._deadline_write:
            self._deadline_write = None
            if self.state is ServerState.RUNNING and self._writing_paused:
                self._fail(ProtocolError("write_timeout", "client not reading"), events)
                return events
        if self._deadline_rate is not None and now >= self._deadline_rate:
            self._deadline_rate = None
            backlog, self._early = self._early, None
            events.append(ReadingResumed())
            if backlog:
                self._handle_frames(backlog, now, events, precharged=True)
            if self.state is ServerState.CLOSED:
                return events
        if self._deadline_ka is not None and now >= self._deadline_ka:
            self._write_fn(F.KEEPALIVE_BYTES)
            self._liveness_check(now, events)
            if self.state is ServerState.RUNNING:
                self._deadline_ka = now + self.policy.keepalive_interval + self._jitter
        return events

    def _liveness_check(self, now: float, events: list[Event]) -> None:
        """Beyond derper: Ping clients that promised to answer, and drop the dead ones.

        A client that declared CanAckPings and has sent nothing for a whole keepalive
        period gets a Ping; if it is still silent at the next tick it is gone (a NAT or a
        laptop lid took it), and it is closed instead of held for TCP timeouts.
        """
        info = self.info
        if info is None or not info.can_ack_pings or self.is_mesh or not self.policy.server_pings:
            return
        silent = now - self.last_recv
        if self._ping_sent > 0 and self.last_recv < self._ping_sent:
            self._fail(ProtocolError("dead_client", f"no answer to a liveness ping for {silent:.0f}s"), events)
            return
        self._ping_sent = 0.0
        if silent >= self.policy.keepalive_interval * 0.9:
            self._write_fn(_PING_HDR + os.urandom(PING_DATA_LEN))
            self._ping_sent = now
            self.counters.server_pings_sent += 1
