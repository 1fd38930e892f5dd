"""Who is connected: duplicate-connection sets and mesh forwarding routes.

Pure bookkeeping with no I/O, so the duplicate policy (spec §5.6) and the forwarder table
(spec §6.3) can be tested without sockets. Connections are opaque objects here.
"""

from __future__ import annotations

import itertools
from typing import Generic, Protocol, TypeVar

C = TypeVar("C")


class ClientSet(Generic[C]):
    """All connections of one key; exactly one of them (``active``) gets data packets.

    Policy "last writer is active", as derper runs it: a newly registered connection
    becomes active; in a duplicate set, any frame a member sends makes it active; when the
    active one leaves, the role falls to the last entry of the send history.
    """

    __slots__ = ("conns", "active", "history")

    def __init__(self, first: C) -> None:
        self.conns: list[C] = [first]
        self.active: C | None = first
        self.history: list[C] = []

    @property
    def is_dup(self) -> bool:
        return len(self.conns) > 1

    def add(self, conn: C) -> None:
        if len(self.conns) == 1:
            # The set forms: its history starts with the older connection only.
            self.history = [self.conns[0]]
        else:
            self.history.append(conn)
        self.conns.append(conn)
        self.active = conn

    def note_activity(self, conn: C) -> None:
        """A member sent a frame: it becomes the active one."""
        if self.active is conn:
            return
        if not self.history or self.history[-1] is not conn:
            self.history.append(conn)
        self.active = conn

    def remove(self, conn: C) -> bool:
        """Drop ``conn``; returns True when the set is now empty."""
        try:
            self.conns.remove(conn)
        except ValueError:
            return not self.conns
        if self.active is conn:
            self.active = None
        trimmed: list[C] = []
        for c in self.history:
            if c is not conn and (not trimmed or trimmed[-1] is not c):
                trimmed.append(c)
        self.history = trimmed
        if len(self.conns) == 1:
            self.active = self.conns[0]
            self.history = []
        elif self.active is None and self.history:
            self.active = self.history[-1]
        return not self.conns


class Forwarder(Protocol):
    """A route to keys that live on another mesh node."""

    def forward_packet(self, src: bytes, dst: bytes, data: bytes) -> None: ...


class MultiForwarder:
    """Several routes to one key (a client moving between nodes); the oldest is used."""

    __slots__ = ("routes",)
    _seq = itertools.count()

    def __init__(self, first: Forwarder, second: Forwarder) -> None:
        self.routes: dict[Forwarder, int] = {first: next(self._seq), second: next(self._seq)}

    def preferred(self) -> Forwarder:
        return min(self.routes, key=self.routes.__getitem__)

    def forward_packet(self, src: bytes, dst: bytes, data: bytes) -> None:
        self.preferred().forward_packet(src, dst, data)


class ForwarderTable:
    """Key -> route, with derper's add/remove rules and counters."""

    def __init__(self) -> None:
        self.routes: dict[bytes, Forwarder | MultiForwarder] = {}
        self.multiforwarder_created = 0
        self.multiforwarder_deleted = 0
        self.delete_other_value = 0

    def get(self, key: bytes) -> Forwarder | MultiForwarder | None:
        return self.routes.get(key)

    def add(self, key: bytes, fwd: Forwarder) -> None:
        cur = self.routes.get(key)
        if cur is None:
            self.routes[key] = fwd
        elif cur is fwd:
            return
        elif isinstance(cur, MultiForwarder):
            if fwd not in cur.routes:
                cur.routes[fwd] = next(MultiForwarder._seq)
        else:
            self.routes[key] = MultiForwarder(cur, fwd)
            self.multiforwarder_created += 1

    def remove(self, key: bytes, fwd: Forwarder) -> bool:
        """Remove one route; True when ``key`` has no route left."""
        cur = self.routes.get(key)
        if cur is None:
            return False
        if cur is fwd:
            del self.routes[key]
            return True
        if isinstance(cur, MultiForwarder):
            if fwd in cur.routes:
                del cur.routes[fwd]
                if len(cur.routes) == 1:
                    self.routes[key] = next(iter(cur.routes))
                    self.multiforwarder_deleted += 1
            return False
        self.delete_other_value += 1
        return False
