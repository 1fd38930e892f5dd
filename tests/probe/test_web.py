"""``derpkit probe`` as a long-running monitor: its endpoints, its metrics, its page in Chromium.

One real ``derpkit serve`` node (healthy) and one map entry whose port nothing listens on
(broken), probed by a real ``derpkit probe -listen …`` process with TLS, STUN, mesh, bandwidth
and queuing-delay probes. Everything is read over HTTP as Prometheus, a load balancer and a
browser would.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.goderper import REQUIRE_ENV, free_port
from tests.interop.pki import Leaf, TestCA

from .helpers import dmap, node, write
from .procs import Serve, start_serve

pytestmark = pytest.mark.timeout(90)


@dataclass
class Monitor:
    base: str
    proc: subprocess.Popen[bytes]
    map_path: Path
    log_path: Path


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 20) -> tuple[int, str, str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


@pytest.fixture(scope="module")
def monitor(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, localhost_leaf: Leaf) -> Iterator[Monitor]:
    d = tmp_path_factory.mktemp("monitor")
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    serve: Serve = start_serve(d / "node", "-a", f"localhost:{port}", "-stun-port", str(stun), "-http-port", "-1",
                               "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir))
    m = dmap((900, "lab", [node("900a", port, stun=stun), node("900b", free_port())]))
    map_path = Path(write(d, m))
    listen = free_port()
    log_path = d / "probe.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "derpkit", "probe", "-listen", f"127.0.0.1:{listen}", "-spread=false",
             "-interval", "2s", "-tls-interval", "1s", "-stun-interval", "2s", "-mesh-interval", "2s",
             "-bw-interval", "2s", "-bw-probe-size-bytes", "200000", "-qd-packets-per-second", "20",
             "-stale-after", "4s", str(map_path)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    mon = Monitor(f"http://127.0.0.1:{listen}", proc, map_path, log_path)
    try:
        deadline = time.monotonic() + 30
        while True:  # until every periodic probe has finished twice (history for the chart)
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                status, _, body = get(mon.base + "/status.json", timeout=5)
                results = json.loads(body)["results"]
                if status == 200 and all(len(r["RecentResults"]) >= 2 for r in results if r["Interval"] > 0):
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.3)
        yield mon
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        serve.stop()


def test_healthz_readyz_and_status_json(monitor: Monitor) -> None:
    assert get(monitor.base + "/healthz")[::2] == (200, "ok\n")
    status, ctype, body = get(monitor.base + "/readyz")
    assert status == 503 and ctype.startswith("application/json")
    reasons = json.loads(body)["reasons"]
    assert any(r.startswith("derp/lab/900b/tls: TCP connection refused") for r in reasons), reasons
    s = json.loads(get(monitor.base + "/status.json")[2])
    by = {r["Name"]: r for r in s["results"]}
    assert by["derp/lab/900a/tls"]["Status"] == "succeeded"
    assert by["derp/lab/900b/tls"]["Status"] == "failed"
    assert by["derp/lab/900b/tls"]["Diagnosis"].startswith("TCP connection refused")
    assert by["derp/lab/900a/900a/bw"]["Details"]["bytes"] == 200000
    assert by["derp/lab/900a/900a/qd"]["Interval"] == -10_000_000_000
    assert s["map"]["source"] == str(monitor.map_path) and s["ready"] is False


def test_probe_run_and_probe_all(monitor: Monitor) -> None:
    b = monitor.base
    assert get(b + "/debug/probe-run")[::2] == (400, "missing name parameter\n")
    assert get(b + "/debug/probe-run?name=nope")[::2] == (404, 'unknown probe "nope"\n')
    assert get(b + "/debug/probe-run?name=derp/lab/900a/900a/qd")[0] == 404  # continuous
    status, _, text = get(b + "/debug/probe-run?name=derp/lab/900a/tls")
    assert status == 200 and text.startswith("Probe succeeded in ") and "success rate 100%" in text, text
    status, ctype, body = get(b + "/debug/probe-run?name=derp/lab/900b/tls", {"Accept": "application/json"})
    j = json.loads(body)
    assert status == 424 and ctype.startswith("application/json")
    assert j["ProbeInfo"]["Status"] == "failed" and j["PreviousSuccessRatio"] == 0
    assert "connection refused" in j["ProbeInfo"]["Error"]
    status, _, text = get(b + "/debug/probe-run?name=derp/lab/900b/tls")
    assert status == 424 and text.startswith("Probe failed: dial tcp") and "Diagnosis: TCP connection refused" in text
    status, _, body = get(b + "/debug/probe-all?exclude=derp/lab/900b/tls", timeout=30)
    res = json.loads(body)["Results"]
    assert status == 424 and "derp/lab/900b/tls" not in res and "derp/lab/900a/900a/qd" not in res
    assert res["derp/lab/900a/900a/mesh"]["ProbeInfo"]["Status"] == "succeeded"
    assert get(b + "/debug/varz", {"X-Forwarded-For": "1.2.3.4"})[::2] == (403, "debug access denied\n")


def test_varz_has_derpprobes_names_and_labels(monitor: Monitor) -> None:
    status, _, text = get(monitor.base + "/debug/varz")
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("derpprobe_interval_secs", "derpprobe_in_flight", "derpprobe_start_secs", "derpprobe_end_secs",
                 "derpprobe_result", "derpprobe_latency_millis", "derpprobe_attempts", "derpprobe_seconds",
                 "derpprobe_derp_bw_probe_size_bytes", "derpprobe_derp_bw_transfer_time_seconds",
                 "derpprobe_derp_qd_probe_delays_seconds", "derpprobe_derp_qd_probe_dropped_packets"):
        assert name in fams, (name, sorted(fams))
    assert fams["derpprobe_attempts"].type == "counter" and fams["derpprobe_derp_qd_probe_delays_seconds"].type == "histogram"

    def sample(fam: str, sname: str | None = None, **labels: str) -> Any:
        for s in fams[fam].samples:
            if (sname is None or s.name == sname) and all(s.labels.get(k) == v for k, v in labels.items()):
                return s
        raise AssertionError(f"no {fam} {labels}: {fams[fam].samples[:3]}")

    tls = sample("derpprobe_result", name="derp/lab/900a/tls")
    assert tls.value == 1 and tls.labels == {"name": "derp/lab/900a/tls", "class": "tls", "region": "lab",
                                             "region_id": "900", "hostname": "localhost"}
    assert sample("derpprobe_result", name="derp/lab/900b/tls").value == 0
    udp = sample("derpprobe_result", name="derp/lab/900a/udp")
    assert udp.labels["class"] == "derp_udp" and udp.labels["address_family"] == "ipv4"
    mesh = sample("derpprobe_result", name="derp/lab/900a/900b/mesh")
    assert mesh.labels["derp_path"] == "mesh" and mesh.labels["class"] == "derp_mesh" and mesh.value == 0
    assert sample("derpprobe_result", name="derp/lab/900a/900a/mesh").labels["derp_path"] == "single"
    assert sample("derpprobe_attempts", "derpprobe_attempts_total", name="derp/lab/900a/tls", status="ok").value >= 2
    bw = sample("derpprobe_derp_bw_probe_size_bytes", name="derp/lab/900a/900a/bw")
    assert bw.value == 200000 and bw.labels["tcp_in_tcp"] == "false"
    count = sample("derpprobe_derp_qd_probe_delays_seconds", "derpprobe_derp_qd_probe_delays_seconds_count",
                   name="derp/lab/900a/900a/qd")
    assert count.value > 10  # 20 packets/s for several seconds, delivered on loopback
    les = {s.labels["le"] for s in fams["derpprobe_derp_qd_probe_delays_seconds"].samples if "le" in s.labels}
    assert les == {"0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "+Inf"}
    assert "derp_path" in sample("derpprobe_derp_qd_probe_dropped_packets", name="derp/lab/900a/900a/qd").labels
    up = fams["derpkit_region_up"].samples
    assert [(s.labels, s.value) for s in up] == [({"region": "lab", "region_id": "900"}, 1.0)]  # 900a relays


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        import os

        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"chromium NOT INSTALLED and {REQUIRE_ENV}=1", pytrace=False)
        pytest.skip("chromium NOT INSTALLED: the status page is not rendered in a browser")
    return path


def test_status_page_in_headless_chromium(monitor: Monitor, tmp_path: Path) -> None:
    from html.parser import HTMLParser

    chromium = _chromium()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", monitor.base + "/"], capture_output=True, text=True, timeout=60).stdout
    shot = tmp_path / "status.png"
    subprocess.run([*flags, "--window-size=1600,1400", f"--screenshot={shot}", monitor.base + "/"],
                   capture_output=True, timeout=60)
    assert shot.exists() and shot.stat().st_size > 5000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    class Rows(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows: dict[str, dict[str, str]] = {}
            self.polylines: list[dict[str, str]] = []
            self.svgs: list[dict[str, str]] = []
            self.fail_marks = 0
            self.ready = ""
            self._in_ready = False
            self.text = ""

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            a = {k: v or "" for k, v in attrs}
            if tag == "tr" and a.get("class") == "probe":
                self.rows[a["data-name"]] = a
            if tag == "svg" and a.get("class") == "chart":
                self.svgs.append(a)
            if tag == "polyline":
                self.polylines.append(a)
            if tag == "line" and a.get("class") == "fail":
                self.fail_marks += 1
            self._in_ready = a.get("id") == "ready"

        def handle_data(self, data: str) -> None:
            self.text += data
            if self._in_ready:
                self.ready += data
                self._in_ready = False

    r = Rows()
    r.feed(dom)
    assert "DERP Prober" in r.text and "out of" in r.text
    assert r.rows["derp/lab/900a/tls"]["data-status"] == "succeeded"
    assert r.rows["derp/lab/900b/tls"]["data-status"] == "failed"
    assert r.rows["derp/lab/900a/900a/qd"]["data-status"] in ("running", "succeeded")
    assert len(r.rows) == 1 + 2 + 1 + 4 * 3  # map, 2 tls, 1 udp, 4 pairs x (mesh, bw, qd)
    assert "TCP connection refused" in r.text and "not ready" == r.ready
    assert len(r.svgs) == len(r.rows)
    # Healthy probes drew a latency line with >= 2 points; failing ones red marks.
    assert any(len(p.get("points", "").split()) >= 2 for p in r.polylines)
    assert r.fail_marks >= 2
    assert "cdn" not in dom.lower() and "<script" not in dom.lower()


def test_broken_map_source_keeps_last_good_map_and_goes_stale(monitor: Monitor) -> None:
    """Last in this module: it breaks the monitor's map file."""
    before = {r["Name"] for r in json.loads(get(monitor.base + "/status.json")[2])["results"]}
    monitor.map_path.write_text("{not json")
    deadline = time.monotonic() + 20
    while True:
        status, _, body = get(monitor.base + "/readyz")
        reasons = json.loads(body)["reasons"]
        if any(r.startswith("DERP map is ") and "stale after 4 s" in r for r in reasons):
            break
        assert time.monotonic() < deadline, reasons
        time.sleep(0.3)
    assert status == 503
    assert any(r.startswith("derpmap-probe: the DERP map could not be loaded: decoding ") and
               "still probing the last good map" in r for r in reasons), reasons
    s = json.loads(get(monitor.base + "/status.json")[2])
    assert {r["Name"] for r in s["results"]} == before  # node probes kept
    assert s["map"]["last_error"].startswith("decoding ")
    fams = {f.name: f for f in text_string_to_metric_families(get(monitor.base + "/debug/varz")[2])}
    assert fams["derpkit_derpmap_age_seconds"].samples[0].value > 4
