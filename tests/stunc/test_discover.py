"""The discovery sequence and the verdicts, driven by a simulated NAT on virtual time.

The simulated NAT follows RFC 4787's definitions literally (a mapping keyed by socket, by
socket + destination IP, or by socket + destination address; a filter that admits any source,
sources whose IP was sent to, or exact addresses sent to; idle expiry), and the simulated RFC
5780 server answers from the address CHANGE-REQUEST names. So these tests check the sequence
and its reading; the real sockets and NATs are in test_nat_netns.py and test_rfc5780.py.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from derpkit.stunc.discover import DiscoveryError, discover, lifetime_schedule
from derpkit.stunc.nat import (
    Observation,
    classify_filtering,
    classify_mapping,
    lifetime_bounds,
    report_json,
    verdict_text,
)

A1, A2, P1, P2 = "192.0.2.1", "192.0.2.2", 3478, 3479
PUBLIC = "198.51.100.7"
INSIDE = "10.0.0.2"


class Clock:
    """Virtual time: sleepers wake in order when every task is waiting on the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def sleep(self, t: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + t, next(self._seq), fut))
        await fut

    async def run(self, coro: Any) -> Any:
        task = asyncio.ensure_future(coro)
        for _ in range(10_000):  # bounded
            for _ in range(50):
                await asyncio.sleep(0)
                if task.done():
                    return task.result()
            if not self._heap:
                continue
            t, _, fut = heapq.heappop(self._heap)
            self.now = max(self.now, t)
            fut.set_result(None)
        raise AssertionError("simulation did not finish")


@dataclass
class FakeNat:
    """An RFC 4787 NAT (or none) in front of an RFC 5780 server on A1/A2 x P1/P2."""

    mapping: str = "eim"  # eim | adm | apdm | none
    filtering: str = "apdf"  # eif | adf | apdf
    hairpins: bool = False
    lifetime: float = 1e9
    rfc5780: bool = True
    silent: bool = False  # a Go derper that answers only Tailscale-shaped requests if "plain"
    blocked: str | None = None  # a server-side firewall dropping everything of this IP
    family: str = "ipv4"
    clock: Clock = field(default_factory=Clock)
    maps: dict[tuple[Any, ...], tuple[int, float]] = field(default_factory=dict)
    sent_to: dict[int, set[tuple[str, int]]] = field(default_factory=dict)
    ports: itertools.count = field(default_factory=lambda: itertools.count(40000))
    asked: list[tuple[int, tuple[str, int], str]] = field(default_factory=list)

    def _key(self, sock: int, dst: tuple[str, int]) -> tuple[Any, ...]:
        return {"eim": (sock,), "adm": (sock, dst[0]), "apdm": (sock, dst)}.get(
            self.mapping, (sock,))

    def _out(self, sock: int, dst: tuple[str, int]) -> tuple[str, int]:
        if self.mapping == "none":
            self.sent_to.setdefault(sock, set()).add(dst)
            return INSIDE, 5000 + sock
        key = self._key(sock, dst)
        now = self.clock.now
        port, last = self.maps.get(key, (0, -1e18))
        if now - last > self.lifetime:
            port = next(self.ports)
            self.sent_to[sock] = set()
        self.maps[key] = (port, now)
        self.sent_to.setdefault(sock, set()).add(dst)
        return PUBLIC, port

    def _in(self, sock: int, src: tuple[str, int]) -> bool:
        seen = self.sent_to.get(sock, set())
        if self.mapping != "none":
            alive = [k for k, (_p, last) in self.maps.items()
                     if k[0] == sock and self.clock.now - last <= self.lifetime]
            if not alive:
                return False
        if self.filtering == "eif":
            return True
        if self.filtering == "adf":
            return any(ip == src[0] for ip, _ in seen)
        return src in seen

    def _sock_of(self, public: tuple[str, int]) -> int | None:
        for key, (port, _last) in self.maps.items():
            if port == public[1]:
                return int(key[0])
        return None

    # --- the Prober interface -------------------------------------------------------------

    async def ask(self, sock: int, server: tuple[str, int], *, shape: str = "plain",
                  change_ip: bool = False, change_port: bool = False,
                  evidence: bool = False) -> Observation:
        change = "ip+port" if change_ip and change_port else "port" if change_port else ""
        self.asked.append((sock, server, change))
        sent = 4 if evidence else 2
        if self.silent and shape == "plain":
            return Observation(sock, server, None, change=change, sent=sent, error="timeout")
        mapped = self._out(sock, server)
        if change and not self.rfc5780:
            return Observation(sock, server, None, change=change, sent=sent, error="timeout")
        src = ((A2 if server[0] == A1 else A1) if change_ip else server[0],
               (P2 if server[1] == P1 else P1) if change_port else server[1])
        if not self._in(sock, src) or self.blocked in (src[0], server[0]):
            return Observation(sock, server, None, change=change, sent=sent, error="timeout")
        other = ((A2 if server[0] == A1 else A1), (P2 if server[1] == P1 else P1))
        return Observation(sock, server, mapped, origin=src, response_origin=src,
                           other_address=other if self.rfc5780 and shape == "plain" else None,
                           change=change, rtt=0.01)

    def local_addr(self, sock: int, toward: tuple[str, int]) -> tuple[str, int]:
        return INSIDE, 5000 + sock

    async def hairpin(self, from_sock: int, to_sock: int, target: tuple[str, int]) -> bool:
        src = self._out(from_sock, target)
        return self.hairpins and self._sock_of(target) == to_sock and bool(src)

    async def redirected(self, via_sock: int, to_sock: int, server: tuple[str, int],
                         port: int) -> bool:
        self._out(via_sock, server)
        return self._sock_of((PUBLIC, port)) == to_sock and self._in(to_sock, server)

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


