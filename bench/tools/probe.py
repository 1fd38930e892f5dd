"""Figure 2: one full ``-once`` probe cycle over a 100-node DERP map, derpkit probe vs Go
derpprobe v1.102.3, with the probers' CPU seconds and peak RSS.

The fleet. 100 ``derpkit serve`` processes would not fit 2 cores (each is a Python process
of ~40 MB), and pointing 100 map entries at a handful of servers would not be 100 nodes. So
each node is a real ``DerpNode`` — the server object ``derpkit serve`` runs, with its own
key, TLS DERP listener and STUN listener on loopback — and ``--fleet-procs`` processes
(``python -m tests.probe.fleet_server``, the prober's scale-test fleet) host them, pinned to
the server CPU. Nodes form regions of ``--per-region``, meshed inside each region as
``-mesh-with`` would do, so every mesh probe has a real path. Certificates come from a
throw-away CA for ``localhost`` that both probers trust through ``SSL_CERT_FILE``.

The probers run one after the other (alternating which goes first) pinned to the other CPU,
with derpprobe's default classes: TLS, STUN (udp) and mesh every 15 s, bandwidth off; Go
derpprobe with ``-spread=false`` (its ``-once`` otherwise waits up to one interval per probe
on purpose; derpkit has no spread in ``-once``). Each prober runs with two trust stores
(``SSL_CERT_FILE``): the test CA alone, and the system's roots plus the test CA — what an
operator's machine has, and it matters: Python's TLS loads the whole store into every new
context. Wall time is the whole process, start-up
included; CPU seconds (``wait4``) and peak RSS (``VmHWM``) are the prober process's own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..servers import pin_prefix
from .measure import Figure, child_env, run_tool

if TYPE_CHECKING:
    from tests.interop.pki import TestCA

# The repository's test helpers (the CA, Go tool lookup, derpprobe's line format, the fleet
# server) are imported where used: importing them costs about a second, which the other parts
# need not pay.


@dataclass
class Fleet:
    """The node processes and the merged map."""

    procs: list[subprocess.Popen[str]]
    map_path: Path
    ca: TestCA
    nodes: int
    regions: int

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)


def start_fleet(nodes: int, per_region: int, procs: int, cpus: str | None, workdir: Path,
                timeout: float = 90.0) -> Fleet:
    """``procs`` fleet processes holding ``nodes`` nodes between them (whole regions each)."""
    from tests.interop.pki import TestCA

    ca = TestCA.create(workdir / "ca")
    leaf = ca.issue("localhost", ["localhost"], ["127.0.0.1", "::1"])
    n_regions = -(-nodes // per_region)
    share = [n_regions // procs + (1 if i < n_regions % procs else 0) for i in range(procs)]
    started: list[subprocess.Popen[str]] = []
    maps: list[Path] = []
    env = trusting_env(ca)  # the mesh links between nodes verify each other's certificates
    left = nodes
    fleet = Fleet(started, workdir / "map.json", ca, nodes, n_regions)
    try:
        for i, regions in enumerate(r for r in share if r):
            count = min(left, regions * per_region)
            left -= count
            part = workdir / f"map{i}.json"
            maps.append(part)
            started.append(subprocess.Popen(
                [*pin_prefix(cpus), sys.executable, "-m", "tests.probe.fleet_server", "--nodes", str(count),
                 "--per-region", str(per_region), "--cert", str(leaf.cert_path), "--key",
                 str(leaf.key_path), "--map", str(part)],
                stdout=subprocess.PIPE, stderr=open(workdir / f"fleet{i}.log", "wb"),  # noqa: SIM115
                stdin=subprocess.DEVNULL, text=True, start_new_session=True, env=env))
        deadline = time.monotonic() + timeout
        for p in started:
            assert p.stdout is not None
            line = p.stdout.readline()  # "ready" once every mesh link of that process is up
            if line.strip() != "ready" or time.monotonic() > deadline:
                logs = " | ".join((workdir / f"fleet{j}.log").read_text(errors="replace")[-300:]
                                  for j in range(len(started)))
                raise RuntimeError(f"a fleet process did not start: {logs}".replace("\n", " "))
        fleet.map_path.write_text(json.dumps(merge_maps(maps)))
        return fleet
    except BaseException:
        fleet.stop()
        raise


def trusting_env(ca: TestCA) -> dict[str, str]:
    """A child environment whose TLS (Python's default contexts and Go's crypto/x509 alike)
    trusts ``ca`` and nothing else."""
    env = child_env(SSL_CERT_FILE=str(ca.cert_path))
    env.pop("SSL_CERT_DIR", None)
    return env


def merge_maps(parts: list[Path]) -> dict[str, Any]:
    """One map from the fleet processes' maps; region IDs, codes and node names renumbered
    (each process numbers its own regions from 900)."""
    regions: dict[str, Any] = {}
    rid = 900
    for part in parts:
        for region in json.loads(part.read_text())["Regions"].values():
            region = dict(region, RegionID=rid, RegionCode=f"r{rid}", RegionName=f"bench {rid}")
            region["Nodes"] = [dict(n, RegionID=rid, Name=f"{rid}{chr(97 + j)}")
                               for j, n in enumerate(region["Nodes"])]
            regions[str(rid)] = region
            rid += 1
    return {"Regions": regions}


def cross_node_mesh(names: dict[str, str]) -> int:
    """How many of these probe names are mesh probes between two different nodes
    (``derp/<rc>/<a>/<b>/mesh`` with a ≠ b): those need the mesh between the nodes."""
    n = 0
    for name in names:
        parts = name.split("/")
        n += len(parts) == 5 and parts[4] == "mesh" and parts[2] != parts[3]
    return n


@dataclass
class ProbeResult:
    figures: list[Figure] = field(default_factory=list)
    probes: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    fleet: str = ""


def prober_argv(kind: str, map_url: str, cpus: str | None, derpprobe: str | None) -> list[str]:
    if kind == "derpkit probe":
        return [*pin_prefix(cpus), sys.executable, "-m", "derpkit", "probe", "-once", "-json",
                "-derp-map", map_url]
    assert derpprobe is not None
    return [*pin_prefix(cpus), derpprobe, "-once", "-spread=false", "-derp-map", map_url]


#: Trust stores the probers can be given: the test CA alone, or the system's roots plus the
#: test CA (what an operator's machine has; Python builds a context from it per connection).
TRUSTS = ("system", "ca")
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def trust_file(kind: str, ca: TestCA, workdir: Path) -> Path:
    """The SSL_CERT_FILE for trust ``kind``: ``ca`` or ``system`` (the system bundle + ca)."""
    if kind == "ca":
        return ca.cert_path
    if not SYSTEM_BUNDLE.is_file():
        raise RuntimeError(f"--probe-trust system: {SYSTEM_BUNDLE} is missing")
    path = workdir / "system-plus-ca.pem"
    path.write_bytes(SYSTEM_BUNDLE.read_bytes() + b"\n" + ca.cert_path.read_bytes())
    return path


def measure(rounds: int, nodes: int, per_region: int, fleet_procs: int, server_cpus: str | None,
            tool_cpus: str | None, log: Any, trusts: tuple[str, ...] = TRUSTS) -> ProbeResult:
    from tests.goderper import find_go_tool
    from tests.interop.helpers import probe_lines

    res = ProbeResult()
    derpprobe = find_go_tool("derpprobe")
    probers = ["derpkit probe"] + (["Go derpprobe"] if derpprobe else [])
    if not derpprobe:
        res.errors.append("Go derpprobe not found: its column is missing")
    variants = [(p, t) for t in trusts for p in probers]
    wd = Path(tempfile.mkdtemp(prefix="tools-probe-"))
    log(f"probe: starting {nodes} nodes in {fleet_procs} process(es)")
    t0 = time.monotonic()
    fleet = start_fleet(nodes, per_region, fleet_procs, server_cpus, wd)
    res.fleet = (f"{nodes} nodes ({fleet.regions} regions of {per_region}, meshed per region) in "
                 f"{len(fleet.procs)} process(es), up in {time.monotonic() - t0:.1f} s")
    wall: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    cpu: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    rss: dict[tuple[str, str], list[float]] = {v: [] for v in variants}
    run_s: dict[str, list[float]] = {t: [] for t in trusts}
    envs = {t: trusting_env(fleet.ca) | {"SSL_CERT_FILE": str(trust_file(t, fleet.ca, wd))} for t in trusts}
    try:
        for i in range(rounds):
            for kind, trust in variants if i % 2 == 0 else variants[::-1]:
                log(f"probe round {i + 1}/{rounds}: {kind}, trust {trust}")
                run = run_tool(prober_argv(kind, "file://" + str(fleet.map_path), tool_cpus, derpprobe),
                               env=envs[trust], timeout=180)
                good, bad = probe_lines(run.stderr + run.stdout)
                if kind == "derpkit probe" and run.stdout.strip():
                    rep = json.loads(run.stdout)
                    run_s[trust].append(float(rep["run"]["seconds"]))
                    good = {r["Name"]: "" for r in rep["results"] if r["Status"] == "succeeded"}
                    bad = {r["Name"]: r["Error"] for r in rep["results"] if r["Status"] != "succeeded"}
                res.probes[kind] = len(good) + len(bad)
                if bad or run.returncode != 0 or run.timed_out:
                    first = next(iter(bad.items()), ("", run.tail(300)))
                    res.errors.append(f"{kind} (trust {trust}) round {i + 1}: exit {run.returncode}, "
                                      f"{len(bad)} bad, {cross_node_mesh(bad)} of them cross-node mesh "
                                      f"(first: {first[0]}: {first[1]})".replace("\n", " "))
                wall[kind, trust].append(run.wall_s)
                cpu[kind, trust].append(run.cpu_s)
                rss[kind, trust].append(run.max_rss / 2**20)
    finally:
        fleet.stop()
    for kind, trust in variants:
        slug = ("derpkit" if kind.startswith("derpkit") else "go") + ("" if trust == "ca" else f"_{trust}")
        who = f"{kind}, {'test CA only' if trust == 'ca' else 'system roots + test CA'}"
        n = res.probes.get(kind, 0)
        res.figures += [
            Figure(f"probe_wall_{slug}", f"probe -once cycle, {nodes} nodes: wall time, {who}", "s",
                   wall[kind, trust], f"{n} probes; whole process, start-up included"),
            Figure(f"probe_cpu_{slug}", f"probe -once cycle: CPU seconds, {who}", "s",
                   cpu[kind, trust], "user+system of the prober (wait4)"),
            Figure(f"probe_rss_{slug}", f"probe -once cycle: peak RSS, {who}", "MiB",
                   rss[kind, trust], "VmHWM of the prober, read every 20 ms"),
        ]
    for trust, vals in run_s.items():
        if vals:
            res.figures.append(Figure(
                "probe_run_derpkit" + ("" if trust == "ca" else f"_{trust}"),
                f"probe -once cycle: derpkit's own run.seconds, {'test CA only' if trust == 'ca' else 'system roots + test CA'}",
                "s", vals, "from its --json report: first probe to last result"))
    return res
