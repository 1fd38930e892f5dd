"""Many DERP nodes in one process, for the prober's scale test: ``python -m tests.probe.fleet_server``.

Each node is a real ``DerpNode`` (the server ``derpkit serve`` runs) with its own DERP and STUN
listener on loopback; nodes are grouped into regions of ``--per-region`` and every node meshes
with the others of its region, as ``-mesh-with`` would. The DERP map is written to ``--map``;
"ready" is printed once every mesh link is up. It runs in its own process so the servers and
the prober do not share one event loop (or one core).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from derpkit.protocol.keys import MeshKey
from derpkit.server.node import DerpNode, NodeOptions
from tests.interop.helpers import mesh_nodes
from tests.interop.pki import Leaf


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--per-region", type=int, default=4)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--map", required=True)
    a = ap.parse_args()
    leaf = Leaf(a.cert, a.key, b"")  # type: ignore[arg-type]
    mesh = MeshKey.generate()
    nodes = [DerpNode(NodeOptions(ssl_context=leaf.server_context(), mesh_key=mesh)) for _ in range(a.nodes)]
    for n in nodes:
        await n.start()
    regions: dict[str, object] = {}
    for r in range(0, a.nodes, a.per_region):
        group = nodes[r:r + a.per_region]
        await mesh_nodes(group)
        rid = 900 + r // a.per_region
        regions[str(rid)] = {"RegionID": rid, "RegionCode": f"r{rid}", "RegionName": f"scale {rid}", "Nodes": [
            {"Name": f"{rid}{chr(97 + i)}", "RegionID": rid, "HostName": "localhost", "IPv4": "127.0.0.1",
             "DERPPort": n.port, "STUNPort": n.stun_port} for i, n in enumerate(group)]}
    await asyncio.to_thread(Path(a.map).write_text, json.dumps({"Regions": regions}))
    print("ready", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for n in nodes:
        await n.stop()


if __name__ == "__main__":
    asyncio.run(main())
