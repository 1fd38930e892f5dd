"""One DERP client connection on the server: the asyncio shell around ``ServerConnection``.

Every protocol rule (handshake, what each frame may hold, the pong slot, keepalives,
liveness pings, write deadline, NotHere budget, -rate-config) lives in
``derpkit.protocol.connection.ServerConnection``. This shell moves bytes: it parses
straight from ``data_received`` (after the HTTP upgrade nothing passes through aiohttp),
arms one timer at the core's next deadline, runs admission, and owns the write side.

Writes are batched per event-loop turn (several frames per syscall under load, like
derper's buffered writer). While the transport is writable, packets go straight to it;
once the kernel and transport buffers are full (``pause_writing``), packets wait in two
small queues (disco and regular, 32 each) with head-drop, and the core's write deadline
runs: a reader that stays stuck past it is disconnected. An idle client allocates no
queues at all.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from derpkit.protocol import frames as F
from derpkit.protocol.connection import ServerConnection, ServerPolicy, ServerState
from derpkit.protocol.constants import KEY_LEN, FrameType, PeerGoneReason, PeerPresentFlags
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import (
    ClientInfoReceived,
    ConnectionFailed,
    Event,
    ReadingPaused,
    ReadingResumed,
)
from derpkit.protocol.handshake import ClientInfo
from derpkit.protocol.keys import NodePublic
from derpkit.server.metrics import WRITE_BATCH_SLOTS, tls_version_label

if TYPE_CHECKING:
    from derpkit.server.metrics import Stats

log = logging.getLogger("derpkit.server")


class Relay(Protocol):
    """Everything a connection shell may ask of the relay it belongs to.

    ``DerpServer`` is the one implementation; the shell holds it only through this view,
    so what a connection can touch of the shared state is written down here and nowhere
    else (the registry, the forwarder table and the watcher set are not in it).
    """

    policy: ServerPolicy  # the settings the protocol core reads (keys, timers, limits)
    stats: Stats  # counters the shell adds to (accepts, drops, errors, TLS versions)
    queue_depth: int  # packets held per client while its socket is not writable
    debug_logs: bool  # DERP_DEBUG_LOGS: one line per ordinary close
    #: admission (verify-clients and friends): None admits everyone
    admit: Callable[[NodePublic, ClientInfo, tuple[str, int] | None], Awaitable[str | None]] | None

    def attach(self, conn: ClientConn) -> None:
        """An accepted connection, before its handshake (counted, closed on shutdown)."""

    def detach(self, conn: ClientConn) -> None:
        """The connection is gone, whether or not it ever registered."""

    def register(self, conn: ClientConn) -> None:
        """Admitted: packets to its key now reach it (and watchers hear it is present)."""

    def unregister(self, conn: ClientConn) -> None:
        """It left after registering: PeerGone for those it sent to, watchers told."""

    def route_packet(self, src: ClientConn, payload: bytes) -> None:
        """A SendPacket's body (destination key + packet) from ``src``."""

    def route_forwarded(self, via: ClientConn, src: bytes, dst: bytes, data: bytes) -> None:
        """A ForwardPacket from a mesh peer."""

    def note_activity(self, conn: ClientConn) -> None:
        """A frame from one of several connections with one key: it becomes the active one."""

    def add_watcher(self, conn: ClientConn) -> None:
        """A mesh peer's WatchConns."""

    def close_peer(self, key: bytes) -> None:
        """A mesh peer's ClosePeer."""

_PEER_GONE_HDR = F.header(FrameType.PEER_GONE, KEY_LEN + 1)
_RUNNING = ServerState.RUNNING
_CLOSED = ServerState.CLOSED
#: Reads at least this large count towards the per-turn read budget (small reads cannot
#: add up to a flood within one turn, so they skip the bookkeeping).
_BIG_READ = 16 * 1024
#: Bytes read from one client per event-loop turn before its reader waits a turn.
READ_BUDGET = 64 * 1024
#: Closes decided by a timer that drop the socket without flushing (the peer is gone or
#: not reading, so waiting for the buffer to drain would only hold the connection).
_ABORT_REASONS = frozenset({"write_timeout", "dead_client"})


