"""``derpkit stunc -nat`` behind real Linux NATs and firewalls built with nftables.

tests/stunc/nat_netns.py builds client -> router -> servers in network namespaces (inside
``unshare -rnm``), runs a real ``derpkit serve -stun-rfc5780`` on the server side and a real
``derpkit stunc -nat -json`` on the client side for each router ruleset, and prints one JSON
report per case. Here each verdict is asserted against what the ruleset is known to do.
Under DERPKIT_REQUIRE_GO_PEERS=1 (CI) a machine without namespaces or nft fails, with the
reason, instead of skipping.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.goderper import REQUIRE_ENV, require_netns

ROOT = Path(__file__).resolve().parents[2]
CASES = ["eim", "adm", "apdm", "open", "fw-apdf", "fw-adf", "lifetime", "hairpin"]
pytestmark = pytest.mark.timeout(200)


def _missing(what: str) -> None:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{what} and {REQUIRE_ENV}=1: the NAT tests must run", pytrace=False)
    pytest.skip(what)


@pytest.fixture(scope="module")
def reports() -> dict[str, dict[str, Any]]:
    require_netns("stunc -nat is proved behind real NATs built in network namespaces")
    for tool in ("nft", "ip"):
        if shutil.which(tool) is None:
            _missing(f"`{tool}` not installed (apt-get install nftables iproute2; "
                     "scripts/install-peers.sh)")
    p = subprocess.run(["unshare", "-rnm", sys.executable, "-m", "tests.stunc.nat_netns", *CASES],
                       cwd=ROOT, capture_output=True, text=True, timeout=190)
    assert p.returncode == 0, f"namespace set-up or run failed:\n{p.stderr[-3000:]}"
    out = {}
    for line in p.stdout.splitlines():
        doc = json.loads(line)
        assert doc["rc"] == 0, doc
        out[doc["case"]] = {**doc["report"], "_natdiscovery": doc.get("natdiscovery"),
                            "_coturn": doc.get("coturn")}
    assert set(out) == set(CASES), p.stdout
    return out


def test_masquerade_is_endpoint_independent_mapping(reports: dict[str, Any]) -> None:
    r = reports["eim"]
    assert r["nat"] is True and r["rfc5780"] is True
    assert r["local_addr"].startswith("10.0.0.2:") and r["mapped_addr"].startswith("203.0.113.1:")
    assert r["mapping"] == "endpoint-independent"
    assert len({m["mapped"] for m in r["mapping_table"]}) == 1 and len(r["mapping_table"]) == 4
    # conntrack only lets in replies from the exact address and port sent to.
    assert r["filtering"] == "address-and-port-dependent"
    assert r["hairpinning"] is False
    assert r["summary"] == ("NAT: endpoint-independent mapping, address-and-port-dependent "
                            "filtering, no hairpinning")
    assert "Behind a NAT" in r["verdict"] and "most peers" in r["tailscale"]


def test_masquerade_random_is_address_and_port_dependent(reports: dict[str, Any]) -> None:
    r = reports["apdm"]
    assert r["nat"] is True and r["mapping"] == "address-and-port-dependent"
    assert len({m["mapped"] for m in r["mapping_table"]}) == 4  # a new port per destination
    assert {m["mapped"].rsplit(":", 1)[0] for m in r["mapping_table"]} == {"203.0.113.1"}
    assert r["filtering"] == "address-and-port-dependent"
    assert "hard NAT" in r["tailscale"] and "DERP" in r["tailscale"]


def test_port_range_per_destination_ip_is_address_dependent(reports: dict[str, Any]) -> None:
    r = reports["adm"]
    assert r["nat"] is True and r["mapping"] == "address-dependent"
    table = {m["server"]: m["mapped"] for m in r["mapping_table"]}
    assert table["203.0.113.11:3478"] == table["203.0.113.11:3479"] != table["203.0.113.10:3478"]
    assert table["203.0.113.10:3479"] == table["203.0.113.10:3478"]
    assert 30000 <= int(table["203.0.113.10:3478"].rsplit(":", 1)[1]) <= 30999
    assert "hard NAT" in r["tailscale"]


def test_routed_without_filter_is_open(reports: dict[str, Any]) -> None:
    r = reports["open"]
    assert r["nat"] is False and r["mapped_addr"] == r["local_addr"]
    assert r["filtering"] == "endpoint-independent" and r["hairpinning"] is None
    assert "directly reachable" in r["tailscale"]


def test_stateful_firewall_filters_by_address_and_port(reports: dict[str, Any]) -> None:
    r = reports["fw-apdf"]
    assert r["nat"] is False and r["filtering"] == "address-and-port-dependent"
    silent = [o for o in r["observations"] if o["change"] and o["mapped"] is None]
    assert len(silent) == 2 and all(o["sent"] >= 3 for o in silent)  # evidence, not one loss


def test_per_ip_firewall_filters_by_address(reports: dict[str, Any]) -> None:
    r = reports["fw-adf"]
    assert r["nat"] is False and r["filtering"] == "address-dependent"
    got = {o["change"]: o["origin"] for o in r["observations"] if o["change"]}
    assert got == {"port": "203.0.113.10:3479", "ip+port": None}
    assert "practically every peer" in r["tailscale"]


def test_mapping_lifetime_is_bounded_by_conntrack_timeout(reports: dict[str, Any]) -> None:
    """conntrack's UDP timeout is 2 s here: alive after 1 s idle, gone after 4 s."""
    r = reports["lifetime"]
    assert r["mapping"] == "endpoint-independent"
    assert r["lifetime_min_s"] in (1.0, 2.0) and r["lifetime_max_s"] in (2.0, 4.0)
    assert r["lifetime_min_s"] < r["lifetime_max_s"] and r["lifetime_monotonic"]
    assert "6 s gone" in r["lifetime_detail"]
    assert "An idle mapping lives between" in r["verdict"]


