"""Two real tailscaled nodes talking only through our relays: the suite an operator believes.

tests/e2e/scenario_netns.py runs the whole scenario once, inside a private network namespace
(``unshare -rn``): Tailscale's own testcontrol (tests/e2e/control, built from the pinned
tailscale.com module) as the control server, real ``tailscaled --tun=userspace-networking``
nodes with ``TS_DEBUG_NEVER_DIRECT_UDP=1`` (no direct path), and real ``derpkit serve``
processes as the only relays. Each test below judges one step of that run; a failing step
shows its error and the tails of the logs that matter. Under DERPKIT_REQUIRE_GO_PEERS=1 (CI)
missing Go programs or namespaces fail instead of skipping.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.goderper import build_go_program, require_go_tool, require_netns

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_netns("the e2e nodes and relays must see nothing but their own loopback")
    tailscaled = require_go_tool("tailscaled")
    cli = require_go_tool("tailscale")
    derper = require_go_tool("derper")
    control = build_go_program(ROOT / "tests" / "e2e" / "control", "the e2e tests")
    work = tmp_path_factory.mktemp("e2e")
    p = subprocess.run(
        ["unshare", "-rn", sys.executable, "-m", "tests.e2e.scenario_netns", str(work), control,
         tailscaled, cli, derper],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
    )
    assert p.returncode == 0 and p.stdout.strip(), (
        f"scenario exited {p.returncode}\n{p.stderr[-4000:]}\n{p.stdout[-2000:]}")
    out: dict[str, Any] = json.loads(p.stdout.splitlines()[-1])
    out["stderr"] = p.stderr
    return out


def step(run: dict[str, Any], name: str) -> dict[str, Any]:
    """The data of one step, or fail naming the step with its error and the log tails."""
    setup = run["steps"].get("setup", {})
    if name != "setup" and not setup.get("ok"):
        pytest.fail(f"e2e setup failed, so step {name!r} never ran: {setup.get('error')}\n"
                    + _logs(setup), pytrace=False)
    s = run["steps"].get(name)
    assert s is not None, f"step {name!r} did not run:\n{run['stderr'][-3000:]}"
    if not s["ok"]:
        pytest.fail(f"e2e step {name!r} failed: {s['error']}\n{s.get('trace', '')}" + _logs(s), pytrace=False)
    return s["data"]


def _logs(s: dict[str, Any]) -> str:
    return "".join(f"\n--- {name} (log tail) ---\n{tail}" for name, tail in (s.get("logs") or {}).items())


def _check_transfers(xfer: list[dict[str, Any]], nbytes: int) -> None:
    directions = {(t["from"], t["to"], t["direction"]) for t in xfer}
    assert directions == {(a, b, d) for a, b in (("a", "b"), ("b", "a")) for d in ("upload", "download")}
    for t in xfer:
        assert t["bytes"] == nbytes and t["sha256_match"], t


def test_setup_two_nodes_join_the_tailnet(run: dict[str, Any]) -> None:
    data = step(run, "setup")
    ips = data["ips"]
    assert ips["a"] != ips["b"] and all(ip.startswith("100.") for ip in ips.values()), ips


def test_relay_ping_via_derp_and_bulk_transfer_counted(run: dict[str, Any]) -> None:
    """tailscale ping answered via DERP(dk1) each way, never direct; 4 MiB up and down in
    both directions through the SOCKS5 proxies, SHA-256 checked; /debug/varz counted it."""
    data = step(run, "relay")
    assert len(data["ping"]) == 6 and all("via DERP(dk1)" in ln for ln in data["ping"]), data["ping"]
    _check_transfers(data["transfers"], 4 << 20)
    d = data["varz_delta"]
    moved = data["payload_bytes"]
    assert moved == 16 << 20
    # Every payload byte crossed the relay at least once (WireGuard adds its own overhead).
    assert moved <= d["derp_bytes_received"] < 3 * moved, d
    assert d["derp_packets_received"] >= moved / 1500, d
    assert d["derp_packets_dropped"] == 0, d


def test_tls_ip_hostname_pinned_by_logged_certname(run: dict[str, Any]) -> None:
    """derpkit -certmode manual on 127.0.0.1: the nodes accept it only through the CertName
    pin taken from derpkit's own log line (no InsecureForTests anywhere)."""
    data = step(run, "tls_ip")
    assert data["cert_name"].startswith("sha256-raw:") and len(data["cert_name"]) == 75
    assert all("via DERP(dkip)" in ln for ln in data["ping"]), data["ping"]
    _check_transfers(data["transfers"], 2 << 20)


