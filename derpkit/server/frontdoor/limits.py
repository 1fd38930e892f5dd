"""Connection controls: derper's accept limiter and the TCP options of accepted sockets.

- ``AcceptLimiter`` is the token bucket behind ``-accept-connection-limit`` (refill rate,
  connections per second) and ``-accept-connection-burst`` (capacity; the bucket starts
  full). derper applies it to the main TLS listener only and counts
  ``tls_listener_accepted_connections`` / ``tls_listener_rejected_connections``. A rejected
  connection is accepted by the kernel and closed at once, before any TLS work.
  Divergence (spec derper-cli §11 Q1): derper *exits* on its first rejection because Go's
  HTTP server treats the limiter's error as fatal; derpkit closes the connection, counts it
  and keeps serving.
- ``tune_socket`` applies ``-tcp-keepalive-time``, ``-tcp-user-timeout`` and TCP_NODELAY
  the way Go sets up derper's accepted connections (keepalive interval 15 s, 9 probes).
- ``ConnectionControls.on_connect`` is the ``NodeOptions.on_connect`` hook doing both.
- ``pre_tls_factory`` lets a TLS listener run the hook on the raw TCP connection, before
  the handshake, so a rejected client costs no TLS work (asyncio would otherwise finish the
  handshake before the protocol sees the connection).
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from typing import Any

from derpkit.server import metrics

#: Go's keepalive probe interval and count for accepted connections (net.KeepAliveConfig).
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 9
#: Go's default idle time when -tcp-keepalive-time is 0.
KEEPALIVE_DEFAULT_IDLE = 15.0


class AcceptLimiter:
    """Token bucket: ``limit`` tokens per second, at most ``burst`` stored, starts full."""

    __slots__ = ("limit", "burst", "tokens", "last", "clock", "accepted", "rejected")

    def __init__(self, limit: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.burst = burst
        self.tokens = float(burst)
        self.clock = clock
        self.last = clock()
        self.accepted = 0
        self.rejected = 0

    def allow(self) -> bool:
        """Spend one token if there is one; count the decision."""
        if self.limit == math.inf:
            self.accepted += 1
            return True
        if self.limit > 0:
            now = self.clock()
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.limit)
            self.last = now
        elif self.limit < 0:
            self.tokens = 0.0  # a negative rate admits nothing
        # limit == 0: only the initial burst is ever spent (x/time/rate does the same).
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            self.accepted += 1
            return True
        self.rejected += 1
        return False

    def families(self) -> Iterator[metrics.Family]:
        yield metrics.counter(
            "tls_listener_accepted_connections", self.accepted, "TLS connections admitted by the accept limiter"
        )
        yield metrics.counter(
            "tls_listener_rejected_connections", self.rejected, "TLS connections closed by the accept limiter"
        )


def tune_socket(sock: Any, keepalive_time: float, user_timeout: float) -> None:
    """Go's options for an accepted derper connection (setsockopt errors are ignored)."""
    opts: list[tuple[int, int, int]] = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    if keepalive_time < 0:
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0))
    else:
        idle = keepalive_time or KEEPALIVE_DEFAULT_IDLE
        opts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
        if hasattr(socket, "TCP_KEEPIDLE"):
            opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, math.ceil(idle))))
        if hasattr(socket, "TCP_KEEPINTVL"):
            opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL))
        if hasattr(socket, "TCP_KEEPCNT"):
            opts.append((socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT))
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux only, like derper
        opts.append((socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(0, int(user_timeout * 1000))))
    for level, name, value in opts:
        try:
            sock.setsockopt(level, name, value)
        except OSError:
            pass


class ConnectionControls:
    """The ``on_connect`` hook: socket options for every connection, then the limiter."""

    def __init__(
        self,
        limiter: AcceptLimiter | None = None,
        *,
        keepalive_time: float = 600.0,
        user_timeout: float = 15.0,
    ) -> None:
        self.limiter = limiter
        self.keepalive_time = keepalive_time
        self.user_timeout = user_timeout

    def tune(self, sock: Any) -> None:
        """Apply the socket options to one socket (listening or accepted)."""
        tune_socket(sock, self.keepalive_time, self.user_timeout)

    def on_connect(self, transport: Any) -> bool:
        limiter = self.limiter
        if limiter is not None and not limiter.allow():
            return False
        sock = transport.get_extra_info("socket")
        if sock is not None:
            self.tune(sock)
        return True


def _ssl_protocol(loop: asyncio.AbstractEventLoop, app: asyncio.BaseProtocol, ctx: ssl.SSLContext, timeout: float) -> Any:
    """The loop's own server-side TLS protocol (uvloop's is native; asyncio's otherwise)."""
    try:
        import uvloop
        import uvloop.loop as uvl

        if isinstance(loop, uvloop.Loop):
            return uvl.SSLProtocol(loop, app, ctx, None, server_side=True, ssl_handshake_timeout=timeout)
    except ImportError:  # pragma: no cover
        pass
    from asyncio import sslproto

    return sslproto.SSLProtocol(loop, app, ctx, None, server_side=True, ssl_handshake_timeout=timeout)


class _PreTLS(asyncio.Protocol):
    """First protocol on a raw TLS-listener connection: gate it, then start TLS."""

    __slots__ = ("app_factory", "ctx", "on_connect", "timeout")

    def __init__(self, app_factory: Callable[[], asyncio.BaseProtocol], ctx: ssl.SSLContext,
                 on_connect: Callable[[Any], bool], timeout: float) -> None:
        self.app_factory = app_factory
        self.ctx = ctx
        self.on_connect = on_connect
        self.timeout = timeout

    def connection_made(self, transport: Any) -> None:
        if not self.on_connect(transport):
            transport.abort()
            return
        tls = _ssl_protocol(asyncio.get_running_loop(), self.app_factory(), self.ctx, self.timeout)
        transport.set_protocol(tls)
        tls.connection_made(transport)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - never before TLS
        pass


#: A TLS handshake not done in this long is dropped (read when each connection starts).
TLS_HANDSHAKE_TIMEOUT = 30.0


def pre_tls_factory(
    app_factory: Callable[[], asyncio.BaseProtocol],
    ctx: ssl.SSLContext,
    on_connect: Callable[[Any], bool],
    handshake_timeout: float | None = None,
) -> Callable[[], asyncio.Protocol]:
    """A listener protocol factory that calls ``on_connect`` before the TLS handshake.

    Use it with ``create_server(..., ssl=None)``: the TLS layer is the loop's own
    ``SSLProtocol``, exactly what ``create_server(ssl=ctx)`` would have used.
    """
    return lambda: _PreTLS(app_factory, ctx, on_connect,
                           TLS_HANDSHAKE_TIMEOUT if handshake_timeout is None else handshake_timeout)


def controls_for(cfg: Any) -> ConnectionControls:
    """Socket options for every listener; the accept limiter only in TLS mode, as derper."""
    limiter = None
    if cfg.tls_enabled:
        limiter = AcceptLimiter(cfg.accept_connection_limit, cfg.accept_connection_burst)
    return ConnectionControls(limiter, keepalive_time=cfg.tcp_keepalive_time, user_timeout=cfg.tcp_user_timeout)
