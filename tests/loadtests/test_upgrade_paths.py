"""``python -m bench.upgrade_paths --quick`` prints its two-row table; no figure is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_upgrade_paths_quick_prints_table() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "bench.upgrade_paths", "--quick"],
        capture_output=True, text=True, timeout=39, cwd=ROOT, env=env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    assert "| figure | front door | aiohttp body |" in out, out
    for label in ("peak packets/s, 1200 B", "peak packets/s, 100 B", "server CPU s / M packets",
                  "one-way latency p50 ms", "one-way latency p99 ms", "RSS bytes / idle conn @ 100"):
        assert label in out, (label, out)
