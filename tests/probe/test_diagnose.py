"""Each diagnosis line, caused for real: a fault set up on loopback, the probe run, the line asserted.

Servers are real: derpkit's ``DerpNode`` (the server ``derpkit serve`` runs) in this process,
plain aiohttp servers where the fault *is* "some other web server", and bare sockets where the
fault is "nothing answers". tests/probe/test_once.py does the same against ``derpkit serve``
processes and Go derper.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from derpkit.protocol.keys import MeshKey
from derpkit.server.admission.verify import Admission, LocalTailscaled
from derpkit.server.node import DerpNode, NodeOptions
from tests.goderper import free_port
from tests.interop.pki import Leaf, TestCA, self_signed_ip

from .helpers import dmap, issue, node, probe_once, result

pytestmark = pytest.mark.timeout(60)


@contextlib.asynccontextmanager
async def derp_node(**kw: object) -> AsyncIterator[DerpNode]:
    n = DerpNode(NodeOptions(**kw))  # type: ignore[arg-type]
    await n.start()
    try:
        yield n
    finally:
        await n.stop()


@contextlib.asynccontextmanager
async def http_server(ssl_context: ssl.SSLContext | None, status: int = 200) -> AsyncIterator[int]:
    """An ordinary web server that answers every request with ``status`` and a page."""

    async def any_path(request: web.Request) -> web.Response:
        return web.Response(status=status, text="<html>welcome to nginx</html>")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_path)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_healthy_node_all_good_and_single_node_warning(tmp_path: Path, localhost_leaf: Leaf) -> None:
    async with derp_node(ssl_context=localhost_leaf.server_context()) as n:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", n.port, stun=n.stun_port)])))
        for name in ("derpmap-probe", "derp/lab/900a/tls", "derp/lab/900a/udp", "derp/lab/900a/900a/mesh"):
            assert result(p, name).ok, (name, result(p, name))
        assert set(p.probes) == {"derpmap-probe", "derp/lab/900a/tls", "derp/lab/900a/udp", "derp/lab/900a/900a/mesh"}
        assert any("region 900 (lab) has one node, 900a: a single point of failure" in w for w in p.all_warnings())
        assert result(p, "derp/lab/900a/tls").details["days_left"] > 19


async def test_refused_port_says_nothing_listens(tmp_path: Path, ca: TestCA) -> None:
    port = free_port()
    p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])))
    r = result(p, "derp/lab/900a/tls")
    assert not r.ok and "connection refused" in r.error
    assert r.diagnosis.startswith(f"TCP connection refused: the host is up but nothing listens on 127.0.0.1:{port}")
    m = result(p, "derp/lab/900a/900a/mesh")
    assert not m.ok and m.diagnosis.startswith("TCP connection refused"), m


async def test_tcp_timeout_is_not_refusal(tmp_path: Path, ca: TestCA) -> None:
    """A listener whose accept queue is full drops SYNs: the connect times out, it is not refused."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(0)
    port = lst.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):  # fill the backlog (Linux admits backlog+1)
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        await asyncio.sleep(0.2)
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])), "-mesh-interval", "0")
        r = result(p, "derp/lab/900a/tls")
        assert not r.ok
        assert "timed out" in r.diagnosis and "dropped on the way" in r.diagnosis, r
        assert "refused" not in r.diagnosis
    finally:
        for s in fillers:
            s.close()
        lst.close()


async def test_plain_http_derp_server_where_tls_is_expected(tmp_path: Path) -> None:
    """A derpkit node without TLS answers the ClientHello with an HTTP 400: "does not speak
    TLS", and never a TCP problem."""
    async with derp_node(stun_port=None) as n:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", n.port)])),
                             "-tls-interval", "2s", "-mesh-interval", "2s")
        for name in ("derp/lab/900a/tls", "derp/lab/900a/900a/mesh"):
            r = result(p, name)
            assert not r.ok, (name, r)
            assert r.diagnosis.startswith(f"127.0.0.1:{n.port} does not speak TLS (plain HTTP?)"), (name, r)


