"""Tailscale's Go ``derpprobe -once`` judging derpkit nodes.

The verdict is derpprobe's own: its exit code and its ``good:``/``bad:`` lines. derpkit
only provides the servers (in-process ``DerpNode``s with TLS from a test CA that Go trusts
through ``SSL_CERT_FILE``; derpprobe's TLS probe knows no CertName pins).
"""

from __future__ import annotations

import pytest

from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.node import DerpNode, NodeOptions
from tests.goderper import require_go_tool

from .conftest import go_env
from .helpers import assert_lab_node_b_down, derp_map, mesh_nodes, probe_lines, run_go, write_map
from .pki import Leaf, TestCA, self_signed_ip

# Short intervals: each probe's timeout is 80 % of its interval, and -once waits for all.
FAST = ["-spread=false", "-interval", "5s", "-tls-interval", "5s", "-stun-interval", "5s",
        "-mesh-interval", "5s"]


def _node_entry(name: str, node: DerpNode, host: str = "localhost", **extra: object) -> dict:
    e = {"Name": name, "HostName": host, "IPv4": "127.0.0.1", "DERPPort": node.port,
         "STUNPort": node.stun_port}
    e.update(extra)
    return e


async def test_derpprobe_passes_two_meshed_nodes_then_reports_one_down(
    tmp_path, test_ca: TestCA, localhost_leaf: Leaf, trust_test_ca: TestCA
) -> None:
    derpprobe = require_go_tool("derpprobe")
    mesh = MeshKey.generate()
    (tmp_path / "mesh.key").write_text(mesh.hex() + "\n")
    a = DerpNode(NodeOptions(ssl_context=localhost_leaf.server_context(), mesh_key=mesh))
    b = DerpNode(NodeOptions(ssl_context=localhost_leaf.server_context(), mesh_key=mesh))
    await a.start()
    await b.start()
    try:
        await mesh_nodes([a, b])
        url = write_map(tmp_path / "map.json",
                        derp_map(900, "lab", [_node_entry("900a", a), _node_entry("900b", b)]))
        argv = [derpprobe, "-once", "-derp-map", url, "-mesh-psk-file",
                str(tmp_path / "mesh.key"), *FAST]
        run = await run_go(argv, env=go_env(test_ca), timeout=40)
        good, bad = probe_lines(run.output)
        assert run.returncode == 0, run.output
        assert not bad, run.output
        want = {"derpmap-probe", "derp/lab/900a/tls", "derp/lab/900b/tls",
                "derp/lab/900a/udp", "derp/lab/900b/udp",
                "derp/lab/900a/900a/mesh", "derp/lab/900a/900b/mesh",
                "derp/lab/900b/900a/mesh", "derp/lab/900b/900b/mesh"}
        assert set(good) == want, run.output
        # The cross-node mesh probes really crossed our mesh: both links forwarded.
        assert a.server.stats.packets_forwarded_out >= 1 and b.server.stats.packets_forwarded_out >= 1
        assert a.server.stats.packets_forwarded_in >= 1 and b.server.stats.packets_forwarded_in >= 1

        await b.stop()
        assert_lab_node_b_down(await run_go(argv, env=go_env(test_ca), timeout=40))
    finally:
        await a.stop()
        await b.stop()


async def test_derpprobe_rejects_a_node_whose_certificate_the_system_does_not_trust(
    tmp_path, test_ca: TestCA, localhost_leaf: Leaf
) -> None:
    """The same node without SSL_CERT_FILE: derpprobe's TLS probe must fail (it can fail)."""
    derpprobe = require_go_tool("derpprobe")
    a = DerpNode(NodeOptions(ssl_context=localhost_leaf.server_context(), stun_port=None))
    await a.start()
    try:
        url = write_map(tmp_path / "map.json",
                        derp_map(900, "lab", [_node_entry("900a", a, STUNPort=-1)]))
        env = go_env(test_ca)
        env["SSL_CERT_FILE"] = str(tmp_path / "empty.pem")
        (tmp_path / "empty.pem").write_text("")
        run = await run_go([derpprobe, "-once", "-derp-map", url, *FAST, "-mesh-interval", "0"],
                           env=env, timeout=30)
        good, bad = probe_lines(run.output)
        assert run.returncode == 1, run.output
        assert "certificate" in bad["derp/lab/900a/tls"], run.output
    finally:
        await a.stop()


