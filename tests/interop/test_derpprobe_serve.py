"""Go ``derpprobe -once`` against two ``derpkit serve`` processes, set up as an operator would.

tests/interop/test_derpprobe.py judges in-process nodes; this is the deployment shape: two
separate processes with ``-certmode manual`` certificates for ``localhost`` (from the test
CA, which Go trusts through ``SSL_CERT_FILE``), STUN on, and ``-mesh-with`` naming both nodes
(each skips itself, as derper does) with one ``-mesh-psk-file``. derpprobe's verdict (exit
code and ``good:``/``bad:`` lines) and both processes' own counters decide.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from derpkit.protocol.keys import MeshKey
from tests.goderper import free_port, require_go_tool
from tests.server.serve_proc import ServeProc, start_serve

from .conftest import go_env
from .helpers import assert_lab_node_b_down, derp_map, probe_lines, run_go, tls_varz, write_map
from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(90)

FAST = ["-spread=false", "-interval", "5s", "-tls-interval", "5s", "-stun-interval", "5s",
        "-mesh-interval", "5s"]


async def _wait_log(sp: ServeProc, text: str, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not any(text in line for line in sp.log):
            await asyncio.sleep(0.05)


async def test_derpprobe_passes_two_serve_processes_meshed_by_flags(
    tmp_path: Path, test_ca: TestCA, localhost_leaf: Leaf
) -> None:
    derpprobe = require_go_tool("derpprobe")
    psk = tmp_path / "mesh.key"
    psk.write_text(MeshKey.generate().hex() + "\n")
    ports = [free_port() for _ in range(2)]
    stun_ports = [free_port(socket.SOCK_DGRAM) for _ in range(2)]
    mesh_with = ",".join(f"localhost:{p}" for p in ports)
    env = {"SSL_CERT_FILE": str(test_ca.cert_path)}  # our mesh links verify each other too
    nodes: list[ServeProc] = []
    try:
        for i in range(2):
            nodes.append(await start_serve(
                "-a", f"localhost:{ports[i]}", "-stun-port", str(stun_ports[i]), "-http-port", "-1",
                "-c", str(tmp_path / f"node{i}.key"), "-certmode", "manual", "-hostname", "localhost",
                "-certdir", str(test_ca.dir), "-mesh-psk-file", str(psk), "-mesh-with", mesh_with,
                env=env))
        # Node 0 dialled node 1 before it listened, so its link waits one retry (5 s).
        for i, other in ((0, 1), (1, 0)):
            await _wait_log(nodes[i], f"mesh localhost:{ports[other]}: connected", timeout=15)
        m = derp_map(900, "lab", [
            {"Name": f"900{c}", "HostName": "localhost", "IPv4": "127.0.0.1", "DERPPort": ports[i],
             "STUNPort": stun_ports[i]} for i, c in enumerate("ab")])
        url = write_map(tmp_path / "map.json", m)
        argv = [derpprobe, "-once", "-derp-map", url, "-mesh-psk-file", str(psk), *FAST]
        run = await run_go(argv, env=go_env(test_ca), timeout=40)
        good, bad = probe_lines(run.output)
        assert run.returncode == 0 and not bad, run.output
        assert set(good) == {"derpmap-probe", "derp/lab/900a/tls", "derp/lab/900b/tls",
                             "derp/lab/900a/udp", "derp/lab/900b/udp",
                             "derp/lab/900a/900a/mesh", "derp/lab/900a/900b/mesh",
                             "derp/lab/900b/900a/mesh", "derp/lab/900b/900b/mesh"}, run.output
        # The cross-node probes crossed the flag-configured mesh, and STUN was answered.
        for i in range(2):
            v = await asyncio.to_thread(tls_varz, f"https://localhost:{ports[i]}", test_ca)
            assert v["derp_packets_forwarded_out"] >= 1 and v["derp_packets_forwarded_in"] >= 1, v
            assert v['stun_requests{disposition="success"}'] >= 1, v
            assert v["derp_watchers"] == 1

        # One process stops (SIGTERM, as an operator or a crash would): derpprobe names it.
        assert await nodes[1].stop() == 0
        assert_lab_node_b_down(await run_go(argv, env=go_env(test_ca), timeout=40))
    finally:
        for sp in nodes:
            await sp.stop()


CERTNAME_LOG_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')


async def test_go_client_accepts_ip_only_serve_process_pinned_by_the_logged_certname(
    tmp_path: Path, test_ca: TestCA
) -> None:
    """The operator's path for an IP-only relay, end to end: ``derpkit serve -certmode manual
    -hostname 127.0.0.1`` makes its own certificate and logs the DERP-map node with its
    CertName; that logged pin goes into the map; derpprobe's DERP client (a real Go client)
    accepts it, relays through the node and uses fast start from our meta-certificate."""
    derpprobe = require_go_tool("derpprobe")
    port, stun_port = free_port(), free_port(socket.SOCK_DGRAM)
    sp = await start_serve("-a", f"127.0.0.1:{port}", "-stun-port", str(stun_port), "-http-port", "-1",
                           "-certmode", "manual", "-hostname", "127.0.0.1",
                           "-certdir", str(tmp_path / "certs"))
    try:
        pins = [m.group(1) for line in sp.log if (m := CERTNAME_LOG_RE.search(line))]
        assert len(pins) == 1, "".join(sp.log)

        def bw_probe(cert_name: str) -> list[str]:
            m = derp_map(903, "ip", [{"Name": "903a", "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                                      "IPv6": "none", "DERPPort": port, "STUNPort": stun_port,
                                      "CertName": cert_name}])
            return [derpprobe, "-once", "-derp-map", write_map(tmp_path / "map.json", m),
                    "-spread=false", "-interval", "5s", "-tls-interval", "0", "-stun-interval", "0",
                    "-mesh-interval", "0", "-bw-interval", "5s", "-bw-probe-size-bytes", "4096"]

        run = await run_go(bw_probe(pins[0]), env=go_env(test_ca), timeout=30)
        good, bad = probe_lines(run.output)
        assert "derp/ip/903a/903a/bw" in good, run.output
        v = await asyncio.to_thread(_plain_varz_over_tls, port)
        assert v["derp_packets_received"] >= 1 and v["derpkit_fast_start_accepts"] >= 1, v

        run = await run_go(bw_probe("sha256-raw:" + "00" * 32), env=go_env(test_ca), timeout=30)
        good, bad = probe_lines(run.output)
        assert "derp/ip/903a/903a/bw" in bad and run.returncode == 1, run.output
    finally:
        await sp.stop()


def _plain_varz_over_tls(port: int) -> dict[str, float]:
    """``/debug/varz`` of a self-signed IP node (no CA to trust: the pin was checked above)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/debug/varz", timeout=5, context=ctx) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-z_]+) (\S+)$", text, re.M)}
