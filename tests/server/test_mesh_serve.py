"""Mesh between real ``derpkit serve`` processes: -mesh-with and -mesh-psk-file.

Plain-HTTP serve processes on loopback mesh over ``http://host:port/derp`` (a derpkit
extension; derper always dials https). Each node lists every node, itself included: self
is detected by server key, as derper does.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import tempfile

import aiohttp

from derpkit.client import DerpClient
from derpkit.protocol.keys import NodePrivate

from .helpers import deliver_eventually, free_ports
from .serve_proc import ServeProc, start_serve


class Mesh:
    def __init__(self, n: int) -> None:
        self.dir = tempfile.mkdtemp(prefix="derpkit-mesh-")
        self.psk = os.path.join(self.dir, "mesh.key")
        with open(self.psk, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        self.ports = free_ports(n)
        self.procs: list[ServeProc | None] = [None] * n

    def args(self, i: int) -> list[str]:
        peers = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        return ["-a", f"127.0.0.1:{self.ports[i]}", "-stun=false", "-c", os.path.join(self.dir, f"{i}.key"),
                "-mesh-psk-file", self.psk, "-mesh-with", peers]

    async def start(self, i: int) -> ServeProc:
        self.procs[i] = await start_serve(*self.args(i))
        return self.procs[i]

    async def stop_all(self) -> None:
        for p in self.procs:
            if p is not None and p.proc.returncode is None:
                p.proc.kill()
                await p.proc.wait()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}/derp"


async def varz(port: int) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/debug/varz") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def test_two_nodes_forward_both_ways() -> None:
    mesh = Mesh(2)
    try:
        await asyncio.gather(mesh.start(0), mesh.start(1))
        a = await DerpClient.connect(mesh.url(0))
        b = await DerpClient.connect(mesh.url(1))
        try:
            await deliver_eventually(a, b, b"a on node 0 -> b on node 1")
            await deliver_eventually(b, a, b"b -> a")
        finally:
            await a.close()
            await b.close()
        v0, v1 = await varz(mesh.ports[0]), await varz(mesh.ports[1])
        assert v0["derp_packets_forwarded_out"] >= 1 and v1["derp_packets_forwarded_in"] >= 1
        assert v1["derp_packets_forwarded_out"] >= 1 and v0["derp_packets_forwarded_in"] >= 1
        assert v0["derp_watchers"] == 1 and v1["derp_watchers"] == 1  # the peer, not itself
        assert any("detected self-connect" in line for line in mesh.procs[0].log)
    finally:
        await mesh.stop_all()


async def test_three_nodes_a_to_c_restart_heals_and_metrics_count() -> None:
    mesh = Mesh(3)
    try:
        await asyncio.gather(*(mesh.start(i) for i in range(3)))
        a = await DerpClient.connect(mesh.url(0))
        c_key = NodePrivate.generate()
        c = await DerpClient.connect(mesh.url(2), private_key=c_key)
        await deliver_eventually(a, c, b"A -> C")
        va, vc = await varz(mesh.ports[0]), await varz(mesh.ports[2])
        assert va["derp_packets_forwarded_out"] >= 1
        assert vc["derp_packets_forwarded_in"] >= 1
        assert va["derp_clients_remote"] >= 1  # C's client, learned over the mesh
        # A packet for a key nobody has is dropped and counted at A.
        before = va['derp_packets_dropped{reason="unknown_dest",kind="other"}']
        await a.send(NodePrivate.generate().public(), b"nobody")
        await asyncio.sleep(0.2)
        va = await varz(mesh.ports[0])
        assert va['derp_packets_dropped{reason="unknown_dest",kind="other"}'] == before + 1

        await drop_after_leaving_is_counted_on_c(mesh, a)

        # Kill node C abruptly; restart it on the same port with the same key.
        await c.close()
        proc = mesh.procs[2]
        assert proc is not None
        proc.proc.kill()
        await proc.proc.wait()
        await mesh.start(2)
        c = await DerpClient.connect(mesh.url(2), private_key=c_key)
        try:
            await deliver_eventually(a, c, b"A -> C after restart", within=20)
            b = await DerpClient.connect(mesh.url(1))
            try:
                await deliver_eventually(b, c, b"B -> C after restart", within=20)
            finally:
                await b.close()
        finally:
            await a.close()
            await c.close()
    finally:
        await mesh.stop_all()


async def drop_after_leaving_is_counted_on_c(mesh: Mesh, a: DerpClient) -> None:
    """A packet A forwards to a client that has just left C is dropped by C, as
    ``unknown_dest_on_fwd``: a drop only the mesh can cause, counted on C and not on A.

    To make "A still thinks the client is on C" certain rather than a race, node A is
    paused (SIGSTOP) while a's packet is sent and *then* the client leaves C (C has removed
    it before A runs again). On SIGCONT A finds a's packet first, in the order the data
    arrived, and forwards it with the map it still has; only then does it read C's
    peer-gone notice.
    """
    leaving = await DerpClient.connect(mesh.url(2))
    await deliver_eventually(a, leaving, b"A learns where it is")
    pa, pc = mesh.procs[0], mesh.procs[2]
    assert pa is not None and pc is not None
    va0, vc0 = await varz(mesh.ports[0]), await varz(mesh.ports[2])
    drop_fwd = 'derp_packets_dropped{reason="unknown_dest_on_fwd",kind="other"}'
    drop_local = 'derp_packets_dropped{reason="unknown_dest",kind="other"}'
    pa.proc.send_signal(signal.SIGSTOP)
    try:
        await a.send(leaving.public_key, b"too late")
        await asyncio.sleep(0.2)  # in A's socket buffer, unread
        await leaving.close()
        async with asyncio.timeout(5):  # C has removed the client (C keeps running)
            while (await varz(mesh.ports[2]))["derp_clients_local"] >= vc0["derp_clients_local"]:
                await asyncio.sleep(0.05)
    finally:
        pa.proc.send_signal(signal.SIGCONT)
    async with asyncio.timeout(5):
        while (await varz(mesh.ports[2]))[drop_fwd] == vc0[drop_fwd]:
            await asyncio.sleep(0.05)
    va, vc = await varz(mesh.ports[0]), await varz(mesh.ports[2])
    assert vc[drop_fwd] == vc0[drop_fwd] + 1
    assert vc["derp_packets_forwarded_in"] == vc0["derp_packets_forwarded_in"] + 1
    assert va["derp_packets_forwarded_out"] == va0["derp_packets_forwarded_out"] + 1
    assert va[drop_local] == va0[drop_local] and va[drop_fwd] == va0[drop_fwd]


async def test_mesh_with_needs_a_key() -> None:
    port = free_ports(1)[0]
    proc = await asyncio.create_subprocess_exec(
        "python3", "-m", "derpkit", "serve", "-a", f"127.0.0.1:{port}", "-stun=false",
        "-c", os.path.join(tempfile.mkdtemp(), "k"), "-mesh-psk-file", "", "-mesh-with", "127.0.0.1:1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"--mesh-with requires --mesh-psk-file" in err
