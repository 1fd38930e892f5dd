"""The pytest plugin end to end: a user's `pytest --derp-url=URL` in a directory of its own.

Runs pytest as a subprocess (as a user's CI would), once against a good server and once
through the 200-instead-of-426 fault, and reads the JUnit file it writes.
"""

from __future__ import annotations

import asyncio
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conformance import faultproxy as fp
from tests.conformance import servers


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    s = servers.serve(tmp_path_factory.mktemp("plugin-backend"), stun=False)
    try:
        yield s
    finally:
        s.stop()


async def _pytest(cwd: Path, *args: str) -> tuple[int, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(p.communicate(), 120)
    return p.returncode or 0, out.decode(errors="replace")


def _junit(path: Path) -> dict[str, str]:
    out = {}
    for tc in ET.parse(path).iter("testcase"):
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        state = "failed" if tc.find("failure") is not None else "skipped" if tc.find("skipped") is not None else "passed"
        out[tc.get("name", "")] = f"{state}/{props.get('result', '')}"
    return out


async def test_plugin_passes_against_a_good_server(backend: servers.Server, tmp_path: Path) -> None:
    mesh = tmp_path / "mesh.key"
    assert backend.mesh_key is not None
    mesh.write_text(backend.mesh_key.hex())
    rc, out = await _pytest(tmp_path, f"--derp-url={backend.url}", f"--derp-mesh-key-file={mesh}",
                            "--derp-cases=http,upgrade,relay,mesh", "--derp-strict", "--junitxml=j.xml")
    assert rc == 0, out
    res = _junit(tmp_path / "j.xml")
    assert res["relay/2"] == "passed/PASS" and res["mesh/5"] == "passed/PASS", res
    assert res["relay/9"] == "passed/INFO", res
    assert len(res) > 40


async def test_plugin_fails_the_broken_cases(backend: servers.Server, tmp_path: Path) -> None:
    port = int(backend.url.rsplit(":", 1)[1])
    proxy = await fp.FaultProxy(("127.0.0.1", port), fp.OkInsteadOf426()).start()
    try:
        rc, out = await _pytest(tmp_path, f"--derp-url=http://127.0.0.1:{proxy.port}", "--derp-cases=upgrade",
                                "--junitxml=j.xml")
    finally:
        await proxy.stop()
    assert rc == 1, out
    res = _junit(tmp_path / "j.xml")
    # upgrade/2 is a SHOULD: without --derp-strict its failure is reported as INFO.
    assert {k for k, v in res.items() if v.startswith("failed")} == {"upgrade/1", "upgrade/7"}, res
    assert res["upgrade/2"] == "passed/INFO", res
    assert "FAIL: GET /derp without Upgrade answered 200 OK, want 426" in out, out


async def test_plugin_unreachable_is_one_line(tmp_path: Path) -> None:
    from tests.goderper import free_port

    rc, out = await _pytest(tmp_path, f"--derp-url=http://127.0.0.1:{free_port()}", "--derp-cases=ping/1")
    assert rc == 1
    assert "cannot reach 127.0.0.1" in out and "Traceback" not in out, out


async def test_plugin_is_inert_without_the_flag(tmp_path: Path) -> None:
    (tmp_path / "test_x.py").write_text("def test_x():\n    pass\n")
    rc, out = await _pytest(tmp_path)
    assert rc == 0 and "1 passed" in out, out
