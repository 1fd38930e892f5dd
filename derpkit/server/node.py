"""A running DERP node: the relay core plus its HTTP(S) listener, STUN and mesh links.

``DerpNode`` is what ``derpkit serve`` starts and what tests embed in-process; it takes
ready-made parts (keys, an SSL context, an admission function) so that configuration
parsing and certificate handling stay in their own modules.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.frontdoor.head import FrontDoor
from derpkit.server.frontdoor.http import ACE, HttpOptions, build_app
from derpkit.server.relay.derp import AdmitFn, DerpServer

from . import metrics

log = logging.getLogger("derpkit.server")


def tls_version_middleware(stats: metrics.Stats) -> Any:
    """derper's per-request TLS version counters for every request aiohttp serves.

    A request stays "active" until its handler returns, so a WebSocket DERP session
    counts as active for its whole life, as in derper. Plain /derp upgrades never reach
    aiohttp; ClientConn counts those.
    """

    @web.middleware
    async def count_tls_version(request: web.Request, handler: Any) -> web.StreamResponse:
        label = metrics.tls_version_label(request.transport)
        if label is None:
            return await handler(request)
        stats.tls_request_version[label] += 1
        stats.tls_active_version[label] += 1
        try:
            return await handler(request)
        finally:
            stats.tls_active_version[label] -= 1

    return count_tls_version


@dataclass
class NodeOptions:
    host: str = "127.0.0.1"
    port: int = 0
    ssl_context: ssl.SSLContext | None = None
    stun_port: int | None = 0  # None disables STUN; 0 picks a free port
    stun_strict: bool = True
    #: RFC 5780 mode: the second (IP, port); None = off (derper's behaviour).
    stun_rfc5780: tuple[str, int] | None = None
    private_key: NodePrivate | None = None
    mesh_key: MeshKey | None = None
    mesh_with: list[tuple[str, str | None]] = field(default_factory=list)
    mesh_scheme: str = "https"
    mesh_insecure_tls: bool = False
    write_timeout: float = 2.0
    keepalive_interval: float = 60.0
    keepalive_jitter: float = 5.0
    admit: AdmitFn | None = None
    restart_notice: float = 5.0
    server_pings: bool = True
    http: HttpOptions = field(default_factory=HttpOptions)
    #: Called for each accepted TCP connection; return False to close it at once.
    on_connect: Callable[[Any], bool] | None = None
    #: Socket options for the port-80 listener's sockets (set on the listening socket,
    #: which accepted sockets inherit on Linux, as derper does).
    tune_listener: Callable[[Any], None] | None = None
    #: Metric sources beyond the DERP core (accept limiter, cert expiry...).
    extra_metrics: list[Callable[[], Iterable[metrics.Family]]] = field(default_factory=list)
    #: Objects with ``async start()`` / ``async stop()`` that live as long as the node
    #: (bootstrap-DNS refresh, admission HTTP sessions...).
    services: list[Any] = field(default_factory=list)
    #: TLS mode's plain-HTTP side listener (-http-port) on ``host``; None = none, 0 = ephemeral.
    http_port: int | None = None
    #: ACME HTTP-01 answers for that listener: (Host header, path) -> (status, body) or None.
    acme_http01: Callable[[str, str], tuple[int, str] | None] | None = None
    # -workers (derpkit/server/workers/): N processes share the ports.
    #: SO_REUSEPORT on the DERP, port-80 and STUN sockets, so sibling workers can bind them too.
    reuse_port: bool = False
    #: A second, plain-HTTP listener on 127.0.0.1 (0 = ephemeral) that only this process
    #: accepts on: sibling workers mesh with it and read its /debug/varz. None = none.
    private_port: int | None = None
    #: Builds the relay core instead of ``DerpServer`` (same arguments), e.g. a worker's.
    relay_factory: Callable[..., DerpServer] | None = None
    #: aiohttp middlewares added after the built-in ones (the workers' summed /debug/varz).
    middlewares: list[Any] = field(default_factory=list)


class DerpNode:
    """Start/stop wrapper around one server's listeners."""

    def __init__(self, opts: NodeOptions | None = None, **kw: Any) -> None:
        self.opts = opts or NodeOptions(**kw)
        o = self.opts
        self.private_key = o.private_key or NodePrivate.generate()
        self.server = (o.relay_factory or DerpServer)(
            self.private_key,
            mesh_key=o.mesh_key,
            write_timeout=o.write_timeout,
            keepalive_interval=o.keepalive_interval,
            keepalive_jitter=o.keepalive_jitter,
            admit=o.admit,
            server_pings=o.server_pings,
            restart_notice=o.restart_notice,
        )
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.AbstractServer | None = None
        self.stun: Any = None
        self.mesh: list[Any] = []
        #: The certificate provider in TLS mode, kept so SIGHUP can ask it to reload.
        self.cert_provider: Any = None
        self.port = 0
        self.port80: asyncio.AbstractServer | None = None
        self.port80_runner: web.AppRunner | None = None
        self.http_port: int | None = None  # bound port of the -http-port listener
        self.private_listener: asyncio.AbstractServer | None = None
        self.private_port: int | None = None  # bound port of NodeOptions.private_port

    @property
    def public_key(self):  # noqa: ANN201 - NodePublic
        return self.server.public_key

    @property
    def url(self) -> str:
        scheme = "https" if self.opts.ssl_context else "http"
        host = self.opts.host or "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}/derp"

    @property
    def stun_port(self) -> int | None:
        return self.stun.sockname[1] if self.stun is not None else None

    def stun_families(self) -> Iterable[metrics.Family]:
        # Every label derper creates is present (zero) from the start, with or without STUN.
        counts = {("requests", d): 0 for d in ("not_stun", "read_error", "success", "write_error")}
        counts |= {("addrfamily", f): 0 for f in ("ipv4", "ipv6")}
        if self.stun is not None:
            counts |= dict(self.stun.counts)
        req = metrics.Family("stun_requests", "counter", "STUN requests by disposition")
        fam = metrics.Family("stun_addrfamily", "counter", "answered STUN requests by address family")
        for (kind, label), v in sorted(counts.items()):
            if kind == "requests":
                req.add(v, disposition=label)
            elif kind == "addrfamily":
                fam.add(v, family=label)
        yield req
        yield fam

    async def start(self) -> None:
        o = self.opts
        http_opts = o.http
        http_opts.metrics_sources = [self.stun_families, *o.extra_metrics, *http_opts.metrics_sources]
        app = build_app(self.server, http_opts)
        app.middlewares.insert(0, tls_version_middleware(self.server.stats))
        app.middlewares.extend(o.middlewares)
        ace = app[ACE]
        self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self.runner.setup()
        factory = self.runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()

        # With TLS, on_connect (socket options, accept limiter) runs on the raw TCP
        # connection before the handshake, as derper's limiter does; see limits.py.
        gate_tls = o.ssl_context is not None and o.on_connect is not None
        door_hook = None if gate_tls else o.on_connect

        def door() -> FrontDoor:
            return FrontDoor(self.server, factory, derp_enabled=http_opts.derp_enabled, on_connect=door_hook,
                             ace=ace)

        listen_factory: Any = door
        listen_ssl = o.ssl_context
        if gate_tls:
            from derpkit.server.frontdoor.limits import pre_tls_factory

            assert o.ssl_context is not None and o.on_connect is not None
            listen_factory = pre_tls_factory(door, o.ssl_context, o.on_connect)
            listen_ssl = None
        host: str | None = o.host or None
        self.listener = await loop.create_server(
            listen_factory, host, o.port, ssl=listen_ssl, reuse_address=True, backlog=4096,
            ssl_handshake_timeout=30.0 if listen_ssl else None, reuse_port=o.reuse_port or None,
        )
        socks = self.listener.sockets
        self.port = socks[0].getsockname()[1]
        for s in socks:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if o.private_port is not None:
            def private_door() -> FrontDoor:
                return FrontDoor(self.server, factory, derp_enabled=http_opts.derp_enabled, ace=ace)

            self.private_listener = await loop.create_server(
                private_door, "127.0.0.1", o.private_port, reuse_address=True, backlog=1024
            )
            psock = self.private_listener.sockets[0]
            psock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.private_port = psock.getsockname()[1]
        if o.http_port is not None:
            await self._start_port80(app, host)
        if o.stun_port is not None:
            from .stun import start_stun_server

            try:
                self.stun = await start_stun_server(
                    o.host, o.stun_port, strict=o.stun_strict and o.stun_rfc5780 is None, rfc5780=o.stun_rfc5780,
                    reuse_port=o.reuse_port,
                )
            except OSError as e:
                # derper goes on without STUN when its port is taken; we say so loudly.
                log.warning("STUN: cannot listen on %s:%s: %s; continuing without STUN", o.host, o.stun_port, e)
        for svc in o.services:
            await svc.start()
        if o.mesh_with:
            from derpkit.server.relay.mesh import MeshLink

            for host_name, dial in o.mesh_with:
                link = MeshLink(self.server, host_name, dial, scheme=o.mesh_scheme, insecure_tls=o.mesh_insecure_tls,
                                mesh_key=o.mesh_key)
                self.mesh.append(link)
                link.start()

    async def _start_port80(self, main_app: web.Application, host: str | None) -> None:
        from derpkit.server.frontdoor.port80 import build_port80_app, connect_answer

        assert self.opts.http_port is not None
        self.port80_runner = web.AppRunner(
            build_port80_app(main_app, self.opts.http.knobs, self.opts.acme_http01), access_log=None, handle_signals=False
        )
        await self.port80_runner.setup()
        factory = self.port80_runner.server
        assert factory is not None
        hook = connect_answer(self.opts.acme_http01)

        def door() -> FrontDoor:
            # No DERP here (derper redirects /derp to https); the front door only keeps
            # CONNECT away from aiohttp and answers it as derper's port-80 handler does.
            return FrontDoor(self.server, factory, derp_enabled=False, plain_connect=hook)

        self.port80 = await asyncio.get_running_loop().create_server(
            door, host, self.opts.http_port, reuse_address=True, reuse_port=self.opts.reuse_port or None
        )
        self.http_port = self.port80.sockets[0].getsockname()[1]
        if self.opts.tune_listener is not None:
            for sock in self.port80.sockets:
                self.opts.tune_listener(sock)

    async def stop(self, *, graceful: bool = True) -> None:
        for link in self.mesh:
            await link.stop()
        self.mesh.clear()
        if self.listener is not None:
            self.listener.close()
        if self.private_listener is not None:
            self.private_listener.close()
            self.private_listener = None
        if self.port80 is not None:
            self.port80.close()
            self.port80 = None
        if self.port80_runner is not None:
            await self.port80_runner.cleanup()
            self.port80_runner = None
        if graceful:
            await self.server.shutdown()
        else:
            for c in list(self.server.conns):
                c.close("shutdown", abort=True)
        if self.stun is not None:
            self.stun.close()
            self.stun = None
        for svc in self.opts.services:
            await svc.stop()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.listener is not None:
            self.listener = None

    async def __aenter__(self) -> DerpNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
