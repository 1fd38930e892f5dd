"""Locust user classes for DERP relays, built on the blocking client in ``derpclient.py``.

Every operation fires locust's ``events.request`` (request_type ``DERP``), so DERP traffic
shows in locust's normal statistics, charts, CSV and HTML report:

============================  =============================================================
name                          what one sample is
============================  =============================================================
``connect``                   TCP (+TLS) connect, HTTP upgrade and handshake up to ServerInfo
``packet <N>B``               one packet, sender to receiver; time = one-way delivery latency;
                              a failure = not delivered within ``--derp-loss-timeout`` (loss)
``mesh packet <N>B``          the same, sender on ``--host``, receiver on ``--derp-mesh-host``
``ping``                      Ping/Pong round trip with the server
``connect+handshake+close``   Churner: one whole short-lived connection
``idle ping``                 Idler: a Ping on a long-held connection (is it still alive?)
============================  =============================================================

With ``--derp-tag-worker`` each name gets `` [w<index>]`` in distributed runs, so the
master's CSV shows every worker's share.
"""

from __future__ import annotations

import logging
import struct
import time
from collections import OrderedDict
from typing import Any

import gevent
from locust import User, between, constant, events, task

from derpkit.protocol.frames import RecvPacket
from derpkit.protocol.keys import MeshKey

from .derpclient import BlockingDerpClient, DerpLoadError

log = logging.getLogger("derpkit.loadtests")

#: Payload prefix: magic, sequence number, send time (perf_counter_ns of this process).
_STAMP = struct.Struct("<4sQq")
_MAGIC = b"dkLT"


class PacketLost(Exception):
    """A packet was not delivered within --derp-loss-timeout."""


@events.init_command_line_parser.add_listener
def _add_options(parser: Any) -> None:
    g = parser.add_argument_group("DERP", "derpkit load test options (see loadtests/users.py)")
    g.add_argument("--derp-mesh-key", default="", env_var="DERP_MESH_KEY",
                   help="mesh key (64 hex digits, or @file) sent in ClientInfo")
    g.add_argument("--derp-cert-name", default="", env_var="DERP_CERT_NAME",
                   help="DERP-map CertName: sha256-raw:<hex> pin or TLS server name")
    g.add_argument("--derp-insecure", action="store_true", default=False,
                   env_var="DERP_INSECURE", help="skip TLS verification")
    g.add_argument("--derp-mesh-host", default="", env_var="DERP_MESH_HOST",
                   help="second node's URL for MeshSender (receivers connect there)")
    g.add_argument("--derp-packet-size", type=int, default=1200, env_var="DERP_PACKET_SIZE",
                   help="PacketPair/MeshSender payload bytes (min 20)")
    g.add_argument("--derp-pps", type=float, default=20.0, env_var="DERP_PPS",
                   help="packets per second per PacketPair/MeshSender user")
    g.add_argument("--derp-loss-timeout", type=float, default=5.0, env_var="DERP_LOSS_TIMEOUT",
                   help="seconds after which an undelivered packet counts as lost")
    g.add_argument("--derp-idle-conns", type=int, default=10, env_var="DERP_IDLE_CONNS",
                   help="connections each Idler user holds open")
    g.add_argument("--derp-source-ips", default="", env_var="DERP_SOURCE_IPS",
                   help="comma-separated local addresses to connect from (round-robin), "
                   "e.g. 127.0.1.1,127.0.1.2 to get past one address's ephemeral ports")
    g.add_argument("--derp-tag-worker", action="store_true", default=False,
                   env_var="DERP_TAG_WORKER", help="suffix request names with [w<worker index>]")


def _mesh_key(text: str) -> MeshKey | None:
    if not text:
        return None
    if text.startswith("@"):
        with open(text[1:]) as f:
            text = f.read()
    return MeshKey.parse(text)