async def test_tls_handshake_unanswered_after_tcp_worked(tmp_path: Path) -> None:
    """A listener that accepts and then says nothing (a plain-HTTP server waiting for a
    request line, a stuck proxy): the TCP connect worked, so this is a TLS timeout, not
    dropped SYNs."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    srv = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])),
                             "-tls-interval", "2s", "-mesh-interval", "2s")
        for name in ("derp/lab/900a/tls", "derp/lab/900a/900a/mesh"):
            r = result(p, name)
            assert not r.ok, (name, r)
            assert r.diagnosis.startswith(f"TCP to 127.0.0.1:{port} works, but no TLS answer came"), (name, r)
            assert "dropped" not in r.diagnosis
    finally:
        for w in held:
            w.close()
        srv.close()


async def test_certificate_for_another_name(tmp_path: Path, ca: TestCA) -> None:
    other = issue(ca, tmp_path / "c", "other", ["other.example"], ips=())
    async with derp_node(ssl_context=other.server_context(), stun_port=None) as n:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", n.port)])), "-mesh-interval", "0")
        r = result(p, "derp/lab/900a/tls")
        assert not r.ok
        assert r.diagnosis.startswith("certificate is for other.example, not localhost"), r


async def test_certname_dns_name_is_honoured(tmp_path: Path, ca: TestCA) -> None:
    """Domain fronting: HostName localhost, certificate for CertName other.example (derpprobe's
    TLS probe ignores CertName and would fail this node)."""
    other = issue(ca, tmp_path / "c", "front", ["other.example"], ips=())
    async with derp_node(ssl_context=other.server_context(), stun_port=None) as n:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", n.port, CertName="other.example")])))
        assert result(p, "derp/lab/900a/tls").ok and result(p, "derp/lab/900a/900a/mesh").ok


async def test_expired_and_not_yet_valid_certificates(tmp_path: Path, ca: TestCA) -> None:
    expired = issue(ca, tmp_path / "c", "exp", ["localhost"], not_before=dt.timedelta(days=-30),
                    not_after=dt.timedelta(days=-3))
    future = issue(ca, tmp_path / "c", "fut", ["localhost"], not_before=dt.timedelta(days=2),
                   not_after=dt.timedelta(days=60))
    async with derp_node(ssl_context=expired.server_context(), stun_port=None) as a, \
            derp_node(ssl_context=future.server_context(), stun_port=None) as b:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", a.port), node("900b", b.port)])),
                             "-mesh-interval", "0")
        ra, rb = result(p, "derp/lab/900a/tls"), result(p, "derp/lab/900b/tls")
        assert not ra.ok and ra.diagnosis.startswith("certificate expired 3 days ago"), ra
        assert not rb.ok and rb.diagnosis.startswith("certificate not valid until"), rb
        # The DERP connection of a mesh probe is explained with the same certificate facts.
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", a.port)])), "-tls-interval", "0")
        m = result(p, "derp/lab/900a/900a/mesh")
        assert not m.ok and m.diagnosis.startswith("certificate expired 3 days ago"), m
        assert re.search(r"\(in 4[78] hours\)", rb.diagnosis), rb


async def test_expiry_window_scales_with_lifetime(tmp_path: Path, ca: TestCA) -> None:
    """3 days left of 90 fails (Go's 7-day rule); 4 days left of a 6-day certificate does not."""
    long_ = issue(ca, tmp_path / "c", "long", ["localhost"], not_before=dt.timedelta(days=-87),
                  not_after=dt.timedelta(days=3))
    short = issue(ca, tmp_path / "c", "short", ["localhost"], not_before=dt.timedelta(days=-2),
                  not_after=dt.timedelta(days=4))
    async with derp_node(ssl_context=long_.server_context(), stun_port=None) as a, \
            derp_node(ssl_context=short.server_context(), stun_port=None) as b:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", a.port), node("900b", b.port)])),
                             "-mesh-interval", "0")
        ra, rb = result(p, "derp/lab/900a/tls"), result(p, "derp/lab/900b/tls")
        assert not ra.ok and "one of the certs expires in" in ra.error, ra
        assert "renewal is not happening" in ra.diagnosis
        assert rb.ok, rb


async def test_self_signed_ip_node_pinned_passes_wrong_pin_shows_presented_pin(tmp_path: Path) -> None:
    leaf = self_signed_ip(tmp_path / "ip")
    async with derp_node(ssl_context=leaf.server_context()) as n:
        good = node("901a", n.port, host="127.0.0.1", stun=n.stun_port, IPv4="127.0.0.1", IPv6="none",
                    CertName=leaf.cert_name)
        p = await probe_once(tmp_path, dmap((901, "ip", [good])))
        assert result(p, "derp/ip/901a/tls").ok and result(p, "derp/ip/901a/901a/mesh").ok
        assert "derp/ip/901a/udp6" not in p.probes  # IPv6 "none": no probe that can only fail

        wrong = dict(good, CertName="sha256-raw:" + "00" * 32)
        p = await probe_once(tmp_path, dmap((901, "ip", [wrong])))
        for name in ("derp/ip/901a/tls", "derp/ip/901a/901a/mesh"):
            r = result(p, name)
            assert not r.ok
            assert r.diagnosis.startswith(f"pin mismatch: the map pins sha256-raw:{'00' * 32}, "
                                          f"the server presents {leaf.cert_name}"), (name, r)

        # Without a pin the same node is explained as self-signed, with the pin to paste.
        p = await probe_once(tmp_path, dmap((901, "ip", [dict(good, CertName="")])), "-mesh-interval", "0")
        r = result(p, "derp/ip/901a/tls")
        assert not r.ok and "is self-signed: pin it in the map with" in r.diagnosis
        assert leaf.cert_name in r.diagnosis


