"""``python -m bench --quick`` prints its table; no figure is asserted.

With ``DERPKIT_REQUIRE_GO_PEERS=1`` (CI, where Go, derper and the Go module cache are
installed) the Go side must really be there: the Go derper column, its ratio column and
the Go generator. Without it, a machine lacking Go still gets a derpkit-only table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from bench.__main__ import Generator, gen_note

ROOT = Path(__file__).resolve().parents[2]
LABELS = ("peak packets/s, 1200 B", "peak packets/s, 100 B", "one-way latency p99 ms",
          "handshakes/s", "RSS bytes / idle conn @ ", "server CPU s / M packets")


def _bench(tmp_path: Path, *args: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-m", "bench", "--quick", "--steps", "1", *args],
                       capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout


def test_bench_quick_prints_table(tmp_path: Path) -> None:
    out = _bench(tmp_path, "--idle", "100", "--servers", "derpkit,go",
                 "--json", str(tmp_path / "bench.json"))
    assert "| figure | derpkit" in out, out
    for label in LABELS:
        assert label in out, (label, out)
    assert "RSS bytes / idle conn @ 100 |" in out, out
    assert (tmp_path / "bench.json").exists()
    if os.environ.get("DERPKIT_REQUIRE_GO_PEERS") == "1":
        # Side by side is the point of the bench: Go derper, the ratio, the Go generator.
        assert "| figure | derpkit | Go derper | derpkit / Go derper |" in out, out
        assert "# generator: derpgen (Go, tailscale.com/derp client)" in out, out


def test_bench_python_generator(tmp_path: Path) -> None:
    """``--generator python`` (bench/pygen.py) drives derpkit alone through every figure."""
    out = _bench(tmp_path, "--generator", "python", "--servers", "derpkit", "--idle", "50")
    assert "# generator: pygen (Python, uvloop)" in out, out
    assert "| figure | derpkit | notes" in out, out
    for label in LABELS:
        assert label in out, (label, out)
    # Every measured row has a number (n/a would mean pygen produced no result for it).
    rows = [line for line in out.splitlines() if line.startswith("| ") and "figure" not in line]
    assert rows and all("n/a" not in line.split("|")[2] for line in rows), out


def test_generator_bound_marks_a_saturated_generator() -> None:
    """The mark depends on the generator alone: at 95 % of its CPU it is set even with the
    server busy too (the handshake rows on 2 cores), below 90 % it is not."""
    gen = Generator(["derpgen"], "test", None, 1, 1)
    busy = {"cpu_seconds": 0.95, "wall_seconds": 1.0}
    assert gen_note(busy, gen, 0.92).endswith("GENERATOR-BOUND")
    assert gen_note(busy, gen, 0.10).endswith("GENERATOR-BOUND")
    idle = {"cpu_seconds": 0.80, "wall_seconds": 1.0}
    assert "GENERATOR-BOUND" not in gen_note(idle, gen, 0.10)


async def test_packet_path_relays_every_packet_it_times() -> None:
    """bench.packet_path refuses to report a figure unless every timed packet came out."""
    from bench.packet_path import ns_per_packet

    ns, packets = await ns_per_packet(100, chunks=3, rounds=1)
    assert packets == 3 * (65536 // (5 + 32 + 100)) and ns > 0
