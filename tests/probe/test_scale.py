"""Scale: a 100-node map (25 regions of 4 meshed nodes, 100 DERP and 100 STUN listeners on
loopback in a separate server process) probed by ``derpkit probe -once`` within one default
interval (15 s), never more than ``-concurrency`` runs at once. The figure goes to docs/probe.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interop.pki import Leaf

pytestmark = pytest.mark.timeout(120)

NODES, PER_REGION, CONCURRENCY = 100, 4, 32


def test_100_nodes_within_one_interval_bounded(tmp_path: Path, localhost_leaf: Leaf) -> None:
    map_path = tmp_path / "map.json"
    srv = subprocess.Popen(
        [sys.executable, "-m", "tests.probe.fleet_server", "--nodes", str(NODES), "--per-region", str(PER_REGION),
         "--cert", str(localhost_leaf.cert_path), "--key", str(localhost_leaf.key_path), "--map", str(map_path)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True,
        start_new_session=True, env=dict(os.environ))
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline()
        assert line.strip() == "ready", f"fleet server did not start (exit {srv.poll()})"
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-m", "derpkit", "probe", "-once", "-json", "-concurrency",
                            str(CONCURRENCY), str(map_path)], capture_output=True, text=True, timeout=90)
        wall = time.monotonic() - t0
        report = json.loads(p.stdout)
        n_probes = 1 + NODES * 2 + (NODES // PER_REGION) * PER_REGION**2  # map, tls+udp per node, mesh pairs
        assert report["run"]["probes"] == n_probes == 601
        bad = [r["Name"] + ": " + r["Error"] for r in report["results"] if r["Status"] != "succeeded"]
        assert not bad and p.returncode == 0, bad[:5]
        assert 1 < report["run"]["max_in_flight"] <= CONCURRENCY
        assert report["run"]["seconds"] < 15.0, report["run"]  # one default interval
        print(f"\nscale: {NODES} nodes, {n_probes} probes in {report['run']['seconds']:.1f} s "
              f"(process {wall:.1f} s), max {report['run']['max_in_flight']} in flight")
    finally:
        srv.terminate()
        try:
            srv.wait(20)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(5)
