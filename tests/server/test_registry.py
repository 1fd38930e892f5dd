"""Duplicate-connection policy and the forwarder table, without sockets (spec §5.6, §6.3)."""

from __future__ import annotations

import random

from derpkit.server.relay.registry import ClientSet, ForwarderTable, MultiForwarder


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def test_newest_connection_is_active_then_last_writer_wins() -> None:
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    s = ClientSet(a)
    assert s.active is a and not s.is_dup
    s.add(b)
    assert s.active is b and s.is_dup and s.history == [a]
    s.note_activity(a)
    assert s.active is a
    s.note_activity(b)
    assert s.active is b
    s.add(c)
    assert s.active is c
    assert s.history == [a, b, c]


def test_active_leaving_falls_back_to_send_history() -> None:
    a, b, c = Conn("a"), Conn("b"), Conn("c")
    s = ClientSet(a)
    s.add(b)
    s.add(c)  # history [a, c], active c
    s.remove(c)
    assert s.active is a  # last remaining entry of the history
    assert s.is_dup
    s.remove(a)
    assert s.active is b and not s.is_dup  # collapsed back to a single client
    assert s.remove(b) is True


def test_inactive_leaving_keeps_active() -> None:
    a, b = Conn("a"), Conn("b")
    s = ClientSet(a)
    s.add(b)
    s.remove(a)
    assert s.active is b and not s.is_dup


def test_repeated_sends_collapse_in_history() -> None:
    a, b = Conn("a"), Conn("b")
    s = ClientSet(a)
    s.add(b)
    s.note_activity(a)
    s.note_activity(a)
    s.note_activity(b)
    assert s.history == [a, b]



def test_a_duplicate_set_always_has_an_active_member() -> None:
    """Why ``dup_client`` drops stay at zero, in derper and here (documented in docs/protocol.md).

    derper counts ``dup_client`` when a key has 2+ connections and none is active. Under its
    policy (last writer is active) that cannot happen: every member except the second
    connection is in the send history (the first from the start, later ones when they
    join), and leaving members are trimmed from it, so with 2+ members left the history
    names one of them. Random joins, sends and departures check the invariant on ours.
    """
    rng = random.Random(20240611)
    for _trial in range(300):
        first = Conn("c0")
        s = ClientSet(first)
        members = [first]
        for step in range(40):
            op = rng.random()
            if op < 0.35 or len(members) < 2:
                c = Conn(f"c{step + 1}")
                s.add(c)
                members.append(c)
            elif op < 0.7:
                s.note_activity(rng.choice(members))
            else:
                gone = rng.choice(members)
                members.remove(gone)
                s.remove(gone)
            if members:
                assert s.active is not None and s.active in members, (s.conns, s.history)
                assert s.is_dup == (len(members) > 1)


class Fwd:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def forward_packet(self, src: bytes, dst: bytes, data: bytes) -> None:
        self.sent.append(data)


def test_forwarder_table_rules() -> None:
    t = ForwarderTable()
    k = b"k" * 32
    f, g, h = Fwd(), Fwd(), Fwd()
    assert t.remove(k, f) is False  # nothing there: no-op
    t.add(k, f)
    t.add(k, f)  # duplicate registration ignored
    assert t.get(k) is f
    t.add(k, g)
    m = t.get(k)
    assert isinstance(m, MultiForwarder) and t.multiforwarder_created == 1
    m.forward_packet(b"", k, b"x")
    assert f.sent == [b"x"] and g.sent == []  # first registered is preferred
    t.add(k, h)
    assert t.remove(k, f) is False  # preferred removed: next oldest (g) takes over
    m.forward_packet(b"", k, b"y")
    assert g.sent == [b"y"]
    t.remove(k, h)
    assert t.get(k) is g and t.multiforwarder_deleted == 1
    assert t.remove(k, h) is False and t.delete_other_value == 1
    assert t.remove(k, g) is True and t.get(k) is None
