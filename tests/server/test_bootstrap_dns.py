"""/bootstrap-dns: rollout test vectors, list parsing, TXT lookups, answers and counters.

TXT lookups go to a real DNS server on loopback (UDP and TCP, answers built by dnspython).

The rollout vectors are the ones in Tailscale's ``cmd/derper/bootstrap_dns_test.go``; the
last test puts our answer next to the real Go derper's for the same configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
from collections.abc import AsyncIterator

import aiohttp
import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from dns.rdtypes.ANY.TXT import TXT

from derpkit.server.frontdoor import bootstrap_dns as B
from derpkit.server.frontdoor.http import BROWSER_HEADERS, HttpOptions
from tests.goderper import start_derper

from .helpers import running_node

# ------------------------------------------------------------------------ rollout test

@pytest.mark.parametrize(
    ("ip", "want"),
    [("1.2.3.4", True), ("1.2.3.5", True), ("1.2.3.6", False), ("1.2.3.7", True),
     ("1.2.3.8", False), ("1.2.3.9", True), ("1.2.3.10", True)],
)
def test_go_vectors_at_half(ip: str, want: bool) -> None:
    assert B.remote_matches_percent(ip, 0.5) is want


def test_rollout_rate_over_a_slash16_and_edge_cases() -> None:
    base = ipaddress.ip_address("1.2.0.0")
    yes = sum(B.remote_matches_percent(str(base + i), 0.5) for i in range(65536))
    assert abs(yes / 65536 - 0.5) < 0.005
    assert B.remote_matches_percent("1.2.3.6", 1.0)
    assert not B.remote_matches_percent("1.2.3.4", 0.0)
    assert not B.remote_matches_percent("not-an-ip", 0.5)
    # IPv4-mapped IPv6 is the same client as plain IPv4.
    assert B.remote_matches_percent("::ffff:1.2.3.6", 0.5) is False
    # Loopback: a coin toss on every call.
    assert B.remote_matches_percent("127.0.0.1", 0.5, rng=lambda: 0.49)
    assert not B.remote_matches_percent("::1", 0.5, rng=lambda: 0.5)


# ------------------------------------------------------------------------ resolving

def fake_resolver(ips: dict[str, list[str]], txt: dict[str, list[str]]) -> B.Resolver:
    async def ip(name: str) -> list[str]:
        if name not in ips:
            raise OSError(f"lookup {name}: no such host")
        return list(ips[name])

    async def txt_lookup(name: str) -> list[str]:
        if name not in txt:
            raise OSError(f"lookup {name}: no such host")
        return list(txt[name])

    return B.Resolver(ip=ip, txt=txt_lookup)


async def test_resolve_list_percentages() -> None:
    r = fake_resolver(
        {"a.example": ["10.0.0.1"], "b.example": ["10.0.0.2"], "c.example": ["10.0.0.3"], "d.example": ["::2"]},
        {"a.pct": ["junk", "30", "101", "+40", " 50"], "b.pct": ["nope"]},
    )
    ents = await B.resolve_list("a.example/a.pct,b.example/b.pct,c.example/missing.pct,d.example,gone.example", r)
    assert ents.ips == {"a.example": ["10.0.0.1"], "b.example": ["10.0.0.2"], "c.example": ["10.0.0.3"], "d.example": ["::2"]}
    # last valid TXT value wins; no valid value or a failed TXT lookup means 0 (absent).
    assert ents.percent == {"a.example": 0.4, "d.example": 1.0}


class LoopbackDNS(asyncio.DatagramProtocol):
    """A real DNS server on loopback: UDP and TCP on one port, messages built by dnspython.

    It answers TXT from ``records`` (NXDOMAIN otherwise), or SERVFAIL to everything when
    ``servfail``. A UDP answer larger than the query allows (512 bytes, or its EDNS payload) is
    sent truncated (TC set, no answers), as a real server does, so the client must use TCP.
    """

    def __init__(self, records: dict[str, list[str]], *, servfail: bool = False) -> None:
        self.records = records
        self.servfail = servfail
        self.udp_queries = self.tcp_queries = self.truncated = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def reply(self, wire: bytes, max_size: int) -> bytes:
        query = dns.message.from_wire(wire)
        resp = dns.message.make_response(query)
        qname = query.question[0].name
        name = qname.to_text(omit_final_dot=True)
        if self.servfail:
            resp.set_rcode(dns.rcode.SERVFAIL)
        elif name not in self.records:
            resp.set_rcode(dns.rcode.NXDOMAIN)
        else:
            rrset = resp.find_rrset(
                resp.answer, qname, dns.rdataclass.IN, dns.rdatatype.TXT, create=True
            )
            for text in self.records[name]:
                raw = text.encode()
                chunks = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
                rrset.add(TXT(dns.rdataclass.IN, dns.rdatatype.TXT, chunks), ttl=60)
        if query.edns >= 0:
            max_size = max(max_size, query.payload)
        try:
            return resp.to_wire(max_size=max_size)
        except dns.exception.TooBig:
            self.truncated += 1
            resp.answer.clear()
            resp.flags |= dns.flags.TC
            return resp.to_wire()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.udp_queries += 1
        assert self.transport is not None
        self.transport.sendto(self.reply(data, 512), addr)

    async def _serve_tcp(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                (n,) = struct.unpack("!H", await r.readexactly(2))
                self.tcp_queries += 1
                out = self.reply(await r.readexactly(n), 65535)
                w.write(struct.pack("!H", len(out)) + out)
                await w.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            w.close()

    async def start(self) -> tuple[str, int]:
        """Bind UDP on an ephemeral port, then TCP on the same number (retry on a clash)."""
        loop = asyncio.get_running_loop()
        for _ in range(20):
            transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
            self.port = transport.get_extra_info("sockname")[1]
            try:
                self.tcp = await asyncio.start_server(self._serve_tcp, "127.0.0.1", self.port)
                return "127.0.0.1", self.port
            except OSError:
                transport.close()
        raise RuntimeError("no port free for both UDP and TCP")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        if self.tcp is not None:
            self.tcp.close()


@contextlib.asynccontextmanager
async def dns_server(records: dict[str, list[str]], **kw: bool) -> AsyncIterator[LoopbackDNS]:
    srv = LoopbackDNS(records, **kw)
    await srv.start()
    try:
        yield srv
    finally:
        srv.close()


async def test_txt_lookup_over_udp() -> None:
    async with dns_server({"pct.example": ["25", "x" * 300]}) as srv:
        server = ("127.0.0.1", srv.port)
        assert sorted(await B.lookup_txt("pct.example", [server])) == ["25", "x" * 300]
        with pytest.raises(OSError, match=r"^lookup missing\.example: no such host$"):
            await B.lookup_txt("missing.example", [server])
        assert srv.tcp_queries == 0 and srv.udp_queries == 2


async def test_txt_lookup_repeats_a_truncated_answer_over_tcp() -> None:
    big = ["y" * 1000, "z" * 1000]  # ~2 KB: more than the 1232-byte EDNS payload
    async with dns_server({"big.example": big}) as srv:
        assert sorted(await B.lookup_txt("big.example", [("127.0.0.1", srv.port)])) == big
        assert (srv.udp_queries, srv.truncated, srv.tcp_queries) == (1, 1, 1)


async def test_txt_lookup_asks_every_nameserver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dead nameserver or a SERVFAIL one does not hide the record the next one has."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        dead = ("127.0.0.1", s.getsockname()[1])  # nothing listens: costs one 2 s try
    async with dns_server({}, servfail=True) as bad, dns_server({"pct.example": ["7"]}) as good:
        bad_addr, good_addr = ("127.0.0.1", bad.port), ("127.0.0.1", good.port)
        assert await B.lookup_txt("pct.example", [dead, good_addr], timeout=4) == ["7"]
        assert await B.lookup_txt("pct.example", [bad_addr, good_addr]) == ["7"]
        assert bad.udp_queries == 1 and good.udp_queries == 2
        with pytest.raises(OSError, match=r"^lookup pct\.example: .*SERVFAIL"):
            await B.lookup_txt("pct.example", [bad_addr])
        # The environment override takes a list too (how a serve process is pointed here).
        monkeypatch.setenv("DERPKIT_DNS_SERVER", f"{bad_addr[0]}:{bad.port},[::1]:1,{good_addr[0]}:{good.port}")
        assert B._split_servers(os.environ["DERPKIT_DNS_SERVER"])[1] == ("::1", 1)
        monkeypatch.setenv("DERPKIT_DNS_SERVER", f"{bad_addr[0]}:{bad.port},{good_addr[0]}:{good.port}")
        assert await B.lookup_txt("pct.example") == ["7"]


# ------------------------------------------------------------------------ the route

async def _get(port: int, q: str | None = None) -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{port}/bootstrap-dns" + (f"?q={q}" if q is not None else "")
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def test_published_unpublished_and_counters() -> None:
    svc = B.BootstrapDNS(
        "pub.example,empty.example,dead.example",
        "hidden.example/hidden.pct,other.example",
        fake_resolver(
            {"pub.example": ["192.0.2.1"], "empty.example": [], "hidden.example": ["198.51.100.7"],
             "other.example": ["2001:db8::1"]},
            {"hidden.pct": ["50"]},
        ),
    )
    http = HttpOptions(bootstrap_dns=svc.handle, metrics_sources=[svc.families])
    async with running_node(http=http, services=[svc]) as node:
        await asyncio.wait_for(svc.refreshed.wait(), 5)
        status, headers, body = await _get(node.port)
        assert status == 200
        assert body == b'{\n\t"empty.example": [],\n\t"pub.example": [\n\t\t"192.0.2.1"\n\t]\n}'
        assert headers["Content-Type"] == "application/json"
        assert headers["Connection"] == "close"
        for k, v in BROWSER_HEADERS.items():
            assert headers[k] == v
        # Loopback client: the rollout coin decides.
        svc.rng = lambda: 0.1
        assert (await _get(node.port, "hidden.example"))[2] == b'{\n\t"hidden.example": [\n\t\t"198.51.100.7"\n\t]\n}'
        svc.rng = lambda: 0.9
        assert (await _get(node.port, "hidden.example"))[2] == body  # percent miss: published set
        assert (await _get(node.port, "other.example"))[2] == b'{\n\t"other.example": [\n\t\t"2001:db8::1"\n\t]\n}'
        assert (await _get(node.port, "pub.example"))[2] == body
        assert (await _get(node.port, "empty.example"))[2] == body
        assert (await _get(node.port, "nowhere.example"))[2] == body
        assert b"hidden" not in body and b"other" not in body
        counts = {f.name: f.samples[0][1] for f in svc.families()}
        assert counts == {
            "bootstrap_dns_requests": 7,
            "bootstrap_dns_published_hits": 1,
            "bootstrap_dns_published_misses": 1,
            "bootstrap_dns_unpublished_hits": 3,
            "bootstrap_dns_unpublished_misses": 2,  # hidden.example percent miss + nowhere
            "bootstrap_dns_unpublished_percent_misses": 1,
            "bootstrap_dns_queried_domains": 5,
        }
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{node.port}/debug/varz") as r:
            varz = await r.text()
        assert "\nbootstrap_dns_unpublished_percent_misses 1\n" in varz
        assert "# TYPE bootstrap_dns_queried_domains counter" in varz


def test_queried_names_set_resets_past_500() -> None:
    svc = B.BootstrapDNS("", "")
    for i in range(500):
        svc.answer(f"n{i}", "192.0.2.1")
    assert len(svc.queried) == 500
    svc.answer("one-more", "192.0.2.1")
    assert len(svc.queried) == 0


async def test_nothing_resolved_is_null_and_unconfigured_is_empty() -> None:
    svc = B.BootstrapDNS("dead.example", "", fake_resolver({}, {}))
    await svc.refresh()
    assert svc.answer("", "192.0.2.1") == b"null"
    assert B.BootstrapDNS("", "").answer("", "192.0.2.1") == b""


async def test_same_answer_as_go_derper() -> None:
    """Both servers resolve ``localhost`` from /etc/hosts; the bytes must be identical."""
    args = ("-bootstrap-dns-names", "localhost", "-unpublished-bootstrap-dns-names", "localhost")
    go = start_derper(extra_args=args)
    svc = B.BootstrapDNS("localhost", "localhost")
    try:
        async with running_node(http=HttpOptions(bootstrap_dns=svc.handle), services=[svc]) as node:
            await asyncio.wait_for(svc.refreshed.wait(), 5)
            async with asyncio.timeout(5):  # derper resolves in the background too
                while True:
                    async with aiohttp.ClientSession() as s, s.get(f"{go.base_url}/bootstrap-dns") as r:
                        if await r.read():
                            break
                    await asyncio.sleep(0.05)
            for q in (None, "localhost", "unknown.example"):
                async with aiohttp.ClientSession() as s:
                    suffix = f"?q={q}" if q else ""
                    async with s.get(f"{go.base_url}/bootstrap-dns{suffix}") as r:
                        go_status, go_headers, go_body = r.status, r.headers, await r.read()
                ours = await _get(node.port, q)
                assert ours[0] == go_status == 200
                assert ours[2] == go_body, (q, ours[2], go_body)
                for h in ("Content-Type", "Connection", *BROWSER_HEADERS):
                    assert ours[1].get(h) == go_headers.get(h), h
            assert json.loads(go_body)  # the comparison above was not between two empties
    finally:
        go.stop()
