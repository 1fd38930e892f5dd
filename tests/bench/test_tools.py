"""Smoke test of ``python -m bench.tools`` (issue 16, part 5): the module runs end to end
with tiny sizes — the conformance CLI against derpkit serve and Go derper, one probe cycle
of derpkit probe and Go derpprobe over a small real fleet, locust and derpgen against a
serve process — and reports every figure. Numbers are never asserted, only their presence
and the relations that must hold whatever the machine (a suite inside its CLI run cannot
take longer than the run; both probers see the same probes).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.tools.measure import Figure, run_tool
from bench.tools.probe import cross_node_mesh, merge_maps
from tests.goderper import REQUIRE_ENV, find_go_tool

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(90)


def _go_expected() -> bool:
    """Go columns must be there when the Go peers are (and always under CI's REQUIRE flag)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        return True
    return all(find_go_tool(t) for t in ("derper", "derpprobe")) and shutil.which("go") is not None


def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "tools.json"
    p = subprocess.run([sys.executable, "-m", "bench.tools", "--quick", "--markdown", "--json", str(out)],
                       capture_output=True, text=True, timeout=80, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["errors"] == []
    fig = {k: v["median"] for k, v in rep["figures"].items()}
    sides = ["derpkit", "go"] if _go_expected() else ["derpkit"]
    for side in sides:
        for key in ("conf_wall", "conf_suite", "conf_cpu", "conf_casesum", "probe_wall", "probe_cpu",
                    "probe_rss"):
            assert fig.get(f"{key}_{side}", 0) > 0, (key, side, fig)
        # The suite's own clock runs inside the CLI process: it cannot exceed the wall time.
        assert fig[f"conf_suite_{side}"] <= fig[f"conf_wall_{side}"]
    assert fig["probe_run_derpkit"] <= fig["probe_wall_derpkit"]
    # --quick: 8 nodes in regions of 2: the map probe, TLS + STUN per node, 2x2 mesh pairs per region.
    probes = rep["facts"]["probes_per_cycle"]
    assert probes["derpkit probe"] == 1 + 8 * 2 + 4 * 2 * 2 == 33
    if "go" in sides:
        assert probes["Go derpprobe"] == probes["derpkit probe"]
    counts = rep["facts"]["conformance_counts"]["derpkit serve"]
    assert counts["FAIL"] == 0 and counts["PASS"] == 3  # --quick selects http/1, ping/1, stun/1
    assert {c["id"] for c in rep["conformance_slowest"]["derpkit serve"]} <= {"http/1", "ping/1", "stun/1"}
    loads = ["locust", "derpgen", "derpgen_paced"] if "go" in sides else ["locust"]
    for kind in loads:
        assert fig[f"load_pps_{kind}"] > 0 and fig[f"load_share_{kind}"] > 0, kind
    # The Markdown table names each figure once, with its rounds.
    assert "| figure | median | unit |" in p.stdout
    assert p.stdout.count("probe -once cycle: peak RSS") == len(sides)


def test_bad_flag_is_one_line_naming_it() -> None:
    p = subprocess.run([sys.executable, "-m", "bench.tools", "--parts", "conformance,nope"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert p.returncode == 2
    assert "--parts: unknown part 'nope'" in p.stderr and "Traceback" not in p.stderr


def test_peak_rss_is_the_tool_not_this_python() -> None:
    """Linux carries a forked child's pre-exec high-water mark across execve; the tool's own
    VmHWM must be reported instead: a tiny program stays tiny, a big one is seen."""
    small = run_tool(["sleep", "0.2"])
    big = run_tool([sys.executable, "-c", "import time; b = bytearray(80_000_000); time.sleep(0.3)"])
    assert small.returncode == 0 and big.returncode == 0
    assert 0 < small.max_rss < 16 * 2**20, small.max_rss
    assert big.max_rss > 80_000_000, big.max_rss
    assert big.cpu_s > 0 and big.wall_s >= 0.3


def test_run_tool_timeout_kills_the_tool() -> None:
    r = run_tool(["sleep", "30"], timeout=0.3)
    assert r.timed_out and r.returncode != 0 and r.wall_s < 10


def test_merge_maps_renumbers_each_processes_regions(tmp_path: Path) -> None:
    part = {"Regions": {"900": {"RegionID": 900, "RegionCode": "r900", "Nodes": [
        {"Name": "900a", "RegionID": 900, "HostName": "localhost", "DERPPort": 1001, "STUNPort": 2001},
        {"Name": "900b", "RegionID": 900, "HostName": "localhost", "DERPPort": 1002, "STUNPort": 2002}]}}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(part))
    part["Regions"]["900"]["Nodes"][0]["DERPPort"] = 1003
    b.write_text(json.dumps(part))
    m = merge_maps([a, b])
    assert sorted(m["Regions"]) == ["900", "901"]
    names = [n["Name"] for r in m["Regions"].values() for n in r["Nodes"]]
    assert names == ["900a", "900b", "901a", "901b"]
    assert [n["DERPPort"] for n in m["Regions"]["901"]["Nodes"]] == [1003, 1002]
    assert all(n["RegionID"] == int(rid) for rid, r in m["Regions"].items() for n in r["Nodes"])


def test_figure_median_and_spread() -> None:
    f = Figure("k", "label", "s", [4.0, 1.0, 2.0])
    assert (f.median, f.low, f.high) == (2.0, 1.0, 4.0)
    assert f.spread_pct == pytest.approx(150.0)
    assert Figure("k", "label", "s", []).median is None


def test_cross_node_mesh_counts_only_pairs_of_two_nodes() -> None:
    assert cross_node_mesh({"derp/r900/900a/900b/mesh": "", "derp/r900/900a/900a/mesh": "",
                            "derp/r900/900a/tls": "", "derp/r900/900b/900a/mesh": ""}) == 2
