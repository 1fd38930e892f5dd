"""bench.hyperderp: Hyper-DERP as a benchmark peer, and proof that it really relays DERP.

The relay tests need the binary that ``bash bench/build_hyperderp.sh`` builds into
``$(go env GOPATH)/peers/hyperderp/``. They skip without it even under
DERPKIT_REQUIRE_GO_PEERS=1: that build reads repository mirrors a session fetches by
hand (GitHub is not reachable), so a fresh CI machine cannot be required to have it.
The refusal tests need no binary and always run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.hyperderp import HyperDerpServer, _expand_cpus, find_hyperderp, in_private_netns
from bench.servers import load_kinds
from tests.goderper import build_go_program, require_netns

ROOT = Path(__file__).resolve().parents[2]


def test_refuses_the_host_network_before_running_anything() -> None:
    assert not in_private_netns()  # this test process is on the host's network
    s = HyperDerpServer(binary="/bin/false")
    with pytest.raises(RuntimeError, match="private network namespace"):
        s.start()
    assert s.proc is None


def test_one_worker_column_is_pinned_whole_and_worker() -> None:
    s = HyperDerpServer(binary="/opt/hd", cpus="0", workers=1)
    s.port, s.metrics_port = 3340, 9100
    assert s._args() == ["taskset", "-c", "0", "/opt/hd", "--port", "3340", "--workers", "1",
                         "--log-level", "info", "--pin-workers", "0", "--metrics-port", "9100"]
    every = HyperDerpServer(binary="/opt/hd", cpus="0-1", workers=0, metrics=False)
    assert every._args()[-2:] == ["--pin-workers", "0,1"]
    assert _expand_cpus("0,2-4") == [0, 2, 3, 4]


def test_kinds_are_registered_plain_http_and_namespaced() -> None:
    kinds = load_kinds()
    for name in ("hyperderp", "hyperderp-all"):
        assert kinds[name].transports == frozenset({"http"}) and kinds[name].needs_netns


@pytest.fixture(scope="module")
def relayed() -> dict[str, Any]:
    if find_hyperderp() is None:
        pytest.skip("Hyper-DERP not built: run `bash bench/build_hyperderp.sh` (needs the "
                    "repository mirrors; see docs/benchmarks.md, Hyper-DERP)")
    require_netns("Hyper-DERP binds 0.0.0.0")
    derpgen = build_go_program(ROOT / "bench" / "derpgen", "the Hyper-DERP relay check")
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run(["unshare", "-rn", sys.executable, "-m", "tests.bench.hyperderp_netns",
                        derpgen], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def test_derpkit_clients_exchange_packets_through_it(relayed: dict[str, Any]) -> None:
    c = relayed["clients"]
    assert c["b_got"] == [True] * 4 and c["b_src_is_a"] == [True] * 4, c
    assert c["a_got_reply"] and c["a_src_is_b"], c
    assert c["server_key"].startswith("nodekey:"), c


def test_a_bystander_hears_nothing_yet_is_alive(relayed: dict[str, Any]) -> None:
    c = relayed["clients"]
    assert c["c_leak"] is False and c["c_ping_ms"] > 0, c


def test_go_derp_clients_flood_through_without_loss(relayed: dict[str, Any]) -> None:
    g = relayed["derpgen"]
    assert "error" not in g, g
    # 20,000 packets/s for 2 s asked; a loaded host may send fewer, never lose them.
    assert g["sent"] > 10_000 and g["received"] == g["sent"], g
    # Its own counter saw at least those bytes (plus the derpkit clients' frames).
    assert relayed["recv_bytes_delta"] >= g["received"] * g["size"], relayed


def test_one_instance_per_host_then_a_restart_works(relayed: dict[str, Any]) -> None:
    assert "only one instance per host" in relayed["second"], relayed
    assert relayed["restart_workers"] == ["2"], relayed