async def test_http_server_in_front_answers_without_upgrade(tmp_path: Path, localhost_leaf: Leaf) -> None:
    async with http_server(localhost_leaf.server_context()) as port:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])))
        assert result(p, "derp/lab/900a/tls").ok  # TLS itself is fine
        m = result(p, "derp/lab/900a/900a/mesh")
        assert not m.ok
        assert m.diagnosis.startswith("TLS is fine but GET /derp answered HTTP 200 without upgrading to DERP: "
                                      "an HTTP proxy"), m


async def test_plain_http_port_does_not_speak_tls(tmp_path: Path, ca: TestCA) -> None:
    async with http_server(None) as port:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])))
        for name in ("derp/lab/900a/tls", "derp/lab/900a/900a/mesh"):
            r = result(p, name)
            assert not r.ok and "does not speak TLS (plain HTTP?)" in r.diagnosis, (name, r)


async def test_load_balancer_two_servers_behind_one_address(tmp_path: Path, localhost_leaf: Leaf) -> None:
    """A round-robin TCP forwarder (what an L4 load balancer does) in front of two unmeshed nodes."""
    async with derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as a, \
            derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as b:
        backends = [a.port, b.port]
        turn = 0

        async def forward(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal turn
            port = backends[turn % 2]
            turn += 1
            ur, uw = await asyncio.open_connection("127.0.0.1", port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(r, uw), pipe(ur, w))

        lb = await asyncio.start_server(forward, "127.0.0.1", 0)
        port = lb.sockets[0].getsockname()[1]
        try:
            p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", port)])), "-tls-interval", "0")
            m = result(p, "derp/lab/900a/900a/mesh")
            assert not m.ok
            assert "two connections to 900a reached different servers" in m.diagnosis, m
            assert a.private_key.public().raw.hex()[:16] in m.diagnosis
            assert b.private_key.public().raw.hex()[:16] in m.diagnosis
            assert any("node 900a answered with 2 different server keys" in w for w in p.all_warnings())
        finally:
            lb.close()


async def test_mesh_key_refused_vs_missing_vs_right(tmp_path: Path, localhost_leaf: Leaf) -> None:
    """A server that admits nobody but its mesh peers (tailscaled unreachable: fail closed)."""
    right = MeshKey.generate()
    adm = Admission(tailscaled=LocalTailscaled(str(tmp_path / "no-tailscaled.sock")))
    try:
        async with derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None, mesh_key=right,
                             admit=adm) as n:
            m = dmap((900, "lab", [node("900a", n.port)]))
            p = await probe_once(tmp_path, m, "-tls-interval", "0", mesh_key=MeshKey.generate())
            r = result(p, "derp/lab/900a/900a/mesh")
            assert not r.ok and "the mesh key is not this server's" in r.diagnosis, r
            p = await probe_once(tmp_path, m, "-tls-interval", "0")
            r = result(p, "derp/lab/900a/900a/mesh")
            assert not r.ok and "give the prober the mesh key (-mesh-psk-file)" in r.diagnosis, r
            p = await probe_once(tmp_path, m, "-tls-interval", "0", mesh_key=right)
            assert result(p, "derp/lab/900a/900a/mesh").ok
    finally:
        await adm.stop()


async def test_stun_silent_vs_port_unreachable_vs_v4_only(tmp_path: Path, localhost_leaf: Leaf) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        async with derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as off, \
                derp_node(ssl_context=localhost_leaf.server_context()) as v4only:
            m = dmap((900, "lab", [
                node("900a", off.port, stun=silent.getsockname()[1]),
                node("900b", off.port, stun=free_port(socket.SOCK_DGRAM)),
                node("900c", v4only.port, stun=v4only.stun_port, IPv6="::1"),
            ]))
            p = await probe_once(tmp_path, m, "-stun-interval", "3s", "-mesh-interval", "0", "-tls-interval", "0")
            a, b = result(p, "derp/lab/900a/udp"), result(p, "derp/lab/900b/udp")
            assert not a.ok and a.diagnosis.startswith("STUN silent: no reply and no ICMP error"), a
            assert not b.ok and b.diagnosis.startswith("STUN port unreachable:"), b
            assert result(p, "derp/lab/900c/udp").ok
            c6 = result(p, "derp/lab/900c/udp6")
            assert not c6.ok and c6.diagnosis.startswith("IPv4 STUN to this node works, IPv6 does not"), c6
            assert result(p, "derp/lab/900c/udp").details["mapped"].startswith("127.0.0.1:")
    finally:
        silent.close()


