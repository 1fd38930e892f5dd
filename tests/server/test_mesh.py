"""Mesh behaviour over real connections: watchers, privileges, forwarding between nodes."""

from __future__ import annotations

import asyncio
import ipaddress
import re

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerGoneReason, PeerPresentFlags
from derpkit.protocol.keys import MeshKey, NodePrivate

from .helpers import RawConn, exchange, nothing_arrives, recv_kind, recv_packet, running_node

MESH = MeshKey.generate()


async def test_watcher_sees_flood_then_changes() -> None:
    async with running_node(mesh_key=MESH) as node:
        early = await DerpClient.connect(node.url, is_prober=True)
        watcher = await DerpClient.connect(node.url, mesh_key=MESH, watch_conns=True)
        seen = {}
        for _ in range(2):  # the initial flood: the prober and the watcher itself
            p = await recv_kind(watcher, F.PeerPresent)
            seen[p.key] = p
        assert seen[early.public_key.raw].flags == PeerPresentFlags.IS_PROBER
        assert seen[watcher.public_key.raw].flags == PeerPresentFlags.IS_MESH_PEER
        assert seen[early.public_key.raw].ip == ipaddress.ip_address("127.0.0.1")
        assert seen[early.public_key.raw].port == early.local_address[1]  # type: ignore[index]
        late = await DerpClient.connect(node.url, ideal_node="other-node")
        p = await recv_kind(watcher, F.PeerPresent)
        assert p.key == late.public_key.raw and p.flags == PeerPresentFlags.NOT_IDEAL
        await late.close()
        g = await recv_kind(watcher, F.PeerGone)
        assert g.key == late.public_key.raw and g.reason == PeerGoneReason.DISCONNECTED
        assert node.server.gauges()["watchers"] == 1


async def test_duplicate_registration_is_announced_again_but_gone_only_once() -> None:
    async with running_node(mesh_key=MESH) as node:
        watcher = await DerpClient.connect(node.url, mesh_key=MESH, watch_conns=True)
        await recv_kind(watcher, F.PeerPresent)  # itself
        key = NodePrivate.generate()
        one = await DerpClient.connect(node.url, private_key=key)
        two = await DerpClient.connect(node.url, private_key=key)
        assert (await recv_kind(watcher, F.PeerPresent)).key == key.public().raw
        assert (await recv_kind(watcher, F.PeerPresent)).key == key.public().raw
        await one.close()
        assert await nothing_arrives(watcher, F.PeerGone)
        await two.close()
        assert (await recv_kind(watcher, F.PeerGone)).key == key.public().raw


async def test_wrong_mesh_key_is_a_regular_client_and_cannot_watch() -> None:
    async with running_node(mesh_key=MESH) as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        wrong = await DerpClient.connect(node.url, mesh_key=MeshKey.generate())
        # It connects (a wrong key is not a handshake failure) and can send packets...
        await wrong.send(a.public_key, b"hi")
        assert (await recv_packet(a)).data == b"hi"
        # ...but WatchConns closes it.
        await wrong.watch_conns()
        async with asyncio.timeout(5):
            while not wrong.closed:
                try:
                    await wrong.recv()
                except Exception:
                    break
        assert node.server.stats.conn_errors["not_mesh_peer"] == 1
        await exchange(a, b, 1)


async def test_forward_packet_needs_the_mesh_key() -> None:
    async with running_node(mesh_key=MESH) as node:
        target = await DerpClient.connect(node.url)
        mesh = await DerpClient.connect(node.url, mesh_key=MESH)
        src = NodePrivate.generate().public()
        await mesh.forward_packet(src, target.public_key, b"forwarded")
        got = await recv_packet(target)
        assert got.src == src.raw and got.data == b"forwarded"
        assert node.server.stats.packets_forwarded_in == 1
        assert node.server.stats.packets_received == 0  # forwarded packets are not "received"
        raw = await RawConn.open(node.port)
        raw.hello()
        raw.send(F.ForwardPacket(src.raw, target.public_key.raw, b"sneaky").encode())
        assert await raw.closed_by_server()
        assert await nothing_arrives(target, F.RecvPacket)


