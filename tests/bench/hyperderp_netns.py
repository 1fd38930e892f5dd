"""Hyper-DERP relaying real DERP, inside a private network namespace.

The calling test (tests/bench/test_hyperderp.py) runs::

    unshare -rn python3 -m tests.bench.hyperderp_netns DERPGEN

Hyper-DERP binds 0.0.0.0, so it only runs in a namespace whose one interface is ``lo``
(brought up here); nothing in it reaches any other network. One ``bench.hyperderp``
server is started and driven by derpkit's own client (a pair and a bystander) and by
derpgen (Tailscale's Go DERP client); the script prints one JSON object of what it saw
for the test to judge.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from typing import Any

from bench.hyperderp import HyperDerpServer
from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.keys import NodePrivate

_RECV_BYTES = re.compile(r"^hyper_derp_recv_bytes_total (\d+)$", re.M)


async def _next_packet(c: DerpClient, timeout: float) -> F.RecvPacket | None:
    """The next RecvPacket within ``timeout`` (chatter skipped), or None."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                f = await c.recv()
                if isinstance(f, F.RecvPacket):
                    return f
    except TimeoutError:
        return None


async def derpkit_clients(url: str) -> dict[str, Any]:
    """A and B exchange packets; C, connected all along, must get none of them."""
    ka, kb, kc = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
    a = await DerpClient.connect(url, private_key=ka, timeout=10)
    b = await DerpClient.connect(url, private_key=kb, timeout=10)
    c = await DerpClient.connect(url, private_key=kc, timeout=10)
    try:
        sent = [os.urandom(n) for n in (1, 300, 1200, 4000)]
        for data in sent:
            await a.send(b.public_key, data)
        got_b = [await _next_packet(b, 5.0) for _ in sent]
        reply = os.urandom(64)
        await b.send(a.public_key, reply)
        got_a = await _next_packet(a, 5.0)
        leaked = await _next_packet(c, 1.0)
        rtt_c = await c.ping(timeout=5)  # C is alive: its silence was not a dead socket
        return {
            "server_key": str(a.server_key),
            "b_got": [p is not None and p.data == d for p, d in zip(got_b, sent, strict=True)],
            "b_src_is_a": [p is not None and p.src == a.public_key.raw for p in got_b],
            "a_got_reply": got_a is not None and got_a.data == reply,
            "a_src_is_b": got_a is not None and got_a.src == b.public_key.raw,
            "c_leak": leaked is not None,
            "c_ping_ms": rtt_c * 1000,
        }
    finally:
        for cl in (a, b, c):
            await cl.close()


def metric(srv: HyperDerpServer) -> int:
    text = srv.varz() or ""
    m = _RECV_BYTES.search(text)
    return int(m.group(1)) if m else -1


def main(derpgen: str) -> dict[str, Any]:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    out: dict[str, Any] = {}
    srv = HyperDerpServer(workers=1)
    with srv:
        srv.start()
        out["clients"] = asyncio.run(derpkit_clients(srv.url))
        before = metric(srv)
        p = subprocess.run([derpgen, "flood", "-url", srv.url, "-pairs", "4", "-size", "1200",
                            "-rate", "20000", "-duration", "2s"],
                           capture_output=True, text=True, timeout=60)
        out["derpgen"] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-500:]}
        out["recv_bytes_delta"] = metric(srv) - before
        try:
            HyperDerpServer(workers=1).start()
            out["second"] = "started"
        except RuntimeError as e:
            out["second"] = str(e)
    # The control socket's file stays behind; a new instance must still start.
    with HyperDerpServer(workers=2) as again:
        again.start()
        out["restart_workers"] = re.findall(r"^hyper_derp_workers (\d+)$", again.varz() or "", re.M)
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
