"""NAT behaviour from STUN observations: RFC 4787 names, a verdict, what it means for Tailscale.

Pure functions over plain data, no sockets and no clocks: :mod:`derpkit.stunc.discover` runs
the RFC 5780 tests and hands the observations here, and the tests feed them by hand. Terms
(RFC 4787): *mapping* is how the NAT picks the public address for an inside socket,
*filtering* which outside sources may send to that mapping; each is endpoint-independent,
address-dependent or address-and-port-dependent.

Why it matters for Tailscale: a direct WireGuard path needs each side to reach the other's
public address. An endpoint-independent mapping publishes one address that works for every
peer; a dependent mapping gives each destination a new port nobody can predict, so the peer's
packets arrive at a port that does not exist; permissive filtering lets a peer's packets in
before we have sent to that exact address and port.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Final, Literal

from derpkit.gosyntax import join_host_port

__all__ = [
    "ADM",
    "APDM",
    "EIM",
    "Behaviour",
    "MappingVerdict",
    "NatReport",
    "Observation",
    "classify_filtering",
    "classify_mapping",
    "lifetime_bounds",
    "report_json",
    "summary",
    "tailscale_meaning",
    "verdict_text",
]

Addr = tuple[str, int]
Behaviour = Literal[
    "endpoint-independent",
    "address-dependent",
    "address-and-port-dependent",
    "destination-dependent",  # varies with the destination; not enough servers to say more
    "unknown",
]
EIM: Final = "endpoint-independent"
ADM: Final = "address-dependent"
APDM: Final = "address-and-port-dependent"


@dataclass(frozen=True)
class Observation:
    """One Binding transaction as the discovery saw it.

    ``sock`` numbers the local socket (tests that must not share one use different numbers),
    ``server`` is where the request went, ``change`` what CHANGE-REQUEST asked (``""``,
    ``"port"``, ``"ip+port"``). ``mapped``/``origin`` are ``None`` when nothing came back;
    ``error`` then says why (``timeout``, ``refused``, ``error_response 420``...). ``sent``
    counts the datagrams, so a "no reply" is read as evidence only after several.
    """

    sock: int
    server: Addr
    mapped: Addr | None
    origin: Addr | None = None
    response_origin: Addr | None = None
    other_address: Addr | None = None
    change: str = ""
    sent: int = 1
    rtt: float | None = None
    error: str | None = None

    @property
    def answered(self) -> bool:
        return self.mapped is not None


@dataclass(frozen=True)
class MappingVerdict:
    """The mapping behaviour and the comparisons that decided it (for ``-json`` and tests)."""

    behaviour: Behaviour
    detail: str
    mapped: tuple[tuple[Addr, Addr], ...]  # (server, mapped) from one socket


def classify_mapping(obs: list[Observation]) -> MappingVerdict:
    """RFC 4787 mapping behaviour from the mapped addresses one socket got from several servers.

    Endpoint-independent needs the same mapping toward at least two server *IPs*. A change
    between two ports of one server IP proves address-and-port-dependent; a change only
    between IPs, with ports of one IP agreeing, proves address-dependent. A change without a
    same-IP pair to compare is reported as destination-dependent (netcheck's
    MappingVariesByDestIP), which is at least address-dependent.
    """
    pairs = [(o.server, o.mapped) for o in obs if o.mapped is not None]
    seen: dict[Addr, Addr] = {}
    for server, mapped in pairs:
        seen.setdefault(server, mapped)
    table = tuple(seen.items())
    if len(seen) < 2:
        return MappingVerdict("unknown", "only one server answered; mapping needs two", table)
    ips = {s[0] for s in seen}
    if len(set(seen.values())) == 1:
        if len(ips) >= 2:
            return MappingVerdict(
                EIM, f"same mapping toward {len(seen)} server addresses on {len(ips)} IPs", table
            )
        return MappingVerdict(
            "unknown", "same mapping toward two ports of one IP; another server IP is needed",
            table,
        )
    by_ip: dict[str, set[Addr]] = {}
    for server, mapped in seen.items():
        by_ip.setdefault(server[0], set()).add(mapped)
    for ip, maps in by_ip.items():
        if len(maps) > 1:
            return MappingVerdict(
                APDM, f"a new mapping for another port of the same server IP {ip}", table
            )
    if any(sum(1 for s in seen if s[0] == ip) > 1 for ip in by_ip):
        return MappingVerdict(
            ADM, "a new mapping per server IP; ports of one IP share a mapping", table
        )
    return MappingVerdict(
        "destination-dependent",
        "the mapping differs between server IPs (no two ports of one IP to compare)",
        table,
    )


def classify_filtering(change_both: bool, change_port: bool | None) -> Behaviour:
    """RFC 5780 §4.4: a reply from the other IP *and* port passing means endpoint-independent
    filtering; else one from the other port only means address-dependent; else
    address-and-port-dependent. ``change_port=None``: that test was not run."""
    if change_both:
        return EIM
    if change_port is None:
        return "unknown"
    return ADM if change_port else APDM


def lifetime_bounds(alive: dict[float, bool]) -> tuple[float | None, float | None, bool]:
    """(longest idle time a mapping survived, shortest it did not, monotonic?) from probes.

    A mapping that survives 20 s but not 10 s means the NAT is not timing out by idle time
    alone (load, another flow); ``monotonic`` is then False and the bounds are the raw ones.
    """
    lived = [t for t, ok in alive.items() if ok]
    died = [t for t, ok in alive.items() if not ok]
    low = max(lived) if lived else None
    high = min(died) if died else None
    return low, high, low is None or high is None or low < high


@dataclass
class NatReport:
    """Everything one discovery learnt; ``verdict_text`` and ``report_json`` present it."""

    family: str
    server: Addr
    local: Addr | None
    mapped: Addr | None
    rfc5780: bool
    other_address: Addr | None
    mapping: MappingVerdict
    filtering: Behaviour = "unknown"
    filtering_detail: str = ""
    hairpinning: bool | None = None
    lifetime: tuple[float | None, float | None, bool] | None = None
    lifetime_detail: str = ""
    observations: list[Observation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def nat(self) -> bool | None:
        """True when the server saw another address than our socket's own; None if unknown."""
        if self.local is None or self.mapped is None:
            return None
        return self.local != self.mapped


