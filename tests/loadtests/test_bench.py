"""``python -m bench --quick`` prints its table; no figure is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_quick_prints_table(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--steps", "1", "--idle", "100",
         "--servers", "derpkit,go",
         "--json", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=env,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    out = p.stdout
    assert "| figure | derpkit" in out, out
    for label in ("peak packets/s, 1200 B", "peak packets/s, 100 B", "one-way latency p99 ms",
                  "handshakes/s", "RSS bytes / idle conn @ 100", "server CPU s / M packets"):
        assert label in out, (label, out)
    assert (tmp_path / "bench.json").exists()