async def test_close_peer_closes_every_connection_of_the_key() -> None:
    async with running_node(mesh_key=MESH) as node:
        key = NodePrivate.generate()
        one = await DerpClient.connect(node.url, private_key=key)
        two = await DerpClient.connect(node.url, private_key=key)
        other = await DerpClient.connect(node.url)
        mesh = await DerpClient.connect(node.url, mesh_key=MESH)
        await mesh.close_peer(key.public())
        async with asyncio.timeout(5):
            while node.server.gauges()["current_connections"] != 2:
                await asyncio.sleep(0.02)
        for c in (one, two):
            try:
                async with asyncio.timeout(3):
                    while True:
                        await c.recv()
            except Exception:
                pass
            assert c.closed
        assert not other.closed


async def test_two_meshed_nodes_forward_both_ways_and_share_peer_gone() -> None:
    async with running_node(mesh_key=MESH) as n1, running_node(mesh_key=MESH) as n2:
        from derpkit.server.relay.mesh import MeshLink

        links = [
            MeshLink(n1.server, f"127.0.0.1:{n2.port}", scheme="http", retry_interval=0.2),
            MeshLink(n2.server, f"127.0.0.1:{n1.port}", scheme="http", retry_interval=0.2),
        ]
        for link in links:
            link.start()
        try:
            for link in links:
                await asyncio.wait_for(link.connected.wait(), 5)
            x = await DerpClient.connect(n1.url)
            y = await DerpClient.connect(n2.url)
            async with asyncio.timeout(5):
                while x.public_key.raw not in links[1].seen or y.public_key.raw not in links[0].seen:
                    await asyncio.sleep(0.02)
            await exchange(x, y, 3)
            assert n1.server.stats.packets_forwarded_out == 3
            assert n2.server.stats.packets_forwarded_in == 3
            assert n1.server.gauges()["clients_remote"] >= 1
            await y.close()
            gone = await recv_kind(x, F.PeerGone)
            assert gone.key == y.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        finally:
            for link in links:
                await link.stop()


async def test_self_mesh_is_detected() -> None:
    async with running_node(mesh_key=MESH) as node:
        from derpkit.server.relay.mesh import MeshLink

        link = MeshLink(node.server, f"127.0.0.1:{node.port}", scheme="http", retry_interval=0.2)
        link.start()
        assert link.task is not None
        await asyncio.wait_for(link.task, 5)  # returns by itself: no loop with ourselves
        assert node.server.gauges()["watchers"] == 0


def _hist(node, name: str) -> tuple[dict[str, int], float, int]:  # noqa: ANN001
    from derpkit.server.metrics import derp_families, render

    text = render(derp_families(node.server, 0))
    buckets = {m[0]: int(m[1]) for m in re.findall(rf'^{name}_bucket\{{le="([^"]+)"\}} (\d+)$', text, re.M)}
    total = float(re.search(rf"^{name}_sum (\S+)$", text, re.M)[1])  # type: ignore[index]
    count = int(re.search(rf"^{name}_count (\S+)$", text, re.M)[1])  # type: ignore[index]
    return buckets, total, count


async def test_watcher_updates_recorded_as_derper_batches() -> None:
    """derp_mesh_update_batch_size / _loop_count: the initial dump is one batch, then one per change."""
    async with running_node(mesh_key=MESH) as node:
        others = [await DerpClient.connect(node.url) for _ in range(3)]
        watcher = await DerpClient.connect(node.url, mesh_key=MESH, watch_conns=True)
        for _ in range(4):  # three clients and the watcher itself, in one batch
            await recv_kind(watcher, F.PeerPresent)
        await asyncio.sleep(0.05)
        buckets, total, count = _hist(node, "derp_mesh_update_batch_size")
        assert (count, total) == (1, 4)
        assert buckets["2"] == 0 and buckets["5"] == 1  # cumulative buckets: 4 falls in le=5
        late = await DerpClient.connect(node.url)
        await recv_kind(watcher, F.PeerPresent)
        await late.close()
        await recv_kind(watcher, F.PeerGone)
        await asyncio.sleep(0.05)
        buckets, total, count = _hist(node, "derp_mesh_update_batch_size")
        assert (count, total) == (3, 6)
        assert buckets["1"] == 2
        loops, loop_total, loop_count = _hist(node, "derp_mesh_update_loop_count")
        assert (loop_count, loop_total, loops["1"]) == (3, 3, 3)
        for c in (*others, watcher):
            await c.close()
