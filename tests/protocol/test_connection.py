"""ClientConnection against ServerConnection in memory, with time passed in by hand.

No sockets and no sleeps: every timer rule (handshake timeout, keepalive with jitter,
liveness ping and close, write deadline, pong slot, NotHere budget, -rate-config pause,
the client's read timeout) is shown by moving ``now`` forward.
"""

from __future__ import annotations

import random

import pytest

from derpkit.protocol import frames as F
from derpkit.protocol.connection import (
    ClientConnection,
    ClientState,
    ServerConnection,
    ServerPolicy,
    ServerState,
)
from derpkit.protocol.constants import KEEPALIVE_INTERVAL, FrameType, PeerGoneReason
from derpkit.protocol.events import (
    ClientInfoReceived,
    ConnectionFailed,
    HandshakeComplete,
    PingAnswered,
    ReadingPaused,
    ReadingResumed,
    ServerKeyReceived,
    UpgradeRefused,
)
from derpkit.protocol.handshake import ClientInfo, ServerInfo
from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.protocol.upgrade import switching_protocols

SERVER = NodePrivate.generate()


class Pair:
    """A client core wired to a server core; ``pump`` moves bytes until both are quiet."""

    def __init__(self, *, policy: ServerPolicy | None = None, info: ClientInfo | None = None,
                 fast: bool = False, now: float = 1000.0) -> None:
        self.now = now
        self.policy = policy or ServerPolicy(SERVER, rng=random.Random(7))
        self.packets: list[bytes] = []
        self.forwards: list[tuple[bytes, bytes, bytes]] = []
        self.server = ServerConnection(self.policy, on_packet=self.packets.append,
                                       on_forward=lambda s, d, p: self.forwards.append((s, d, p)))
        self.key = NodePrivate.generate()
        self.client = ClientConnection(self.key, info=info or ClientInfo(can_ack_pings=True),
                                       server_key=self.policy.public_key if fast else None)
        self.server_events: list = []
        self.client_events: list = []
        self._http_done = False

    def start(self) -> None:
        self.client.start(self.now)
        req = self.client.data_to_send()
        head, _, rest = req.partition(b"\r\n\r\n")
        assert head.startswith(b"GET /derp HTTP/1.1")
        fast = self.client.fast_start
        self.server.start(self.now)
        preamble = b"" if fast else switching_protocols(self.policy.public_key)
        self.client_events += self.client.receive_data(preamble + self.server.data_to_send(), self.now)
        if rest:
            self.server_events += self.server.receive_data(rest, self.now)
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            c = self.client.data_to_send()
            s = self.server.data_to_send()
            if not c and not s:
                return
            if c:
                self.server_events += self.server.receive_data(c, self.now)
            if s:
                self.client_events += self.client.receive_data(s, self.now)
        raise AssertionError("the two ends never went quiet")

    def admit(self) -> None:
        assert any(isinstance(e, ClientInfoReceived) for e in self.server_events)
        self.server_events += self.server.admit(self.now)
        self.pump()

    def connect(self) -> None:
        self.start()
        self.admit()
        assert self.client.state is ClientState.CONNECTED
        assert self.server.state is ServerState.RUNNING

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for core, sink in ((self.server, self.server_events), (self.client, self.client_events)):
            d = core.next_deadline()
            if d is not None and d <= self.now:
                sink += core.handle_timer(self.now)
        self.pump()


# --------------------------------------------------------------------------- handshake


def test_handshake_reports_each_step_and_delivers_packets_both_ways() -> None:
    p = Pair()
    p.start()
    assert isinstance(p.client_events[0], ServerKeyReceived)
    assert p.client_events[0].key == SERVER.public()
    (info_ev,) = [e for e in p.server_events if isinstance(e, ClientInfoReceived)]
    assert info_ev.key == p.key.public() and info_ev.info.can_ack_pings and not info_ev.is_mesh
    assert p.client.state is ClientState.AWAIT_SERVER_INFO
    p.admit()
    assert [e for e in p.client_events if isinstance(e, HandshakeComplete)] == [HandshakeComplete(ServerInfo())]
    dst = NodePrivate.generate().public()
    assert p.client.send_packet(dst, b"hello", p.now)
    p.pump()
    assert p.packets == [dst.raw + b"hello"]


def test_fast_start_skips_the_101_and_checks_the_late_server_key() -> None:
    p = Pair(fast=True)
    p.start()
    assert p.client.fast_start and p.client.server_key_received
    p.admit()
    assert p.client.state is ClientState.CONNECTED


