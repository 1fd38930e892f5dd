"""The DERP relay core: registration, routing, watchers and peer-gone notices.

Connections (``conn.ClientConn``) parse frames and call in here; this module decides
where each packet goes and who must hear about arrivals and departures. It follows
derper's semantics (spec §5-§6); the places where derpkit goes further (Restarting on
shutdown, liveness pings) are marked.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable, Callable

from derpkit.protocol import frames as F
from derpkit.protocol.connection import ServerPolicy
from derpkit.protocol.constants import (
    DISCO_MAGIC,
    DISCO_MIN_LEN,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_JITTER,
    KEY_LEN,
    MESH_WRITE_TIMEOUT,
    MIN_RATE_BURST,
    PER_CLIENT_SEND_QUEUE_DEPTH,
    SEND_QUEUE_DEPTH_ENV,
    FrameType,
    PeerGoneReason,
    looks_like_disco,
)
from derpkit.protocol.handshake import ClientInfo
from derpkit.protocol.keys import MeshKey, NodePrivate, NodePublic
from derpkit.server.metrics import Stats

from .conn import ClientConn
from .registry import ClientSet, Forwarder, ForwarderTable
from .rtt import RttSampler

log = logging.getLogger("derpkit.server")

#: admit(key, info, remote) -> None to admit, or the refusal reason.
AdmitFn = Callable[[NodePublic, ClientInfo, tuple[str, int] | None], Awaitable[str | None]]

_RECV = FrameType.RECV_PACKET
_HDR = F._HEADER.pack  # noqa: SLF001 - the hot path encodes headers inline
_ZERO = bytes(KEY_LEN)


def _queue_depth_from_env() -> int:
    raw = os.environ.get(SEND_QUEUE_DEPTH_ENV, "")
    if raw:
        try:
            depth = int(raw)
        except ValueError:
            raise ValueError(f"{SEND_QUEUE_DEPTH_ENV}={raw!r} is not an integer") from None
        if depth > 0:
            return depth
    return PER_CLIENT_SEND_QUEUE_DEPTH


class DerpServer:
    """State shared by every connection of one DERP server."""

    def __init__(
        self,
        private_key: NodePrivate,
        *,
        mesh_key: MeshKey | None = None,
        write_timeout: float = 2.0,
        keepalive_interval: float = KEEPALIVE_INTERVAL,
        keepalive_jitter: float = KEEPALIVE_JITTER,
        admit: AdmitFn | None = None,
        server_pings: bool = True,
        restart_notice: float = 5.0,
    ) -> None:
        # The settings every connection's protocol core reads; the attributes below with
        # the same names are views of it, so a reload changes it for every connection.
        self.policy = ServerPolicy(
            private_key,
            mesh_key=mesh_key,
            keepalive_interval=keepalive_interval,
            keepalive_jitter=keepalive_jitter,
            server_pings=server_pings,
            write_timeout=write_timeout,
            mesh_write_timeout=MESH_WRITE_TIMEOUT,
        )
        self.public_key = private_key.public()
        self.admit = admit
        self.restart_notice = restart_notice
        self.queue_depth = _queue_depth_from_env()
        self.debug_logs = bool(os.environ.get("DERP_DEBUG_LOGS"))
        self.stats = Stats()
        self.conns: set[ClientConn] = set()
        self.clients: dict[bytes, ClientSet[ClientConn]] = {}
        self.forwarders = ForwarderTable()
        self.watchers: set[ClientConn] = set()
        self.rtt = RttSampler(self)
        self.peer_gone_subs: dict[bytes, set[ClientConn]] = {}
        self.closing = False

    # ------------------------------------------------------------------ policy views

    private_key = property(lambda self: self.policy.private_key)
    server_key_frame = property(lambda self: self.policy.server_key_frame)

    def _policy_attr(name: str) -> property:  # type: ignore[misc]
        return property(
            lambda self: getattr(self.policy, name),
            lambda self, value: setattr(self.policy, name, value),
        )

    mesh_key = _policy_attr("mesh_key")
    write_timeout = _policy_attr("write_timeout")
    mesh_write_timeout = _policy_attr("mesh_write_timeout")
    keepalive_interval = _policy_attr("keepalive_interval")
    keepalive_jitter = _policy_attr("keepalive_jitter")
    server_pings = _policy_attr("server_pings")
    rate_limit = _policy_attr("rate_limit")
    server_info = _policy_attr("server_info")
    del _policy_attr

    # ------------------------------------------------------------------ registration

    def attach(self, conn: ClientConn) -> None:
        self.conns.add(conn)

    def detach(self, conn: ClientConn) -> None:
        self.conns.discard(conn)

    def register(self, conn: ClientConn) -> None:
        self.rtt.add(conn)
        key = conn.key_raw
        cs = self.clients.get(key)
        if cs is None:
            self.clients[key] = ClientSet(conn)
        else:
            if not cs.is_dup:
                cs.conns[0].is_dup = True
            cs.add(conn)
            conn.is_dup = True
            self.stats.total_dup_client_conns += 1
        if self.watchers:
            frame = conn.peer_present_frame()
            for w in self.watchers:
                w.send_mesh_update(frame)

    def unregister(self, conn: ClientConn) -> None:
        key = conn.key_raw
        self.watchers.discard(conn)
        srcs = conn.peer_gone_srcs
        if srcs:
            for src in srcs:
                subs = self.peer_gone_subs.get(src)
                if subs is not None:
                    subs.discard(conn)
                    if not subs:
                        del self.peer_gone_subs[src]
        cs = self.clients.get(key)
        if cs is None:
            return
        if cs.remove(conn):
            del self.clients[key]
            for w in self.watchers:
                w.send_mesh_gone(key)
            if self.forwarders.get(key) is None:
                self._peer_gone_from_region(key)
        elif not cs.is_dup:
            cs.conns[0].is_dup = False

    def note_activity(self, conn: ClientConn) -> None:
        cs = self.clients.get(conn.key_raw)
        if cs is not None:
            cs.note_activity(conn)

    def _peer_gone_from_region(self, key: bytes) -> None:
        subs = self.peer_gone_subs.pop(key, None)
        if not subs:
            return
        for c in subs:
            if c.peer_gone_srcs is not None:
                c.peer_gone_srcs.discard(key)
            c.send_peer_gone(key, PeerGoneReason.DISCONNECTED)

    # ------------------------------------------------------------------ routing

    def route_packet(self, src: ClientConn, payload: bytes) -> None:
        """A SendPacket from ``src``: payload is destination key + packet."""
        stats = self.stats
        dst = payload[:KEY_LEN]
        n = len(payload) - KEY_LEN
        disco = n >= DISCO_MIN_LEN and payload[KEY_LEN : KEY_LEN + 6] == DISCO_MAGIC
        stats.packets_received += 1
        stats.bytes_received += n
        if disco:
            stats.packets_received_disco += 1
        else:
            stats.packets_received_other += 1
        cs = self.clients.get(dst)
        if cs is not None:
            target = cs.active
            if target is not None:
                self._deliver(target, src.key_raw, payload, n, disco)
                return
            stats.drop("dup_client", disco, n)
            return
        fwd = self.forwarders.get(dst)
        if fwd is not None:
            stats.packets_forwarded_out += 1
            try:
                fwd.forward_packet(src.key_raw, dst, payload[KEY_LEN:])
            except Exception as e:  # a broken mesh link loses the packet, as in Go
                log.debug("derp: forward to %s failed: %s", NodePublic(dst), e)
            return
        self._unknown_dest(src, dst, payload, n, disco)

    def _unknown_dest(self, src: ClientConn, dst: bytes, payload: bytes, n: int, disco: bool) -> None:
        """No route for ``dst``: drop (a -workers worker first waits briefly for a route)."""
        self.stats.drop("unknown_dest", disco, n)
        if disco:
            src.send_not_here(dst)

    def route_forwarded(self, via: ClientConn, src: bytes, dst: bytes, data: bytes) -> None:
        """A ForwardPacket from a mesh peer; forwarded packets are never forwarded again."""
        stats = self.stats
        stats.packets_forwarded_in += 1
        n = len(data)
        disco = looks_like_disco(data)
        cs = self.clients.get(dst)
        if cs is not None and cs.active is not None:
            self._deliver(cs.active, src, dst + data, n, disco)
            return
        if cs is not None and cs.is_dup:
            stats.drop("dup_client", disco, n)
            return
        stats.drop("unknown_dest_on_fwd", disco, n)
        if disco:
            via.send_not_here(dst)

    def _deliver(self, target: ClientConn, src: bytes, payload: bytes, n: int, disco: bool) -> None:
        if src == _ZERO:
            frame = _HDR(_RECV, n) + payload[KEY_LEN:]
            self.stats.v1_recv_packets += 1
        else:
            frame = _HDR(_RECV, n + KEY_LEN) + src + payload[KEY_LEN:]
            srcs = target.peer_gone_srcs
            if srcs is None:
                srcs = target.peer_gone_srcs = set()
            if src not in srcs:
                srcs.add(src)
                self.peer_gone_subs.setdefault(src, set()).add(target)
        target.enqueue_packet(frame, disco, n)

    # ------------------------------------------------------------------ mesh

    def add_watcher(self, conn: ClientConn) -> None:
        if conn.key_raw == self.public_key.raw:
            return  # a server meshed with itself
        for cs in self.clients.values():
            if cs.active is not None:
                conn.send_mesh_update(cs.active.peer_present_frame())
        self.watchers.add(conn)

    def close_peer(self, key: bytes) -> None:
        cs = self.clients.get(key)
        if cs is None:
            log.info("derp: close peer %s: not connected here", NodePublic(key))
            return
        log.info("derp: closing %d connection(s) of %s at a mesh peer's request", len(cs.conns), NodePublic(key))
        for c in list(cs.conns):
            c.close("closed_by_mesh_peer")

    def add_forwarder(self, key: bytes, fwd: Forwarder) -> None:
        self.forwarders.add(key, fwd)

    def remove_forwarder(self, key: bytes, fwd: Forwarder) -> None:
        if self.forwarders.remove(key, fwd) and key not in self.clients:
            self._peer_gone_from_region(key)

    # ------------------------------------------------------------------ configuration

    def set_rate_limit(self, rate: int, burst: int) -> None:
        """-rate-config: rate 0 disables; bursts below one full frame are raised."""
        if rate <= 0:
            self.rate_limit = None
        else:
            self.rate_limit = (rate, max(burst, MIN_RATE_BURST))
        for c in list(self.conns):
            c.apply_rate_limit()

    # ------------------------------------------------------------------ views

    def gauges(self) -> dict[str, float]:
        current = home = notideal = dup_keys = dup_conns = 0
        for cs in self.clients.values():
            n = len(cs.conns)
            current += n
            if n > 1:
                dup_keys += 1
                dup_conns += n
            for c in cs.conns:
                home += c.preferred
                notideal += c.not_ideal
        local = len(self.clients)
        remote = sum(1 for k in self.forwarders.routes if k not in self.clients)
        s = self.stats
        s.multiforwarder_created = self.forwarders.multiforwarder_created
        s.multiforwarder_deleted = self.forwarders.multiforwarder_deleted
        s.packet_forwarder_delete_other_value = self.forwarders.delete_other_value
        return {
            "current_connections": current,
            "current_home_connections": home,
            "current_notideal_connections": notideal,
            "clients_total": local + remote,
            "clients_local": local,
            "clients_remote": remote,
            "current_dup_client_keys": dup_keys,
            "current_dup_client_conns": dup_conns,
            "watchers": len(self.watchers),
        }

    # ------------------------------------------------------------------ shutdown

    async def shutdown(self, grace: float = 1.0) -> None:
        """Beyond derper: tell every client we are restarting, then close.

        Go clients parse the Restarting frame; sending it lets reconnect logic that honours
        it come back at once instead of waiting for a read timeout.
        """
        self.closing = True
        self.rtt.stop()
        notice = int(self.restart_notice * 1000)
        conns = list(self.conns)
        if notice > 0:
            for c in conns:
                reconnect_in = random.randint(0, min(1000, notice))
                c.send_frame(F.Restarting(reconnect_in, notice).encode())
                self.stats.restarting_frames += 1
        for c in conns:
            c._flush()  # noqa: SLF001 - push the notice out before closing
        await asyncio.sleep(0)
        for c in conns:
            c.close("shutdown")
        if conns and grace > 0:
            # transport.close() sends what is buffered before closing; give it a moment.
            await asyncio.sleep(min(grace, 0.1))