async def test_map_ipv4_differs_from_dns_and_port80_missing(tmp_path: Path, localhost_leaf: Leaf) -> None:
    async with derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as n:
        m = dmap((900, "lab", [node("900a", n.port, IPv4="127.0.0.2", CanPort80=True)],),
                 (901, "two", [node("901a", n.port), node("901b", n.port)]))
        p = await probe_once(tmp_path, m, "-tls-interval", "0", "-mesh-interval", "0")
        w = p.all_warnings()
        assert any("node 900a: the map's IPv4 127.0.0.2 is not what localhost resolves to (127.0.0.1)" in x for x in w), w
        assert any("node 900a: CanPort80 is set but http://127.0.0.2/generate_204 did not answer 204" in x for x in w), w
        assert not any("901" in x and "single point" in x for x in w), w


async def test_port80_answering_204_gives_no_warning(tmp_path: Path, localhost_leaf: Leaf) -> None:
    async def gen204(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/generate_204", gen204)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.3", 80)
        try:
            await site.start()
        except OSError as e:
            pytest.skip(f"cannot listen on 127.0.0.3:80 here: {e}")
        m = dmap((900, "lab", [node("900a", 1, host="127.0.0.3", IPv4="127.0.0.3", CanPort80=True)]))
        p = await probe_once(tmp_path, m, "-tls-interval", "0", "-mesh-interval", "0")
        assert not any("CanPort80" in x for x in p.all_warnings()), p.all_warnings()
    finally:
        await runner.cleanup()


async def test_crl_revoked_leaf_fails_unrevoked_passes_missing_issuer_explained(tmp_path: Path, ca: TestCA) -> None:
    from cryptography import x509

    served: dict[str, bytes] = {}

    async def crl_handler(request: web.Request) -> web.Response:
        return web.Response(body=served[request.match_info["n"]])

    app = web.Application()
    app.router.add_get("/{n}.crl", crl_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    try:
        bad = issue(ca, tmp_path / "c", "revoked", ["localhost"], crl_url=base + "/a.crl", fullchain=True)
        ok = issue(ca, tmp_path / "c", "fine", ["localhost"], crl_url=base + "/b.crl", fullchain=True)
        lone = issue(ca, tmp_path / "c", "lone", ["localhost"], crl_url=base + "/b.crl")
        serial = x509.load_der_x509_certificate(bad.der).serial_number
        served["a"] = ca.crl([serial])
        served["b"] = ca.crl([serial + 1])
        async with derp_node(ssl_context=bad.server_context(), stun_port=None) as a, \
                derp_node(ssl_context=ok.server_context(), stun_port=None) as b, \
                derp_node(ssl_context=lone.server_context(), stun_port=None) as c:
            m = dmap((900, "lab", [node("900a", a.port), node("900b", b.port), node("900c", c.port)]))
            p = await probe_once(tmp_path, m, "-mesh-interval", "0")
        ra = result(p, "derp/lab/900a/tls")
        assert not ra.ok and ra.error.startswith("CRL verification failed for ") and "has been revoked on" in ra.error, ra
        assert "revoked by its CA" in ra.diagnosis
        assert result(p, "derp/lab/900b/tls").ok
        rc = result(p, "derp/lab/900c/tls")
        assert not rc.ok and "does not send its intermediate certificate" in rc.diagnosis, rc
    finally:
        await runner.cleanup()


async def test_two_nodes_of_a_region_not_meshed(tmp_path: Path, localhost_leaf: Leaf) -> None:
    async with derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as a, \
            derp_node(ssl_context=localhost_leaf.server_context(), stun_port=None) as b:
        p = await probe_once(tmp_path, dmap((900, "lab", [node("900a", a.port), node("900b", b.port)])),
                             "-tls-interval", "0")
        assert result(p, "derp/lab/900a/900a/mesh").ok and result(p, "derp/lab/900b/900b/mesh").ok
        r = result(p, "derp/lab/900a/900b/mesh")
        assert not r.ok and r.diagnosis.startswith("900a did not forward to 900b within"), r
        assert "the two nodes are not meshed" in r.diagnosis
