"""Helpers for the prober's tests: maps, an in-process prober run, certificates with any dates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from derpkit.probe.derpconn import ProbeEnv
from derpkit.probe.dmap import MapHolder
from derpkit.probe.flags import parse_args
from derpkit.probe.model import Outcome
from derpkit.probe.scheduler import Prober
from derpkit.protocol.keys import MeshKey
from tests.interop.pki import Leaf, TestCA

#: Short intervals: each probe's deadline is 80 % of its interval.
FAST = ["-spread=false", "-interval", "5s", "-tls-interval", "3s", "-stun-interval", "3s",
        "-mesh-interval", "3s"]


def node(name: str, port: int, *, host: str = "localhost", stun: int = -1, **extra: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"Name": name, "HostName": host, "DERPPort": port, "STUNPort": stun}
    if host == "localhost":
        e["IPv4"] = "127.0.0.1"
    e.update(extra)
    return e


def dmap(*regions: tuple[int, str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"Regions": {}}
    for rid, code, nodes in regions:
        for n in nodes:
            n.setdefault("RegionID", rid)
        out["Regions"][str(rid)] = {"RegionID": rid, "RegionCode": code, "RegionName": code, "Nodes": nodes}
    return out


def write(tmp_path: Path, m: dict[str, Any], name: str = "map.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(m))
    return str(p)


async def probe_once(tmp_path: Path, m: dict[str, Any], *args: str, mesh_key: MeshKey | None = None) -> Prober:
    """Run every probe of map ``m`` once in this process, as ``derpkit probe -once`` does."""
    opts = parse_args([*FAST, *args, write(tmp_path, m)])
    prober = Prober(opts, ProbeEnv(mesh_key=mesh_key), MapHolder(opts.derp_map))
    await prober.run_once()
    return prober


def result(prober: Prober, name: str) -> Outcome:
    p = prober.probes.get(name)
    assert p is not None and p.last is not None, f"no result for {name}; have {sorted(prober.probes)}"
    return p.last


def issue(ca: TestCA, directory: Path, stem: str, dns: list[str], *, ips: tuple[str, ...] = ("127.0.0.1",),
          **kw: Any) -> Leaf:
    """``TestCA.issue`` with the leaf written into ``directory`` (dates, CRL, full chain in ``kw``)."""
    return ca.issue(stem, dns, list(ips), directory=directory, **kw)

