"""``derpkit probe -once`` as a deploy gate against a real ``derpkit serve`` process: exit codes,
derpprobe's lines, the table on a terminal, ``--json``, ``-region-code``, WebSocket, qd in once
mode, and map changes in the long-running prober."""

from __future__ import annotations

import json
import os
import pty
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from derpkit.probe.derpconn import ProbeEnv
from derpkit.probe.dmap import MapHolder
from derpkit.probe.flags import parse_args
from derpkit.probe.scheduler import Prober
from tests.goderper import free_port
from tests.interop.helpers import probe_lines
from tests.interop.pki import Leaf, TestCA

from .helpers import FAST, dmap, node, write
from .procs import Serve, run_ours, start_serve, why

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, localhost_leaf: Leaf) -> Iterator[tuple[int, int]]:
    d = tmp_path_factory.mktemp("once")
    port, stun = free_port(), free_port(socket.SOCK_DGRAM)
    s: Serve = start_serve(d, "-a", f"localhost:{port}", "-stun-port", str(stun), "-http-port", "-1",
                           "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir))
    try:
        yield port, stun
    finally:
        s.stop()


def _map(tmp_path: Path, port: int, stun: int) -> str:
    return write(tmp_path, dmap((900, "lab", [node("900a", port, stun=stun), node("900b", free_port())]),
                                (901, "ok", [node("901a", port, stun=stun)])))


def test_lines_exit_code_and_json(serve: tuple[int, int], tmp_path: Path) -> None:
    path = _map(tmp_path, *serve)
    r = run_ours("-once", "-json", path, *FAST)
    assert r.returncode == 1
    good, bad = probe_lines(r.output)
    assert "derp/ok/901a/tls" in good and "derpmap-probe" in good
    assert set(bad) == {"derp/lab/900b/tls", "derp/lab/900a/900b/mesh", "derp/lab/900b/900a/mesh",
                        "derp/lab/900b/900b/mesh"}, r.output
    assert why(r.output, "derp/lab/900b/tls").startswith("TCP connection refused")
    lines = [ln for ln in r.output.splitlines() if "good: " in ln or "bad: " in ln]
    # derpprobe's order: all good lines sorted, then all bad lines sorted; Go's log timestamp.
    tags = ["good" if "good: " in ln else "bad" for ln in lines]
    assert tags == sorted(tags, key=lambda t: t != "good")
    assert all(ln[4] == "/" and ln[19] == " " for ln in lines), lines[:2]
    j = json.loads(r.output[r.output.index("{"):])
    assert j["ok"] is False and j["bad"] == 4 and j["good"] == len(good)
    res = {x["Name"]: x for x in j["results"]}
    assert res["derp/lab/900b/tls"]["Diagnosis"].startswith("TCP connection refused")
    assert res["derp/ok/901a/udp"]["Details"]["mapped"].startswith("127.0.0.1:")
    assert "Traceback" not in r.output


def test_region_code_by_code_or_id(serve: tuple[int, int], tmp_path: Path) -> None:
    path = _map(tmp_path, *serve)
    for rc in ("ok", "901"):
        r = run_ours("-once", path, "-region-code", rc, *FAST)
        good, bad = probe_lines(r.output)
        assert r.returncode == 0 and not bad, r.output
        assert set(good) == {"derpmap-probe", "derp/ok/901a/tls", "derp/ok/901a/udp", "derp/ok/901a/901a/mesh"}
    r = run_ours("-once", path, "-region-code", "OK", *FAST)  # case-sensitive, as Go
    assert r.returncode == 0 and set(probe_lines(r.output)[0]) == {"derpmap-probe"}
    assert "warning: -region-code 'OK' matches no region of the map, so nothing was probed" in r.output


def test_table_and_progress_only_on_a_terminal(serve: tuple[int, int], tmp_path: Path) -> None:
    path = _map(tmp_path, *serve)
    pid, fd = pty.fork()
    if pid == 0:  # child: stderr is the terminal
        os.environ["COLUMNS"] = "200"
        os.execv(sys.executable, [sys.executable, "-m", "derpkit", "probe", "-once", path, *FAST])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    raw = out.decode(errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert os.waitstatus_to_exitcode(status) == 1
    assert "probing" in text  # the progress bar ran
    assert "derpkit probe" in text and "region" in text and "diagnosis" in text
    assert "FAIL" in text and "TCP connection refused" in text and "good, 4 bad" in text
    assert "bad: derp/" not in text  # the table replaces the plain lines on a terminal


def test_websocket_and_qd_in_once_mode(serve: tuple[int, int], tmp_path: Path) -> None:
    port, stun = serve
    path = write(tmp_path, dmap((901, "ok", [node("901a", port, stun=stun)])))
    before = _ws_accepts(port)
    r = run_ours("-once", path, *FAST, "-websocket", "-qd-packets-per-second", "50", "-bw-interval", "3s",
                 "-bw-probe-size-bytes", "300000")
    good, bad = probe_lines(r.output)
    assert r.returncode == 0 and not bad, r.output
    assert {"derp/ok/901a/901a/mesh", "derp/ok/901a/901a/bw"} <= set(good)
    assert not any(n.endswith("/qd") for n in good)  # continuous: not run by -once (Go may hang)
    assert _ws_accepts(port) - before == 4  # mesh and bw pairs: two WebSocket clients each


def _ws_accepts(port: int) -> float:
    """derpkit serve's own count of WebSocket DERP connections (its /debug/varz over TLS)."""
    import ssl
    import urllib.request

    with urllib.request.urlopen(f"https://localhost:{port}/debug/varz", timeout=5,
                                context=ssl.create_default_context()) as resp:
        text = resp.read().decode()
    m = re.search(r"^derp_websocket_accepts (\S+)$", text, re.M)
    assert m, text[:500]
    return float(m.group(1))


async def test_changed_node_gets_a_fresh_probe_removed_node_goes(serve: tuple[int, int], tmp_path: Path) -> None:
    port, stun = serve
    path = write(tmp_path, dmap((901, "ok", [node("901a", free_port(), stun=stun), node("901b", port)])))
    prober = Prober(parse_args([*FAST, path]), ProbeEnv(), MapHolder(path))
    await prober.run_once()
    assert not prober.probes["derp/ok/901a/tls"].last.ok  # type: ignore[union-attr]
    old = prober.probes["derp/ok/901a/tls"]
    write(tmp_path, dmap((901, "ok", [node("901a", port, stun=stun)])))
    await prober.run_once()
    assert prober.probes["derp/ok/901a/tls"] is not old  # new target, new probe (Go keeps the old one)
    assert prober.probes["derp/ok/901a/tls"].last.ok  # type: ignore[union-attr]
    assert not any("901b" in n for n in prober.probes)
