"""Locust against real ``derpkit serve`` subprocesses, in every way an operator runs it.

Headless (plain HTTP, and TLS with a self-signed IP certificate pinned by CertName), the
web UI driven over its HTTP API, a master with two local workers, MeshSender across two
meshed serve processes, and a run where packets are really lost. Numbers are not asserted;
only that traffic flowed, was counted, and that failures show up where locust reports them.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers import DerpkitServer, free_port

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"

# Never import locust here: importing it monkey-patches this whole process with gevent,
# which breaks asyncio TLS in every later test. Locust runs in subprocesses only.
if importlib.util.find_spec("locust") is None:
    _why = "locust is not installed (pip install -e '.[test]'; it is a test dependency)"
    if os.environ.get("DERPKIT_REQUIRE_GO_PEERS") == "1":
        # CI installs the test extra; a missing locust there is a broken environment, and
        # skipping would let the whole load-test suite pass without running.
        pytest.fail(f"{_why}; DERPKIT_REQUIRE_GO_PEERS=1 forbids skipping", pytrace=False)
    pytest.skip(_why, allow_module_level=True)


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
    for name in ("connect", "ping", "connect+handshake+close", "mesh packet 1200B", "idle ping"):
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


# --------------------------------------------------------------------------- helpers


def _failures(path: Path) -> list[dict[str, str]]:
    """Rows of locust's ``<prefix>_failures.csv`` (Method, Name, Error, Occurrences)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _headless(url: str, prefix: Path, seconds: int, *extra: str) -> subprocess.Popen[str]:
    """Start one headless locust run writing ``<prefix>_stats.csv``; output in .stdout."""
    return subprocess.Popen(
        [*_locust_cmd(), "-f", str(LOCUSTFILE), "--headless", "-t", f"{seconds}s",
         "--host", url, "--csv", str(prefix), "--only-summary", "--stop-timeout", "2", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=prefix.parent,
        env=_env(),
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out


def _varz(port: int) -> dict[str, float]:
    """``/debug/varz`` of a plain-HTTP serve process as {metric (with labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/varz", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _dropped_unknown_dest(port: int) -> float:
    return sum(v for k, v in _varz(port).items()
               if k.startswith("derp_packets_dropped{") and 'reason="unknown_dest"' in k)


# --------------------------------------------------------------------------- TLS + CertName


_CERTNAME_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DerpkitServer, str]]:
    """``derpkit serve`` over TLS with an IP -hostname: a self-signed certificate, and the
    DERP-map CertName pin read from its log, as an operator would copy it."""
    certdir = tmp_path_factory.mktemp("certs")
    s = DerpkitServer(extra=["-certmode", "manual", "-hostname", "127.0.0.1",
                             "-certdir", str(certdir), "-http-port", "-1", "-stun=false"]).start()
    try:
        log = b"".join(s.log).decode(errors="replace")
        m = _CERTNAME_RE.search(log)
        assert m, f"no CertName line in serve's log:\n{log}"
        yield s, m.group(1)
    finally:
        s.stop()


def test_tls_ip_certname_pin(tls_server: tuple[DerpkitServer, str], tmp_path: Path) -> None:
    """``derp://`` and ``https://`` with the logged pin carry traffic with no failure; a
    wrong pin is a failed ``connect`` in locust's stats, not a crashed user."""
    s, pin = tls_server
    wrong = "sha256-raw:" + "00" * 32
    common = ["-u", "3", "-r", "3", "--derp-pps", "20", "PacketPair", "Pinger"]
    runs = {
        "derp": _headless(f"derp://127.0.0.1:{s.port}", tmp_path / "derp", 5,
                          "--derp-cert-name", pin, *common),
        "https": _headless(f"https://127.0.0.1:{s.port}", tmp_path / "https", 5,
                           "--derp-cert-name", pin, *common),
        "wrong": _headless(f"derp://127.0.0.1:{s.port}", tmp_path / "wrong", 4,
                           "--derp-cert-name", wrong, *common),
    }
    outs = {k: _finish(p) for k, p in runs.items()}
    for k in ("derp", "https"):
        assert runs[k].returncode == 0, outs[k][-4000:]
        rows = _rows(tmp_path / f"{k}_stats.csv")
        assert int(rows["Aggregated"]["Failure Count"]) == 0, outs[k][-4000:]
        for name in ("connect", "packet 1200B", "ping"):
            assert int(rows[name]["Request Count"]) > 0, (k, name, sorted(rows))
    # Failures make locust exit 1; the user must not have died with a traceback instead.
    assert runs["wrong"].returncode == 1, outs["wrong"][-4000:]
    assert "Traceback" not in outs["wrong"], outs["wrong"][-4000:]
    rows = _rows(tmp_path / "wrong_stats.csv")
    assert int(rows["connect"]["Failure Count"]) > 0, (sorted(rows), outs["wrong"][-4000:])
    assert int(rows["connect"]["Failure Count"]) == int(rows["connect"]["Request Count"])
    assert "packet 1200B" not in rows and "ping" not in rows  # nothing got through
    errors = " ".join(r["Error"] for r in _failures(tmp_path / "wrong_failures.csv"))
    assert "does not match the CertName pin" in errors, errors


# --------------------------------------------------------------------------- mesh


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[DerpkitServer], Path]]:
    """Two ``derpkit serve`` processes meshed with -mesh-psk-file/-mesh-with (both list both,
    self is detected by key), as in tests/server/test_mesh_serve.py; waits until each has
    the other as its one watcher, so the mesh is up before any load starts."""
    d = tmp_path_factory.mktemp("mesh")
    psk = d / "mesh.key"
    psk.write_text(os.urandom(32).hex() + "\n")
    ports = [free_port(), free_port()]
    peers = ",".join(f"127.0.0.1:{p}" for p in ports)
    nodes: list[DerpkitServer] = []
    try:
        for p in ports:
            nodes.append(DerpkitServer(extra=["-a", f"127.0.0.1:{p}", "-stun=false",
                                              "-mesh-psk-file", str(psk), "-mesh-with", peers]))
            nodes[-1].start()
        deadline = time.monotonic() + 20
        while not all(_varz(n.port).get("derp_watchers") == 1 for n in nodes):
            assert time.monotonic() < deadline, "mesh did not come up: " + repr(
                [b"".join(n.log[-20:]).decode(errors="replace") for n in nodes])
            time.sleep(0.2)
        yield nodes, psk
    finally:
        for n in nodes:
            n.stop()


