"""``derpkit probe -once`` side by side with Tailscale's Go ``derpprobe -once`` on the same map.

The fleet is real processes on loopback: two ``derpkit serve`` nodes meshed by flags (region
``lab``), one Go derper (region ``go``), and one self-signed IP ``derpkit serve`` node pinned by
its logged CertName (region ``ip``). All TLS certificates but the IP node's come from a test
CA that both probers trust through ``SSL_CERT_FILE``.

Same probe names and same good/bad verdicts, except the cases docs/probe.md lists where
derpkit is right and derpprobe is not (DIFFERENCES below). Then one node is stopped and both
must name the same broken probes.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from derpkit.protocol.keys import MeshKey
from tests.goderper import GoDerper, free_port, require_go_tool, start_derper
from tests.interop.helpers import probe_lines
from tests.interop.pki import Leaf, TestCA

from .helpers import dmap, node, write
from .procs import CERTNAME_RE, Run, Serve, run_go, run_ours, start_serve, why

pytestmark = [pytest.mark.timeout(120), pytest.mark.interop]

FAST = ["-spread=false", "-interval", "5s", "-tls-interval", "4s", "-stun-interval", "4s", "-mesh-interval", "4s"]

#: Probes where derpprobe's verdict is wrong and ours differs (see docs/probe.md).
#: IP-only node pinned by CertName: derpprobe's TLS probe ignores the pin; its mesh probe wants
#: the TLS server name to equal an IP HostName, which Go never sends as SNI; and IPv6 "none"
#: makes it probe the string "none".
GO_WRONG = {"derp/ip/902a/tls": "bad", "derp/ip/902a/902a/mesh": "bad", "derp/ip/902a/udp6": "bad"}


@dataclass
class Fleet:
    lab: list[Serve]
    go: GoDerper
    ip: Serve
    psk: Path
    map_path: str


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, localhost_leaf: Leaf) -> Iterator[Fleet]:
    require_go_tool("derpprobe")
    d = tmp_path_factory.mktemp("fleet")
    mesh = MeshKey.generate()
    psk = d / "mesh.key"
    psk.write_text(mesh.hex() + "\n")
    ports = [free_port() for _ in range(2)]
    stun = [free_port(socket.SOCK_DGRAM) for _ in range(3)]
    mesh_with = ",".join(f"localhost:{p}" for p in ports)
    started: list[Serve] = []
    go = None
    try:
        for i in range(2):
            started.append(start_serve(
                d / f"lab{i}", "-a", f"localhost:{ports[i]}", "-stun-port", str(stun[i]), "-http-port", "-1",
                "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir),
                "-mesh-psk-file", str(psk), "-mesh-with", mesh_with, env={"SSL_CERT_FILE": str(ca.cert_path)}))
        ip_port = free_port()
        ip = start_serve(d / "ip", "-a", f"127.0.0.1:{ip_port}", "-stun-port", str(stun[2]), "-http-port", "-1",
                         "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(d / "ipcerts"))
        started.append(ip)
        pin = CERTNAME_RE.search(ip.log())
        assert pin, ip.log()
        go = start_derper(d / "go", tls=True, hostname="localhost", certdir=ca.dir, mesh_key_hex=mesh.hex())
        for i, other in ((0, 1), (1, 0)):
            started[i].wait_for(f"mesh localhost:{ports[other]}: connected", timeout=20)
        m = dmap(
            (900, "lab", [node(f"900{c}", ports[i], stun=stun[i]) for i, c in enumerate("ab")]),
            (901, "go", [node("901a", go.port, stun=go.stun_port)]),
            (902, "ip", [node("902a", ip_port, host="127.0.0.1", stun=stun[2], IPv4="127.0.0.1", IPv6="none",
                              CertName=pin.group(1))]),
        )
        yield Fleet(started[:2], go, ip, psk, "file://" + write(d, m))
    finally:
        for s in started:
            s.stop()
        if go is not None:
            go.stop()


def both(fleet: Fleet, *extra: str) -> tuple[Run, Run]:
    derpprobe = require_go_tool("derpprobe")
    args = ["-once", "-derp-map", fleet.map_path, *FAST, *extra]
    with ThreadPoolExecutor(2) as pool:
        ours = pool.submit(run_ours, *args)
        go = pool.submit(run_go, derpprobe, *args)
        return ours.result(), go.result()


def verdicts(run: Run) -> dict[str, str]:
    good, bad = probe_lines(run.output)
    assert not set(good) & set(bad), run.output
    return {**{n: "good" for n in good}, **{n: "bad" for n in bad}}


def test_same_names_and_verdicts_as_derpprobe_then_one_node_stopped(fleet: Fleet) -> None:
    ours, go = both(fleet, "-mesh-psk-file", str(fleet.psk))
    v_ours, v_go = verdicts(ours), verdicts(go)
    assert {n: v for n, v in v_go.items() if n in GO_WRONG} == GO_WRONG, go.output
    # Same names except the udp6 probe Go makes for IPv6 "none"; same verdicts except GO_WRONG.
    assert set(v_ours) == set(v_go) - {"derp/ip/902a/udp6"}, (ours.output, go.output)
    assert {n: v for n, v in v_ours.items() if n not in GO_WRONG} == \
        {n: v for n, v in v_go.items() if n not in GO_WRONG}, (ours.output, go.output)
    assert len(v_ours) == 1 + 8 + 3 + 3  # map; lab: 2 tls, 2 udp, 4 mesh; go: tls, udp, mesh; ip: same
    assert all(v == "good" for v in v_ours.values()), ours.output
    assert ours.returncode == 0 and go.returncode == 1
    # Meta-certificate and handshake agree on each node's key: no load-balancer false alarm.
    assert "different server keys" not in ours.output, ours.output

    fleet.lab[1].stop()
    ours, go = both(fleet, "-mesh-psk-file", str(fleet.psk))
    v_ours, v_go = verdicts(ours), verdicts(go)
    down = {"derp/lab/900b/tls", "derp/lab/900b/udp", "derp/lab/900a/900b/mesh", "derp/lab/900b/900a/mesh",
            "derp/lab/900b/900b/mesh"}
    assert {n for n, v in v_ours.items() if v == "bad"} == down, ours.output
    assert {n for n, v in v_go.items() if v == "bad"} - set(GO_WRONG) == down, go.output
    assert ours.returncode == 1
    assert why(ours.output, "derp/lab/900b/tls").startswith("TCP connection refused"), ours.output
    assert why(ours.output, "derp/lab/900b/udp").startswith("STUN port unreachable"), ours.output


@pytest.fixture(scope="module")
def verify_derper(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, localhost_leaf: Leaf,
                  tailscaled_sock: str) -> Iterator[tuple[GoDerper, Path]]:
    """Go derper with ``-verify-clients`` against a real, logged-out tailscaled: it admits nobody
    but mesh peers."""
    d = tmp_path_factory.mktemp("verify")
    mesh = MeshKey.generate()
    psk = d / "psk"
    psk.write_text(mesh.hex())
    go = start_derper(d, tls=True, hostname="localhost", certdir=ca.dir, mesh_key_hex=mesh.hex(),
                      extra_args=("-verify-clients", "-socket", tailscaled_sock))
    try:
        yield go, psk
    finally:
        go.stop()


def test_once_passes_go_derper_with_verify_clients_only_with_the_mesh_key(
    verify_derper: tuple[GoDerper, Path], tmp_path: Path
) -> None:
    go, psk = verify_derper
    m = dmap((901, "go", [node("901a", go.port, stun=go.stun_port)]))
    path = "file://" + write(tmp_path, m)
    derpprobe = require_go_tool("derpprobe")
    args = ["-once", path, *FAST]
    ours = run_ours(*args, "-mesh-psk-file", str(psk))
    assert ours.returncode == 0, ours.output
    assert verdicts(ours)["derp/go/901a/901a/mesh"] == "good"

    ours = run_ours(*args)
    theirs = run_go(derpprobe, "-derp-map", path, *args[2:], "-once")
    assert verdicts(ours) == verdicts(theirs), (ours.output, theirs.output)
    assert verdicts(ours)["derp/go/901a/901a/mesh"] == "bad" and ours.returncode == 1
    assert "give the prober the mesh key (-mesh-psk-file)" in why(ours.output, "derp/go/901a/901a/mesh"), ours.output


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, localhost_leaf: Leaf) -> Iterator[str]:
    """One broken node per region, each a real program: a plain HTTP server where TLS should be
    (python -m http.server), a TLS web server that is not derper (openssl s_server -www, as an
    HTTP proxy in front would look), derpkit serve with STUN off, and derpkit serve with an
    expired certificate."""
    import datetime as dt
    import shutil
    import subprocess
    import sys
    import time

    from .helpers import issue

    d = tmp_path_factory.mktemp("broken")
    procs: list[subprocess.Popen[bytes]] = []
    serves: list[Serve] = []
    try:
        plain = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "http.server", "-b", "127.0.0.1", str(plain)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=d))
        openssl = shutil.which("openssl")
        assert openssl, "openssl NOT INSTALLED"
        web_port = free_port()
        leaf = ca.issue("weblocal", ["localhost"], ["127.0.0.1"])
        procs.append(subprocess.Popen([openssl, "s_server", "-quiet", "-accept", f"127.0.0.1:{web_port}",
                                       "-cert", str(leaf.cert_path), "-key", str(leaf.key_path), "-www"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.PIPE))
        nostun_port = free_port()
        serves.append(start_serve(d / "nostun", "-a", f"localhost:{nostun_port}", "-stun=false", "-http-port", "-1",
                                  "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir)))
        exp_port = free_port()
        expdir = d / "expired"
        issue(ca, expdir, "localhost", ["localhost"], not_before=dt.timedelta(days=-40), not_after=dt.timedelta(days=-2))
        serves.append(start_serve(d / "exp", "-a", f"localhost:{exp_port}", "-stun=false", "-http-port", "-1",
                                  "-certmode", "manual", "-hostname", "localhost", "-certdir", str(expdir)))
        for port in (plain, web_port):
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), 0.5).close()
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"port {port} never listened"
                    time.sleep(0.05)
        m = dmap((910, "plain", [node("910a", plain)]), (911, "web", [node("911a", web_port)]),
                 (912, "nostun", [node("912a", nostun_port, stun=free_port(socket.SOCK_DGRAM))]),
                 (913, "exp", [node("913a", exp_port)]))
        yield "file://" + write(d, m)
    finally:
        for p in procs:
            p.kill()
            p.wait(5)
        for s in serves:
            s.stop()


def test_same_verdicts_as_derpprobe_on_broken_nodes(broken: str) -> None:
    derpprobe = require_go_tool("derpprobe")
    args = ["-once", "-derp-map", broken, *FAST]
    with ThreadPoolExecutor(2) as pool:
        f_ours, f_go = pool.submit(run_ours, *args), pool.submit(run_go, derpprobe, *args)
        ours, go = f_ours.result(), f_go.result()
    v_ours, v_go = verdicts(ours), verdicts(go)
    assert v_ours == v_go, (ours.output, go.output)
    assert {n for n, v in v_ours.items() if v == "good"} == {"derpmap-probe", "derp/web/911a/tls",
                                                            "derp/nostun/912a/tls", "derp/nostun/912a/912a/mesh"}
    assert ours.returncode == go.returncode == 1
    assert "does not speak TLS (plain HTTP?)" in why(ours.output, "derp/plain/910a/tls")
    assert why(ours.output, "derp/web/911a/911a/mesh").startswith("TLS is fine but GET /derp answered HTTP 200")
    assert why(ours.output, "derp/nostun/912a/udp").startswith("STUN port unreachable")
    assert why(ours.output, "derp/exp/913a/tls").startswith("certificate expired 2 days ago")
    assert why(ours.output, "derp/exp/913a/913a/mesh").startswith("certificate expired 2 days ago")


def test_derpkit_serve_verify_clients_wrong_mesh_key_named_same_verdicts_as_go(
    tmp_path: Path, ca: TestCA, localhost_leaf: Leaf, tailscaled_sock: str
) -> None:
    """``derpkit serve -verify-clients`` (a real, logged-out tailscaled behind it) with a mesh key:
    the prober with another key is refused, and says the key is wrong; with the right key it
    passes. Go derpprobe reaches the same verdicts."""
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(MeshKey.generate().hex())
    wrong.write_text(MeshKey.generate().hex())
    port = free_port()
    s = start_serve(tmp_path / "vc", "-a", f"localhost:{port}", "-stun=false", "-http-port", "-1",
                    "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir),
                    "-verify-clients", "-socket", tailscaled_sock, "-mesh-psk-file", str(right))
    try:
        path = "file://" + write(tmp_path, dmap((900, "vc", [node("900a", port)])))
        derpprobe = require_go_tool("derpprobe")
        outputs = []
        for key, want in ((wrong, "bad"), (right, "good")):
            args = ["-once", "-derp-map", path, *FAST, "-mesh-psk-file", str(key)]
            ours, go = run_ours(*args), run_go(derpprobe, *args)
            assert verdicts(ours) == verdicts(go), (ours.output, go.output)
            assert verdicts(ours)["derp/vc/900a/900a/mesh"] == want, ours.output
            outputs.append(ours.output)
        assert "the mesh key is not this server's" in why(outputs[0], "derp/vc/900a/900a/mesh"), outputs[0]
    finally:
        s.stop()