class DerpUser(User):
    """Shared plumbing: options, connecting with a timed event, firing events."""

    abstract = True
    _src_next = 0

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        o = environment.parsed_options
        self.opts = o
        if not self.host:
            raise ValueError("DERP load tests need --host (derp://, https:// or http:// URL)")
        self.mesh_key = _mesh_key(getattr(o, "derp_mesh_key", "") if o else "")
        self.cert_name = (getattr(o, "derp_cert_name", "") if o else "") or None
        self.insecure = bool(getattr(o, "derp_insecure", False)) if o else False
        srcs = (getattr(o, "derp_source_ips", "") if o else "") or ""
        self.sources = [s.strip() for s in srcs.split(",") if s.strip()]
        self.suffix = ""
        runner = environment.runner
        if o is not None and getattr(o, "derp_tag_worker", False) and runner is not None:
            idx = getattr(runner, "worker_index", None)
            if idx is not None and type(runner).__name__ == "WorkerRunner":
                self.suffix = f" [w{idx}]"
        self.conns: list[BlockingDerpClient] = []

    def fire(self, name: str, ms: float, length: int = 0, exc: BaseException | None = None) -> None:
        self.environment.events.request.fire(
            request_type="DERP",
            name=name + self.suffix,
            response_time=ms,
            response_length=length,
            exception=exc,
            context={},
        )

    def next_source(self) -> tuple[str, int] | None:
        """The next local address from --derp-source-ips, round robin (None: let the OS pick)."""
        if not self.sources:
            return None
        DerpUser._src_next += 1
        return (self.sources[DerpUser._src_next % len(self.sources)], 0)

    def connect(self, url: str | None = None, name: str = "connect") -> BlockingDerpClient | None:
        """Connect and fire one event; returns None (event failed) on error."""
        src = self.next_source()
        t0 = time.perf_counter()
        try:
            c = BlockingDerpClient.connect(
                url or self.host, mesh_key=self.mesh_key, cert_name=self.cert_name,
                insecure_tls=self.insecure, source_address=src,
            )
        except DerpLoadError as e:
            self.fire(name, (time.perf_counter() - t0) * 1e3, 0, e)
            return None
        self.fire(name, (time.perf_counter() - t0) * 1e3, 0)
        self.conns.append(c)
        return c

    def on_stop(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()


class PacketPair(DerpUser):
    """A sender and a receiver; one-way latency and loss from a seq number and timestamp.

    Packets go out at ``--derp-pps`` per user. The receiver greenlet reports each delivery
    as a success whose response time is the one-way latency; a packet still missing after
    ``--derp-loss-timeout`` is reported once as a failure (``PacketLost``). Sender and
    receiver live in one process, so the timestamp is ``perf_counter_ns``: no clock sync.
    """

    weight = 4
    receiver_url_option = ""  # MeshSender points the receiver elsewhere
    label = "packet"

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        o = environment.parsed_options
        self.size = max(_STAMP.size, int(getattr(o, "derp_packet_size", 1200) if o else 1200))
        self.pps = max(0.01, float(getattr(o, "derp_pps", 20.0) if o else 20.0))
        self.loss_timeout = float(getattr(o, "derp_loss_timeout", 5.0) if o else 5.0)
        self.name = f"{self.label} {self.size}B"
        self.pending: OrderedDict[int, int] = OrderedDict()  # seq -> send time (ns)
        self.seq = 0
        self.sender: BlockingDerpClient | None = None
        self.receiver: BlockingDerpClient | None = None
        self.reader: gevent.Greenlet | None = None
        self._next = 0.0
        self._pad = b"\0" * (self.size - _STAMP.size)
        self.active = True

    def receiver_url(self) -> str:
        return self.host

    def wait_time(self) -> float:  # type: ignore[override]
        now = time.monotonic()
        self._next = max(self._next + 1.0 / self.pps, now - 1.0)
        return max(0.0, self._next - now)

    def on_start(self) -> None:
        self._ensure()

    def _ensure(self) -> bool:
        if self.receiver is None or self.receiver.closed:
            self.receiver = self.connect(self.receiver_url())
            if self.receiver is None:
                return False
            self.reader = gevent.spawn(self._read_loop, self.receiver)
        if self.sender is None or self.sender.closed:
            self.sender = self.connect()
        return self.sender is not None

    def _read_loop(self, conn: BlockingDerpClient) -> None:
        pending = self.pending
        unpack = _STAMP.unpack_from
        while not conn.closed:
            try:
                f = conn.recv()
            except (DerpLoadError, OSError, TimeoutError):
                return
            if not isinstance(f, RecvPacket) or len(f.data) < _STAMP.size:
                continue
            now = time.perf_counter_ns()
            magic, seq, sent = unpack(f.data)
            if magic != _MAGIC or pending.pop(seq, None) is None:
                continue  # a duplicate, or already counted as lost
            self.fire(self.name, (now - sent) / 1e6, len(f.data))

    @task
    def send_packet(self) -> None:
        if not self.active or not self._ensure():
            return
        assert self.sender is not None and self.receiver is not None
        self._sweep()
        self.seq += 1
        now = time.perf_counter_ns()
        self.pending[self.seq] = now
        try:
            self.sender.send(self.receiver.public_raw, _STAMP.pack(_MAGIC, self.seq, now) + self._pad)
        except DerpLoadError as e:
            self.pending.pop(self.seq, None)
            self.fire("send", 0.0, 0, e)

    def _sweep(self) -> None:
        limit = time.perf_counter_ns() - int(self.loss_timeout * 1e9)
        pending = self.pending
        while pending:
            seq, sent = next(iter(pending.items()))
            if sent > limit:
                break
            del pending[seq]
            self.fire(self.name, (time.perf_counter_ns() - sent) / 1e6, 0,
                      PacketLost(f"not delivered within {self.loss_timeout:g} s"))

    def on_stop(self) -> None:
        self.pending.clear()  # in flight at the end is not lost
        super().on_stop()
        if self.reader is not None:
            self.reader.kill(block=False)


class MeshSender(PacketPair):
    """PacketPair across a mesh: sender on ``--host``, receiver on ``--derp-mesh-host``."""

    weight = 1
    label = "mesh packet"

    def receiver_url(self) -> str:
        return self.mesh_host

    def on_start(self) -> None:
        o = self.environment.parsed_options
        self.mesh_host = getattr(o, "derp_mesh_host", "") if o else ""
        if not self.mesh_host:
            if not getattr(MeshSender, "_warned", False):
                log.warning("MeshSender needs --derp-mesh-host (node B's URL); it stays idle")
                MeshSender._warned = True  # type: ignore[attr-defined]
            self.active = False
            return
        super().on_start()

    def wait_time(self) -> float:  # type: ignore[override]
        return super().wait_time() if self.mesh_host else 3600.0



class Pinger(DerpUser):
    """One connection; a Ping/Pong round trip per second."""

    weight = 2
    wait_time = constant(1.0)

    def on_start(self) -> None:
        self.conn = self.connect()

    @task
    def ping(self) -> None:
        if self.conn is None or self.conn.closed:
            self.conn = self.connect()
            if self.conn is None:
                return
        t0 = time.perf_counter()
        try:
            rtt = self.conn.ping(timeout=5.0)
        except (DerpLoadError, TimeoutError) as e:
            self.conn.close()
            self.fire("ping", (time.perf_counter() - t0) * 1e3, 0, e or TimeoutError("no pong"))
            return
        self.fire("ping", rtt * 1e3, 8)


class Churner(DerpUser):
    """Connect, handshake (to ServerInfo) and disconnect, over and over."""

    weight = 1
    wait_time = between(0.05, 0.15)

    @task
    def churn(self) -> None:
        src = self.next_source()
        t0 = time.perf_counter()
        try:
            c = BlockingDerpClient.connect(
                self.host, mesh_key=self.mesh_key, cert_name=self.cert_name,
                insecure_tls=self.insecure, source_address=src,
            )
        except DerpLoadError as e:
            self.fire("connect+handshake+close", (time.perf_counter() - t0) * 1e3, 0, e)
            return
        c.close()
        self.fire("connect+handshake+close", (time.perf_counter() - t0) * 1e3, 0)


class Idler(DerpUser):
    """Holds ``--derp-idle-conns`` connections open; pings one of them every few seconds."""

    weight = 1
    wait_time = constant(5.0)

    def on_start(self) -> None:
        o = self.environment.parsed_options
        n = int(getattr(o, "derp_idle_conns", 10) if o else 10)
        self.turn = 0
        for _ in range(max(1, n)):
            self.connect()

    @task
    def check_one(self) -> None:
        live = [c for c in self.conns if not c.closed]
        self.conns[:] = live
        if not live:
            self.connect()
            return
        self.turn = (self.turn + 1) % len(live)
        c = live[self.turn]
        t0 = time.perf_counter()
        try:
            rtt = c.ping(timeout=5.0)
        except (DerpLoadError, TimeoutError) as e:
            c.close()
            self.fire("idle ping", (time.perf_counter() - t0) * 1e3, 0, e)
            return
        self.fire("idle ping", rtt * 1e3, 8)
