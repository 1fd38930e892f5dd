"""Figure 1: how long ``derpkit conformance`` takes against a local relay, and which cases
take the time.

Each round starts a fresh relay (derpkit serve, then Go derper, alternating which goes
first), pinned to the server CPU, and runs the CLI exactly as an operator would —
``derpkit conformance URL --stun HOST:PORT --mesh-key-file F --json FILE`` — pinned to the
other CPU. Wall time includes the CLI's own start-up; the suite's ``duration_s`` does not.
Per-case times come from the suite's JSON report (``cases[].duration_s``).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..servers import Server, find_go_derper, pin_prefix
from .measure import Figure, ToolRun, child_env, run_tool
from .relays import MeshedGoDerper, derpkit_relay, stun_port, write_mesh_key


@dataclass
class ConformanceResult:
    figures: list[Figure] = field(default_factory=list)
    slowest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def run_suite(srv: Server, mesh_key_file: Path, cpus: str | None, cases: str | None,
              workdir: Path) -> tuple[ToolRun, dict[str, Any]]:
    """One CLI run against a started ``srv``: the process's costs and its JSON report."""
    report = workdir / "report.json"
    argv = [*pin_prefix(cpus), sys.executable, "-m", "derpkit", "conformance",
            f"http://127.0.0.1:{srv.port}", "--stun", f"127.0.0.1:{stun_port(srv)}",
            "--mesh-key-file", str(mesh_key_file), "--json", str(report)]
    if cases:
        argv += ["--cases", cases]
    run = run_tool(argv, env=child_env(), timeout=180)
    if run.returncode not in (0, 1) or not report.exists():
        raise RuntimeError(f"derpkit conformance against {srv.name} exited {run.returncode}: "
                           + run.tail(400).replace("\n", " "))
    return run, json.loads(report.read_text())


def measure(rounds: int, server_cpus: str | None, tool_cpus: str | None, cases: str | None,
            log: Any) -> ConformanceResult:
    res = ConformanceResult()
    go = find_go_derper()
    kinds = ["derpkit serve"] + (["Go derper"] if go else [])
    if not go:
        res.errors.append("Go derper not found: its column is missing")
    wall: dict[str, list[float]] = {k: [] for k in kinds}
    suite: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    casesum: dict[str, list[float]] = {k: [] for k in kinds}
    per_case: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    titles: dict[str, str] = {}
    for i in range(rounds):
        order = kinds if i % 2 == 0 else kinds[::-1]
        for kind in order:
            wd = Path(tempfile.mkdtemp(prefix="tools-conf-"))
            key = write_mesh_key(wd)
            srv: Server = (derpkit_relay(key, server_cpus) if kind == "derpkit serve"
                           else MeshedGoDerper(go or "", key, server_cpus))
            log(f"conformance round {i + 1}/{rounds}: {kind}")
            with srv:
                srv.start()
                run, rep = run_suite(srv, key, tool_cpus, cases, wd)
            wall[kind].append(run.wall_s)
            suite[kind].append(float(rep["duration_s"]))
            cpu[kind].append(run.cpu_s)
            casesum[kind].append(sum(float(c["duration_s"]) for c in rep["cases"]))
            res.counts[kind] = dict(rep["counts"])
            if rep["counts"].get("FAIL"):
                failed = [c["id"] for c in rep["cases"] if c["result"] == "FAIL"]
                res.errors.append(f"{kind} round {i + 1}: FAIL in {', '.join(failed)}")
            for c in rep["cases"]:
                per_case[kind].setdefault(c["id"], []).append(float(c["duration_s"]))
                titles[c["id"]] = c["title"]
    for kind in kinds:
        n = sum(res.counts[kind].values())
        res.figures += [
            Figure(f"conf_wall_{_slug(kind)}", f"conformance: CLI wall time vs {kind}", "s",
                   wall[kind], f"{n} cases, --jobs 4 (default); " + _counts(res.counts[kind])),
            Figure(f"conf_suite_{_slug(kind)}", f"conformance: suite duration_s vs {kind}", "s",
                   suite[kind], "the report's own clock: cases only, no process start"),
            Figure(f"conf_cpu_{_slug(kind)}", f"conformance: CLI CPU seconds vs {kind}", "s",
                   cpu[kind], "user+system of the CLI process (wait4)"),
        ]
        med = {cid: statistics.median(v) for cid, v in per_case[kind].items()}
        total = sum(med.values())
        res.slowest[kind] = [
            {"id": cid, "title": titles[cid], "median_s": round(t, 3),
             "share_of_case_time_pct": round(t / total * 100, 1) if total else None}
            for cid, t in sorted(med.items(), key=lambda kv: -kv[1])[:6]
        ]
        res.figures.append(Figure(f"conf_casesum_{_slug(kind)}",
                                  f"conformance: sum of case durations vs {kind}", "s", casesum[kind],
                                  "about what --jobs 1 would take"))
    return res


def _slug(kind: str) -> str:
    return "derpkit" if kind.startswith("derpkit") else "go"


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{v} {k}" for k, v in c.items())