async def test_go_derp_client_accepts_ip_only_node_pinned_by_certname(tmp_path, test_ca: TestCA) -> None:
    """derpprobe's DERP client honours ``CertName: sha256-raw:…`` for an IP-only node.

    Findings (Tailscale v1.102.3), asserted so a change in Go shows up here:
    - the bandwidth probe (DERP client, prober flag off) connects with the pin and relays
      through the node: a real Go client accepted the pinned self-signed certificate;
    - the mesh probe (prober flag on) fails by design: Go sends no SNI for an IP literal,
      so ``ConnectionState.ServerName`` is "" and derpprobe refuses it;
    - the TLS probe fails: it ignores CertName and verifies against system roots;
    - ``IPv6: "none"`` still creates a ``udp6`` probe, which times out.
    """
    derpprobe = require_go_tool("derpprobe")
    leaf = self_signed_ip(tmp_path / "ipcert")
    node = DerpNode(NodeOptions(ssl_context=leaf.server_context()))
    await node.start()
    try:
        m = derp_map(901, "ip", [_node_entry("901a", node, host="127.0.0.1", IPv6="none",
                                             CertName=leaf.cert_name)])
        url = write_map(tmp_path / "map.json", m)
        argv = [derpprobe, "-once", "-derp-map", url, "-spread=false", "-interval", "5s",
                "-tls-interval", "5s", "-stun-interval", "3s", "-mesh-interval", "5s",
                "-bw-interval", "5s", "-bw-probe-size-bytes", "4096"]
        run = await run_go(argv, env=go_env(test_ca), timeout=40)
        good, bad = probe_lines(run.output)
        assert "derp/ip/901a/901a/bw" in good, run.output
        assert node.server.stats.packets_received >= 1
        assert "derp/ip/901a/udp" in good, run.output
        assert 'TLS server name "" != derp hostname "127.0.0.1"' in bad["derp/ip/901a/901a/mesh"], run.output
        assert "derp/ip/901a/tls" in bad, run.output
        assert "derp/ip/901a/udp6" in bad, run.output
        assert run.returncode == 1

        # A wrong pin must make the same Go client refuse the node.
        wrong = "sha256-raw:" + "00" * 32
        m = derp_map(901, "ip", [_node_entry("901a", node, host="127.0.0.1", CertName=wrong)])
        url = write_map(tmp_path / "map.json", m)
        before = node.server.stats.packets_received
        run = await run_go([derpprobe, "-once", "-derp-map", url, "-spread=false", "-interval",
                            "5s", "-tls-interval", "0", "-stun-interval", "0", "-mesh-interval",
                            "0", "-bw-interval", "5s", "-bw-probe-size-bytes", "4096"],
                           env=go_env(test_ca), timeout=30)
        good, bad = probe_lines(run.output)
        assert "derp/ip/901a/901a/bw" in bad, run.output
        assert run.returncode == 1
        assert node.server.stats.packets_received == before
    finally:
        await node.stop()


pytestmark = pytest.mark.timeout(90)


async def test_go_client_reads_our_meta_certificate_and_uses_fast_start(tmp_path, test_ca: TestCA) -> None:
    """derpkit's own certificate path (``certs.py``: derper's self-signed IP certificate plus
    the meta-certificate at the end of the chain), pinned by the CertName derpkit logs.

    A Go DERP client that finds the meta-certificate in a TLS 1.3 handshake skips the 101
    and sends ``Derp-Fast-Start: 1``; our front door counts those upgrades, so this shows a
    real Go client both accepting the pin and reading the server key from our chain.
    """
    from derpkit.server.tls import certs

    derpprobe = require_go_tool("derpprobe")
    provider = certs.ManualCertProvider(str(tmp_path / "certs"), "127.0.0.1", poll_interval=0)
    key = NodePrivate.generate()
    node = DerpNode(NodeOptions(ssl_context=provider.ssl_context(key.public()), private_key=key))
    await node.start()
    try:
        m = derp_map(902, "meta", [_node_entry("902a", node, host="127.0.0.1", IPv6="none",
                                               CertName=provider.cert_name)])
        url = write_map(tmp_path / "map.json", m)
        run = await run_go([derpprobe, "-once", "-derp-map", url, "-spread=false", "-interval",
                            "5s", "-tls-interval", "0", "-stun-interval", "0", "-mesh-interval",
                            "0", "-bw-interval", "5s", "-bw-probe-size-bytes", "4096"],
                           env=go_env(test_ca), timeout=30)
        good, _bad = probe_lines(run.output)
        assert "derp/meta/902a/902a/bw" in good, run.output
        assert node.server.stats.fast_start_accepts >= 1, run.output
    finally:
        await node.stop()
