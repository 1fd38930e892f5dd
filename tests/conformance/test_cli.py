"""`derpkit conformance` as a user runs it: reports, exit codes, one-line errors."""

from __future__ import annotations

import asyncio
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import faultproxy as fp
from tests.conformance import servers
from tests.goderper import free_port


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    s = servers.serve(tmp_path_factory.mktemp("cli-backend"))
    try:
        yield s
    finally:
        s.stop()


async def _cli(*args: str) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "derpkit", "conformance", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(p.communicate(), 120)
    return p.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


async def test_reports_and_exit_zero(backend: servers.Server, tmp_path: Path) -> None:
    rc, out, err = await _cli(*backend.cli_args(mesh_file=tmp_path / "mesh.key"), "--strict",
                              "--junit", str(tmp_path / "j.xml"), "--html", str(tmp_path / "r.html"),
                              "--json", str(tmp_path / "r.json"))
    assert rc == 0, out + err
    assert "0 FAIL" in out and "relay" in out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["target"] == backend.url and len(doc["cases"]) >= 100
    c = next(c for c in doc["cases"] if c["id"] == "relay/1")
    assert set(c) >= {"id", "title", "level", "result", "reason", "duration_s", "wire"}
    kinds = [(w["conn"], w["dir"], w.get("type")) for w in c["wire"] if w["kind"] == "frame"]
    assert ("A", "send", "SendPacket") in kinds and ("B", "recv", "RecvPacket") in kinds
    assert all(isinstance(w["t"], float) for w in c["wire"])
    suites = ET.parse(tmp_path / "j.xml").getroot()
    assert sum(int(s.get("tests", 0)) for s in suites) == len(doc["cases"])
    assert sum(int(s.get("failures", 0)) for s in suites) == 0
    html = (tmp_path / "r.html").read_text()
    assert html.startswith("<!doctype html>") and "relay/1" in html and "SendPacket" in html


async def test_a_failure_exits_one_and_json_goes_to_stdout(backend: servers.Server) -> None:
    port = int(backend.url.rsplit(":", 1)[1])
    proxy = await fp.FaultProxy(("127.0.0.1", port), fp.OkInsteadOf426()).start()
    try:
        rc, out, err = await _cli(f"http://127.0.0.1:{proxy.port}/derp", "--cases", "upgrade/1,upgrade/3", "--json")
    finally:
        await proxy.stop()
    assert rc == 1, out + err
    doc = json.loads(out)
    res = {c["id"]: (c["result"], c["reason"]) for c in doc["cases"]}
    assert res == {"upgrade/1": ("FAIL", "GET /derp without Upgrade answered 200 OK, want 426"),
                   "upgrade/3": ("PASS", "101 then ServerKey, before the client wrote a frame")}


@pytest.mark.parametrize(("args", "needle"), [
    ([f"http://127.0.0.1:{free_port()}"], "cannot reach 127.0.0.1:"),
    (["http://127.0.0.1:1/derp", "--cert-name", "x"], "--cert-name/--insecure need an https:// URL"),
    (["ftp://example.com"], "scheme must be http, https or derp"),
    (["http://127.0.0.1:1/other"], "the path must be /derp"),
    (["http://127.0.0.1:1", "--mesh-key-file", "/nonexistent/mesh"], "--mesh-key-file /nonexistent/mesh:"),
    (["http://127.0.0.1:1", "--stun", "nope"], "--stun 'nope': want HOST:PORT"),
    (["http://127.0.0.1:1", "--cases", "nosuch/*"], "no case matches"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
async def test_errors_are_one_line(args: list[str], needle: str) -> None:
    rc, out, err = await _cli(*args)
    assert rc == 2, out + err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


async def test_a_wrong_pin_is_one_line(tmp_path: Path) -> None:
    s = servers.serve(tmp_path, tls=True, mesh=False, stun=False)
    try:
        rc, out, err = await _cli(s.url, "--cert-name", "sha256-raw:" + "00" * 32)
    finally:
        s.stop()
    assert rc == 2, out + err
    assert "does not match the CertName pin" in err and len(err.strip().splitlines()) == 1, err


async def test_list_names_every_case() -> None:
    rc, out, _ = await _cli("--list", "--cases", "mesh")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("mesh/1 ") and any("[needs mesh key]" in ln for ln in lines)
