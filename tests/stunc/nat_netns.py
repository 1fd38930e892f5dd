"""Real NATs for ``derpkit stunc -nat``: client -> NAT router -> servers, in network namespaces.

Run as ``unshare -rnm python3 -m tests.stunc.nat_netns CASE...`` (a private user, network and
mount namespace: root inside, nothing visible outside). It builds three more namespaces with
``ip netns`` (a private ``/run`` is mounted first so nothing leaks to the host):

    cli 10.0.0.2 --- 10.0.0.1 rtr 203.0.113.1 --- 203.0.113.10 + .11 srv

``srv`` runs a real ``derpkit serve -stun-rfc5780`` (STUN on .10 and .11, ports 3478/3479).
For each case the router gets an nftables ruleset, then ``derpkit stunc -nat -json`` runs in
``cli``; one JSON object per case goes to stdout for the test to judge:

* ``eim`` — plain ``masquerade``: Linux keeps one mapping per socket (endpoint-independent),
  conntrack admits only the exact address replied to (address-and-port-dependent filtering).
* ``apdm`` — ``masquerade random``: a random port per new flow, i.e. per destination address
  and port (address-and-port-dependent mapping, a "symmetric" NAT).
* ``adm`` — ``snat`` to a port range chosen by destination IP: one public port per socket and
  server IP, whatever the server port (address-dependent mapping).
* ``open`` — routing without NAT or filter: no NAT, endpoint-independent filtering.
* ``fw-apdf`` — no NAT, a stateful firewall (``ct state established``): address-and-port-
  dependent filtering.
* ``fw-adf`` — no NAT, a firewall admitting packets to a client socket from any port of an
  IP that socket has sent to (an nftables set of socket . remote IP, filled by outgoing
  packets): address-dependent filtering.
* ``lifetime`` — ``eim`` with conntrack's UDP timeouts cut to 2 s/3 s, and ``-lifetime 6s``.
* ``hairpin`` — ``eim`` plus a port forward of the client's UDP 40000 with hairpin NAT, and
  ``-local :40000``: the NAT hairpins, and the forwarded port admits anyone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRV1, SRV2, PUBLIC = "203.0.113.10", "203.0.113.11", "203.0.113.1"

RULES = {
    "eim": """
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "r1" masquerade; }
}""",
    "apdm": """
table ip nat {
  chain post { type nat hook postrouting priority 100; oifname "r1" masquerade random; }
}""",
    "open": "",
    "fw-apdf": """
table inet fw {
  chain forward_filter {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "r0" accept
  }
}""",
    "fw-adf": """
table inet fw {
  set contacted { type ipv4_addr . inet_service . ipv4_addr; flags dynamic, timeout; timeout 5m; }
  chain forward_filter {
    type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname "r0" meta l4proto udp add @contacted { ip saddr . udp sport . ip daddr } accept
    iifname "r0" accept
    iifname "r1" meta l4proto udp ip daddr . udp dport . ip saddr @contacted accept
  }
}""",
}
RULES["lifetime"] = RULES["eim"]
#: A port range per destination IP: one public port per (socket, server IP), shared by the
#: server's ports (Linux keeps the first free port of the range for each new flow).
RULES["adm"] = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "r1" meta l4proto udp snat ip to ip daddr map {
      203.0.113.10 : 203.0.113.1 . 30000-30999, 203.0.113.11 : 203.0.113.1 . 31000-31999 }
  }
}"""
#: Port forward of the client's UDP 40000 with hairpin NAT: masquerade keeps the port, the
#: forward lets anyone reach it, and inside packets to the public address are sent back in
#: with the router's public address as their source (what "NAT loopback" settings do).
RULES["hairpin"] = """
table ip nat {
  chain pre {
    type nat hook prerouting priority -100;
    ip daddr 203.0.113.1 udp dport 40000 dnat to 10.0.0.2:40000
  }
  chain post {
    type nat hook postrouting priority 100;
    oifname "r1" masquerade
    iifname "r0" oifname "r0" snat to 203.0.113.1
  }
}"""
#: Cases where coturn's turnutils_natdiscovery also runs from the client, as a second opinion.
COTURN_CASES = ("eim", "adm", "apdm", "fw-adf")


def sh(*argv: str, check: bool = True, input: str | None = None) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, input=input, timeout=30)
    if check and p.returncode:
        raise RuntimeError(f"{' '.join(argv)}: {p.stderr.strip() or p.stdout.strip()}")
    return p.stdout


def ns(name: str, *argv: str, **kw: object) -> str:
    return sh("ip", "netns", "exec", name, *argv, **kw)  # type: ignore[arg-type]


