"""STUN both ways: Go ``stunc`` against derpkit's STUN server, our codec against Go derper.

The Go side's verdict is stunc's exit code and its ``stun addr:`` line, and Go derper's own
``stun_*`` counters on /debug/varz. The dual-stack (4-in-6) cases need a wildcard socket and
run in a private network namespace: see test_dev_mode_netns.py.
"""

from __future__ import annotations

import re
import urllib.request

import pytest

from derpkit.server.stun import start_stun_server
from derpkit.stun import codec
from derpkit.stun.client import query
from tests.goderper import derper_fixture, require_go_tool

from .helpers import run_go

pytestmark = pytest.mark.timeout(60)
derper = derper_fixture(scope="module")

_LINE = re.compile(r"^(sent|from|stun) addr: (\S+)$", re.M)


def stunc_lines(output: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in _LINE.finditer(output)}


def go_varz(base_url: str) -> str:
    with urllib.request.urlopen(base_url + "/debug/varz", timeout=5) as r:
        return r.read().decode()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_go_stunc_against_derpkit_stun(host: str) -> None:
    stunc = require_go_tool("stunc")
    srv = await start_stun_server(host, 0)
    port = srv.sockname[1]
    try:
        run = await run_go([stunc, "-timeout", "3s", host, str(port)], timeout=15)
    finally:
        srv.close()
    assert run.returncode == 0, run.output
    lines = stunc_lines(run.output)
    bracket = f"[{host}]" if ":" in host else host
    assert lines["sent"] == f"{bracket}:{port}", run.output
    # stunc listens dual-stack, so Go shows an IPv4 sender as [::ffff:a.b.c.d].
    assert lines["from"] in (f"{bracket}:{port}", f"[::ffff:{host}]:{port}"), run.output
    # The address stunc was told is its own: loopback, a real ephemeral port.
    m = re.fullmatch(r"\[?([0-9a-f.:]+)\]?:(\d+)", lines["stun"])
    assert m and m.group(1) == host and 0 < int(m.group(2)) < 65536, run.output
    fam = "ipv6" if ":" in host else "ipv4"
    assert srv.counts[("requests", "success")] == 1
    assert srv.counts[("addrfamily", fam)] == 1


async def test_go_stunc_reads_derpkit_and_go_derper_alike(derper) -> None:
    """Same tool, both servers: the answers have the same form and the same address."""
    stunc = require_go_tool("stunc")
    srv = await start_stun_server("127.0.0.1", 0)
    try:
        ours = await run_go([stunc, "127.0.0.1", str(srv.sockname[1])], timeout=15)
    finally:
        srv.close()
    go = await run_go([stunc, "127.0.0.1", str(derper.stun_port)], timeout=15)
    assert ours.returncode == go.returncode == 0, (ours.output, go.output)
    o, g = stunc_lines(ours.output), stunc_lines(go.output)
    assert o["stun"].split(":")[0] == g["stun"].split(":")[0] == "127.0.0.1"
    assert set(o) == set(g) == {"sent", "from", "stun"}


@pytest.mark.parametrize("rounds", [3])
async def test_derpkit_codec_against_go_derper_stun(derper, rounds: int) -> None:
    before = go_varz(derper.base_url)
    n0 = int(re.search(r'^stun_requests\{disposition="success"\} (\d+)$', before, re.M).group(1))
    for _ in range(rounds):
        r = await query("127.0.0.1", derper.stun_port, timeout=3, local=("127.0.0.1", 0))
        assert (str(r.mapped_ip), r.mapped_port) == r.local
        assert r.origin == ("127.0.0.1", derper.stun_port)
        assert r.addr_attr == codec.ATTR_XOR_MAPPED_ADDRESS
        # Go's exact reply to an IPv4 client on an IPv4 socket is what we would send.
        assert r.raw == codec.build_response(r.txid, r.mapped_ip, r.mapped_port)
    after = go_varz(derper.base_url)
    n1 = int(re.search(r'^stun_requests\{disposition="success"\} (\d+)$', after, re.M).group(1))
    assert n1 - n0 == rounds
    assert re.search(r'^stun_addrfamily\{family="ipv4"\} [1-9]', after, re.M)