def test_mesh_sender_across_two_nodes(mesh: tuple[list[DerpkitServer], Path],
                                      tmp_path: Path) -> None:
    """MeshSender with the mesh key: senders on node A, receivers on node B; every packet
    crosses the mesh link (A forwards it) and is delivered."""
    (a, b), psk = mesh
    before = _varz(a.port).get("derp_packets_forwarded_out", 0.0)
    p = _headless(f"http://127.0.0.1:{a.port}", tmp_path / "mesh", 6, "-u", "2", "-r", "2",
                  "--derp-mesh-host", f"http://127.0.0.1:{b.port}",
                  "--derp-mesh-key", f"@{psk}", "--derp-pps", "20", "MeshSender")
    out = _finish(p)
    assert p.returncode == 0, out[-4000:]
    rows = _rows(tmp_path / "mesh_stats.csv")
    assert int(rows["Aggregated"]["Failure Count"]) == 0, out[-4000:]
    delivered = int(rows["mesh packet 1200B"]["Request Count"])
    assert delivered > 0, sorted(rows)
    forwarded = _varz(a.port)["derp_packets_forwarded_out"] - before
    assert forwarded >= delivered, (forwarded, delivered)


# --------------------------------------------------------------------------- loss


def test_lost_packets_are_failures(server: DerpkitServer, tmp_path: Path) -> None:
    """Packets really lost: MeshSender between two serve processes that are *not* meshed.
    Node A has no route to a receiver on node B and drops every packet (its
    ``unknown_dest`` counter); each one must come out as a failed ``mesh packet`` after
    ``--derp-loss-timeout``, in the stats and in the failures CSV."""
    other = DerpkitServer(extra=["-stun=false"]).start()
    try:
        before = _dropped_unknown_dest(server.port)
        p = _headless(f"http://127.0.0.1:{server.port}", tmp_path / "loss", 4, "-u", "1",
                      "-r", "1", "--derp-mesh-host", f"http://127.0.0.1:{other.port}",
                      "--derp-pps", "20", "--derp-loss-timeout", "0.5", "MeshSender")
        out = _finish(p)
    finally:
        other.stop()
    assert p.returncode == 1, out[-4000:]  # locust's exit code when requests failed
    rows = _rows(tmp_path / "loss_stats.csv")
    lost = int(rows["mesh packet 1200B"]["Failure Count"])
    assert lost > 0 and lost == int(rows["mesh packet 1200B"]["Request Count"]), rows
    assert int(rows["connect"]["Failure Count"]) == 0  # connecting worked; delivery did not
    assert _dropped_unknown_dest(server.port) - before >= lost
    fails = [r for r in _failures(tmp_path / "loss_failures.csv")
             if r["Name"] == "mesh packet 1200B"]
    assert fails and "PacketLost" in fails[0]["Error"], fails
    assert "not delivered within 0.5 s" in fails[0]["Error"], fails
    assert sum(int(r["Occurrences"]) for r in fails) == lost


# --------------------------------------------------------------------------- web UI


def test_web_ui_swarm(server: DerpkitServer, tmp_path: Path) -> None:
    """The web UI mode: start a swarm with POST /swarm as the browser form does, watch DERP
    rows fill in /stats/requests, stop it with POST /stop, then end locust with SIGTERM."""
    url = f"http://127.0.0.1:{server.port}"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [*_locust_cmd(), "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1", "--web-port",
         str(port), "--host", url, "--derp-pps", "20", "PacketPair", "Pinger"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=_env(),
    )
    stats: dict[str, dict[str, object]] = {}
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "locust exited before its web UI came up"
            try:
                with urllib.request.urlopen(base + "/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "web UI did not come up"
            time.sleep(0.2)
        form = urllib.parse.urlencode({"user_count": "3", "spawn_rate": "3", "host": url})
        with urllib.request.urlopen(base + "/swarm", data=form.encode(), timeout=5) as r:
            reply = json.loads(r.read())
        assert reply.get("success") is True, reply
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(base + "/stats/requests", timeout=5) as r:
                report = json.loads(r.read())
            stats = {str(row["name"]): row for row in report["stats"]}
            if all(int(stats.get(n, {}).get("num_requests", 0)) > 0  # type: ignore[call-overload]
                   for n in ("connect", "packet 1200B", "ping")):
                break
            assert time.monotonic() < deadline, f"no DERP rows in /stats/requests: {report}"
            time.sleep(0.5)
        with urllib.request.urlopen(urllib.request.Request(base + "/stop", method="POST"),
                                    timeout=10) as r:
            assert json.loads(r.read()).get("success") is True
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out = _finish(proc, timeout=20)
    assert stats["packet 1200B"]["method"] == "DERP"
    assert all(int(row["num_failures"]) == 0 for row in stats.values()), stats  # type: ignore[call-overload]
    assert proc.returncode == 0, out[-4000:]
