"""Run inside a private network namespace (``unshare -rn``): Go derper ``-dev`` and friends.

``derper -dev`` forces the fixed ports 3340 (DERP, plain HTTP) and 3478 (STUN) on every
address. Tests must not take fixed ports on the shared machine, so this script runs in a
fresh network namespace whose only interface is its own loopback; nothing can collide and
nothing is exposed. It prints one JSON object on stdout for the calling test to judge.

Usage: ``unshare -rn python3 -m tests.interop.netns_dev DERPER STUNC``
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import urllib.request

from tests.server.dev_serve_netns import wait_for_probe


def stunc(binary: str, host: str, port: int) -> dict[str, object]:
    p = subprocess.run([binary, "-timeout", "3s", host, str(port)], capture_output=True, text=True, timeout=10)
    return {"rc": p.returncode, "out": p.stdout + p.stderr}


def codec_exchange(family: int, addr: tuple[str, int]) -> dict[str, object]:
    """One request through derpkit's STUN client from a wildcard socket; the raw reply."""
    from derpkit.stun.client import query

    r = asyncio.run(query(addr[0], addr[1], family=family, timeout=3))
    return {"raw": r.raw.hex(), "ip": str(r.mapped_ip), "port": r.mapped_port,
            "txid_ok": r.raw[8:20] == r.txid, "local_ip": r.local[0], "local_port": r.local[1]}


async def client_session() -> dict[str, object]:
    from derpkit.client import DerpClient
    from derpkit.protocol import frames as F

    out: dict[str, object] = {}
    a = await DerpClient.connect("http://127.0.0.1:3340/derp")
    b = await DerpClient.connect("http://127.0.0.1:3340/derp")
    try:
        si = await a.wait_server_info(timeout=5)
        out["server_info_version"] = si.version
        out["server_key"] = a.server_key.hex()
        await a.send(b.public_key, b"a->b")
        await b.send(a.public_key, b"b->a")
        got = {}
        for me, c in (("b", b), ("a", a)):
            async with asyncio.timeout(5):
                while True:
                    f = await c.recv()
                    if isinstance(f, F.RecvPacket):
                        got[me] = [f.src.hex(), f.data.decode()]
                        break
        out["received"] = got
        out["a_key"] = a.public_key.hex()
        out["b_key"] = b.public_key.hex()
        out["rtt"] = await a.ping(timeout=3)
    finally:
        await a.close()
        await b.close()
    return out


async def derpkit_dual_stack(stunc_bin: str) -> dict[str, object]:
    from derpkit.server.stun import start_stun_server

    srv = await start_stun_server("", 0)
    port = srv.sockname[1]
    try:
        r4 = await asyncio.to_thread(stunc, stunc_bin, "127.0.0.1", port)
        r6 = await asyncio.to_thread(stunc, stunc_bin, "::1", port)
        c4 = await asyncio.to_thread(codec_exchange, socket.AF_INET, ("127.0.0.1", port))
    finally:
        srv.close()
    return {"stunc_v4": r4, "stunc_v6": r6, "codec_v4": c4, "counts": {f"{k}:{v}": n for (k, v), n in srv.counts.items()}}


def main() -> int:
    derper, stunc_bin = sys.argv[1], sys.argv[2]
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log = open("/dev/null", "w")  # noqa: SIM115
    p = subprocess.Popen([derper, "-dev"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: dict[str, object] = {}
    try:
        wait_for_probe(p, limit=15, name="derper -dev")
        out["client"] = asyncio.run(client_session())
        with urllib.request.urlopen("http://127.0.0.1:3340/debug/varz", timeout=5) as r:
            out["varz"] = r.read().decode()
        out["go_stunc_v4"] = stunc(stunc_bin, "127.0.0.1", 3478)
        out["go_stunc_v6"] = stunc(stunc_bin, "::1", 3478)
        out["codec_v4"] = codec_exchange(socket.AF_INET, ("127.0.0.1", 3478))
        out["codec_v6"] = codec_exchange(socket.AF_INET6, ("::1", 3478))
        out["derpkit_dual_stack"] = asyncio.run(derpkit_dual_stack(stunc_bin))
    finally:
        p.kill()
        stdout, _ = p.communicate(timeout=10)
        out["derper_log"] = stdout.decode(errors="replace")
        log.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
