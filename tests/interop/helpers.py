"""Helpers shared by the interop tests: running Go programs with bounded time, DERP maps,
and wiring in-process derpkit nodes into a mesh."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derpkit.server.node import DerpNode
from derpkit.server.relay.mesh import MeshLink
from tests.server.helpers import deliver_eventually, recv_kind, recv_packet

from .pki import TestCA

__all__ = ["deliver_eventually", "recv_kind", "recv_packet"]  # shared with tests/server/


@dataclass
class GoRun:
    argv: list[str]
    returncode: int
    output: str


async def run_go(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 30.0) -> GoRun:
    """Run a Go program to completion (stdout+stderr merged); kill it on timeout."""
    p = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(p.communicate(), timeout)
    except BaseException:
        p.kill()
        await p.wait()
        raise
    assert p.returncode is not None
    return GoRun(list(argv), p.returncode, out.decode(errors="replace"))


def run_go_sync(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 30.0) -> GoRun:
    p = subprocess.run(
        list(argv), stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout
    )
    return GoRun(list(argv), p.returncode, (p.stdout + p.stderr).decode(errors="replace"))


def derp_map(region_id: int, code: str, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    for n in nodes:
        n.setdefault("RegionID", region_id)
    return {
        "Regions": {
            str(region_id): {
                "RegionID": region_id,
                "RegionCode": code,
                "RegionName": f"derpkit interop {code}",
                "Nodes": nodes,
            }
        }
    }


def write_map(path: Path, m: dict[str, Any]) -> str:
    path.write_text(json.dumps(m, indent=1))
    return f"file://{path}"


def probe_lines(output: str) -> tuple[dict[str, str], dict[str, str]]:
    """derpprobe -once's ``good: <name>: <latency>`` / ``bad: <name>: <error>`` lines."""
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    for line in output.splitlines():
        for tag, into in (("good: ", good), ("bad: ", bad)):
            i = line.find(tag)
            if i >= 0:
                name, _, rest = line[i + len(tag) :].partition(": ")
                into[name] = rest
    return good, bad


def assert_lab_node_b_down(run: GoRun) -> None:
    """derpprobe's verdict on region "lab" (nodes 900a, 900b) once 900b has stopped: every
    probe that touches 900b fails (its TLS probe with "connection refused"), 900a's own pass,
    and the exit code says so."""
    good, bad = probe_lines(run.output)
    assert run.returncode == 1, run.output
    assert set(bad) == {"derp/lab/900b/tls", "derp/lab/900b/udp", "derp/lab/900a/900b/mesh",
                        "derp/lab/900b/900a/mesh", "derp/lab/900b/900b/mesh"}, run.output
    assert {"derp/lab/900a/tls", "derp/lab/900a/udp", "derp/lab/900a/900a/mesh"} <= set(good)
    assert "connection refused" in bad["derp/lab/900b/tls"], run.output


async def mesh_nodes(nodes: Sequence[DerpNode], host: str = "localhost") -> None:
    """Give every node a MeshLink to every other node (after all are listening) and wait.

    Like ``-mesh-with`` listing each node (a node's own entry is skipped: derper would
    detect the self-connect and stop that link anyway).
    """
    for a in nodes:
        for b in nodes:
            if a is b:
                continue
            link = MeshLink(a.server, f"{host}:{b.port}", "127.0.0.1")
            a.mesh.append(link)
            link.start()
    async with asyncio.timeout(10):
        for a in nodes:
            for link in a.mesh:
                await link.connected.wait()


def tls_varz(base_url: str, ca: TestCA) -> dict[str, float]:
    """``<base_url>/debug/varz`` over TLS trusting only the test CA, as {sample: value}.

    The key is the sample as printed (name plus labels), so Go's and ours compare directly.
    """
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    with urllib.request.urlopen(base_url + "/debug/varz", timeout=5, context=ctx) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", text, re.M):
        try:
            out[m.group(1)] = float(m.group(2))
        except ValueError:
            pass
    return out
