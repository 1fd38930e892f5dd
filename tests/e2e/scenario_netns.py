"""The end-to-end scenario, run inside a private network namespace (``unshare -rn``).

One control server (tests/e2e/control: Tailscale's testcontrol) and two real tailscaled
nodes are started once; each step then points the nodes at different relays by replacing
the DERP map, drives real traffic, and records what it saw. Nothing can leave the namespace
(its only interface is loopback), and the nodes' HTTP(S)_PROXY is the control binary's
refusing trap, so any attempt to reach the internet is logged and reported.

Prints one JSON object: ``{"steps": {name: {"ok", "seconds", "data" | "error", "logs"}},
"trapped": [...]}`` for tests/e2e/test_e2e.py to judge. A failing step carries its error
and the tail of the logs that matter; later steps still run when they can.

Usage: ``unshare -rn python3 -m tests.e2e.scenario_netns WORKDIR CONTROL TAILSCALED TAILSCALE DERPER``
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.e2e import harness as H
from tests.e2e import traffic

MIB = 1 << 20
TRANSFER_BYTES = 4 * MIB


@dataclass
class World:
    work: Path
    control_bin: str
    tailscaled: str
    cli: str
    derper: str
    control: H.Control | None = None
    nodes: dict[str, H.Node] = field(default_factory=dict)
    relays: dict[str, H.Relay] = field(default_factory=dict)
    service_port: int = 0
    node_env: dict[str, str] = field(default_factory=dict)

    def procs(self) -> list[H.Proc]:
        ps = [n.proc for n in self.nodes.values()] + [r.proc for r in self.relays.values()]
        return ps + ([self.control.proc] if self.control else [])

    def use_map(self, derp_map: dict[str, Any]) -> None:
        """Give every node ``derp_map`` and wait until each has it.

        Replacing testcontrol's map twice within a moment can leave a node with the first
        one, so no step goes on before every node shows the new regions. (A node then moves
        its home at its next periodic netcheck, some 20-25 s later: most of the TLS and
        mesh steps' time.)"""
        H.register_regions(derp_map)
        assert self.control is not None
        self.control.set_map(derp_map)
        want = sorted(derp_map["Regions"])
        for n in self.nodes.values():
            H.wait_until(lambda n=n: sorted(json.loads(n.cli("debug", "derp-map").stdout)["Regions"]) == want,
                         20, f"{n.name} receiving the DERP map with regions {want}", n.proc, self.control.proc)

    def start_nodes(self, env: dict[str, str]) -> None:
        """(Re)start nodes a and b with ``env``; their state directories persist."""
        assert self.control is not None
        for name in ("a", "b"):
            if name in self.nodes:
                self.nodes.pop(name).proc.stop()
        self.node_env = env
        for name in ("a", "b"):
            self.nodes[name] = H.start_node(f"node{name}", self.work, self.tailscaled, self.cli,
                                            self.control, env=env)


def check(cond: object, msg: str, *procs: H.Proc) -> None:
    if not cond:
        raise H.StepError(msg, *procs)


_PONG_RE = re.compile(r"pong from \S+ \((\S+)\) via (\S+) in ")


def await_home(w: World, code: str, timeout: float = 40.0) -> float:
    """Wait until both nodes report ``code`` as their home DERP region; the seconds it took."""
    t0 = time.monotonic()
    for n in w.nodes.values():
        H.wait_until(lambda n=n: n.status()["Self"].get("Relay") == code, timeout,
                     f"{n.name} homed on region {code}", n.proc, *[r.proc for r in w.relays.values()])
    return time.monotonic() - t0


def derp_ping(w: World, src: str, dst: str, code: str, count: int = 3) -> list[str]:
    """``tailscale ping`` from src to dst: every pong must come via DERP(code), none direct."""
    a, b = w.nodes[src], w.nodes[dst]
    p = a.cli("ping", f"-c={count}", "--timeout=5s", b.ip, check=False, timeout=60)
    pongs = _PONG_RE.findall(p.stdout)
    check(pongs, f"tailscale ping {src}->{dst}: no pong (exit {p.returncode}): {p.stdout.strip()[-300:]} {p.stderr.strip()[-300:]}",
          a.proc, b.proc, *[r.proc for r in w.relays.values()])
    vias = sorted({via for _, via in pongs})
    check(vias == [f"DERP({code})"], f"tailscale ping {src}->{dst}: pongs came via {vias}, wanted only DERP({code})",
          a.proc, b.proc)
    return p.stdout.strip().splitlines()


def transfers(w: World, nbytes: int = TRANSFER_BYTES) -> list[dict[str, object]]:
    """Upload and download nbytes a->b and b->a through the SOCKS5 proxies, checksummed."""
    out = []
    for src, dst in (("a", "b"), ("b", "a")):
        s, d = w.nodes[src], w.nodes[dst]
        for fn in (traffic.upload, traffic.download):
            try:
                t = fn(s.socks_port, d.ip, w.service_port, nbytes)
            except OSError as e:
                raise H.StepError(f"{fn.__name__} {src}->{dst} through SOCKS5 failed: {e}", s.proc, d.proc) from e
            check(t.sha_ok, f"{fn.__name__} {src}->{dst}: SHA-256 mismatch", s.proc, d.proc)
            out.append({"from": src, "to": dst, **t.as_dict()})
    return out


def counters(r: H.Relay) -> dict[str, float]:
    v = r.varz()
    keys = ("derp_packets_received", "derp_packets_sent", "derp_bytes_received", "derp_bytes_sent",
            "derp_packets_forwarded_out", "derp_packets_forwarded_in", "derp_packets_dropped")
    return {k: v.get(k, 0.0) for k in keys}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# --------------------------------------------------------------------------- steps


def step_setup(w: World) -> dict[str, Any]:
    r = H.start_relay("relay1", "derpkit", w.work)
    w.relays["relay1"] = r
    dm = {"Regions": {"901": H.region(901, "dk1", H.derp_node("901a", 901, r.port, r.stun_port))}}
    H.register_regions(dm)
    w.control = H.Control.start(w.control_bin, w.work, dm)
    w.service_port, _ = traffic.start_service()
    t0 = time.monotonic()
    w.start_nodes({"TS_DEBUG_USE_DERP_HTTP": "1"})
    return {"nodes_up_seconds": round(time.monotonic() - t0, 2),
            "ips": {k: n.ip for k, n in w.nodes.items()}}


def step_relay(w: World) -> dict[str, Any]:
    r = w.relays["relay1"]
    await_home(w, "dk1")
    before = counters(r)
    ping = derp_ping(w, "a", "b", "dk1") + derp_ping(w, "b", "a", "dk1")
    xfer = transfers(w)
    d = delta(counters(r), before)
    moved = sum(int(t["bytes"]) for t in xfer)  # type: ignore[call-overload]
    check(d["derp_bytes_received"] >= moved and d["derp_bytes_sent"] >= moved,
          f"relay1 /debug/varz counted {d['derp_bytes_received']:.0f} bytes in, {d['derp_bytes_sent']:.0f} out; "
          f"{moved} bytes of payload crossed", r.proc)
    check(d["derp_packets_received"] >= moved / 1500, f"relay1 counted only {d['derp_packets_received']:.0f} packets", r.proc)
    peer = w.nodes["a"].status()["Peer"]
    cur = [p.get("CurAddr") for p in peer.values()]
    check(cur == [""], f"node a has a direct path to b ({cur}); TS_DEBUG_NEVER_DIRECT_UDP should forbid it")
    return {"ping": ping, "transfers": xfer, "varz_delta": d, "payload_bytes": moved}


def _tls_relay_step(w: World, name: str, rid: int, code: str, extra: list[str], host: str,
                    cert_name_from_log: bool, env: dict[str, str]) -> dict[str, Any]:
    r = H.start_relay(name, "derpkit", w.work, *extra, tls=True, sni="" if host[0].isdigit() else host)
    w.relays[name] = r
    cert_name = ""
    if cert_name_from_log:
        m = r.proc.wait_log(r'"CertName":\s*"(sha256-raw:[0-9a-f]{64})"', 10, "CertName line in the log")
        cert_name = m.group(1)
    dm = {"Regions": {str(rid): H.region(rid, code, H.derp_node(f"{rid}a", rid, r.port, r.stun_port,
                                                               host=host, cert_name=cert_name))}}
    if w.node_env != env:
        w.start_nodes(env)
    w.use_map(dm)
    await_home(w, code, 60)
    before = counters(r)
    ping = derp_ping(w, "a", "b", code)
    xfer = transfers(w, 2 * MIB)
    d = delta(counters(r), before)
    moved = sum(int(t["bytes"]) for t in xfer)  # type: ignore[call-overload]
    check(d["derp_bytes_received"] >= moved, f"{name} counted {d['derp_bytes_received']:.0f} bytes; {moved} crossed", r.proc)
    return {"cert_name": cert_name, "host": host, "ping": ping, "transfers": xfer, "varz_delta": d}


def step_tls_ip(w: World) -> dict[str, Any]:
    """derpkit -certmode manual on 127.0.0.1: self-signed, pinned by the CertName it logs."""
    certdir = w.work / "tls-ip-certs"
    return _tls_relay_step(w, "relay_tls_ip", 902, "dkip",
                           ["-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(certdir)],
                           "127.0.0.1", True, {"SSL_CERT_FILE": str(_ca(w).cert_path)})


_CA: list[Any] = []


def _ca(w: World) -> Any:
    """The run's test CA (tests/interop/pki.py), made once; the nodes trust it via SSL_CERT_FILE."""
    from tests.interop.pki import TestCA

    if not _CA:
        _CA.append(TestCA.create(w.work / "ca"))
    return _CA[0]


def step_tls_ca(w: World) -> dict[str, Any]:
    """derpkit -certmode manual with a hostname certificate from a test CA the nodes trust."""
    ca = _ca(w)
    certdir = w.work / "tls-ca-certs"
    host = "derp." + H.TEST_DOMAIN
    ca.issue(host, [host], [], directory=certdir)
    return _tls_relay_step(w, "relay_tls_ca", 903, "dkca",
                           ["-certmode", "manual", "-hostname", host, "-certdir", str(certdir)],
                           host, False, {"SSL_CERT_FILE": str(ca.cert_path)})


def _dm(*regions: tuple[int, str, H.Relay]) -> dict[str, Any]:
    """A DERP map of plain-HTTP regions, one relay each."""
    return {"Regions": {str(rid): H.region(rid, code, H.derp_node(f"{rid}a", rid, r.port, r.stun_port))
                        for rid, code, r in regions}}


def step_diagnostics(w: World) -> dict[str, Any]:
    """tailscale netcheck / debug derp on a node, and derpkit probe reading the node's map."""
    a = w.nodes["a"]
    relay = w.relays["relay_tls_ip"]  # the TLS region tls_ip left in the map, pinned by CertName
    await_home(w, "dkip")
    nc = a.cli("netcheck", timeout=60)
    check("Nearest DERP: derpkit e2e dkip" in nc.stdout,
          f"tailscale netcheck does not name region dkip as nearest:\n{nc.stdout[-1500:]}", a.proc)
    dd = a.cli("debug", "derp", "dkip", timeout=60, check=False)
    dd_text = dd.stdout + dd.stderr
    report = json.loads(dd.stdout) if dd.returncode == 0 else {}
    # The CLI dials the map's IPv6 field even when it is "none" (the map's way of saying
    # "no IPv6"); that one error is Tailscale's, every other error is ours.
    errors = [e for e in report.get("Errors") or [] if '@ "none:' not in e]
    info = " ".join(report.get("Info") or [])
    check(dd.returncode == 0 and not errors and "Successfully established a DERP connection" in info
          and "STUN response" in info,
          f"tailscale debug derp dkip exited {dd.returncode}:\n{dd_text[-1500:]}", a.proc, relay.proc)
    pr = subprocess.run([sys.executable, "-m", "derpkit", "probe", "-derp-map", "local", "-socket", str(a.sock),
                         "-once"], capture_output=True, text=True, timeout=90)
    probe_text = pr.stdout + pr.stderr
    check(pr.returncode == 0 and "dkip" in probe_text,
          f"derpkit probe -derp-map local -once exited {pr.returncode}:\n{probe_text[-2000:]}", relay.proc)
    return {"netcheck": nc.stdout.strip().splitlines(), "debug_derp": report, "debug_derp_errors": errors,
            "probe": probe_text.strip().splitlines()[-40:], "probe_exit": pr.returncode}


def _recover(w: World, code: str, timeout: float, *procs: H.Proc) -> float:
    """Seconds (from now) until tailscale ping a->b gets a pong via DERP(code)."""
    a, b = w.nodes["a"], w.nodes["b"]
    t0 = time.monotonic()

    def pong() -> bool:
        p = a.cli("ping", "-c=1", "--timeout=1s", b.ip, check=False, timeout=10)
        return f"via DERP({code})" in p.stdout

    H.wait_until(pong, timeout, f"a->b pong via DERP({code})", a.proc, b.proc, *procs, interval=0.05)
    return time.monotonic() - t0


def step_restart(w: World) -> dict[str, Any]:
    """The home relay restarts in place: SIGKILL then start vs SIGTERM (Restarting frame) then start."""
    out: dict[str, Any] = {}
    for sig_name, sig in (("SIGKILL", signal.SIGKILL), ("SIGTERM", signal.SIGTERM)):
        old = w.relays.pop("relay1")
        w.use_map(_dm((901, "dk1", old)))
        await_home(w, "dk1")
        _recover(w, "dk1", 20, old.proc)
        t0 = time.monotonic()
        old.proc.stop(sig)
        new = H.start_relay("relay1", "derpkit", w.work, port=old.port, stun_port=old.stun_port)
        w.relays["relay1"] = new
        up = time.monotonic() - t0
        rec = _recover(w, "dk1", 60, new.proc) + up
        out[sig_name] = {"server_back_seconds": round(up, 2), "traffic_back_seconds": round(rec, 2)}
    return out


def step_failover(w: World) -> dict[str, Any]:
    """Two regions; the home region's server is killed; both nodes move and traffic resumes."""
    r1 = w.relays["relay1"]
    r2 = H.start_relay("relay2", "derpkit", w.work)
    w.relays["relay2"] = r2
    await_home(w, "dk1")
    w.use_map(_dm((901, "dk1", r1), (904, "dk2", r2)))  # returns once both nodes know dk2
    homes_before = {k: n.status()["Self"].get("Relay") for k, n in w.nodes.items()}
    check(set(homes_before.values()) == {"dk1"}, f"nodes moved off dk1 before the kill: {homes_before}")
    before = counters(r2)
    t0 = time.monotonic()
    r1.proc.stop(signal.SIGKILL)
    rec = _recover(w, "dk2", 90, r2.proc)
    moved = await_home(w, "dk2", 90) + rec
    xfer = transfers(w, 1 * MIB)
    total = time.monotonic() - t0
    d = delta(counters(r2), before)
    check(d["derp_bytes_received"] >= 4 * MIB, f"relay2 counted only {d['derp_bytes_received']:.0f} bytes", r2.proc)
    # Bring region 1 back for the steps after this one.
    w.relays["relay1"] = H.start_relay("relay1", "derpkit", w.work, port=r1.port, stun_port=r1.stun_port)
    return {"traffic_back_seconds": round(rec, 2), "both_homed_seconds": round(moved, 2),
            "with_transfer_seconds": round(total, 2), "transfers": xfer, "varz_delta_relay2": d}


def step_verify_clients(w: World) -> dict[str, Any]:
    """derpkit -verify-clients asking a third tailscaled: nodes a and b admitted, a stranger refused."""
    import asyncio

    assert w.control is not None
    c = w.nodes.get("c") or H.start_node("nodec", w.work, w.tailscaled, w.cli, w.control, env=w.node_env)
    w.nodes["c"] = c
    rv = H.start_relay("relay_verify", "derpkit", w.work, "-verify-clients", "-socket", str(c.sock))
    w.relays["relay_verify"] = rv
    w.use_map(_dm((905, "dkv", rv)))
    await_home(w, "dkv", 60)
    ping = derp_ping(w, "a", "b", "dkv")
    xfer = transfers(w, 1 * MIB)
    refused = asyncio.run(_stranger(rv))
    v = rv.varz()
    log = rv.proc.text()
    check(v.get("derpkit_admission_rejected", 0) >= 1, f"relay_verify counted no rejection: {v.get('derpkit_admission_rejected')}", rv.proc)
    stranger_lines = [ln for ln in log.splitlines() if refused["key"][8:24] in ln]
    check(stranger_lines, f"relay_verify logged nothing about the stranger {refused['key']}", rv.proc)
    return {"ping": ping, "transfers": xfer, "stranger": refused, "stranger_log": stranger_lines[-3:],
            "admitted": v.get("derpkit_admission_admitted", 0), "rejected": v.get("derpkit_admission_rejected", 0)}


async def _stranger(r: H.Relay) -> dict[str, Any]:
    """A DERP client with a fresh key the tailnet has never seen: it must not get through."""
    from derpkit.client import DerpClient
    from derpkit.client.errors import DerpConnectionError, DerpTimeoutError
    from derpkit.protocol.keys import NodePrivate

    key = NodePrivate.generate()
    pub = str(key.public())
    try:
        cl = await DerpClient.connect(f"http://127.0.0.1:{r.port}/derp", private_key=key, timeout=10)
    except (DerpConnectionError, DerpTimeoutError, OSError) as e:
        return {"key": pub, "refused": True, "how": f"{type(e).__name__}: {e}"}
    try:
        await cl.ping()
        got = await cl.recv(timeout=3)
        return {"key": pub, "refused": False, "how": f"still connected, got {type(got).__name__}"}
    except Exception as e:  # noqa: BLE001 - any end of the connection is the refusal we expect
        return {"key": pub, "refused": True, "how": f"after connect: {type(e).__name__}: {e}"}
    finally:
        await cl.close()


def _restart_node(w: World, name: str, env: dict[str, str]) -> H.Node:
    """Restart one node with ``env`` (its state directory, so its keys and IP, persist)."""
    assert w.control is not None
    w.nodes.pop(name).proc.stop()
    n = H.start_node(f"node{name}", w.work, w.tailscaled, w.cli, w.control, env=env)
    w.nodes[name] = n
    return n


def _mesh(w: World, kind_b: str, rid: int, code: str) -> dict[str, Any]:
    """Relay m1 (derpkit) and m2 (``kind_b``) meshed in one region; a homed on m1, b on m2.

    The map lists m1 first, so a node uses m1 when it can. Node b is restarted with a NO_PROXY
    that leaves m1's name out: its dial to m1 goes to the refusing proxy and it settles on m2,
    the region's second node, exactly as a client that cannot reach the first node would."""
    import secrets

    ca = _ca(w)
    certdir = w.work / "mesh-certs"
    names = [f"m1.{H.TEST_DOMAIN}", f"m2.{H.TEST_DOMAIN}"]
    for n in names:
        if not (certdir / f"{n}.crt").exists():
            ca.issue(n, [n], [], directory=certdir)
    psk = w.work / "mesh.key"
    psk.write_text(secrets.token_hex(32) + "\n")
    p1, p2 = H.free_port(), H.free_port()
    env = {"SSL_CERT_FILE": str(ca.cert_path)}

    def args(me: str, other: str, other_port: int) -> list[str]:
        # Each relay is its own name (Go derper in manual mode insists the SNI is -hostname);
        # the mesh link connects as the peer's name and dials 127.0.0.1.
        return ["-certmode", "manual", "-hostname", me, "-certdir", str(certdir),
                "-mesh-psk-file", str(psk), "-mesh-with", f"{other}:{other_port}/127.0.0.1"]

    m1 = H.start_relay(f"mesh_{code}_m1", "derpkit", w.work, *args(names[0], names[1], p2), tls=True,
                       sni=names[0], env=env, port=p1)
    w.relays[m1.name] = m1
    m2 = H.start_relay(f"mesh_{code}_m2", kind_b, w.work, *args(names[1], names[0], p1), tls=True,
                       sni=names[1], env=env, port=p2, derper=w.derper)
    w.relays[m2.name] = m2
    dm = {"Regions": {str(rid): H.region(rid, code,
                                         H.derp_node(f"{rid}m1", rid, p1, m1.stun_port, host=names[0]),
                                         H.derp_node(f"{rid}m2", rid, p2, m2.stun_port, host=names[1]))}}
    if w.node_env.get("SSL_CERT_FILE") != str(ca.cert_path):
        w.start_nodes(env)
    no_proxy = f"{names[1]},derp.{H.TEST_DOMAIN}"
    base_env = {**w.node_env}
    b_env = {**base_env, "NO_PROXY": no_proxy, "no_proxy": no_proxy}
    if w.nodes["b"].env.get("NO_PROXY") != no_proxy:
        _restart_node(w, "b", b_env)
    w.use_map(dm)
    await_home(w, code, 60)
    before1, before2 = counters(m1), counters(m2)
    _recover(w, code, 60, m1.proc, m2.proc)  # the mesh links may still be connecting
    ping = derp_ping(w, "a", "b", code) + derp_ping(w, "b", "a", code)
    xfer = transfers(w, 1 * MIB)
    d1, d2 = delta(counters(m1), before1), delta(counters(m2), before2)
    check(d1["derp_packets_forwarded_out"] > 0 and d2["derp_packets_forwarded_in"] > 0,
          f"a->b did not cross the mesh m1->m2: m1 forwarded_out {d1['derp_packets_forwarded_out']}, "
          f"m2 forwarded_in {d2['derp_packets_forwarded_in']}", m1.proc, m2.proc)
    check(d2["derp_packets_forwarded_out"] > 0 and d1["derp_packets_forwarded_in"] > 0,
          f"b->a did not cross the mesh m2->m1: m2 forwarded_out {d2['derp_packets_forwarded_out']}, "
          f"m1 forwarded_in {d1['derp_packets_forwarded_in']}", m1.proc, m2.proc)
    for r in (m1, m2):
        r.proc.stop()
        w.relays.pop(r.name)
    return {"m2_kind": kind_b, "ping": ping, "transfers": xfer, "varz_delta_m1": d1, "varz_delta_m2": d2}


def step_mesh_go(w: World) -> dict[str, Any]:
    """Node a on derpkit serve, node b on Go derper, one region, meshed."""
    return _mesh(w, "derper", 907, "dkgo")


def step_mesh_derpkit(w: World) -> dict[str, Any]:
    """Both relays of the region are derpkit serve, meshed."""
    return _mesh(w, "derpkit", 908, "dkdk")


STEPS: list[tuple[str, Callable[[World], dict[str, Any]]]] = [
    ("setup", step_setup),
    ("relay", step_relay),
    ("restart", step_restart),
    ("failover", step_failover),
    ("verify_clients", step_verify_clients),
    ("tls_ip", step_tls_ip),
    ("diagnostics", step_diagnostics),
    ("tls_ca", step_tls_ca),
    ("mesh_go", step_mesh_go),
    ("mesh_derpkit", step_mesh_derpkit),
]


def main() -> int:
    work, control_bin, tailscaled, cli, derper = sys.argv[1:6]
    only = set(sys.argv[6].split(",")) if len(sys.argv) > 6 and sys.argv[6] else None
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    w = World(Path(work), control_bin, tailscaled, cli, derper)
    results: dict[str, Any] = {}
    trapped: list[str] = []
    by_design: list[str] = []
    try:
        for name, fn in STEPS:
            if only and name not in only and name != "setup":
                continue
            t0 = time.monotonic()
            res: dict[str, Any] = {}
            try:
                res["data"] = fn(w)
                res["ok"] = True
            except H.StepError as e:
                res.update(ok=False, error=str(e), logs=e.logs)
            except Exception as e:  # noqa: BLE001 - report any crash as this step's failure
                res.update(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:],
                           logs={p.name: p.tail() for p in w.procs()})
            res["seconds"] = round(time.monotonic() - t0, 2)
            results[name] = res
            print(f"e2e step {name}: {'ok' if res['ok'] else 'FAILED: ' + res['error']} ({res['seconds']}s)",
                  file=sys.stderr, flush=True)
            if name == "setup" and not res["ok"]:
                break
    finally:
        trapped = w.control.trapped() if w.control else []
        # The mesh steps send node b's dials to m1 into the trap on purpose (see _mesh).
        by_design = [ln for ln in trapped if f"m1.{H.TEST_DOMAIN}" in ln]
        trapped = [ln for ln in trapped if ln not in by_design]
        for p in w.procs():
            p.stop(timeout=5)
    print(json.dumps({"steps": results, "trapped": trapped, "trapped_by_design": by_design}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
