"""Locust against a real ``derpkit serve`` subprocess: headless, and master + 2 workers.

Numbers are not asserted; only that traffic flowed, was counted, and nothing failed.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers import DerpkitServer, free_port

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

# Never import locust here: importing it monkey-patches this whole process with gevent,
# which breaks asyncio TLS in every later test. Locust runs in subprocesses only.
if importlib.util.find_spec("locust") is None:
    pytest.skip("locust is not installed (pip install -e '.[test]')", allow_module_level=True)


def _locust_cmd() -> list[str]:
    exe = shutil.which("locust")
    return [exe] if exe else [sys.executable, "-m", "locust"]


@pytest.fixture(scope="module")
def server() -> Iterator[DerpkitServer]:
    s = DerpkitServer().start()
    try:
        yield s
    finally:
        s.stop()


def _packets_sent(server: DerpkitServer) -> int:
    m = re.search(r"^derp_packets_sent (\d+)", server.varz(), re.M)
    assert m, "derp_packets_sent missing from /debug/varz"
    return int(m.group(1))


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {r["Name"]: r for r in csv.DictReader(f)}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_headless_smoke(server: DerpkitServer, tmp_path: Path) -> None:
    before = _packets_sent(server)
    url = f"http://127.0.0.1:{server.port}"
    p = subprocess.run(
        [*_locust_cmd(), "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10",
         "-t", "10s", "--host", url, "--csv", str(tmp_path / "run"), "--only-summary",
         "--derp-mesh-host", url, "--derp-pps", "50", "--derp-idle-conns", "5",
         "--stop-timeout", "2", "--exit-code-on-error", "1"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=_env(),
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    rows = _rows(tmp_path / "run_stats.csv")
    agg = rows["Aggregated"]
    assert int(agg["Failure Count"]) == 0, out[-4000:]
    delivered = int(rows["packet 1200B"]["Request Count"])
    assert delivered > 0
    for name in ("connect", "ping", "connect+handshake+close", "mesh packet 1200B"):
        assert int(rows[name]["Request Count"]) > 0, name
    # The server counted (at least) every packet locust saw delivered.
    assert _packets_sent(server) - before >= delivered


def test_distributed_two_workers(server: DerpkitServer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{server.port}"
    port = free_port()
    common = ["-f", str(LOCUSTFILE), "--derp-tag-worker", "--derp-pps", "20"]
    master = subprocess.Popen(
        [*_locust_cmd(), *common, "--master", "--master-bind-host", "127.0.0.1",
         "--master-bind-port", str(port), "--headless", "--expect-workers", "2",
         "--expect-workers-max-wait", "30", "-u", "6", "-r", "6", "-t", "6s", "--host", url,
         "--csv", str(tmp_path / "dist"), "--only-summary", "--stop-timeout", "2",
         "PacketPair", "Pinger"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=_env(),
    )
    workers = [
        subprocess.Popen(
            [*_locust_cmd(), *common, "--worker", "--master-host", "127.0.0.1",
             "--master-port", str(port), "PacketPair", "Pinger"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path, env=_env(),
        )
        for _ in range(2)
    ]
    try:
        out, _ = master.communicate(timeout=75)
        for w in workers:
            w.wait(timeout=20)
    finally:
        for proc in (master, *workers):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert master.returncode == 0, out[-4000:]
    rows = _rows(tmp_path / "dist_stats.csv")
    assert int(rows["Aggregated"]["Failure Count"]) == 0, out[-4000:]
    for w in ("w0", "w1"):
        assert int(rows[f"packet 1200B [{w}]"]["Request Count"]) > 0, (w, sorted(rows))
        assert int(rows[f"connect [{w}]"]["Request Count"]) > 0, (w, sorted(rows))