async def run(nat: FakeNat, **kw: Any) -> Any:
    return await nat.clock.run(discover(nat, (A1, P1), **kw))


@pytest.mark.parametrize(
    ("mapping", "filtering", "want_map", "want_filter", "meaning"),
    [
        ("eim", "apdf", "endpoint-independent", "address-and-port-dependent", "most peers"),
        ("eim", "adf", "endpoint-independent", "address-dependent", "practically every peer"),
        ("eim", "eif", "endpoint-independent", "endpoint-independent", "practically every peer"),
        ("adm", "apdf", "address-dependent", "address-and-port-dependent", "hard NAT"),
        ("apdm", "apdf", "address-and-port-dependent", "address-and-port-dependent", "hard NAT"),
        ("apdm", "eif", "address-and-port-dependent", "endpoint-independent", "hard NAT"),
    ],
)
async def test_rfc5780_matrix(mapping: str, filtering: str, want_map: str, want_filter: str,
                              meaning: str) -> None:
    nat = FakeNat(mapping=mapping, filtering=filtering)
    r = await run(nat)
    assert r.rfc5780 and r.nat is True
    assert (r.mapping.behaviour, r.filtering) == (want_map, want_filter)
    text = verdict_text(r)
    assert f"{want_map.capitalize()} mapping" in text and meaning in text
    assert f"{want_filter.capitalize()} filtering" in text
    # The filtering socket never talked to the alternate addresses before its change tests.
    first_change = next(i for i, a in enumerate(nat.asked) if a[2])
    assert all(a[1] == (A1, P1) for a in nat.asked[:first_change] if a[0] == 1)
    doc = report_json(r)
    assert doc["mapping"] == want_map and doc["filtering"] == want_filter
    assert doc["summary"] == f"NAT: {want_map} mapping, {want_filter} filtering, no hairpinning"
    assert doc["mapped_addr"].startswith(PUBLIC + ":")


async def test_no_nat_open_and_firewalled() -> None:
    r = await run(FakeNat(mapping="none", filtering="eif"))
    assert r.nat is False and r.filtering == "endpoint-independent"
    assert "No NAT" in verdict_text(r) and "directly reachable" in verdict_text(r)
    assert r.hairpinning is None
    r = await run(FakeNat(mapping="none", filtering="apdf"))
    assert r.nat is False and r.filtering == "address-and-port-dependent"
    assert "most peers" in verdict_text(r)


