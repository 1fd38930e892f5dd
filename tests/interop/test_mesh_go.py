"""One Go derper and one derpkit node in one mesh, each ``-mesh-with`` the other.

Go derper's mesh always dials ``https://host/derp``, so both servers speak TLS for
``localhost`` with certificates from the test CA: Go trusts it through ``SSL_CERT_FILE``,
our MeshLink through the same variable (Python's default context honours it). Go's side
of every claim is read from Go: its ``/debug/varz`` counters and its log.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerGoneReason
from derpkit.protocol.keys import MeshKey
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.relay.mesh import MeshLink
from tests.goderper import GoDerper, start_derper

from .helpers import deliver_eventually, recv_kind, recv_packet, tls_varz
from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(60)




async def _start_pair(
    tmp_path, ca: TestCA, leaf: Leaf, ours_key: MeshKey, go_key: MeshKey
) -> tuple[DerpNode, GoDerper, MeshLink]:
    # derpkit first, so Go's mesh client finds it listening on its first try (Go retries
    # only every 5 s); then our link to Go, once Go listens.
    ours = DerpNode(NodeOptions(ssl_context=leaf.server_context(), mesh_key=ours_key))
    await ours.start()
    go = await asyncio.to_thread(
        start_derper, tmp_path / "go", tls=True, hostname="localhost", certdir=ca.dir,
        mesh_key_hex=go_key.hex(), extra_args=("-mesh-with", f"localhost:{ours.port}"),
        env={"SSL_CERT_FILE": str(ca.cert_path)},
    )
    link = MeshLink(ours.server, f"localhost:{go.port}", "127.0.0.1")
    ours.mesh.append(link)
    link.start()
    return ours, go, link


async def _wait(cond, timeout: float = 10.0, what: str = "") -> None:  # noqa: ANN001
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.05)


async def test_go_derper_and_derpkit_mesh_both_ways(
    tmp_path, test_ca: TestCA, localhost_leaf: Leaf, trust_test_ca: TestCA
) -> None:
    mesh = MeshKey.generate()
    ours, go, link = await _start_pair(tmp_path, test_ca, localhost_leaf, mesh, mesh)
    ctx = test_ca.client_context()
    clients: list[DerpClient] = []
    try:
        async with asyncio.timeout(10):
            await link.connected.wait()
        assert link.client is not None and link.client.server_key == go.public_key
        # Go's mesh client logged in to us with Go's server key and the right PSK.
        await _wait(lambda: go.public_key.raw in ours.server.clients)
        assert ours.server.stats.conn_errors["not_mesh_peer"] == 0

        x = await DerpClient.connect(go.url, ssl_context=ctx)
        y1 = await DerpClient.connect(f"https://localhost:{ours.port}/derp", ssl_context=ctx)
        y2 = await DerpClient.connect(f"https://localhost:{ours.port}/derp", ssl_context=ctx)
        clients += [x, y1, y2]

        # Each asserts the sender's key and the payload on arrival.
        await deliver_eventually(x, y1, b"x to y1 via Go->derpkit", within=10)
        await deliver_eventually(y1, x, b"y1 to x via derpkit->Go", within=10)
        await deliver_eventually(y2, x, b"y2", within=10)
        await deliver_eventually(x, y2, b"x to y2", within=10)

        varz = tls_varz(go.base_url, test_ca)
        assert varz["derp_packets_forwarded_out"] >= 2, varz  # Go -> us
        assert varz["derp_packets_forwarded_in"] >= 2, varz  # us -> Go
        assert varz["derp_clients_remote"] >= 2, varz  # y1, y2 learned over the mesh
        assert ours.server.stats.packets_forwarded_in >= 2
        assert ours.server.stats.packets_forwarded_out >= 2

        # PeerGone crosses derpkit -> Go: y1 leaves; Go tells x, who had heard from y1.
        await y1.close()
        gone = await recv_kind(x, F.PeerGone)
        assert gone.key == y1.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        # ... and Go -> derpkit: x leaves; we tell y2.
        await x.close()
        gone = await recv_kind(y2, F.PeerGone)
        assert gone.key == x.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        varz = tls_varz(go.base_url, test_ca)
        assert varz["derp_peer_gone_disconnected_frames"] >= 1, varz
    finally:
        for c in clients:
            await c.close()
        await ours.stop()
        go.stop()


async def test_wrong_mesh_key_is_refused_on_both_sides(
    tmp_path, test_ca: TestCA, localhost_leaf: Leaf, trust_test_ca: TestCA
) -> None:
    ours, go, link = await _start_pair(
        tmp_path, test_ca, localhost_leaf, MeshKey.generate(), MeshKey.generate()
    )
    try:
        # Go's mesh client logs in to us (a wrong key is still a regular client), sends
        # WatchConns, and we close it: counted by reason.
        await _wait(lambda: ours.server.stats.conn_errors["not_mesh_peer"] >= 1)
        # Our link to Go: Go refuses its WatchConns the same way and logs why.
        await _wait(lambda: "insufficient permissions" in go.log(), what="Go log")
        assert re.search(r"derp: 127\.0\.0\.1:\d+: insufficient permissions", go.log()), go.log()
        # And Go's own mesh client reports our refusal as its watch connection ending.
        await _wait(lambda: f'mesh("localhost:{ours.port}"): Recv: derp.Recv: EOF' in go.log())
        # Neither side learned anything over the broken mesh.
        assert not link.connected.is_set() or not link.seen
        varz = tls_varz(go.base_url, test_ca)
        assert varz.get("derp_watchers", 0) == 0, varz
        assert ours.server.gauges()["watchers"] == 0
        x = await DerpClient.connect(go.url, ssl_context=test_ca.client_context())
        y = await DerpClient.connect(
            f"https://localhost:{ours.port}/derp", ssl_context=test_ca.client_context()
        )
        try:
            await x.send(y.public_key, b"nowhere")
            with pytest.raises(TimeoutError):
                await recv_packet(y, timeout=0.5)
        finally:
            await x.close()
            await y.close()
    finally:
        await ours.stop()
        go.stop()
