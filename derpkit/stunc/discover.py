"""NAT behaviour discovery (RFC 5780 §4): which tests to run, in which order, from which socket.

The sequence is written against the small :class:`Prober` interface (ask a server from local
socket *n*, watch for a looped-back request, sleep), so tests can drive it with a simulated
NAT and fake time; :class:`derpkit.stunc.netprober.EndpointProber` is the real one over
:class:`derpkit.stun.client.StunEndpoint`. Interpretation lives in :mod:`derpkit.stunc.nat`.

Sockets, and why several: mapping tests reuse socket 0 (its mapping toward several servers is
the question). Filtering tests need a socket that has only ever sent to the primary address,
or the earlier sends would have opened the filter (socket 1). It must not be socket 0 either,
even before socket 0's mapping tests: on a Linux NAT the change-request replies that the
filter drops leave conntrack entries (alternate address -> public port) that make the NAT
pick a *new* port when socket 0 later sends to that alternate address, so an
endpoint-independent NAT would be reported as address-and-port-dependent (seen in
tests/stunc/test_nat_netns.py). Hairpinning sends from socket 2
to socket 0's public address. Each lifetime probe has its own socket, because a probe that
gets through refreshes the mapping it measures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from derpkit.gosyntax import join_host_port
from derpkit.stunc.nat import (
    EIM,
    NatReport,
    Observation,
    classify_filtering,
    classify_mapping,
    lifetime_bounds,
)

__all__ = ["DiscoveryError", "Prober", "discover", "lifetime_schedule"]

Addr = tuple[str, int]

SOCK_MAPPING = 0
SOCK_FILTERING = 1
SOCK_HAIRPIN = 2
SOCK_LIFETIME_HELPER = 3
SOCK_LIFETIME_BASE = 10  # probe k uses socket 10 + k


class DiscoveryError(Exception):
    """The primary server never answered; ``str()`` is the explanation for people."""


class Prober(Protocol):
    """The I/O the discovery needs; every method reports, none raises for network trouble."""

    family: str

    async def ask(
        self,
        sock: int,
        server: Addr,
        *,
        shape: str = "plain",
        change_ip: bool = False,
        change_port: bool = False,
        evidence: bool = False,
    ) -> Observation:
        """One Binding transaction from local socket ``sock``. ``evidence``: its silence will be
        read as a verdict, so it is retransmitted enough to rule out ordinary loss."""
        ...

    def local_addr(self, sock: int, toward: Addr) -> Addr | None:
        """Socket ``sock``'s own address as the kernel would send it toward ``toward``."""
        ...

    async def hairpin(self, from_sock: int, to_sock: int, target: Addr) -> bool:
        """Send a Binding request from ``from_sock`` to ``target``; True if ``to_sock`` gets it."""
        ...

    async def redirected(self, via_sock: int, to_sock: int, server: Addr, port: int) -> bool:
        """Ask ``server`` from ``via_sock`` with RESPONSE-PORT ``port``; True if the reply
        reaches ``to_sock`` (whose mapping has that port)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait (fake time in tests)."""
        ...


def lifetime_schedule(max_seconds: float) -> list[float]:
    """Idle times to probe, doubling from 1 s up to and including ``max_seconds``."""
    out: list[float] = []
    t = 1.0
    while t < max_seconds:
        out.append(t)
        t *= 2
    if max_seconds > 0:
        out.append(max_seconds)
    return out


async def _first_contact(p: Prober, server: Addr) -> Observation:
    """Both request shapes at once from socket 0; the plain answer is preferred (RFC 5780
    servers add OTHER-ADDRESS to it), the Tailscale one covers Go derper, which ignores plain
    requests. Sending both costs one round trip, not one timeout."""
    plain, ts = await asyncio.gather(
        p.ask(SOCK_MAPPING, server, shape="plain"),
        p.ask(SOCK_MAPPING, server, shape="tailscale"),
    )
    if plain.answered:
        return plain
    if ts.answered:
        return ts
    where = join_host_port(*server)
    raise DiscoveryError(
        f"no STUN reply from {where} to a plain or a Tailscale-shaped request "
        f"({plain.error or 'timeout'}); run `derpkit stunc {server[0]} {server[1]}` for the "
        "usual causes"
    )


