"""The relay core of one ``-workers`` worker: a ``DerpServer`` that knows its siblings.

Sibling workers mesh with each other over loopback (``siblings.py``), so a packet for a key
on another worker is forwarded exactly as derper forwards across a region. Go's mesh rules
give routing and PeerGone across nodes; they do not make N processes behave as ONE server,
which is what an operator asked for. This module adds what is missing:

* **One newest connection per key, server-wide.** derper makes a key's newest (or last
  writing) connection the active one. Across nodes Go lets each node prefer its own local
  connection, so a laptop whose new connection landed on another worker would keep getting
  packets on the dead old one from every sender on the old worker. Here each worker stamps
  the moment a key's set became active (registration, or a frame from an inactive member)
  with ``CLOCK_MONOTONIC`` (one clock for every process on the machine) and the worker's
  index, and sends the stamp to its siblings in a *claim*. A worker holding an older claim
  *parks* its set: the connections stay open, get keepalives, pings and PeerGone, but leave
  the routing table, so packets from its own clients go to the newest claimant through the
  mesh. A frame from a parked connection claims the key back (last writer wins), and when
  the claimant's connections all leave, the parked set takes over with its own stamp.
* **PeerGone only when a key is gone from every worker.** Moving a key between workers
  removes one route before the next claim arrives; derper would send PeerGone(Disconnected)
  in that gap. So "gone from the region" waits ``GONE_GRACE`` and is dropped if the key is
  back (locally, parked, or through any route) by then.
* **A client that just connected to another worker is reachable at once.** Its claim takes
  a loopback hop to arrive; a packet for a key nobody has claimed yet waits up to
  ``PENDING_WAIT`` for it instead of being dropped at once (derpprobe sends the moment
  both its clients are connected). Only after that wait is it counted as ``unknown_dest``
  and, for disco, answered with NotHere.
* **The siblings' own links are invisible:** they are not registered as clients, not
  announced to anyone's watchers and not counted in the gauges.
* **External mesh peers see one server.** Each worker runs the operator's ``-mesh-with``
  links itself (so its forwards go straight out). A peer's own link lands on one worker,
  which announces every key of every worker to it and passes a ForwardPacket for a key on
  a sibling on to that sibling: the only case where a forwarded packet is forwarded again,
  one internal hop, never back out.

Claims travel as a pair of PeerPresent frames (``claim_frames``), only to sibling watchers.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from derpkit.protocol import frames as F
from derpkit.protocol.constants import KEY_LEN, PeerPresentFlags
from derpkit.protocol.keys import MeshKey
from derpkit.server.relay.derp import DerpServer
from derpkit.server.relay.registry import ClientSet

if TYPE_CHECKING:
    from derpkit.server.relay.conn import ClientConn

    from .siblings import SiblingLink

#: A claim is two PeerPresent frames, written only to sibling watchers: the client's own
#: (its address and flags, which a worker repeats to external watchers), then one whose
#: 16-byte address field is ``CLAIM_MAGIC`` + the stamp (uint64 BE). A client core drops
#: frame types it does not know, so a private type would never reach the sibling's link.
CLAIM_MAGIC = b"DKWCLAIM"
_CLAIM = struct.Struct(">8sQ")
#: How long "gone from the region" waits for the key to reappear on another worker.
GONE_GRACE = 0.5
#: How long a packet for an unknown key waits for a sibling's claim of it (a client that
#: just connected to another worker), and how many such packets one key may hold.
PENDING_WAIT = 0.05
PENDING_MAX = 32


def claim_stamp(index: int) -> int:
    """Now, as a stamp every worker can compare: monotonic ns, ties broken by worker index."""
    return (time.monotonic_ns() << 8) | index


def claim_frames(key: bytes, stamp: int, present: bytes) -> bytes:
    """A claim for ``key``; ``present`` is the client's PeerPresent frame."""
    stamp_ip = ipaddress.IPv6Address(_CLAIM.pack(CLAIM_MAGIC, stamp))
    return present + F.PeerPresent(key, stamp_ip, 0, PeerPresentFlags.IS_REGULAR).encode()