def test_tls_hostname_cert_from_a_ca_the_nodes_trust(run: dict[str, Any]) -> None:
    data = step(run, "tls_ca")
    assert data["cert_name"] == "" and data["host"].endswith(".e2e.derpkit.test")
    assert all("via DERP(dkca)" in ln for ln in data["ping"]), data["ping"]
    _check_transfers(data["transfers"], 2 << 20)


def test_nothing_tried_to_reach_the_internet(run: dict[str, Any]) -> None:
    """The nodes' HTTP(S)_PROXY is a trap that refuses and logs: it must have seen nothing."""
    assert run["trapped"] == [], run["trapped"][:10]


def test_restart_in_place_kill_vs_sigterm(run: dict[str, Any]) -> None:
    """The home relay restarts on the same port: traffic comes back after SIGKILL and after
    SIGTERM (derpkit then sends a Restarting frame); both times are measured and reported."""
    data = step(run, "restart")
    for sig in ("SIGKILL", "SIGTERM"):
        assert 0 < data[sig]["traffic_back_seconds"] < 60, data


def test_failover_to_the_second_region(run: dict[str, Any]) -> None:
    """Two regions; the home region's relay is killed; both nodes re-home on dk2 and a 1 MiB
    transfer each way succeeds through it, counted in relay2's /debug/varz."""
    data = step(run, "failover")
    assert 0 < data["traffic_back_seconds"] < 90, data
    _check_transfers(data["transfers"], 1 << 20)
    assert data["varz_delta_relay2"]["derp_bytes_received"] >= 4 << 20, data


def test_verify_clients_admits_the_tailnet_and_refuses_a_stranger(run: dict[str, Any]) -> None:
    """-verify-clients asking a third node's tailscaled: a and b relay through it; a DERP client
    with a fresh key is closed before ServerInfo, counted and logged with its key."""
    data = step(run, "verify_clients")
    assert all("via DERP(dkv)" in ln for ln in data["ping"]), data["ping"]
    _check_transfers(data["transfers"], 1 << 20)
    assert data["stranger"]["refused"], data["stranger"]
    assert data["rejected"] >= 1 and data["admitted"] >= 2, data
    assert any("not authorized" in ln for ln in data["stranger_log"]), data["stranger_log"]


def test_diagnostics_netcheck_debug_derp_and_probe_local(run: dict[str, Any]) -> None:
    """tailscale netcheck names our region nearest, tailscale debug derp reaches it, and
    derpkit probe -derp-map local reads the node's map over its LocalAPI socket and probes it."""
    data = step(run, "diagnostics")
    assert any("Nearest DERP: derpkit e2e dkip" in ln for ln in data["netcheck"]), data["netcheck"]
    assert data["debug_derp_errors"] == [], data["debug_derp"]
    assert data["probe_exit"] == 0 and any("dkip" in ln for ln in data["probe"]), data["probe"]


@pytest.mark.parametrize("name,code,kind", [("mesh_go", "dkgo", "derper"), ("mesh_derpkit", "dkdk", "derpkit")],
                         ids=["derpkit+derper", "derpkit+derpkit"])
def test_mesh_across_implementations(run: dict[str, Any], name: str, code: str, kind: str) -> None:
    """Node a homed on derpkit serve (m1), node b on m2 (Go derper, then derpkit) in the same
    region, meshed: pings and 1 MiB transfers each way cross the mesh, and both relays count
    the forwarded packets in each direction."""
    data = step(run, name)
    assert data["m2_kind"] == kind
    assert len(data["ping"]) == 6 and all(f"via DERP({code})" in ln for ln in data["ping"]), data["ping"]
    _check_transfers(data["transfers"], 1 << 20)
    d1, d2 = data["varz_delta_m1"], data["varz_delta_m2"]
    # 2 MiB of payload went each way: at least ~1400 full-size packets per direction crossed.
    for d in (d1, d2):
        assert d["derp_packets_forwarded_out"] > 1400 and d["derp_packets_forwarded_in"] > 1400, data
    # What one side forwarded out over the mesh, the other counted in.
    assert abs(d1["derp_packets_forwarded_out"] - d2["derp_packets_forwarded_in"]) <= 10, data
    assert abs(d2["derp_packets_forwarded_out"] - d1["derp_packets_forwarded_in"]) <= 10, data


def test_mesh_steps_steered_node_b_around_m1(run: dict[str, Any]) -> None:
    """The mesh steps send node b's dials to m1 into the refusing proxy on purpose, so that b
    homes on m2: the trap must have seen those dials (else b's home was never forced)."""
    step(run, "mesh_go")
    assert run["trapped_by_design"], "node b never tried m1 through the proxy"
    assert all("CONNECT" in ln for ln in run["trapped_by_design"]), run["trapped_by_design"][:5]