def test_fast_start_with_the_wrong_server_key_fails_with_both_keys_named() -> None:
    other = ServerPolicy(NodePrivate.generate())
    c = ClientConnection(NodePrivate.generate(), server_key=SERVER.public())
    c.start(0.0)
    c.data_to_send()
    evs = c.receive_data(other.server_key_frame, 0.0)
    assert isinstance(evs[-1], ConnectionFailed) and evs[-1].reason == "server_key_mismatch"
    assert str(other.public_key) in str(evs[-1].error)
    assert c.state is ClientState.CLOSED


def test_non_101_answer_becomes_upgrade_refused_with_the_body() -> None:
    c = ClientConnection(NodePrivate.generate())
    c.start(0.0)
    body = b"DERP requires connection upgrade\n"
    resp = b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: %d\r\n\r\n" % len(body)
    assert c.receive_data(resp, 0.0) == []  # the body has not arrived yet
    evs = c.receive_data(body, 0.0)
    refused = evs[0]
    assert isinstance(refused, UpgradeRefused) and refused.status == 426 and refused.body == body
    assert refused.header("content-length") == str(len(body))
    assert isinstance(evs[-1], ConnectionFailed) and evs[-1].reason == "upgrade_refused"


def test_eof_while_reading_an_error_body_still_reports_the_refusal() -> None:
    c = ClientConnection(NodePrivate.generate())
    c.start(0.0)
    c.receive_data(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 100\r\n\r\nno", 0.0)
    evs = c.connection_lost(0.0)
    assert isinstance(evs[0], UpgradeRefused) and evs[0].body == b"no"


def test_connection_lost_names_the_state() -> None:
    c = ClientConnection(NodePrivate.generate())
    c.start(0.0)
    (ev,) = c.connection_lost(0.0)
    assert isinstance(ev, ConnectionFailed) and "waiting for the HTTP 101 response" in str(ev.error)


def test_bad_magic_in_server_key_fails() -> None:
    c = ClientConnection(NodePrivate.generate(), websocket=True)
    c.start(0.0)
    bad = F.frame(FrameType.SERVER_KEY, b"NOTDERP!" + bytes(32))
    (ev,) = c.receive_data(bad, 0.0)
    assert isinstance(ev, ConnectionFailed) and ev.reason == "invalid_server_greeting"


def test_server_refuses_a_wrong_first_frame_and_a_bad_box() -> None:
    s = ServerConnection(ServerPolicy(SERVER), on_packet=lambda p: None)
    s.start(0.0)
    (ev,) = s.receive_data(F.KEEPALIVE_BYTES, 0.0)
    assert isinstance(ev, ConnectionFailed) and ev.reason == "bad_first_frame"
    s2 = ServerConnection(ServerPolicy(SERVER), on_packet=lambda p: None)
    s2.start(0.0)
    k = NodePrivate.generate()
    (ev,) = s2.receive_data(F.frame(FrameType.CLIENT_INFO, k.public().raw + bytes(24 + 40)), 0.0)
    assert isinstance(ev, ConnectionFailed) and ev.reason == "bad_box"


def test_frames_pipelined_behind_client_info_wait_for_admission() -> None:
    p = Pair()
    p.client.start(p.now)
    p.client.data_to_send()
    p.server.start(p.now)
    p.client.receive_data(switching_protocols(SERVER.public()) + p.server.data_to_send(), p.now)
    dst = NodePrivate.generate().public().raw
    p.client.send_packet(dst, b"early", p.now)
    p.server_events += p.server.receive_data(p.client.data_to_send(), p.now)
    assert p.packets == [] and p.server.holding_frames
    p.admit()
    assert p.packets == [dst + b"early"]


def test_refused_client_gets_nothing_more() -> None:
    p = Pair()
    p.start()
    p.server.refuse()
    assert p.server.admit(p.now) == []
    assert p.server.receive_data(F.Ping(b"12345678").encode(), p.now) == []
    assert p.server.next_deadline() is None


# --------------------------------------------------------------------------- timers


def test_server_handshake_timeout_fires_at_ten_seconds_not_before() -> None:
    s = ServerConnection(ServerPolicy(SERVER), on_packet=lambda p: None)
    s.start(50.0)
    assert s.next_deadline() == 60.0
    assert s.handle_timer(59.9) == []
    (ev,) = s.handle_timer(60.0)
    assert isinstance(ev, ConnectionFailed) and ev.reason == "handshake_timeout"


def test_client_handshake_timeout_names_where_it_stuck() -> None:
    c = ClientConnection(NodePrivate.generate(), handshake_timeout=10.0)
    c.start(0.0)
    assert c.next_deadline() == 10.0
    (ev,) = c.handle_timer(10.0)
    assert ev.reason == "handshake_timeout" and "101" in str(ev.error)


def test_keepalive_every_interval_plus_a_jitter_drawn_once() -> None:
    policy = ServerPolicy(SERVER, keepalive_interval=60.0, keepalive_jitter=5.0, rng=random.Random(3))
    p = Pair(policy=policy, info=ClientInfo(can_ack_pings=False))
    p.connect()
    first = p.server.next_deadline()
    assert first is not None
    jitter = first - p.now - 60.0
    assert 0.0 <= jitter < 5.0
    seen = []
    for _ in range(3):
        d = p.server.next_deadline()
        assert d is not None
        p.now = d
        p.server.handle_timer(p.now)
        out = p.server.data_to_send()
        assert out == F.KEEPALIVE_BYTES
        seen.append(d)
        assert isinstance(p.client.receive_data(out, p.now)[0], F.KeepAlive)
    assert [round(b - a, 9) for a, b in zip(seen, seen[1:], strict=False)] == [round(60.0 + jitter, 9)] * 2


def test_liveness_pings_a_silent_client_and_closes_it_at_the_next_tick() -> None:
    p = Pair(info=ClientInfo(can_ack_pings=True))
    p.connect()
    # First tick: the client sent its handshake at connect time, ~60 s ago → Ping.
    p.now = p.server.next_deadline()
    assert p.server.handle_timer(p.now) == []
    out = p.server.data_to_send()
    assert out[:5] == F.KEEPALIVE_BYTES and out[5] == FrameType.PING
    assert p.server.counters.server_pings_sent == 1
    # The client never reads it (dead). Next tick: closed as dead.
    p.now = p.server.next_deadline()
    (ev,) = p.server.handle_timer(p.now)
    assert isinstance(ev, ConnectionFailed) and ev.reason == "dead_client"


def test_liveness_spares_a_client_that_answers() -> None:
    p = Pair(info=ClientInfo(can_ack_pings=True))
    p.connect()
    for _ in range(4):
        p.now = p.server.next_deadline()
        p.server_events += p.server.handle_timer(p.now)
        p.pump()  # the client core answers the Ping with a Pong by itself
    assert p.server.state is ServerState.RUNNING
    assert not [e for e in p.server_events if isinstance(e, ConnectionFailed)]
    assert p.server.counters.server_pings_sent >= 2


def test_client_without_can_ack_pings_does_not_answer_and_is_not_pinged() -> None:
    p = Pair(info=ClientInfo(can_ack_pings=False))
    p.connect()
    evs = p.client.receive_data(F.Ping(b"abcdefgh").encode(), p.now)
    assert evs == [F.Ping(b"abcdefgh")] and p.client.data_to_send() == b""
    for _ in range(3):
        p.now = p.server.next_deadline()
        p.server.handle_timer(p.now)
        assert p.server.data_to_send() == F.KEEPALIVE_BYTES
    assert p.server.state is ServerState.RUNNING


def test_client_read_timeout_after_120_silent_seconds_unless_reading_is_paused() -> None:
    p = Pair()
    p.connect()
    start = p.now
    assert p.client.next_deadline() == start + 120.0
    assert p.client.handle_timer(start + 119.0) == []
    p.client.set_reading_paused(True, start + 100)
    assert p.client.next_deadline() is None
    p.client.set_reading_paused(False, start + 200)
    assert p.client.next_deadline() == start + 320.0
    (ev,) = p.client.handle_timer(start + 320.0)
    assert ev.reason == "read_timeout"
    with pytest.raises(Exception, match="closed"):
        p.client.send_packet(bytes(32), b"x", start + 321)


def test_write_deadline_closes_a_client_that_stops_reading() -> None:
    p = Pair()
    p.connect()
    p.server.writing_paused(p.now)
    assert p.server.next_deadline() == p.now + 2.0
    p.server.writing_resumed()
    assert p.server.next_deadline() != p.now + 2.0
    p.server.writing_paused(p.now)
    (ev,) = p.server.handle_timer(p.now + 2.0)
    assert ev.reason == "write_timeout"


def test_mesh_peers_get_the_longer_write_deadline() -> None:
    mesh = MeshKey(bytes(range(32)))
    policy = ServerPolicy(SERVER, mesh_key=mesh)
    p = Pair(policy=policy, info=ClientInfo(mesh_key=mesh, can_ack_pings=True))
    p.connect()
    assert p.server.is_mesh
    p.server.writing_paused(p.now)
    assert p.server.next_deadline() == p.now + 30.0


# --------------------------------------------------------------------------- pong slot and pings


def test_pong_slot_two_pongs_per_batch_while_writable_one_while_full() -> None:
    p = Pair()
    p.connect()
    pings = b"".join(F.Ping(bytes([i]) * 8).encode() for i in range(5))
    p.server.receive_data(pings, p.now)
    out = p.server.data_to_send()
    assert out == F.Pong(b"\x00" * 8).encode() + F.Pong(b"\x01" * 8).encode()
    assert p.server.counters.got_ping == 5 and p.server.counters.sent_pong == 2
    p.server.output_flushed()
    p.server.writing_paused(p.now)
    p.server.receive_data(pings, p.now)
    assert p.server.data_to_send() == F.Pong(b"\x00" * 8).encode()
    p.server.writing_resumed()
    p.server.receive_data(F.Ping(b"z" * 8).encode(), p.now)
    assert p.server.data_to_send() == F.Pong(b"z" * 8).encode()


def test_client_ping_is_answered_with_a_round_trip_in_the_callers_clock() -> None:
    p = Pair()
    p.connect()
    data = p.client.ping(p.now)
    p.server.receive_data(p.client.data_to_send(), p.now)
    evs = p.client.receive_data(p.server.data_to_send(), p.now + 0.25)
    assert evs == [PingAnswered(data, 0.25)]
    # A Pong for a ping nobody waits for is an ordinary frame.
    assert p.client.receive_data(F.Pong(b"q" * 8).encode(), p.now) == [F.Pong(b"q" * 8)]


# --------------------------------------------------------------------------- budgets


def test_not_here_budget_three_in_a_burst_then_one_per_second() -> None:
    p = Pair()
    p.connect()
    t = p.now
    assert [p.server.not_here_allowed(t) for _ in range(6)] == [True, True, True, False, False, False]
    assert p.server.not_here_allowed(t + 0.5) is False
    assert p.server.not_here_allowed(t + 1.0) is True
    assert p.server.not_here_allowed(t + 1.0) is False
    assert [p.server.not_here_allowed(t + 100) for _ in range(4)] == [True, True, True, False]


def test_rate_config_pauses_reading_and_resumes_when_the_bucket_refills() -> None:
    policy = ServerPolicy(SERVER, rate_limit=(100_000.0, 65_568))
    p = Pair(policy=policy)
    p.connect()
    dst = NodePrivate.generate().public().raw
    for _ in range(3):
        p.client.send_packet(dst, bytes(30_000), p.now)
    evs = p.server.receive_data(p.client.data_to_send(), p.now)
    assert len(p.packets) == 2 and isinstance(evs[0], ReadingPaused)
    until = evs[0].until
    assert until > p.now and p.server.holding_frames and p.server.next_deadline() == until
    # Frames that arrive during the pause join the backlog, in order.
    p.client.send_packet(dst, b"late", p.now)
    assert p.server.receive_data(p.client.data_to_send(), p.now) == []
    evs = p.server.handle_timer(until)
    assert evs[0] == ReadingResumed()
    assert [len(x) for x in p.packets] == [32 + 30_000] * 3
    # The bucket is exactly empty now, so the late frame waits its own (short) turn.
    assert isinstance(evs[1], ReadingPaused) and evs[1].until - until < 0.01
    assert p.server.handle_timer(evs[1].until)[0] == ReadingResumed()
    assert [len(x) for x in p.packets] == [32 + 30_000] * 3 + [36]
    assert p.server.counters.rate_limit_waited >= 1


def test_client_honours_the_advisory_bucket_from_server_info() -> None:
    policy = ServerPolicy(SERVER, server_info=ServerInfo(token_bucket_bytes_per_second=1000,
                                                         token_bucket_bytes_burst=2000))
    p = Pair(policy=policy)
    p.connect()
    dst = bytes(32)
    assert p.client.send_packet(dst, bytes(1000), p.now)
    assert not p.client.send_packet(dst, bytes(1000), p.now)  # 1037 + 1037 > 2000
    assert p.client.rate_limited_drops == 1
    assert p.client.send_packet(dst, bytes(1000), p.now + 1.1)


# --------------------------------------------------------------------------- rules


def test_forward_packet_needs_the_mesh_key_and_reaches_the_forward_sink_with_it() -> None:
    p = Pair()
    p.connect()
    a, b = NodePrivate.generate().public(), NodePrivate.generate().public()
    p.client.forward_packet(a, b, b"fwd")
    (ev,) = p.server.receive_data(p.client.data_to_send(), p.now)
    assert ev.reason == "not_mesh_peer" and p.forwards == []
    mesh = MeshKey(bytes(32 * [9]))
    m = Pair(policy=ServerPolicy(SERVER, mesh_key=mesh), info=ClientInfo(mesh_key=mesh))
    m.connect()
    m.client.forward_packet(a, b, b"fwd")
    m.client.watch_conns()
    m.client.close_peer(a)
    evs = m.server.receive_data(m.client.data_to_send(), m.now)
    assert m.forwards == [(a.raw, b.raw, b"fwd")]
    assert evs == [F.WatchConns(), F.ClosePeer(a.raw)]


def test_frames_before_a_bad_header_are_acted_on_then_the_connection_fails() -> None:
    p = Pair()
    p.connect()
    dst = bytes(range(32))
    good = F.encode_send_packet(dst, b"ok")
    bad = F.header(FrameType.SEND_PACKET, 32 + 70_000)
    evs = p.server.receive_data(good + bad, p.now)
    assert p.packets == [dst + b"ok"]
    assert isinstance(evs[-1], ConnectionFailed) and evs[-1].reason == "oversized_packet"
    assert p.server.receive_data(good, p.now) == [] and len(p.packets) == 1


def test_home_moves_are_counted_only_after_the_grace_period() -> None:
    p = Pair()
    p.connect()
    p.client.note_preferred(True)
    p.server.receive_data(p.client.data_to_send(), p.now + 1)
    assert p.server.preferred and p.server.counters.home_moves_in == 0
    p.client.note_preferred(False)
    p.server.receive_data(p.client.data_to_send(), p.now + 10)
    assert p.server.counters.home_moves_out == 1


def test_peer_gone_and_recv_packet_reach_the_client_as_frame_events() -> None:
    p = Pair()
    p.connect()
    src = NodePrivate.generate().public().raw
    out = F.encode_recv_packet(src, b"data") + F.PeerGone(src, PeerGoneReason.NOT_HERE).encode()
    assert p.client.receive_data(out, p.now) == [F.RecvPacket(src, b"data"), F.PeerGone(src, PeerGoneReason.NOT_HERE)]


def test_a_one_megabyte_frame_kills_the_client_connection() -> None:
    p = Pair()
    p.connect()
    (ev,) = p.client.receive_data(F.header(FrameType.HEALTH, (1 << 20) + 1), p.now)
    assert ev.reason == "frame_too_large"


@pytest.mark.parametrize(
    "make",
    [
        lambda: F.SendPacket(b"x", b"hi").encode(),
        lambda: F.encode_send_packet(b"x", b"hi"),
        lambda: F.RecvPacket(b"short", b"hi").encode(),
        lambda: F.PeerGone(b"k").encode(),
        lambda: F.ForwardPacket(bytes(32), b"k", b"").encode(),
        lambda: F.ClosePeer(bytes(31)).encode(),
        lambda: F.Ping(b"1234").encode(),
        lambda: F.Pong(b"123456789").encode(),
        lambda: F.encode_send_packet(bytes(32), bytes(65537)),
        lambda: F.PeerPresent(bytes(33)).encode(),
    ],
)
def test_encoders_refuse_wrong_key_lengths_and_sizes(make) -> None:
    with pytest.raises(ValueError, match="bytes"):
        make()


def test_client_core_send_checks_keys_and_size() -> None:
    p = Pair()
    p.connect()
    with pytest.raises(ValueError, match="32-byte"):
        p.client.send_packet(b"short", b"x", p.now)
    with pytest.raises(ValueError, match="65536"):
        p.client.send_packet(bytes(32), bytes(65537), p.now)


def test_keepalive_interval_constant_is_the_default() -> None:
    assert ServerPolicy(SERVER).keepalive_interval == KEEPALIVE_INTERVAL