def _fmt(addr: Addr | None) -> str:
    return join_host_port(*addr) if addr else "?"


def _seconds(t: float) -> str:
    return f"{t:g} s"


def summary(r: NatReport) -> str:
    """One line in RFC 4787 words, e.g. "NAT: endpoint-independent mapping,
    address-dependent filtering" (the paragraph explains it)."""
    head = "no NAT" if r.nat is False else "NAT" if r.nat else "NAT unknown"
    parts = []
    if r.nat is not False:
        parts.append(f"{r.mapping.behaviour} mapping")
    parts.append(f"{r.filtering} filtering")
    if r.hairpinning is not None:
        parts.append("hairpinning" if r.hairpinning else "no hairpinning")
    return f"{head}: {', '.join(parts)}"


def verdict_text(r: NatReport) -> str:
    """One paragraph a person can read: what the NAT does, then what it means for Tailscale."""
    parts: list[str] = []
    if r.nat is False:
        parts.append(
            f"No NAT: {_fmt(r.server)} sees this socket's own address {_fmt(r.mapped)}."
        )
    elif r.nat:
        parts.append(
            f"Behind a NAT: this socket {_fmt(r.local)} appears as {_fmt(r.mapped)}."
        )
    if r.nat is not False:
        m = r.mapping
        if m.behaviour == "unknown":
            parts.append(f"Mapping behaviour unknown ({m.detail}).")
        elif m.behaviour == "destination-dependent":
            parts.append(
                f"The mapping varies by destination ({m.detail}): address-dependent or "
                "address-and-port-dependent."
            )
        else:
            parts.append(f"{m.behaviour.capitalize()} mapping ({m.detail}).")
    if r.filtering == "unknown":
        why = r.filtering_detail or (
            "needs an RFC 5780 server: derpkit serve -stun-rfc5780, or coturn with two IPs"
        )
        parts.append(f"Filtering not measured ({why}).")
    else:
        parts.append(
            f"{r.filtering.capitalize()} filtering"
            + (f" ({r.filtering_detail})." if r.filtering_detail else ".")
        )
    if r.hairpinning is not None:
        parts.append(
            "The NAT hairpins (a packet to its own public address loops back inside)."
            if r.hairpinning
            else "No hairpinning: two devices behind this NAT cannot reach each other via "
            "the public address (Tailscale uses their LAN addresses instead)."
        )
    if r.lifetime is not None:
        low, high, mono = r.lifetime
        if high is not None and low is not None:
            parts.append(
                f"An idle mapping lives between {_seconds(low)} and {_seconds(high)}"
                + ("" if mono else " (not a clean idle timeout)") + "."
            )
        elif high is not None:
            parts.append(f"An idle mapping is gone within {_seconds(high)}.")
        elif low is not None:
            parts.append(f"An idle mapping lives at least {_seconds(low)}.")
        elif r.lifetime_detail:
            parts.append(f"Mapping lifetime not measured ({r.lifetime_detail}).")
    parts.append(tailscale_meaning(r))
    return " ".join(parts)