def build() -> None:
    sh("mount", "-t", "tmpfs", "none", "/run")
    os.makedirs("/run/netns", exist_ok=True)
    for n in ("cli", "rtr", "srv"):
        sh("ip", "netns", "add", n)
        ns(n, "ip", "link", "set", "lo", "up")
    sh("ip", "link", "add", "c0", "type", "veth", "peer", "name", "r0")
    sh("ip", "link", "add", "r1", "type", "veth", "peer", "name", "s0")
    for dev, n in (("c0", "cli"), ("r0", "rtr"), ("r1", "rtr"), ("s0", "srv")):
        sh("ip", "link", "set", dev, "netns", n)
    for n, dev, addrs in (("cli", "c0", ["10.0.0.2/24"]), ("rtr", "r0", ["10.0.0.1/24"]),
                          ("rtr", "r1", [f"{PUBLIC}/24"]),
                          ("srv", "s0", [f"{SRV1}/24", f"{SRV2}/24"])):
        for a in addrs:
            ns(n, "ip", "addr", "add", a, "dev", dev)
        ns(n, "ip", "link", "set", dev, "up")
    ns("cli", "ip", "route", "add", "default", "via", "10.0.0.1")
    ns("srv", "ip", "route", "add", "10.0.0.0/24", "via", PUBLIC)  # for the no-NAT cases
    ns("rtr", "sysctl", "-qw", "net.ipv4.ip_forward=1")


def start_server() -> subprocess.Popen[str]:
    key = os.path.join(tempfile.mkdtemp(prefix="derpkit-key-"), "derper.key")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", "srv", sys.executable, "-m", "derpkit", "serve", "-c", key,
         "-a", f"{SRV1}:8080", "-http-port", "-1", "-stun-port", "3478", "-stun-rfc5780", SRV2],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError("derpkit serve exited early")
        if "DERP on port" in line:
            return proc
    raise RuntimeError("derpkit serve did not start")


COTURN_PORT = 3490  # coturn's RFC 5780 server in srv: .10/.11 x 3490/3491


def start_coturn() -> subprocess.Popen[bytes] | None:
    """coturn's turnserver as a second RFC 5780 server in srv (None if not installed)."""
    binary = shutil.which("turnserver")
    if binary is None:
        return None
    work = tempfile.mkdtemp(prefix="coturn-")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", "srv", binary, "-n", "--stun-only", "--no-cli", "--no-tls",
         "--no-dtls", "-L", SRV1, "-L", SRV2, "-p", str(COTURN_PORT), "--log-file", "stdout",
         "--pidfile", f"{work}/turn.pid"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return proc


def stunc_nat(port: int, extra: list[str]) -> dict[str, object]:
    p = subprocess.run(
        ["ip", "netns", "exec", "cli", sys.executable, "-m", "derpkit", "stunc", "-nat",
         "-json", "-timeout", "1s", *extra, SRV1, str(port)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    try:
        return {"rc": p.returncode, "report": json.loads(p.stdout), "stderr": p.stderr[-2000:]}
    except ValueError:
        return {"rc": p.returncode, "stdout": p.stdout[-2000:], "stderr": p.stderr[-2000:]}


def natdiscovery(port: int) -> str:
    nd = subprocess.run(
        ["ip", "netns", "exec", "cli", "turnutils_natdiscovery", "-m", "-f", "-p", str(port),
         SRV1], capture_output=True, text=True, timeout=60,
    )
    return nd.stdout + nd.stderr


def run_case(case: str) -> dict[str, object]:
    ns("rtr", "nft", "flush", "ruleset")
    if RULES[case]:
        ns("rtr", "nft", "-f", "-", input=RULES[case])
    extra: list[str] = []
    # conntrack's UDP timeouts: the kernel defaults, cut short only for the lifetime case.
    short = case == "lifetime"
    for knob, value in (("nf_conntrack_udp_timeout", "2" if short else "30"),
                        ("nf_conntrack_udp_timeout_stream", "3" if short else "120")):
        # (before conntrack is in use the knobs may not exist yet: only the cut must work)
        ns("rtr", "sysctl", "-qw", f"net.netfilter.{knob}={value}", check=short)
    if short:
        extra = ["-lifetime", "6s"]
    if case == "hairpin":
        extra = ["-local", ":40000"]
    t0 = time.monotonic()
    p = subprocess.run(
        ["ip", "netns", "exec", "cli", sys.executable, "-m", "derpkit", "stunc", "-nat",
         "-json", "-timeout", "1s", *extra, SRV1, "3478"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    doc: dict[str, object] = {"case": case, "rc": p.returncode, "stderr": p.stderr[-2000:],
                              "seconds": round(time.monotonic() - t0, 2)}
    try:
        doc["report"] = json.loads(p.stdout)
    except ValueError:
        doc["stdout"] = p.stdout[-2000:]
    if case in COTURN_CASES and shutil.which("turnutils_natdiscovery"):
        # Second opinions: coturn's client against our server, and both clients against
        # coturn's server.
        # They run at once (separate sockets, so separate mappings): coturn's client waits
        # out several seconds of its own timeouts.
        with ThreadPoolExecutor(3) as pool:
            nd_ours = pool.submit(natdiscovery, 3478)
            nd_theirs = pool.submit(natdiscovery, COTURN_PORT)
            st_theirs = pool.submit(stunc_nat, COTURN_PORT, [])
            doc["natdiscovery"] = nd_ours.result()
            doc["coturn"] = {"stunc": st_theirs.result(), "natdiscovery": nd_theirs.result()}
    return doc


def main(cases: list[str]) -> int:
    build()
    server = start_server()
    coturn = start_coturn()
    try:
        for case in cases:
            print(json.dumps(run_case(case)), flush=True)
    finally:
        for proc in (server, coturn):
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