async def discover(
    p: Prober, server: Addr, extra: Sequence[Addr] = (), *, lifetime_max: float = 0.0
) -> NatReport:
    """Run the tests the servers allow and return the report (see the module docstring)."""
    first = await _first_contact(p, server)
    other = first.other_address
    notes: list[str] = []
    rfc5780 = other is not None and other[0] != server[0] and other[1] != server[1]
    if other is not None and not rfc5780:
        notes.append(
            f"OTHER-ADDRESS {join_host_port(*other)} does not differ from {join_host_port(*server)}"
            " in both IP and port, so the RFC 5780 tests were skipped"
        )
    if other is None:
        notes.append(
            f"{join_host_port(*server)} is not an RFC 5780 server (no OTHER-ADDRESS): filtering "
            "and lifetime cannot be measured against it"
        )
    local = p.local_addr(SOCK_MAPPING, server)
    mapping_obs = [first]

    # Mapping (§4.3): the same socket toward the alternate IP, then the alternate IP and port.
    targets: list[Addr] = []
    if rfc5780 and other is not None:
        # RFC 5780's two, then the primary IP's other port: it tells address-dependent from
        # address-and-port-dependent on its own, and proves that port answers at all.
        targets += [(other[0], server[1]), other, (server[0], other[1])]
    targets += [a for a in extra if a != server and a not in targets]
    for target in targets:
        # Tailscale's shape is answered by every kind of server (Go derper included).
        o = await p.ask(SOCK_MAPPING, target, shape="tailscale")
        if not o.answered:
            o2 = await p.ask(SOCK_MAPPING, target, shape="plain")
            o = o2 if o2.answered else o
        mapping_obs.append(o)
        if not o.answered:
            notes.append(f"{join_host_port(*target)} did not answer ({o.error or 'timeout'})")
    mapping = classify_mapping(mapping_obs)
    report = NatReport(
        family=p.family, server=server, local=local, mapped=first.mapped, rfc5780=rfc5780,
        other_address=other, mapping=mapping, observations=list(mapping_obs), notes=notes,
    )

    jobs = []
    if rfc5780 and other is not None:
        silent = {o.server for o in mapping_obs if not o.answered}
        jobs.append(_filtering(p, server, other, report, silent))
    if report.nat and first.mapped is not None:
        jobs.append(_hairpinning(p, first.mapped, report))
    elif report.nat is False:
        notes.append("hairpinning not tested: there is no NAT")
    await asyncio.gather(*jobs)
    if lifetime_max > 0:
        if rfc5780:
            await _lifetime(p, server, lifetime_max, report)
        else:
            report.lifetime = (None, None, True)
            report.lifetime_detail = "needs an RFC 5780 server (RESPONSE-PORT)"
    return report


async def _filtering(
    p: Prober, server: Addr, other: Addr, report: NatReport, silent: set[Addr]
) -> None:
    """§4.4 from a socket that has talked to ``server`` only; both change tests at once
    (replies do not open filters, so running them together changes nothing)."""
    base = await p.ask(SOCK_FILTERING, server)
    report.observations.append(base)
    if not base.answered:
        report.filtering_detail = "the filtering socket got no first answer"
        return
    both, port = await asyncio.gather(
        p.ask(SOCK_FILTERING, server, change_ip=True, change_port=True, evidence=True),
        p.ask(SOCK_FILTERING, server, change_port=True, evidence=True),
    )
    report.observations += [both, port]
    for o, want in ((both, other), (port, (server[0], other[1]))):
        if o.answered and o.origin != want:
            report.filtering_detail = (
                f"the server answered a CHANGE-REQUEST from {join_host_port(*(o.origin or ('?', 0)))}"
                f", not {join_host_port(*want)}: it does not honour CHANGE-REQUEST"
            )
            return
        if o.error and o.error.startswith("error_response"):
            report.filtering_detail = f"the server refused CHANGE-REQUEST ({o.error})"
            return
    # Silence from an address that did not answer a direct request either says nothing about
    # our filter: something on the server's side (a firewall, the second IP not routed) is
    # dropping it.
    for o, src in ((both, other), (port, (server[0], other[1]))):
        if not o.answered and src in silent:
            report.filtering_detail = (
                f"{join_host_port(*src)} did not answer a direct request either, so its "
                "silence to a CHANGE-REQUEST proves nothing (is the server's second address "
                "or port open?)"
            )
            return
    report.filtering = classify_filtering(both.answered, port.answered)
    if report.filtering == EIM:
        report.filtering_detail = "a reply from the other IP and port got in"
    elif report.filtering == "address-dependent":
        report.filtering_detail = (
            f"a reply from another port got in, one from another IP did not after {both.sent} "
            "requests"
        )
    else:
        report.filtering_detail = (
            "only replies from the exact address and port we sent to got in; "
            f"{both.sent + port.sent} change requests went unanswered"
        )


async def _hairpinning(p: Prober, public: Addr, report: NatReport) -> None:
    report.hairpinning = await p.hairpin(SOCK_HAIRPIN, SOCK_MAPPING, public)


async def _lifetime(p: Prober, server: Addr, lifetime_max: float, report: NatReport) -> None:
    """§4.6, bounded: one fresh socket per idle time, all waiting at once; after its wait each
    asks (from a helper socket, with RESPONSE-PORT) for a reply to its own public port."""
    # Does the server honour RESPONSE-PORT at all, and does a fresh mapping get it? (t = 0)
    check = await p.ask(SOCK_LIFETIME_BASE - 1, server)
    if not check.answered or check.mapped is None:
        report.lifetime = (None, None, True)
        report.lifetime_detail = "no answer to the lifetime socket"
        return
    if not await p.redirected(SOCK_LIFETIME_HELPER, SOCK_LIFETIME_BASE - 1, server,
                              check.mapped[1]):
        report.lifetime = (None, None, True)
        report.lifetime_detail = (
            "a RESPONSE-PORT reply never arrived even without waiting: the server may not "
            "support RESPONSE-PORT"
        )
        return

    async def probe(k: int, wait: float) -> tuple[float, bool]:
        sock = SOCK_LIFETIME_BASE + k
        o = await p.ask(sock, server)
        if o.mapped is None:
            return wait, False
        await p.sleep(wait)
        return wait, await p.redirected(SOCK_LIFETIME_HELPER, sock, server, o.mapped[1])

    results = await asyncio.gather(
        *(probe(k, t) for k, t in enumerate(lifetime_schedule(lifetime_max)))
    )
    report.lifetime = lifetime_bounds(dict(results))
    report.lifetime_detail = ", ".join(
        f"{t:g} s {'alive' if ok else 'gone'}" for t, ok in sorted(results)
    )