def tailscale_meaning(r: NatReport) -> str:
    """What the measured behaviour means for direct (peer-to-peer) vs DERP-relayed paths."""
    mapping = "endpoint-independent" if r.nat is False else r.mapping.behaviour
    filt = r.filtering
    if r.nat is False and filt == EIM:
        text = (
            "For Tailscale: this address is directly reachable, so peers can connect straight "
            "to it and direct connections work with practically everyone."
        )
    elif mapping == EIM and filt in (EIM, ADM):
        text = (
            "For Tailscale: direct connections work with practically every peer, even peers "
            "behind hard (address-and-port-dependent) NATs, because their packets are let in "
            "once this side has sent to their IP."
        )
    elif mapping == EIM:
        text = (
            "For Tailscale: direct connections work with most peers (any whose NAT also keeps "
            "one mapping per socket); a peer behind an address-and-port-dependent NAT will "
            "usually stay on DERP with this node."
        )
        if filt == "unknown":
            text += " (Filtering was not measured; permissive filtering would widen that.)"
    elif mapping in (APDM, ADM, "destination-dependent"):
        text = (
            "For Tailscale: this is a hard NAT. Every peer gets a different, unpredictable "
            "port, so direct connections work only with peers that have a public address or "
            "an easy (endpoint-independent, permissively filtering) NAT; with another hard "
            "NAT the traffic stays relayed through DERP. To fix it, make the NAT keep one "
            "mapping per socket (endpoint-independent / \"static port\"), forward a UDP port "
            "to the node (tailscaled --port), or enable UPnP/NAT-PMP/PCP."
        )
    else:
        text = (
            "For Tailscale: not enough answers to predict direct connections; add servers "
            "with -nat-servers or use an RFC 5780 server."
        )
    return text


def report_json(r: NatReport) -> dict[str, Any]:
    """The facts behind the verdict, for ``-json`` (addresses as ``ip:port`` strings)."""
    low, high, mono = r.lifetime if r.lifetime else (None, None, True)
    return {
        "family": r.family,
        "server": _fmt(r.server),
        "local_addr": _fmt(r.local) if r.local else None,
        "mapped_addr": _fmt(r.mapped) if r.mapped else None,
        "nat": r.nat,
        "rfc5780": r.rfc5780,
        "other_address": _fmt(r.other_address) if r.other_address else None,
        "mapping": r.mapping.behaviour,
        "mapping_detail": r.mapping.detail,
        "mapping_table": [
            {"server": _fmt(s), "mapped": _fmt(m)} for s, m in r.mapping.mapped
        ],
        "filtering": r.filtering,
        "filtering_detail": r.filtering_detail,
        "hairpinning": r.hairpinning,
        "lifetime_min_s": low,
        "lifetime_max_s": high,
        "lifetime_monotonic": mono,
        "lifetime_detail": r.lifetime_detail or None,
        "summary": summary(r),
        "verdict": verdict_text(r),
        "tailscale": tailscale_meaning(r),
        "notes": r.notes,
        "observations": [
            {
                **{k: v for k, v in asdict(o).items() if k not in ("server", "mapped", "origin", "rtt",
                                                                   "response_origin",
                                                                   "other_address")},
                "server": _fmt(o.server),
                "mapped": _fmt(o.mapped) if o.mapped else None,
                "origin": _fmt(o.origin) if o.origin else None,
                "response_origin": _fmt(o.response_origin) if o.response_origin else None,
                "other_address": _fmt(o.other_address) if o.other_address else None,
                "rtt_ms": round(o.rtt * 1000, 3) if o.rtt is not None else None,
            }
            for o in r.observations
        ],
    }
