"""``/bootstrap-dns``: IPs for key names, for clients whose DNS is broken (spec derper-cli §3.6).

Two lists: ``-bootstrap-dns-names`` is resolved and published to everyone as one JSON
object; ``-unpublished-bootstrap-dns-names`` is answered only to a client that asks for
that name with ``?q=`` and passes the name's rollout test. An unpublished entry may be
``name/txtname``: the TXT record of ``txtname`` holds the rollout percentage 0-100.

Names resolve through the system resolver (A and AAAA, like Go's ``LookupIP``); TXT records
through dnspython's asyncio resolver, which tries every nameserver in /etc/resolv.conf in turn
and repeats a truncated UDP answer over TCP. Both lists are refreshed at start-up and then
every 10 minutes. The counters carry derper's names (``bootstrap_dns_requests``,
``…_published_hits`` …).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import random
import re
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver
from aiohttp import web

from derpkit.server import metrics

log = logging.getLogger("derpkit.server")

REFRESH_INTERVAL = 600.0
REFRESH_TIMEOUT = 60.0
QUERIED_NAMES_LIMIT = 500
_ATOI_RE = re.compile(r"^[+-]?[0-9]+\Z")
_M64 = (1 << 64) - 1
_PCG_MUL = (2549297995355413924 << 64) | 4865540595714422341
_PCG_INC = (6364136223846793005 << 64) | 1442695040888963407
_DXSM_MUL = 0xDA942042E4DD58B5


# --------------------------------------------------------------------------- rollout test

def _pcg_float(seed_hi: int, seed_lo: int) -> float:
    """The first Float64 of Go's math/rand/v2 ``NewPCG(seed_hi, seed_lo)``."""
    state = ((seed_hi << 64) | seed_lo) * _PCG_MUL + _PCG_INC
    state &= (1 << 128) - 1
    hi, lo = state >> 64, state & _M64
    h = hi ^ (hi >> 32)
    h = (h * _DXSM_MUL) & _M64
    h ^= h >> 48
    h = (h * (lo | 1)) & _M64
    return (h & ((1 << 53) - 1)) / (1 << 53)


def remote_matches_percent(ip_text: str, percent: float, rng: Callable[[], float] = random.random) -> bool:
    """derper's ``remoteAddrMatchesPercent``: deterministic per IP, a coin toss on loopback."""
    if percent == 0:
        return False
    if percent == 1:
        return True
    try:
        ip = ipaddress.ip_address(ip_text.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return rng() < 0.5
    b16 = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    s1, s2 = struct.unpack("<QQ", b16)
    return percent > _pcg_float(s1, s2)


# --------------------------------------------------------------------------- resolving

async def lookup_ip(name: str) -> list[str]:
    """A and AAAA records together, as Go's ``LookupIP("ip", name)``."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    out: list[str] = []
    for family, _, _, _, addr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = str(addr[0]).split("%")[0]
            if ip not in out:
                out.append(ip)
    if not out:
        raise OSError(f"no such host {name}")
    return out


#: Go's resolver falls back to these when resolv.conf names no nameserver.
_DEFAULT_NAMESERVERS = (("127.0.0.1", 53), ("::1", 53))
#: EDNS0 UDP payload size Go's resolver advertises (the DNS flag day 2020 value); bigger
#: answers come back truncated and are fetched again over TCP.
_EDNS_PAYLOAD = 1232


def _split_servers(text: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (IPv6 in brackets) from ``$DERPKIT_DNS_SERVER``."""
    out = []
    for item in text.split(","):
        host, _, port = item.strip().rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _resolver(servers: Sequence[tuple[str, int]] | None) -> dns.asyncresolver.Resolver:
    """A fresh resolver for one refresh: ``servers``, else ``$DERPKIT_DNS_SERVER`` (tests point
    TXT lookups at a loopback server with it), else every nameserver in /etc/resolv.conf.

    Fresh each time (a refresh runs every 10 minutes) so an edited resolv.conf is picked up, as
    Go re-reads it; and without a cache, so a changed rollout percentage is seen at once.
    """
    env = os.environ.get("DERPKIT_DNS_SERVER", "")
    if servers is None and env:
        servers = _split_servers(env)
    if servers is None:
        try:
            resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
        except dns.resolver.NoResolverConfiguration:
            servers = _DEFAULT_NAMESERVERS
    if servers is not None:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in servers]
    resolver.use_edns(0, 0, _EDNS_PAYLOAD)
    return resolver


