"""/debug/ access from a source address that is not loopback, inside a private network namespace.

On the host every test client is on loopback, which derper always lets into ``/debug/``;
only the ``X-Forwarded-For`` refusal could be shown there. The calling test runs::

    unshare -rn python3 -m tests.server.debug_netns [GO_DERPER]

Inside that namespace (its own network stack: nothing here reaches the host's or any other
network) this script brings ``lo`` up and adds ``10.99.0.1/32`` to it, so a client bound to
that address reaches the server from a source that is neither loopback nor a Tailscale IP.
For each environment case it starts ``derpkit serve`` and, when given, Go ``derper`` (both
plain HTTP, listening on every address), asks ``/debug/``, ``/debug/varz`` and ``/`` from
both sources, and prints one JSON object for the test to compare.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUTSIDE = "10.99.0.1"
LOOPBACK = "127.0.0.1"

#: name -> environment for the server. "bad" holds an invalid entry: derper exits at the
#: first access check that needs the list, so it is asked from loopback first.
CASES: dict[str, dict[str, str]] = {
    "none": {},
    "allow_ip": {"TS_ALLOW_DEBUG_IP": OUTSIDE},
    "allow_other_ip": {"TS_ALLOW_DEBUG_IP": "10.99.0.2"},
    "cidrs_in": {"TS_DEBUG_TRUSTED_CIDRS": "10.98.0.0/16, ,10.99.0.0/24"},
    "cidrs_out": {"TS_DEBUG_TRUSTED_CIDRS": "10.98.0.0/16"},
    "cidrs_bad": {"TS_DEBUG_TRUSTED_CIDRS": "10.98.0.0/16,10.99.0.1"},
}


def setup() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    subprocess.run(["ip", "addr", "add", f"{OUTSIDE}/32", "dev", "lo"], check=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def ask(port: int, source: str, path: str) -> dict[str, Any]:
    """One GET from ``source`` to the server's address of the same kind."""
    c = http.client.HTTPConnection(source, port, timeout=5, source_address=(source, 0))
    try:
        c.request("GET", path, headers={"Connection": "close"})
        r = c.getresponse()
        body = r.read().decode("utf-8", "replace")
        return {"status": r.status, "type": r.getheader("Content-Type"), "body": body[:200],
                "debug_link": "/debug/</a>" in body}
    except (OSError, http.client.HTTPException) as e:
        return {"error": type(e).__name__}
    finally:
        c.close()


def drive(port: int, name: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    sources = (LOOPBACK, OUTSIDE)
    for source in sources:
        for path in ("/debug/", "/debug/varz", "/"):
            out[f"{source} {path}"] = ask(port, source, path)
    return out


async def run_derpkit(name: str, env: dict[str, str]) -> dict[str, Any]:
    from tests.server.serve_proc import start_serve

    port = free_port()
    sp = await start_serve("-a", f":{port}", "-stun=false", env=env)
    try:
        got = await asyncio.to_thread(drive, port, name)
        try:
            got["exit"] = await asyncio.wait_for(sp.proc.wait(), 0.5 if name != "cidrs_bad" else 5)
        except TimeoutError:
            got["exit"] = None
    finally:
        await sp.stop()
    got["log"] = "".join(sp.log)
    return got


def run_go(binary: str, name: str, env: dict[str, str]) -> dict[str, Any]:
    from tests.goderper import start_derper

    d = start_derper(Path(tempfile.mkdtemp()), listen_host="", env=env or None)
    try:
        got = drive(d.port, name)
        assert d.process is not None
        deadline = time.monotonic() + (5 if name == "cidrs_bad" else 0.5)
        while d.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        got["exit"] = d.process.poll()
    finally:
        got_log = d.log()
        d.stop()
    got["log"] = got_log
    return got


async def main_async(go_derper: str | None) -> dict[str, Any]:
    result: dict[str, Any] = {"derpkit": {}, "go": {}}
    for name, env in CASES.items():
        result["derpkit"][name] = await run_derpkit(name, env)
        if go_derper:
            result["go"][name] = await asyncio.to_thread(run_go, go_derper, name, env)
    return result


def main() -> int:
    setup()
    go_derper = sys.argv[1] if len(sys.argv) > 1 else None
    print(json.dumps(asyncio.run(main_async(go_derper))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