def test_port_forward_with_hairpin_nat(reports: dict[str, Any]) -> None:
    """-local :40000 behind a router forwarding UDP 40000 with NAT loopback: the NAT keeps
    the port and a packet to the public address comes back in. (Filtering is measured on a
    fresh, unforwarded socket, so it is conntrack's.)"""
    r = reports["hairpin"]
    assert r["local_addr"] == "10.0.0.2:40000" and r["mapped_addr"] == "203.0.113.1:40000"
    assert r["mapping"] == "endpoint-independent"
    assert r["filtering"] == "address-and-port-dependent"
    assert r["hairpinning"] is True and "The NAT hairpins" in r["verdict"]
    assert reports["eim"]["hairpinning"] is False  # the same NAT without the loopback rule


COTURN_WORDS = {
    "endpoint-independent": "Endpoint Independent",
    "address-dependent": "Address Dependent",
    "address-and-port-dependent": "Address and Port Dependent",
}


def coturn_verdict(out: str) -> tuple[str, str]:
    """(mapping, filtering) as turnutils_natdiscovery prints them, in our words."""
    words = {v: k for k, v in COTURN_WORDS.items()}
    m = re.search(r"NAT with (.+?) Mapping!", out)
    f = re.search(r"NAT with (.+?) Filtering!", out)
    assert m and f, out
    return words[m[1]], words[f[1]]


@pytest.mark.parametrize("case", ["eim", "adm", "apdm", "fw-adf"])
def test_coturn_agrees(reports: dict[str, Any], case: str) -> None:
    """coturn's turnutils_natdiscovery, run from the same client namespace, and coturn's own
    RFC 5780 server behind the same NAT: stunc's verdict is the same whichever server it asks,
    natdiscovery reaches it against coturn's server, and sees the same public IP."""
    r = reports[case]
    if r["_natdiscovery"] is None:
        _missing("coturn not installed (apt-get install coturn)")
    ours = (r["mapping"], r["filtering"])
    vs_coturn = r["_coturn"]["stunc"]
    assert vs_coturn["rc"] == 0, vs_coturn
    assert (vs_coturn["report"]["mapping"], vs_coturn["report"]["filtering"]) == ours
    assert coturn_verdict(r["_coturn"]["natdiscovery"]) == ours
    nd = r["_natdiscovery"]
    theirs = {a.rsplit(":", 1)[0] for a in re.findall(r"UDP reflexive addr: (\S+)", nd)}
    assert theirs == {r["mapped_addr"].rsplit(":", 1)[0]}, nd
    if case != "adm":
        assert coturn_verdict(nd) == ours
    else:
        # natdiscovery's test III goes to the OTHER-ADDRESS of its *second* answer. derpkit
        # serve gives RFC 5780's value there (the socket a change-IP+port reply would come
        # from: A1:P2), coturn's server gives A2:P2; so against derpkit the address-dependent
        # NAT is compared across two IPs and natdiscovery says "address and port dependent".
        assert "Response origin: : 203.0.113.10:3479" in nd, nd
        assert coturn_verdict(nd)[0] == "address-and-port-dependent"
