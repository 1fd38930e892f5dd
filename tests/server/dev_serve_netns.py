"""Run inside a private network namespace (``unshare -rn``): the real ``derpkit serve -dev``.

``-dev`` forces the fixed ports 3340 (DERP, plain HTTP) and 3478 (STUN). Tests must not take
fixed ports on the shared machine, so the calling test runs this script in a fresh network
namespace whose only interface is its own loopback: nothing collides, nothing is exposed.

The script starts ``python -m derpkit serve`` exactly as an operator would, with ``-dev`` on
the command line (``flag``) or only ``DEV=true`` in the environment (``env``), with ``$HOME``
and the working directory pointing at an empty directory of its own. It then drives the
server through its fixed addresses, sends SIGTERM, and prints one JSON object with what it
saw, for the calling test to judge.

Usage: ``unshare -rn python3 -m tests.server.dev_serve_netns flag|env WORKDIR``
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

DERP_URL = "http://127.0.0.1:3340/derp"
STUN_ADDR = ("127.0.0.1", 3478)


def files_under(root: Path) -> list[str]:
    """Every file and directory below ``root``, relative, sorted (what the server created)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def wait_for_probe(proc: subprocess.Popen[bytes], limit: float = 20.0, name: str = "derpkit serve -dev") -> None:
    """Poll the fixed dev address until the server answers; bounded in time.

    tests/interop/netns_dev.py uses it for Go's ``derper -dev`` too: same address, same wait."""
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen("http://127.0.0.1:3340/derp/probe", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.05)


async def derp_session() -> dict[str, Any]:
    """Two clients on the dev address: one packet each way, with the sender's key."""
    from derpkit.client import DerpClient
    from derpkit.protocol import frames as F

    a = await DerpClient.connect(DERP_URL)
    b = await DerpClient.connect(DERP_URL)
    out: dict[str, Any] = {"a_key": a.public_key.raw.hex(), "b_key": b.public_key.raw.hex()}
    try:
        await a.wait_server_info(timeout=5)
        await b.wait_server_info(timeout=5)
        await a.send(b.public_key, b"a->b over -dev")
        await b.send(a.public_key, b"b->a over -dev")
        got: dict[str, list[str]] = {}
        for me, c in (("b", b), ("a", a)):
            async with asyncio.timeout(5):
                while True:
                    f = await c.recv()
                    if isinstance(f, F.RecvPacket):
                        got[me] = [f.src.hex(), f.data.decode()]
                        break
        out["received"] = got
    finally:
        await a.close()
        await b.close()
    return out


def stun_exchange() -> dict[str, Any]:
    """A Tailscale-shaped Binding request to the fixed STUN port; the raw answer and our socket."""
    from derpkit.stun.client import query

    r = asyncio.run(query(*STUN_ADDR, timeout=3, local=("127.0.0.1", 0)))
    return {
        "raw": r.raw.hex(), "from": list(r.origin), "ip": str(r.mapped_ip), "port": r.mapped_port,
        "txid_ok": r.raw[8:20] == r.txid, "local_ip": r.local[0], "local_port": r.local[1],
    }


def tls_refused_on_3340() -> str:
    """What a TLS ClientHello to the dev port gets: dev mode serves plain HTTP only."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection(("127.0.0.1", 3340), timeout=3) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost"):
            return "handshake completed"
    except (ssl.SSLError, OSError) as e:
        return f"{type(e).__name__}: {e}"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def main() -> int:
    mode, work = sys.argv[1], Path(sys.argv[2])
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    home = work / "home"
    run_dir = work / "cwd"
    home.mkdir(parents=True)
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTNAME", "XDG_CACHE_HOME", "DEV")}
    env["HOME"] = str(home)
    argv = [sys.executable, "-m", "derpkit", "serve"]
    if mode == "flag":
        argv.append("-dev")
    else:
        env["DEV"] = "true"
    proc = subprocess.Popen(argv, cwd=run_dir, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"mode": mode}
    try:
        wait_for_probe(proc)
        out["derp"] = asyncio.run(derp_session())
        out["stun"] = stun_exchange()
        out["tls_on_3340"] = tls_refused_on_3340()
        out["port_443_open"] = port_open(443)
        out["port_80_open"] = port_open(80)
        proc.send_signal(signal.SIGTERM)
        out["exit_code"] = proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
        log, _ = proc.communicate(timeout=10)
        out["log"] = log.decode(errors="replace")
    out["files_in_home"] = files_under(home)
    out["files_in_cwd"] = files_under(run_dir)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