async def test_hairpinning_reported_both_ways() -> None:
    assert (await run(FakeNat(hairpins=True))).hairpinning is True
    r = await run(FakeNat(hairpins=False))
    assert r.hairpinning is False and "No hairpinning" in verdict_text(r)


async def test_go_derper_only_tailscale_shape_mapping_from_extra_servers() -> None:
    """A Go derper ignores plain requests and has no OTHER-ADDRESS: mapping from -nat-servers."""
    nat = FakeNat(mapping="apdm", silent=True, rfc5780=False)
    r = await nat.clock.run(discover(nat, (A1, P1), [(A1, P2), (A2, P1)]))
    assert not r.rfc5780 and r.mapping.behaviour == "address-and-port-dependent"
    assert r.filtering == "unknown" and "Filtering not measured" in verdict_text(r)
    assert any("not an RFC 5780 server" in n for n in r.notes)
    nat = FakeNat(mapping="eim", silent=True, rfc5780=False)
    r = await nat.clock.run(discover(nat, (A1, P1), [(A2, P1)]))
    assert r.mapping.behaviour == "endpoint-independent"
    nat = FakeNat(mapping="apdm", silent=True, rfc5780=False)
    r = await nat.clock.run(discover(nat, (A1, P1)))
    assert r.mapping.behaviour == "unknown"


async def test_silent_server_is_an_error() -> None:
    class Dead(FakeNat):
        async def ask(self, sock: int, server: tuple[str, int], **kw: Any) -> Observation:
            return Observation(sock, server, None, sent=2, error="timeout")

    with pytest.raises(DiscoveryError, match="no STUN reply from 192.0.2.1:3478"):
        await run(Dead())


async def test_lifetime_bounded_on_virtual_time() -> None:
    nat = FakeNat(lifetime=5.0)
    r = await run(nat, lifetime_max=16)
    assert r.lifetime == (4.0, 8.0, True)
    assert "between 4 s and 8 s" in verdict_text(r)
    assert nat.clock.now == 16.0  # all probes waited at once: total time is the longest wait
    r = await run(FakeNat(lifetime=100.0), lifetime_max=8)
    assert r.lifetime == (8.0, None, True) and "at least 8 s" in verdict_text(r)


def test_lifetime_schedule_and_bounds() -> None:
    assert lifetime_schedule(10) == [1, 2, 4, 8, 10]
    assert lifetime_schedule(1) == [1]
    assert lifetime_schedule(0) == []
    assert lifetime_bounds({1: True, 2: True, 4: False}) == (2, 4, True)
    assert lifetime_bounds({1: False, 2: True}) == (2, 1, False)


def test_classify_mapping_needs_two_ips_for_eim() -> None:
    def o(server: tuple[str, int], mapped: tuple[str, int]) -> Observation:
        return Observation(0, server, mapped)

    x, y = (PUBLIC, 1), (PUBLIC, 2)
    assert classify_mapping([o((A1, P1), x), o((A1, P2), x)]).behaviour == "unknown"
    assert classify_mapping([o((A1, P1), x), o((A2, P1), x)]).behaviour == "endpoint-independent"
    assert classify_mapping([o((A1, P1), x), o((A2, P1), y)]).behaviour == "destination-dependent"
    assert classify_mapping(
        [o((A1, P1), x), o((A2, P1), y), o((A2, P2), y)]).behaviour == "address-dependent"
    assert classify_mapping([o((A1, P1), x), o((A1, P2), y)]).behaviour == (
        "address-and-port-dependent")
    assert classify_filtering(True, None) == "endpoint-independent"
    assert classify_filtering(False, None) == "unknown"


async def test_silent_second_ip_is_not_read_as_filtering() -> None:
    """A firewall on the server side dropping the second IP must not look like a strict NAT."""
    r = await run(FakeNat(mapping="eim", filtering="eif", blocked=A2))
    assert r.filtering == "unknown"
    assert "did not answer a direct request either" in r.filtering_detail
    assert any("did not answer" in n for n in r.notes)
    assert "Filtering not measured" in verdict_text(r)
