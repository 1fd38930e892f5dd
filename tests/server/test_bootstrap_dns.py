"""/bootstrap-dns: rollout test vectors, list parsing, TXT lookups, answers and counters.

The rollout vectors are the ones in Tailscale's ``cmd/derper/bootstrap_dns_test.go``; the
last test puts our answer next to the real Go derper's for the same configuration.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import struct

import aiohttp
import pytest

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


class TinyDNS(asyncio.DatagramProtocol):
    """A one-zone UDP DNS server answering TXT queries (for the stdlib TXT client)."""

    def __init__(self, records: dict[str, list[str]]) -> None:
        self.records = records
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        qid = struct.unpack("!H", data[:2])[0]
        off, labels = 12, []
        while data[off]:
            n = data[off]
            labels.append(data[off + 1 : off + 1 + n].decode())
            off += 1 + n
        question = data[12 : off + 5]
        name = ".".join(labels)
        if name not in self.records:
            reply = struct.pack("!HHHHHH", qid, 0x8183, 1, 0, 0, 0) + question
        else:
            answers = b""
            for text in self.records[name]:
                raw = text.encode()
                chunks = b"".join(bytes([len(raw[i : i + 255])]) + raw[i : i + 255] for i in range(0, len(raw), 255))
                answers += b"\xc0\x0c" + struct.pack("!HHIH", 16, 1, 60, len(chunks)) + chunks
            reply = struct.pack("!HHHHHH", qid, 0x8180, 1, len(self.records[name]), 0, 0) + question + answers
        assert self.transport is not None
        self.transport.sendto(reply, addr)


async def test_txt_lookup_over_udp() -> None:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: TinyDNS({"pct.example": ["25", "x" * 300]}), local_addr=("127.0.0.1", 0)
    )
    try:
        server = transport.get_extra_info("sockname")[:2]
        assert await B.lookup_txt("pct.example", server) == ["25", "x" * 300]
        with pytest.raises(OSError, match="no such host"):
            await B.lookup_txt("missing.example", server)
    finally:
        transport.close()


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