def claim_stamp_of(f: F.PeerPresent) -> int | None:
    """The stamp if ``f`` is the second frame of a claim, else None."""
    ip = f.ip
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    magic, stamp = _CLAIM.unpack(ip.packed)
    return stamp if magic == CLAIM_MAGIC else None


class EitherMeshKey:
    """The server's mesh-key check when workers run: the operator's key or the internal one.

    Stands where a ``MeshKey`` stands in ``ServerPolicy``; only ``matches`` is asked of it
    there. Outbound links always name their own key (``MeshLink(mesh_key=...)``).
    """

    def __init__(self, internal: MeshKey, external: MeshKey | None) -> None:
        self.internal = internal
        self.external = external

    def matches(self, other: MeshKey | None) -> bool:
        return self.internal.matches(other) or (self.external is not None and self.external.matches(other))

    def __repr__(self) -> str:
        return "EitherMeshKey(<redacted>)"


@dataclass
class Parked:
    """A key's local connections while a sibling holds a newer claim."""

    conns: ClientSet[ClientConn]
    stamp: int


class WorkerServer(DerpServer):
    """``DerpServer`` plus sibling claims, parked sets and the one-server view."""

    def __init__(self, *args: Any, index: int, internal_key: MeshKey, **kw: Any) -> None:
        external = kw.get("mesh_key")
        super().__init__(*args, **kw)
        self.index = index
        self.internal_key = internal_key
        self.external_key = external
        self.policy.mesh_key = EitherMeshKey(internal_key, external)  # type: ignore[assignment]
        #: Siblings' inbound links (registered here only in this set) and those watching.
        self.sibling_conns: set[ClientConn] = set()
        self.sibling_watchers: set[ClientConn] = set()
        #: Stamp of each locally active key's claim.
        self.claims: dict[bytes, int] = {}
        self.parked: dict[bytes, Parked] = {}
        #: Newest claim seen per key, per sibling link; the route goes to the newest.
        self.sib_stamps: dict[bytes, dict[SiblingLink, int]] = {}
        self.sib_route: dict[bytes, SiblingLink] = {}
        self.sib_present: dict[bytes, bytes] = {}
        #: Keys announced to external watchers on a sibling's behalf.
        self.announced: set[bytes] = set()
        self._gone: dict[bytes, asyncio.TimerHandle] = {}
        #: Packets waiting for a key to be claimed: key -> (sender, payload, size, disco).
        self._pending: dict[bytes, list[tuple[ClientConn, bytes, int, bool]]] = {}
        self.pending_delivered = 0
        self.forwarded_again = 0  # external ForwardPackets passed on to a sibling

    # ------------------------------------------------------------------ who is a sibling

    def _is_sibling(self, conn: ClientConn) -> bool:
        info = conn.info
        return conn.is_mesh and info is not None and self.internal_key.matches(info.mesh_key)

    def _broadcast_claim(self, key: bytes, cs: ClientSet[ClientConn]) -> None:
        if not self.sibling_watchers or cs.active is None:
            return
        frame = claim_frames(key, self.claims[key], cs.active.peer_present_frame())
        for w in self.sibling_watchers:
            w.send_mesh_update(frame)

    # ------------------------------------------------------------------ registration

    def register(self, conn: ClientConn) -> None:
        if self._is_sibling(conn):
            self.sibling_conns.add(conn)
            return
        if conn.is_mesh:
            # An external mesh peer: its forwards may be for a sibling's client.
            conn.core.on_forward = functools.partial(self.route_forwarded_external, conn)
        key = conn.key_raw
        p = self.parked.pop(key, None)
        if p is not None:
            self._restore(key, p.conns)
        super().register(conn)
        self.claims[key] = claim_stamp(self.index)
        self._broadcast_claim(key, self.clients[key])
        if key in self._pending:
            self._flush_pending(key)

    def unregister(self, conn: ClientConn) -> None:
        if conn in self.sibling_conns:
            self.sibling_conns.discard(conn)
            self.sibling_watchers.discard(conn)
            return
        key = conn.key_raw
        p = self.parked.get(key)
        if p is not None and conn in p.conns.conns:
            if p.conns.remove(conn):
                del self.parked[key]
            super().unregister(conn)  # its PeerGone subscriptions; the key is not in clients
            return
        had = key in self.clients
        super().unregister(conn)
        if had and key not in self.clients:
            self.claims.pop(key, None)
            for w in self.sibling_watchers:
                w.send_mesh_gone(key)

    def note_activity(self, conn: ClientConn) -> None:
        key = conn.key_raw
        p = self.parked.get(key)
        if p is not None and conn in p.conns.conns:
            # Last writer wins across workers: this worker claims the key back.
            del self.parked[key]
            self._restore(key, p.conns)
            p.conns.note_activity(conn)
            self.claims[key] = claim_stamp(self.index)
            self._broadcast_claim(key, p.conns)
            return
        super().note_activity(conn)

    def _restore(self, key: bytes, cs: ClientSet[ClientConn]) -> None:
        self.clients[key] = cs
        dup = cs.is_dup
        for c in cs.conns:
            c.is_dup = dup

    def _park(self, key: bytes) -> None:
        cs = self.clients.pop(key)
        self.parked[key] = Parked(cs, self.claims.pop(key, 0))
        for c in cs.conns:
            c.is_dup = True  # so its next frame is noticed (note_activity)
        for w in self.sibling_watchers:
            w.send_mesh_gone(key)

    def close_peer(self, key: bytes) -> None:
        p = self.parked.get(key)
        if p is not None:
            for c in list(p.conns.conns):
                c.close("closed_by_mesh_peer")
        super().close_peer(key)

    # ------------------------------------------------------------------ watchers

    def add_watcher(self, conn: ClientConn) -> None:
        if conn in self.sibling_conns:
            for key, cs in self.clients.items():
                if cs.active is not None:
                    conn.send_mesh_update(claim_frames(key, self.claims[key], cs.active.peer_present_frame()))
            self.sibling_watchers.add(conn)
            return
        super().add_watcher(conn)
        if conn in self.watchers:
            for key, frame in self.sib_present.items():
                if key not in self.clients:
                    conn.send_mesh_update(frame)
                    self.announced.add(key)

    # ------------------------------------------------------------------ sibling claims

    def sibling_claim(self, link: SiblingLink, key: bytes, stamp: int, present: bytes) -> None:
        """A sibling says ``key`` became active there at ``stamp``."""
        stamps = self.sib_stamps.setdefault(key, {})
        stamps[link] = stamp
        cur = self.sib_route.get(key)
        if cur is not None and cur is not link and stamps.get(cur, 0) > stamp:
            return  # a late, older claim: the route stays with the newer one
        if cur is not link:
            if cur is not None:
                self.forwarders.remove(key, cur)
            self.sib_route[key] = link
            self.add_forwarder(key, link)
        self.sib_present[key] = present
        if key in self._pending:
            self._flush_pending(key)
        if key in self.clients:
            if self.claims.get(key, 0) < stamp:
                self._park(key)
        elif key not in self.parked and self.watchers:
            for w in self.watchers:
                w.send_mesh_update(present)
            self.announced.add(key)

    def sibling_gone(self, link: SiblingLink, key: bytes) -> None:
        """A sibling no longer has ``key`` active (it left there, or it parked it)."""
        stamps = self.sib_stamps.get(key)
        if stamps is not None:
            stamps.pop(link, None)
            if not stamps:
                del self.sib_stamps[key]
        if self.sib_route.get(key) is not link:
            return
        del self.sib_route[key]
        if stamps:
            best = max(stamps, key=stamps.__getitem__)
            self.sib_route[key] = best
            self.add_forwarder(key, best)
        else:
            self.sib_present.pop(key, None)
            p = self.parked.pop(key, None)
            if p is not None:
                # The newest connection left its worker: ours take over, as the next one in
                # a duplicate set does; the stamp stays theirs so the newest parked set wins.
                self._restore(key, p.conns)
                self.claims[key] = p.stamp
                self._broadcast_claim(key, p.conns)
        self.remove_forwarder(key, link)

    def sibling_lost(self, link: SiblingLink) -> None:
        """A sibling's link broke (it died or restarts): everything it claimed is gone."""
        for key in [k for k, s in self.sib_stamps.items() if link in s]:
            self.sibling_gone(link, key)

    # ------------------------------------------------------------------ unknown keys wait

    def _unknown_dest(self, src: ClientConn, dst: bytes, payload: bytes, n: int, disco: bool) -> None:
        pend = self._pending.get(dst)
        if pend is None:
            if not self.sibling_watchers:
                super()._unknown_dest(src, dst, payload, n, disco)
                return
            pend = self._pending[dst] = []
            asyncio.get_running_loop().call_later(PENDING_WAIT, self._pending_expired, dst)
        if len(pend) >= PENDING_MAX:
            super()._unknown_dest(src, dst, payload, n, disco)
            return
        pend.append((src, payload, n, disco))

    def _flush_pending(self, key: bytes) -> None:
        """The key has a route now: what waited for it goes there, in order."""
        stats = self.stats
        for src, payload, n, disco in self._pending.pop(key, ()):
            cs = self.clients.get(key)
            if cs is not None and cs.active is not None:
                self._deliver(cs.active, src.key_raw, payload, n, disco)
            else:
                fwd = self.forwarders.get(key)
                if fwd is None:
                    super()._unknown_dest(src, key, payload, n, disco)
                    continue
                stats.packets_forwarded_out += 1
                fwd.forward_packet(src.key_raw, key, payload[KEY_LEN:])
            self.pending_delivered += 1

    def _pending_expired(self, key: bytes) -> None:
        for src, payload, n, disco in self._pending.pop(key, ()):
            super()._unknown_dest(src, key, payload, n, disco)

    # ------------------------------------------------------------------ gone, with grace

    def _peer_gone_from_region(self, key: bytes) -> None:
        if key not in self._gone:
            self._gone[key] = asyncio.get_running_loop().call_later(GONE_GRACE, self._gone_check, key)

    def _gone_check(self, key: bytes) -> None:
        del self._gone[key]
        if key in self.clients or key in self.parked or self.forwarders.get(key) is not None:
            return
        super()._peer_gone_from_region(key)
        if key in self.announced:
            self.announced.discard(key)
            for w in self.watchers:
                w.send_mesh_gone(key)

    # ------------------------------------------------------------------ external forwards

    def route_forwarded_external(self, via: ClientConn, src: bytes, dst: bytes, data: bytes) -> None:
        """An external mesh peer's ForwardPacket: a sibling's client gets it one hop on."""
        if dst not in self.clients:
            link = self.sib_route.get(dst)
            if link is not None:
                self.stats.packets_forwarded_in += 1
                self.forwarded_again += 1
                link.forward_packet(src, dst, data)
                return
        self.route_forwarded(via, src, dst, data)

    # ------------------------------------------------------------------ views

    def gauges(self) -> dict[str, float]:
        g = super().gauges()
        parked_conns = sum(len(p.conns.conns) for p in self.parked.values())
        # A parked key is a duplicate whose newest connection is on another worker.
        g["current_connections"] += parked_conns
        g["current_dup_client_keys"] += len(self.parked)
        g["current_dup_client_conns"] += parked_conns
        via_siblings = sum(1 for k in self.sib_route if k not in self.clients)
        g["clients_remote"] -= via_siblings
        g["clients_total"] -= via_siblings
        return g