class ClientConn(asyncio.Protocol):
    """Server side of one client; created by the front door after the upgrade."""

    __slots__ = (
        "server", "core", "transport", "key", "key_raw", "info", "is_mesh", "not_ideal",
        "remote", "created", "_is_dup", "websocket", "_out", "_paused", "_qd", "_qr",
        "_timer", "_timer_at", "peer_gone_srcs", "close_reason", "_loop", "_turn_in",
        "_turn_paused", "tcp_sock", "rtt_due", "_mesh_batch", "_tls_label",
        "_ob_n", "_ob_b", "_ob_dn", "_ob_db", "_closed", "_registered",
    )

    def __init__(
        self,
        server: Relay,
        remote: tuple[str, int] | None,
        *,
        not_ideal: bool = False,
        websocket: bool = False,
    ) -> None:
        self.server = server
        self.core = ServerConnection(
            server.policy,
            on_packet=functools.partial(server.route_packet, self),
            on_forward=functools.partial(server.route_forwarded, self),
            write=self._write,
            counters=server.stats,
        )
        self.transport: asyncio.BaseTransport | Any = None
        self.key: NodePublic | None = None
        self.key_raw = b""
        self.info: ClientInfo | None = None
        self.is_mesh = False
        self.not_ideal = not_ideal
        self.remote = remote
        self.created = time.monotonic()
        self._is_dup = False
        self.websocket = websocket
        self._out: list[bytes] | None = None
        self._paused = False
        self._qd: collections.deque[tuple[bytes, int, float]] | None = None
        self._qr: collections.deque[tuple[bytes, int, float]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.peer_gone_srcs: set[bytes] | None = None
        self._turn_in = 0
        self._turn_paused = False
        self.tcp_sock: Any = None  # set by the RTT sampler once it can read TCP_INFO
        self.rtt_due = 0.0
        self._mesh_batch = 0
        self._tls_label: str | None = None
        # Packets (count, bytes; regular then disco) in this turn's batch: counted as sent
        # once the batch is handed to the transport, or dropped by reason if it is not.
        self._ob_n = self._ob_b = self._ob_dn = self._ob_db = 0
        self._closed = False
        self._registered = False
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ core state

    @property
    def running(self) -> bool:
        return self.core.state is _RUNNING

    @property
    def preferred(self) -> bool:
        return self.core.preferred

    @property
    def last_recv(self) -> float:
        return self.core.last_recv

    @property
    def is_dup(self) -> bool:
        return self._is_dup

    @is_dup.setter
    def is_dup(self, dup: bool) -> None:
        """One of several connections with this key: each frame counts as its activity."""
        self._is_dup = dup
        self.core.on_activity = functools.partial(self.server.note_activity, self) if dup else None

    # ------------------------------------------------------------------ lifecycle

    def start(self, transport: Any, initial: bytes, preamble: bytes = b"") -> None:
        """Begin the handshake: optional 101 preamble, ServerKey, then wait for ClientInfo."""
        self.transport = transport
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=256 * 1024)
        self.server.attach(self)
        stats = self.server.stats
        stats.accepts += 1
        # derper counts the /derp request by TLS version and keeps it "active" for the
        # whole session; WebSocket sessions are counted by the HTTP middleware instead.
        if not self.websocket:
            label = self._tls_label = tls_version_label(transport)
            if label is not None:
                stats.tls_request_version[label] += 1
                stats.tls_active_version[label] += 1
        self.core.start(time.monotonic())
        out, self._out = self._out, None  # ServerKey, written with the 101 in one go
        transport.write(preamble + b"".join(out or ()))
        self._arm()
        if initial:
            self.data_received(initial)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._teardown(self.close_reason or ("read_error" if exc else "eof"))

    def eof_received(self) -> bool:
        return False

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close this connection (and only it), recording why."""
        if self._closed:
            return
        if not self.close_reason:
            self.close_reason = reason
        t = self.transport
        if self._out and not abort:
            self._flush()
        if t is not None and not t.is_closing():
            if abort:
                t.abort()
            else:
                t.close()
        self._teardown(reason)

    def _teardown(self, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        # The core may have closed itself already (the fault that ends us); registration is
        # the shell's own record.
        was_running, self._registered = self._registered, False
        self.core.close()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        stats = self.server.stats
        for q in (self._qd, self._qr):
            if q:
                for _data, n, _t in q:
                    stats.drop("gone_disconnected", q is self._qd, n)
                q.clear()
        # Packets of a batch never handed to the transport (an abort, or the peer went away
        # before the flush): like derper draining its queues, they are gone_disconnected.
        self._drop_batch("gone_disconnected")
        self._out = None
        self.server.detach(self)
        if self._tls_label is not None:
            stats.tls_active_version[self._tls_label] -= 1
            self._tls_label = None
        self.tcp_sock = None
        if was_running:
            self.server.unregister(self)
        if self.server.debug_logs:
            # Every non-routine close already logged its one line where it was decided.
            who = str(self.key) if self.key else f"{self.remote}"
            log.info("derp: %s closed: %s", who, reason)

    def _fail(self, err: ProtocolError) -> None:
        stats = self.server.stats
        reason = err.reason
        stats.conn_errors[reason] += 1
        who = str(self.key) if self.key else f"{self.remote}"
        if reason == "write_timeout":
            stats.sclient_write_timeouts += 1
            log.info("derp: %s: write timeout, client not reading", who)
        elif reason == "dead_client":
            stats.dead_clients_closed += 1
            log.info("derp: %s: %s; closing", who, err.detail)
        else:
            log.info("derp: closing %s: %s", who, err)
        self.close(reason, abort=reason in _ABORT_REASONS)

    # ------------------------------------------------------------------ timer

    def _arm(self) -> None:
        """One asyncio timer at the core's next deadline; re-armed only when it moved."""
        at = self.core.next_deadline()
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = at
        if at is not None and not self._closed:
            self._timer = self._loop.call_at(self._loop.time() + max(0.0, at - time.monotonic()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        if self._closed:
            return
        events = self.core.handle_timer(time.monotonic())
        if events:
            self._events(events)
        if not self._closed:
            self._arm()

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        events = self.core.receive_data(data, time.monotonic())
        if events:
            self._events(events)
            if self._closed:
                return
        if len(data) >= _BIG_READ:
            self._budget_read(len(data))

    def _events(self, events: list[Event]) -> None:
        for ev in events:
            if self._closed:
                return
            if isinstance(ev, ConnectionFailed):
                self._fail(ev.error)
            elif isinstance(ev, ClientInfoReceived):
                self._client_info(ev)
            elif isinstance(ev, F.WatchConns):
                self.server.add_watcher(self)
            elif isinstance(ev, F.ClosePeer):
                self.server.close_peer(ev.key)
            elif isinstance(ev, ReadingPaused):
                if hasattr(self.transport, "pause_reading"):
                    self.transport.pause_reading()
                self._arm()
            elif isinstance(ev, ReadingResumed):
                if hasattr(self.transport, "resume_reading"):
                    self.transport.resume_reading()

    def _budget_read(self, n: int) -> None:
        """Read at most about READ_BUDGET bytes from one client per event-loop turn.

        libuv (uvloop) reads a busy socket up to 32 times per turn, so a flooding sender
        could hand us megabytes at once; all of it would land in a few receivers' write
        buffers in one batch, and everything after that batch would be head-dropped while
        they drain. Pausing the reader until the next turn lets the writes go out first.
        It never waits on a receiver, so a stuck receiver still cannot slow its senders.
        """
        if not self._turn_in:
            self._loop.call_soon(self._next_turn)
        self._turn_in += n
        if self._turn_in >= READ_BUDGET and not self._turn_paused and hasattr(self.transport, "pause_reading"):
            self._turn_paused = True
            self.server.stats.read_budget_pauses += 1
            self.transport.pause_reading()

    def _next_turn(self) -> None:
        self._turn_in = 0
        if self._turn_paused:
            self._turn_paused = False
            # Not while admission or a -rate-config pause holds frames: they resume it.
            if not self._closed and not self.core.holding_frames:
                self.transport.resume_reading()

    def _client_info(self, ev: ClientInfoReceived) -> None:
        self.key = ev.key
        self.key_raw = ev.key.raw
        self.info = ev.info
        self.is_mesh = ev.is_mesh
        server = self.server
        if self.is_mesh or server.admit is None:
            self._admitted()
            return
        if hasattr(self.transport, "pause_reading"):
            self.transport.pause_reading()
        task = self._loop.create_task(server.admit(ev.key, ev.info, self.remote))
        task.add_done_callback(self._admission_done)

    def _admission_done(self, task: asyncio.Task[str | None]) -> None:
        if self._closed or self.core.state is not ServerState.ADMITTING:
            return
        try:
            refusal = task.result()
        except Exception as e:  # an admission bug must not admit anyone
            refusal = f"admission check failed: {e}"
        if refusal:
            self.server.stats.conn_errors["admission_denied"] += 1
            where = f"[{self.remote[0]}]:{self.remote[1]}" if self.remote and ":" in self.remote[0] else (
                f"{self.remote[0]}:{self.remote[1]}" if self.remote else "unknown"
            )
            log.info("derp: %s: client %s rejected: %s", where, self.key, refusal)
            self.core.refuse()
            self.close("admission_denied")
            return
        if hasattr(self.transport, "resume_reading"):
            self.transport.resume_reading()
        self._admitted()

    def _admitted(self) -> None:
        server = self.server
        assert self.key is not None
        # Registered before ServerInfo and before the frames the client pipelined, so those
        # find their peers (and a sender to us finds us) at once.
        server.register(self)
        self._registered = True
        events = self.core.admit(time.monotonic())
        self._arm()
        if events:
            self._events(events)

    def apply_rate_limit(self) -> None:
        """Called on SIGHUP reload: start (or stop) limiting this existing connection."""
        self.core.apply_rate_limit(time.monotonic())

    # ------------------------------------------------------------------ writing

    def _write(self, data: bytes) -> None:
        """Queue a control frame (or a packet while writable) for this turn's batch."""
        out = self._out
        if out is None:
            self._out = [data]
            self._loop.call_soon(self._flush)
        else:
            out.append(data)

    def _flush(self) -> None:
        out = self._out
        self._out = None
        if not out or self._closed:
            return
        t = self.transport
        n = len(out)
        stats = self.server.stats
        stats.write_batches[n if n < WRITE_BATCH_SLOTS else WRITE_BATCH_SLOTS] += 1
        stats.write_batch_frames += n
        if n == 1:
            t.write(out[0])
        elif self._tls_label is not None:
            # One TLS write per batch: the loop's TLS layer makes one record (and one
            # SSL_write) per chunk it is given, which costs more than the copy does.
            t.write(b"".join(out))
        else:
            t.writelines(out)
        self.core.output_flushed()
        if self._ob_n or self._ob_dn:
            if t.is_closing():
                # Still running, yet the transport is closing: the OS refused a write
                # (reset, broken pipe) and asyncio dropped the data; connection_lost comes
                # next turn. derper counts a packet whose write fails as write_error.
                self._drop_batch("write_error")
            else:
                stats.packets_sent += self._ob_n + self._ob_dn
                stats.bytes_sent += self._ob_b + self._ob_db
                self._ob_n = self._ob_b = self._ob_dn = self._ob_db = 0

    def _drop_batch(self, reason: str) -> None:
        """Count this batch's packets as dropped for ``reason`` (both disco and other)."""
        stats = self.server.stats
        for disco, count, nbytes in ((False, self._ob_n, self._ob_b), (True, self._ob_dn, self._ob_db)):
            if count:
                key = (reason, "disco" if disco else "other")
                stats.dropped_packets[key] += count
                stats.dropped_bytes[key] += nbytes
        self._ob_n = self._ob_b = self._ob_dn = self._ob_db = 0

    def _batch_packet(self, frame: bytes, disco: bool, nbytes: int) -> None:
        self._write(frame)
        if disco:
            self._ob_dn += 1
            self._ob_db += nbytes
        else:
            self._ob_n += 1
            self._ob_b += nbytes

    def enqueue_packet(self, frame: bytes, disco: bool, nbytes: int) -> None:
        """Deliver one RecvPacket frame, or queue it while the client is not reading."""
        stats = self.server.stats
        if self.core.state is not _RUNNING or self._closed:
            stats.drop("gone_disconnected", disco, nbytes)
            return
        if not self._paused:
            # _batch_packet inlined: this is the per-packet hot path.
            self._write(frame)
            if disco:
                self._ob_dn += 1
                self._ob_db += nbytes
            else:
                self._ob_n += 1
                self._ob_b += nbytes
            return
        if disco:
            q = self._qd
            if q is None:
                q = self._qd = collections.deque()
        else:
            q = self._qr
            if q is None:
                q = self._qr = collections.deque()
        now = self._loop.time()
        if len(q) >= self.server.queue_depth:
            _old, n, t0 = q.popleft()
            stats.drop("queue_head", disco, n)
            stats.note_queue_duration(now - t0)
        q.append((frame, nbytes, now))

    def send_peer_gone(self, key: bytes, reason: int) -> None:
        if not self.running:
            return
        self._write(_PEER_GONE_HDR + key + bytes((reason,)))
        stats = self.server.stats
        if reason == PeerGoneReason.NOT_HERE:
            stats.peer_gone_not_here_frames += 1
        else:
            stats.peer_gone_disconnected_frames += 1

    def send_not_here(self, key: bytes) -> None:
        """PeerGone(NotHere) within the core's budget (1/s, burst 3, per connection)."""
        if self.core.not_here_allowed(time.monotonic()):
            self.send_peer_gone(key, PeerGoneReason.NOT_HERE)

    def send_mesh_update(self, frame: bytes) -> None:
        """A PeerPresent/PeerGone for a watcher; one loop turn's worth is one batch.

        derper drains a watcher's pending updates in batches and records each batch's size
        and the drains per wake-up; our writes are already batched per loop turn, so a turn
        is a batch and every drain takes exactly one loop.
        """
        if not self.running:
            return
        self._write(frame)
        self._count_mesh_update()

    def send_mesh_gone(self, key: bytes) -> None:
        """A watcher's PeerGone(Disconnected): counted as a frame and as a mesh update."""
        if not self.running:
            return
        self.send_peer_gone(key, PeerGoneReason.DISCONNECTED)
        self._count_mesh_update()

    def _count_mesh_update(self) -> None:
        if not self._mesh_batch:
            self._loop.call_soon(self._mesh_batch_done)
        self._mesh_batch += 1

    def _mesh_batch_done(self) -> None:
        stats = self.server.stats
        stats.mesh_update_batch.observe(self._mesh_batch)
        stats.mesh_update_loops.observe(1)
        self._mesh_batch = 0

    def send_frame(self, data: bytes) -> None:
        """Write any pre-encoded frame (Restarting, Health, ...); watchers get send_mesh_update."""
        if self.running:
            self._write(data)

    def pause_writing(self) -> None:
        self._paused = True
        self.core.writing_paused(time.monotonic())
        self._arm()

    def resume_writing(self) -> None:
        self._paused = False
        self.core.writing_resumed()
        if not self._closed:
            self._arm()
        stats = self.server.stats
        now = self._loop.time()
        for q in (self._qd, self._qr):
            while q and not self._paused:
                data, n, t0 = q.popleft()
                self._batch_packet(data, q is self._qd, n)
                stats.note_queue_duration(now - t0)

    # ------------------------------------------------------------------ mesh view

    def peer_present_frame(self) -> bytes:
        flags = 0
        if self.is_mesh:
            flags |= PeerPresentFlags.IS_MESH_PEER
        if self.info is not None and self.info.is_prober:
            flags |= PeerPresentFlags.IS_PROBER
        if self.not_ideal:
            flags |= PeerPresentFlags.NOT_IDEAL
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        port = 0
        if self.remote is not None:
            try:
                ip = ipaddress.ip_address(self.remote[0].split("%")[0])
                port = self.remote[1]
            except ValueError:
                ip, port = None, 0
        return F.PeerPresent(self.key_raw, ip, port, flags or PeerPresentFlags.IS_REGULAR).encode()
