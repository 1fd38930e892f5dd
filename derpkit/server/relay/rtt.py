"""derper's ``derp_tcp_rtt``: the kernel's smoothed TCP RTT of every client, sampled.

derper asks the kernel (TCP_INFO) for each client's RTT when the client joins and then
every 10 s, and counts each sample under one label. That tells an operator how far away
their clients really are, without any probe traffic. We keep derper's per-connection
cadence (first sample 10 s after joining, then every 10 s) but drive it from one timer
per server that ticks every second and samples the connections that are due: at 10k
clients that is 10k float comparisons a second instead of 10k live timer handles.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any

from derpkit.server.metrics import tcp_rtt_label

if TYPE_CHECKING:
    from .derp import DerpServer

#: Seconds between samples of one connection (derper's statsInterval).
RTT_INTERVAL = 10.0
#: How often the sampler looks for connections that are due; a sample is at most this late.
RTT_TICK = 1.0
#: derper's switch to turn sampling off on servers with very many connections.
DISABLE_ENV = "TS_DERP_DISABLE_RTT_STATS"
# struct tcp_info: eight one-byte fields, then 32-bit fields; tcpi_rtt (microseconds) is
# the 16th of those, at byte 68. 104 bytes covers every kernel since 2.6.
_TCP_INFO_LEN = 104
_RTT = struct.Struct("=I")
_RTT_OFFSET = 68


def disabled_by_env() -> bool:
    """Go's strconv.ParseBool truth values, as envknob reads them."""
    return os.environ.get(DISABLE_ENV, "").strip() in ("1", "t", "T", "TRUE", "true", "True")


def tcp_socket(transport: Any) -> Any | None:
    """The TCP socket under a DERP connection (through TLS), or None (WebSocket, tests)."""
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or getattr(sock, "type", None) != socket.SOCK_STREAM:
        return None
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def read_rtt_us(sock: Any) -> int:
    """The kernel's smoothed RTT for this socket in microseconds; OSError when unavailable."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _RTT_OFFSET + 4:
        raise OSError("short TCP_INFO")
    return _RTT.unpack_from(info, _RTT_OFFSET)[0]


class RttSampler:
    """Samples every running client's TCP RTT into ``Stats.tcp_rtt``."""

    __slots__ = ("server", "enabled", "interval", "tick", "_timer")

    def __init__(self, server: DerpServer, *, enabled: bool | None = None) -> None:
        self.server = server
        self.enabled = (not disabled_by_env()) if enabled is None else enabled
        self.interval = RTT_INTERVAL
        self.tick = RTT_TICK
        self._timer: asyncio.TimerHandle | None = None

    def add(self, conn: Any) -> None:
        """A client just joined: check that its RTT can be read at all, as derper does."""
        if not self.enabled:
            return
        stats = self.server.stats
        sock = tcp_socket(conn.transport)
        if sock is None:
            stats.tcp_rtt["non-tcp"] += 1
            return
        try:
            read_rtt_us(sock)
        except (OSError, ValueError, AttributeError):
            stats.tcp_rtt["error"] += 1
            return
        conn.tcp_sock = sock
        conn.rtt_due = time.monotonic() + self.interval
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now = time.monotonic()  # the clock ClientConn.created uses
        counts = self.server.stats.tcp_rtt
        waiting = False
        for conn in tuple(self.server.conns):
            sock = conn.tcp_sock
            if sock is None or not conn.running:
                continue
            waiting = True
            if conn.rtt_due > now:
                continue
            conn.rtt_due = now + self.interval
            try:
                counts[tcp_rtt_label(read_rtt_us(sock))] += 1
            except (OSError, ValueError):
                pass  # the socket is going away; derper skips failed samples too
        if waiting:
            self._timer = loop.call_later(self.tick, self._sweep)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