async def lookup_txt(
    name: str, servers: Sequence[tuple[str, int]] | None = None, timeout: float = 5.0
) -> list[str]:
    """TXT records of ``name``, each record's strings joined (Go's ``LookupTXT``).

    dnspython's resolver asks the nameservers in order until one answers (a dead or SERVFAIL
    server does not hide the record) and repeats a truncated UDP answer over TCP, which a
    hand-written UDP client did not. ``timeout`` bounds the whole lookup. Failures are
    :class:`OSError` with a one-line reason, as :func:`lookup_ip`'s are.
    """
    resolver = _resolver(servers)
    try:
        answer = await resolver.resolve(name, "TXT", lifetime=timeout, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        raise OSError(f"lookup {name}: no such host") from None
    except dns.exception.DNSException as e:
        raise OSError(f"lookup {name}: {e}") from None
    if answer.rrset is None:  # the name exists but has no TXT record
        return []
    return [b"".join(rd.strings).decode(errors="replace") for rd in answer.rrset]


@dataclass
class Resolver:
    """The two lookups bootstrap DNS needs; tests substitute their own."""

    ip: Callable[[str], Awaitable[list[str]]] = lookup_ip
    txt: Callable[[str], Awaitable[list[str]]] = lookup_txt


@dataclass
class Entries:
    ips: dict[str, list[str]] = field(default_factory=dict)
    percent: dict[str, float] = field(default_factory=dict)


async def resolve_list(names: str, resolver: Resolver) -> Entries:
    """derper's ``resolveList``: entries split on ``,`` untrimmed, each ``name[/txtname]``."""
    ret = Entries()
    for ent in names.split(","):
        name, _, txt_name = ent.partition("/")
        try:
            ips = await resolver.ip(name)
        except Exception as e:  # noqa: BLE001 - any lookup failure just leaves the name out
            log.info("bootstrap DNS lookup %r: %s", name, e)
            continue
        ret.ips[name] = ips
        if not txt_name:
            ret.percent[name] = 1.0
            continue
        try:
            values = await resolver.txt(txt_name)
        except Exception as e:  # noqa: BLE001
            log.info("bootstrap DNS lookup %r: %s", txt_name, e)
            continue
        for v in values:
            if _ATOI_RE.match(v):  # Go's strconv.Atoi: optional sign, ASCII digits only
                n = int(v)
                if 0 <= n <= 100:
                    ret.percent[name] = n / 100
    return ret


def _go_json(obj: object) -> bytes:
    """Go's ``json.MarshalIndent(v, "", "\\t")`` for a map of string lists (keys sorted)."""
    return json.dumps(obj, indent="\t", sort_keys=True, separators=(",", ": ")).encode()


# --------------------------------------------------------------------------- the service

class BootstrapDNS:
    """Caches, refresh loop, the request handler and derper's counters."""

    def __init__(self, published: str = "", unpublished: str = "", resolver: Resolver | None = None) -> None:
        self.published_names = published
        self.unpublished_names = unpublished
        self.resolver = resolver or Resolver()
        self.published: Entries | None = None
        self.published_json = b""
        self.unpublished: Entries | None = None
        self.queried: set[str] = set()
        self.requests = 0
        self.published_hits = 0
        self.published_misses = 0
        self.unpublished_hits = 0
        self.unpublished_misses = 0
        self.unpublished_percent_misses = 0
        self.refreshed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.rng: Callable[[], float] = random.random

    @property
    def enabled(self) -> bool:
        return bool(self.published_names or self.unpublished_names)

    async def refresh(self) -> None:
        if self.published_names:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    ents = await resolve_list(self.published_names, self.resolver)
            except TimeoutError:
                ents = Entries()
            for ips in ents.ips.values():
                random.shuffle(ips)
            self.published = ents
            self.published_json = _go_json(ents.ips) if ents.ips else b"null"
        if self.unpublished_names:
            try:
                async with asyncio.timeout(REFRESH_TIMEOUT):
                    self.unpublished = await resolve_list(self.unpublished_names, self.resolver)
            except TimeoutError:
                self.unpublished = Entries()
        self.refreshed.set()

    async def _loop(self, interval: float) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # pragma: no cover - keep serving the last answer
                log.exception("bootstrap DNS refresh failed")
            await asyncio.sleep(interval)

    async def start(self, interval: float = REFRESH_INTERVAL) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(interval), name="bootstrap-dns")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def answer(self, q: str, remote_ip: str) -> bytes:
        """The body for one request; counts as derper does."""
        self.requests += 1
        if q:
            self.queried.add(q)
            if len(self.queried) > QUERIED_NAMES_LIMIT:
                self.queried.clear()
            un = self.unpublished
            if un is not None and un.ips.get(q):
                self.unpublished_hits += 1
                if remote_matches_percent(remote_ip, un.percent.get(q, 0.0), self.rng):
                    return _go_json({q: un.ips[q]})
                self.unpublished_percent_misses += 1
            pub = self.published
            if pub is not None and q in pub.ips:
                if pub.ips[q]:
                    self.published_hits += 1
                else:
                    self.published_misses += 1
            else:
                self.unpublished_misses += 1
        return self.published_json

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        body = self.answer(request.query.get("q", ""), peer[0] if peer else "")
        return web.Response(
            body=body, status=200, headers={"Content-Type": "application/json", "Connection": "close"}
        )

    def families(self) -> Iterator[metrics.Family]:
        for name in (
            "requests", "published_hits", "published_misses", "unpublished_hits",
            "unpublished_misses", "unpublished_percent_misses",
        ):
            yield metrics.counter("bootstrap_dns_" + name, getattr(self, name))
        yield metrics.counter("bootstrap_dns_queried_domains", len(self.queried))
