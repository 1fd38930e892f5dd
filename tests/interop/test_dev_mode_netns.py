"""Go ``derper -dev`` (fixed ports 3340/3478, every address) inside a private network namespace.

One run of tests/interop/netns_dev.py under ``unshare -rn`` gives: our client's session with
the dev-mode derper (handshake, ServerInfo, packets both ways, ping) with Go's own counters,
Go stunc and our STUN codec against Go's dual-stack STUN socket, and Go stunc against a
dual-stack derpkit STUN socket. Without user/network namespaces these tests skip and say so.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.goderper import require_go_tool, require_netns

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def netns_run() -> dict:
    derper = require_go_tool("derper")
    stunc = require_go_tool("stunc")
    require_netns("derper -dev needs fixed ports 3340/3478, which these tests take only inside a private namespace")
    p = subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "tests.interop.netns_dev", derper, stunc],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def varz(run: dict, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", run["varz"], re.M)
    assert m, name
    return float(m.group(1))


def test_our_client_against_go_derper_dev_mode(netns_run: dict) -> None:
    log = netns_run["derper_log"]
    assert "Running in dev mode." in log and "derper: serving on :3340" in log
    c = netns_run["client"]
    assert c["server_info_version"] == 2
    assert c["received"]["b"] == [c["a_key"], "a->b"]
    assert c["received"]["a"] == [c["b_key"], "b->a"]
    assert 0 < c["rtt"] < 3
    # What Go counted for that session.
    assert varz(netns_run, "derp_accepts") == 2
    assert varz(netns_run, "derp_packets_received") == 2
    assert varz(netns_run, "derp_packets_sent") == 2
    assert varz(netns_run, "derp_got_ping") == 1 and varz(netns_run, "derp_sent_pong") == 1


def test_go_derper_dual_stack_stun_answers_ipv4_with_4in6(netns_run: dict) -> None:
    """The spec's UNVERIFIED point, observed: family 0x02, ::ffff:127.0.0.1."""
    assert "STUN server listening on [::]:3478" in netns_run["derper_log"]
    raw = bytes.fromhex(netns_run["codec_v4"]["raw"])
    assert raw[20:26] == bytes.fromhex("002000140002")
    assert netns_run["codec_v4"]["ip"] == "127.0.0.1"  # our parser unmaps, as Go's does
    assert netns_run["codec_v4"]["port"] == netns_run["codec_v4"]["local_port"]
    assert netns_run["codec_v6"]["ip"] == "::1"
    assert netns_run["codec_v6"]["port"] == netns_run["codec_v6"]["local_port"]
    # Go's own client unmaps it too.
    out = netns_run["go_stunc_v4"]
    assert out["rc"] == 0 and re.search(r"^stun addr: 127\.0\.0\.1:\d+$", out["out"], re.M), out
    out = netns_run["go_stunc_v6"]
    assert out["rc"] == 0 and re.search(r"^stun addr: \[::1\]:\d+$", out["out"], re.M), out


def test_go_stunc_against_derpkit_dual_stack_stun(netns_run: dict) -> None:
    d = netns_run["derpkit_dual_stack"]
    for key, pat in (("stunc_v4", r"127\.0\.0\.1:\d+"), ("stunc_v6", r"\[::1\]:\d+")):
        assert d[key]["rc"] == 0 and re.search(rf"^stun addr: {pat}$", d[key]["out"], re.M), d[key]
    # derpkit answers an IPv4 client on its dual-stack socket with family 0x01 (docs/compat.md).
    raw = bytes.fromhex(d["codec_v4"]["raw"])
    assert raw[20:26] == bytes.fromhex("002000080001")
    assert d["codec_v4"]["port"] == d["codec_v4"]["local_port"]
    assert d["counts"]["addrfamily:ipv4"] == 2 and d["counts"]["addrfamily:ipv6"] == 1
