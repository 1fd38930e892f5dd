"""One DERP client connection on the server: handshake, frame dispatch, send queue.

The connection is an asyncio ``Protocol`` that parses frames straight from
``data_received``; after the HTTP upgrade nothing passes through aiohttp. Writes are
batched per event-loop turn (several frames per syscall under load, like derper's
buffered writer). While the transport is writable, packets go straight to it; once the
kernel and transport buffers are full (``pause_writing``), packets wait in two small
queues (disco and regular, 32 each) with head-drop, and a write deadline runs: a reader
that stays stuck past it is disconnected. An idle client allocates no queues at all.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import os
import random
import time
from typing import TYPE_CHECKING, Any

from derpkit.protocol import frames as F
from derpkit.protocol.constants import (
    HANDSHAKE_TIMEOUT,
    HOME_MOVE_GRACE,
    KEY_LEN,
    MIN_RATE_BURST,
    NOT_HERE_BURST,
    NOT_HERE_RATE,
    FrameType,
    PeerGoneReason,
    PeerPresentFlags,
)
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.handshake import ClientInfo, open_client_info, server_info_frame
from derpkit.protocol.keys import NodePublic

from .metrics import WRITE_BATCH_SLOTS, tls_version_label

if TYPE_CHECKING:
    from .derp import DerpServer

log = logging.getLogger("derpkit.server")

_SEND = FrameType.SEND_PACKET
_PING = FrameType.PING
_NOTE = FrameType.NOTE_PREFERRED
_FWD = FrameType.FORWARD_PACKET
_WATCH = FrameType.WATCH_CONNS
_CLOSE = FrameType.CLOSE_PEER
_PONG_HDR = F.header(FrameType.PONG, 8)
_PING_HDR = F.header(FrameType.PING, 8)
_PEER_GONE_HDR = F.header(FrameType.PEER_GONE, KEY_LEN + 1)
_HANDSHAKE, _ADMITTING, _RUNNING, _CLOSED = range(4)
#: Reads at least this large count towards the per-turn read budget (small reads cannot
#: add up to a flood within one turn, so they skip the bookkeeping).
_BIG_READ = 16 * 1024
#: Bytes read from one client per event-loop turn before its reader waits a turn.
READ_BUDGET = 64 * 1024
#: Pongs answered per loop turn while the client's socket takes data. derper has a 1-slot
#: pong queue drained by its writer goroutine: an idle writer takes the first Pong out of
#: the slot at once, the second waits in it, later Pings are ignored until the writer
#: comes back. Against Go derper, 5 Pings in one write get exactly 2 Pongs (the first two);
#: while the socket is full (the writer blocked) only the slot is left: 1.
_PONGS_WRITABLE = 2


class ClientConn(asyncio.Protocol):
    """Server side of one client; created by the front door after the upgrade."""

    __slots__ = (
        "server", "transport", "reader", "state", "key", "key_raw", "info", "is_mesh",
        "not_ideal", "remote", "preferred", "created", "is_dup", "websocket",
        "_out", "_paused", "_qd", "_qr", "_timer", "_keepalive", "_early",
        "peer_gone_srcs", "_nh_tokens", "_nh_last", "_rate_tokens", "_rate_last",
        "last_recv", "_ping_sent", "close_reason", "_loop", "_kj", "_turn_in", "_turn_paused",
        "tcp_sock", "rtt_due", "_mesh_batch", "_tls_label",
        "_ob_n", "_ob_b", "_ob_dn", "_ob_db", "_pongs",
    )

    def __init__(
        self,
        server: DerpServer,
        remote: tuple[str, int] | None,
        *,
        not_ideal: bool = False,
        websocket: bool = False,
    ) -> None:
        self.server = server
        self.transport: asyncio.BaseTransport | Any = None
        self.reader = F.FrameReader(F.server_header_check)
        self.state = _HANDSHAKE
        self.key: NodePublic | None = None
        self.key_raw = b""
        self.info: ClientInfo | None = None
        self.is_mesh = False
        self.not_ideal = not_ideal
        self.remote = remote
        self.preferred = False
        self.created = time.monotonic()
        self.is_dup = False
        self.websocket = websocket
        self._out: list[bytes] | None = None
        self._paused = False
        self._qd: collections.deque[tuple[bytes, int, float]] | None = None
        self._qr: collections.deque[tuple[bytes, int, float]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None
        self._early: list[tuple[int, bytes]] | None = None
        self.peer_gone_srcs: set[bytes] | None = None
        self._nh_tokens = float(NOT_HERE_BURST)
        self._nh_last = self.created
        self._rate_tokens = 0.0
        self._rate_last = 0.0
        self.last_recv = self.created
        self._ping_sent = 0.0
        self._kj = 0.0
        self._turn_in = 0
        self._turn_paused = False
        self.tcp_sock: Any = None  # set by the RTT sampler once it can read TCP_INFO
        self.rtt_due = 0.0
        self._mesh_batch = 0
        self._tls_label: str | None = None
        # Packets (count, bytes; regular then disco) in this turn's batch: counted as sent
        # once the batch is handed to the transport, or dropped by reason if it is not.
        self._ob_n = self._ob_b = self._ob_dn = self._ob_db = 0
        # Pongs not yet handed to the socket (derper's pong slot plus the one its writer
        # holds; see _PONGS_WRITABLE).
        self._pongs = 0
        self.close_reason = ""
        self._loop = asyncio.get_running_loop()

    # ------------------------------------------------------------------ lifecycle

    def start(self, transport: Any, initial: bytes, preamble: bytes = b"") -> None:
        """Begin the handshake: optional 101 preamble, ServerKey, then wait for ClientInfo."""
        self.transport = transport
        if hasattr(transport, "set_write_buffer_limits"):
            transport.set_write_buffer_limits(high=256 * 1024)
        self.server.conns.add(self)
        stats = self.server.stats
        stats.accepts += 1
        # derper counts the /derp request by TLS version and keeps it "active" for the
        # whole session; WebSocket sessions are counted by the HTTP middleware instead.
        if not self.websocket:
            label = self._tls_label = tls_version_label(transport)
            if label is not None:
                stats.tls_request_version[label] += 1
                stats.tls_active_version[label] += 1
        transport.write(preamble + self.server.server_key_frame)
        self._timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)
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
        if self.state == _CLOSED:
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
        if self.state == _CLOSED:
            return
        was_running = self.state == _RUNNING
        self.state = _CLOSED
        for h in (self._timer, self._keepalive):
            if h is not None:
                h.cancel()
        self._timer = self._keepalive = None
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
        self.server.conns.discard(self)
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
        self.server.stats.conn_errors[err.reason] += 1
        who = str(self.key) if self.key else f"{self.remote}"
        log.info("derp: closing %s: %s", who, err)
        self.close(err.reason)

    def _handshake_timeout(self) -> None:
        self._timer = None
        if self.state in (_HANDSHAKE, _ADMITTING):
            self._fail(ProtocolError("handshake_timeout", "no ClientInfo within 10s"))

    # ------------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        if self.state == _CLOSED:
            return
        try:
            frames = self.reader.feed(data)
        except ProtocolError as e:
            # Frames that arrived before the bad header are acted on first, as Go does.
            before = getattr(e, "frames", None)
            if before and self.state == _RUNNING and self._early is None:
                self._handle_frames(before)
            self._fail(e)
            return
        if len(data) >= _BIG_READ:
            self._budget_read(len(data))
        if not frames:
            return
        self.last_recv = self._loop.time()
        if self.state == _RUNNING:
            if self._early is not None:
                self._early.extend(frames)  # still waiting out a rate-limit pause
            else:
                self._handle_frames(frames)
        elif self.state == _HANDSHAKE:
            self._handshake(frames)
        else:
            assert self._early is not None
            self._early.extend(frames)

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
            if self.state != _CLOSED and self._early is None:
                self.transport.resume_reading()

    def _handshake(self, frames: list[tuple[int, bytes]]) -> None:
        ftype, payload = frames[0]
        server = self.server
        try:
            F.decode_server_side(ftype, payload, first=True)
            if ftype == FrameType.CLIENT_INFO and not payload and self.reader.skipped:
                raise ProtocolError("bad_first_frame", "empty ClientInfo")
            key, info = open_client_info(server.private_key, payload)
        except ProtocolError as e:
            self._fail(e)
            return
        self.key = key
        self.key_raw = key.raw
        self.info = info
        self.is_mesh = server.mesh_key is not None and server.mesh_key.matches(info.mesh_key)
        self._early = frames[1:]
        self.state = _ADMITTING
        if self.is_mesh or server.admit is None:
            self._admitted()
            return
        if hasattr(self.transport, "pause_reading"):
            self.transport.pause_reading()
        task = self._loop.create_task(server.admit(key, info, self.remote))
        task.add_done_callback(self._admission_done)

    def _admission_done(self, task: asyncio.Task[str | None]) -> None:
        if self.state != _ADMITTING:
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
            self.close("admission_denied")
            return
        if hasattr(self.transport, "resume_reading"):
            self.transport.resume_reading()
        self._admitted()

    def _admitted(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        server = self.server
        assert self.key is not None
        self.state = _RUNNING
        if server.rate_limit is not None and not self.is_mesh:
            self._rate_tokens = float(server.rate_limit[1])
            self._rate_last = self._loop.time()
        server.register(self)
        self._write(server_info_frame(server.private_key, self.key, server.server_info))
        server.rtt.add(self)
        self._schedule_keepalive()
        early, self._early = self._early, None
        if early:
            self._handle_frames(early)

    def _handle_frames(self, frames: list[tuple[int, bytes]], precharged: bool = False) -> None:
        server = self.server
        stats = server.stats
        for i, (ftype, payload) in enumerate(frames):
            if self.state != _RUNNING:
                return
            if self._rate_last and not (precharged and i == 0):
                wait = self._charge(len(payload))
                if wait > 0:
                    # Like derper, hold this frame (and everything after it) until the
                    # bucket refills; not reading is what slows the sender down.
                    self._early = frames[i:]
                    stats.rate_limit_waited += 1
                    if hasattr(self.transport, "pause_reading"):
                        self.transport.pause_reading()
                    self._loop.call_later(wait, self._rate_resume)
                    return
            if self.is_dup:
                server.note_activity(self)
            if ftype == _SEND:
                n = len(payload)
                if n < KEY_LEN:
                    self._fail(ProtocolError("short_send_packet", f"{n} bytes"))
                    return
                server.route_packet(self, payload)
            elif ftype == _PING:
                stats.got_ping += 1
                try:
                    ping = F.decode_server_side(ftype, payload)
                except ProtocolError as e:
                    self._fail(e)
                    return
                assert isinstance(ping, F.Ping)
                if self._pongs >= (1 if self._paused else _PONGS_WRITABLE):
                    # derper's pong queue holds one; a Ping while it is taken is ignored
                    # ("pinging too fast"), so a ping flood cannot pile Pongs up here.
                    continue
                self._pongs += 1
                self._write(_PONG_HDR + ping.data)
                stats.sent_pong += 1
            elif ftype in (_NOTE, _FWD, _WATCH, _CLOSE):
                if ftype == _FWD and not self.is_mesh:
                    self._fail(ProtocolError("not_mesh_peer", "ForwardPacket without the mesh key"))
                    return
                try:
                    f = F.decode_server_side(ftype, payload)
                except ProtocolError as e:
                    self._fail(e)
                    return
                if isinstance(f, F.NotePreferred):
                    self._note_preferred(f.preferred)
                elif not self.is_mesh:
                    self._fail(ProtocolError("not_mesh_peer", f"{FrameType(ftype).name} without the mesh key"))
                    return
                elif isinstance(f, F.ForwardPacket):
                    server.route_forwarded(self, f.src, f.dst, f.data)
                elif isinstance(f, F.WatchConns):
                    server.add_watcher(self)
                elif isinstance(f, F.ClosePeer):
                    server.close_peer(f.key)
            else:
                if ftype not in (FrameType.PONG, FrameType.KEEP_ALIVE):
                    stats.unknown_frames += 1

    def _note_preferred(self, preferred: bool) -> None:
        if preferred == self.preferred:
            return
        self.preferred = preferred
        if self._loop.time() - self.created > HOME_MOVE_GRACE:
            if preferred:
                self.server.stats.home_moves_in += 1
            else:
                self.server.stats.home_moves_out += 1

    def _charge(self, nbytes: int) -> float:
        """-rate-config: take a frame's cost from the bucket; return how long to wait."""
        limit = self.server.rate_limit
        if limit is None or self.is_mesh:
            self._rate_last = 0.0
            return 0.0
        rate, burst = limit
        now = self._loop.time()
        self._rate_tokens = min(float(burst), self._rate_tokens + (now - self._rate_last) * rate)
        self._rate_last = now
        self._rate_tokens -= min(nbytes, MIN_RATE_BURST)
        return -self._rate_tokens / rate if self._rate_tokens < 0 else 0.0

    def _rate_resume(self) -> None:
        if self.state != _RUNNING:
            return
        backlog, self._early = self._early, None
        if hasattr(self.transport, "resume_reading"):
            self.transport.resume_reading()
        if backlog:
            self._handle_frames(backlog, precharged=True)

    def apply_rate_limit(self) -> None:
        """Called on SIGHUP reload: start (or stop) limiting this existing connection."""
        if self.server.rate_limit is None or self.is_mesh:
            self._rate_last = 0.0
        elif not self._rate_last:
            self._rate_tokens = float(self.server.rate_limit[1])
            self._rate_last = self._loop.time()

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
        if not out or self.state == _CLOSED:
            return
        t = self.transport
        n = len(out)
        stats = self.server.stats
        stats.write_batches[n if n < WRITE_BATCH_SLOTS else WRITE_BATCH_SLOTS] += 1
        stats.write_batch_frames += n
        if n == 1:
            t.write(out[0])
        else:
            t.writelines(out)
        if self._pongs and not self._paused:
            self._pongs = 0  # handed over; a full socket keeps the slot taken
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
        if self.state != _RUNNING:
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
        if self.state != _RUNNING:
            return
        self._write(_PEER_GONE_HDR + key + bytes((reason,)))
        stats = self.server.stats
        if reason == PeerGoneReason.NOT_HERE:
            stats.peer_gone_not_here_frames += 1
        else:
            stats.peer_gone_disconnected_frames += 1

    def send_not_here(self, key: bytes) -> None:
        """PeerGone(NotHere) limited to 1/s with a burst of 3 per connection."""
        now = self._loop.time()
        self._nh_tokens = min(float(NOT_HERE_BURST), self._nh_tokens + (now - self._nh_last) * NOT_HERE_RATE)
        self._nh_last = now
        if self._nh_tokens >= 1.0:
            self._nh_tokens -= 1.0
            self.send_peer_gone(key, PeerGoneReason.NOT_HERE)

    def send_mesh_update(self, frame: bytes) -> None:
        """A PeerPresent/PeerGone for a watcher; one loop turn's worth is one batch.

        derper drains a watcher's pending updates in batches and records each batch's size
        and the drains per wake-up; our writes are already batched per loop turn, so a turn
        is a batch and every drain takes exactly one loop.
        """
        if self.state != _RUNNING:
            return
        self._write(frame)
        self._count_mesh_update()

    def send_mesh_gone(self, key: bytes) -> None:
        """A watcher's PeerGone(Disconnected): counted as a frame and as a mesh update."""
        if self.state != _RUNNING:
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
        if self.state == _RUNNING:
            self._write(data)

    def pause_writing(self) -> None:
        self._paused = True
        timeout = self.server.mesh_write_timeout if self.is_mesh else self.server.write_timeout
        if timeout and self._timer is None and self.state == _RUNNING:
            self._timer = self._loop.call_later(timeout, self._write_timeout)

    def resume_writing(self) -> None:
        self._paused = False
        self._pongs = 0  # the Pongs held back went out with the buffer
        if self._timer is not None and self.state == _RUNNING:
            self._timer.cancel()
            self._timer = None
        stats = self.server.stats
        now = self._loop.time()
        for q in (self._qd, self._qr):
            while q and not self._paused:
                data, n, t0 = q.popleft()
                self._batch_packet(data, q is self._qd, n)
                stats.note_queue_duration(now - t0)

    def _write_timeout(self) -> None:
        self._timer = None
        if self.state == _RUNNING and self._paused:
            self.server.stats.sclient_write_timeouts += 1
            self.server.stats.conn_errors["write_timeout"] += 1
            log.info("derp: %s: write timeout, client not reading", self.key)
            self.close("write_timeout", abort=True)

    # ------------------------------------------------------------------ keepalive and liveness

    def _schedule_keepalive(self) -> None:
        # Jitter is drawn once per connection, as derper does, so the period stays fixed.
        self._kj = random.random() * self.server.keepalive_jitter
        self._keepalive = self._loop.call_later(self.server.keepalive_interval + self._kj, self._on_keepalive)

    def _on_keepalive(self) -> None:
        self._keepalive = None
        if self.state != _RUNNING:
            return
        self._write(F.KEEPALIVE_BYTES)
        self._liveness_check()
        if self.state == _RUNNING:
            self._keepalive = self._loop.call_later(
                self.server.keepalive_interval + self._kj, self._on_keepalive
            )

    def _liveness_check(self) -> None:
        """Beyond derper: ping clients that promised to answer, and drop the dead ones.

        A client that declared CanAckPings and has sent nothing for a whole keepalive
        period gets a Ping; if it is still silent at the next tick it is gone (a NAT or
        a laptop lid took it), and we close it instead of holding it for TCP timeouts.
        """
        info = self.info
        if info is None or not info.can_ack_pings or self.is_mesh or not self.server.server_pings:
            return
        now = self._loop.time()
        silent = now - self.last_recv
        if self._ping_sent > 0 and self.last_recv < self._ping_sent:
            self.server.stats.dead_clients_closed += 1
            self.server.stats.conn_errors["dead_client"] += 1
            log.info("derp: %s: no answer to a liveness ping for %.0fs; closing", self.key, silent)
            self.close("dead_client", abort=True)
            return
        self._ping_sent = 0.0
        if silent >= self.server.keepalive_interval * 0.9:
            self._write(_PING_HDR + os.urandom(8))
            self._ping_sent = now
            self.server.stats.server_pings_sent += 1

    # ------------------------------------------------------------------ mesh view

    @property
    def running(self) -> bool:
        return self.state == _RUNNING

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
