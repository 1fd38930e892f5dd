"""``derpkit serve -workers 2``: real processes, real clients, the issue-16 rules.

One server (module-scoped) answers the read-mostly tests; the ones that kill or stop it
start their own. A client is put on a chosen worker by dialling that worker's private
loopback port (logged at start-up); the shared port is used where the kernel's choice is
the point. What the tests show, against what Go's mesh rules alone would give:

* any client reaches any other, whichever worker each landed on;
* the newest connection of a key is the active one across workers (Go's mesh prefers the
  local one, so the sender on the old connection's worker would keep hitting it), and a
  frame from the older one takes the role back (last writer), as in one process;
* PeerGone(Disconnected) only once a key is gone from every worker;
* one /debug/varz sums the workers; /debug/ pages answer; STUN answers from each worker;
* SIGTERM stops everything with Restarting frames (a real Go derphttp client sees one);
  a killed worker is restarted while the other keeps relaying;
* a real ``-mesh-with`` peer reaches clients on both workers and is reached by them.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerGoneReason
from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.workers.relay import GONE_GRACE
from derpkit.server.workers.varz import merge
from derpkit.stun import client as stun
from tests.goderper import build_go_program, free_port, require_go_tool
from tests.interop.helpers import derp_map, probe_lines, run_go, write_map
from tests.server.helpers import deliver_eventually, nothing_arrives, recv_kind
from tests.server.serve_proc import ServeProc, start_serve

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

_PRIVATE_RE = re.compile(r"\[w(\d+)\] derpkit: worker \d+ of \d+ listening on port \d+ \(private 127\.0\.0\.1:(\d+)\)")
_PIDS_RE = re.compile(r"\d+ workers \(pids ([\d, ]+)\)")
GOCLIENT = Path(__file__).parents[1] / "interop" / "goclient"


def private_ports(sp: ServeProc) -> dict[int, int]:
    """Worker index -> private port, the latest line for each (a restart logs a new one)."""
    out: dict[int, int] = {}
    for line in sp.log:
        if m := _PRIVATE_RE.search(line):
            out[int(m.group(1))] = int(m.group(2))
    return out


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}/derp"


def varz(port: int, local: bool = False) -> dict[str, float]:
    q = "?worker=local" if local else ""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/debug/varz{q}", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", text, re.M)}


async def settled(src: DerpClient, active: DerpClient, inactive: DerpClient) -> None:
    """Once the claim has spread, every packet goes to ``active`` and none to ``inactive``.

    Packets sent before the claim reached the sender's worker may sit in ``inactive``'s
    queue; they are read off first (reading sends nothing, so it claims nothing).
    """
    while True:
        try:
            await recv_kind(inactive, F.RecvPacket, timeout=0.3)
        except TimeoutError:
            break
    for i in range(5):
        want = f"settled {i}".encode()
        await src.send(active.public_key, want)
        async with asyncio.timeout(3):
            while (await recv_kind(active, F.RecvPacket)).data != want:
                pass  # an earlier copy from deliver_eventually
    assert await nothing_arrives(inactive, F.RecvPacket, within=0.3, ping=False)


async def start_workers(*args: str) -> ServeProc:
    return await start_serve("-a", "127.0.0.1:0", "-stun-port", "0", "-workers", "2", *args, timeout=40)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server() -> AsyncIterator[ServeProc]:
    sp = await start_workers()
    try:
        yield sp
    finally:
        await sp.stop()


async def test_clients_on_different_workers_reach_each_other(server: ServeProc) -> None:
    ports = private_ports(server)
    assert sorted(ports) == [0, 1], server.log
    a = await DerpClient.connect(url(ports[0]))
    b = await DerpClient.connect(url(ports[1]))
    try:
        await deliver_eventually(a, b, b"w0 to w1", within=5)
        await deliver_eventually(b, a, b"w1 to w0", within=5)
        # Per worker: each relayed one of them across.
        w0, w1 = varz(ports[0], local=True), varz(ports[1], local=True)
        assert w0["derp_packets_forwarded_out"] >= 1 and w1["derp_packets_forwarded_in"] >= 1
        assert w1["derp_packets_forwarded_out"] >= 1 and w0["derp_packets_forwarded_in"] >= 1
    finally:
        await a.close()
        await b.close()


async def test_the_kernel_spreads_clients_and_every_pair_works(server: ServeProc) -> None:
    clients = [await DerpClient.connect(url(server.port)) for _ in range(16)]
    try:
        per = varz(server.port)
        by = [per.get(f'derp_clients_local_by_worker{{worker="{i}"}}', 0) for i in (0, 1)]
        # 16 connections all on one worker has probability 2/65536.
        assert sum(by) == 16 and min(by) >= 1, by
        for i, src in enumerate(clients):
            await deliver_eventually(src, clients[(i + 1) % 16], f"ring {i}".encode(), within=5)
    finally:
        for c in clients:
            await c.close()


async def test_newest_connection_wins_across_workers_and_last_writer_takes_it_back(server: ServeProc) -> None:
    ports = private_ports(server)
    key = NodePrivate.generate()
    y = await DerpClient.connect(url(ports[0]))  # the sender, on worker 0
    old = await DerpClient.connect(url(ports[0]), private_key=key)
    try:
        await deliver_eventually(y, old, b"to the only one", within=5)
        new = await DerpClient.connect(url(ports[1]), private_key=key)
        try:
            # Go's mesh rule would deliver this to `old` (local to y's worker) for ever.
            await deliver_eventually(y, new, b"newest wins", within=5)
            await settled(y, new, old)
            # A frame from the older connection makes it the active one again (last writer).
            await old.note_preferred(True)
            await deliver_eventually(y, old, b"last writer wins", within=5)
            await settled(y, old, new)
            # y hears from the key (so it would get a PeerGone for it), then the newest goes.
            await deliver_eventually(new, y, b"from the newest", within=5)
        finally:
            await new.close()
        # The older one is the one left: still reached, and y hears no PeerGone for the key.
        await deliver_eventually(y, old, b"after the newest left", within=5)
        assert await nothing_arrives(y, F.PeerGone, within=GONE_GRACE + 0.5)
    finally:
        await old.close()
        await y.close()


async def test_parked_connection_takes_over_when_the_newest_leaves(server: ServeProc) -> None:
    ports = private_ports(server)
    key = NodePrivate.generate()
    y = await DerpClient.connect(url(ports[1]))
    old = await DerpClient.connect(url(ports[0]), private_key=key)
    new = await DerpClient.connect(url(ports[1]), private_key=key)
    try:
        await deliver_eventually(y, new, b"to the newest", within=5)
        await deliver_eventually(new, y, b"from the newest", within=5)  # y subscribes to "gone"
        await new.close()
        await deliver_eventually(y, old, b"to the one left on the other worker", within=5)
        assert await nothing_arrives(y, F.PeerGone, within=GONE_GRACE + 0.5)
    finally:
        await old.close()
        await y.close()


async def test_peer_gone_reaches_a_receiver_on_another_worker_only_when_the_key_is_gone(server: ServeProc) -> None:
    ports = private_ports(server)
    key = NodePrivate.generate()
    x1 = await DerpClient.connect(url(ports[0]), private_key=key)
    x2 = await DerpClient.connect(url(ports[0]), private_key=key)  # a local duplicate
    r = await DerpClient.connect(url(ports[1]))
    try:
        await deliver_eventually(x2, r, b"from x", within=5)  # r now subscribes to "x gone"
        await x2.close()
        assert await nothing_arrives(r, F.PeerGone, within=GONE_GRACE + 0.5)
        await x1.close()
        gone = await recv_kind(r, F.PeerGone, timeout=GONE_GRACE + 5)
        assert gone.key == key.public().raw and gone.reason == PeerGoneReason.DISCONNECTED
    finally:
        await r.close()


async def test_varz_is_the_sum_of_the_workers(server: ServeProc) -> None:
    ports = private_ports(server)
    a = await DerpClient.connect(url(ports[0]))
    b = await DerpClient.connect(url(ports[1]))
    try:
        await deliver_eventually(a, b, b"count me", within=5)
        locals_ = [varz(ports[i], local=True) for i in (0, 1)]
        total = varz(server.port)
        for name in ("derp_packets_received", "derp_packets_sent", "derp_current_connections",
                     "derp_clients_local", 'derp_packets_dropped{reason="unknown_dest",kind="other"}'):
            assert total[name] == locals_[0][name] + locals_[1][name], name
        assert total["derp_current_connections"] >= 2
        # The siblings' own links are not clients: two clients, counted once each.
        assert locals_[0]["derp_clients_local"] >= 1 and locals_[1]["derp_clients_local"] >= 1
        assert total["derpkit_workers"] == 2
        assert total['derpkit_worker_up{worker="0"}'] == total['derpkit_worker_up{worker="1"}'] == 1
        assert total["uptime_sec"] == max(loc["uptime_sec"] for loc in locals_)
    finally:
        await a.close()
        await b.close()


def test_merge_rules() -> None:
    """The merge itself, on two hand-written expositions (a missing worker shows as down)."""
    one = "# HELP derp_accepts a\n# TYPE derp_accepts counter\nderp_accepts 3\n# HELP version v\n# TYPE version untyped\nversion{version=\"1\"} 1\n"
    two = "# HELP derp_accepts a\n# TYPE derp_accepts counter\nderp_accepts 4\n# HELP version v\n# TYPE version untyped\nversion{version=\"1\"} 1\n"
    text = merge({0: one, 1: two, 2: None}, 3)
    assert "derp_accepts 7\n" in text and 'version{version="1"} 1\n' in text
    assert 'derpkit_worker_up{worker="2"} 0' in text and "derpkit_workers 3" in text


async def test_debug_pages_answer_with_workers(server: ServeProc) -> None:
    def get(path: str) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as r:
            return r.status, r.read().decode()

    status, body = await asyncio.to_thread(get, "/debug/")
    assert status == 200 and "Workers:</b> 2 (this page is from worker" in body
    status, body = await asyncio.to_thread(get, "/debug/check")
    assert status == 200 and "okay" in body
    status, body = await asyncio.to_thread(get, "/debug/vars")
    assert status == 200 and '"derp_accepts"' in body


async def test_stun_is_answered_by_every_worker(server: ServeProc) -> None:
    assert server.stun_port is not None
    for _ in range(12):  # fresh source ports: the kernel hashes them over both workers
        res = await stun.query("127.0.0.1", server.stun_port, timeout=3)
        assert str(res.mapped_ip) == "127.0.0.1"
    ports = private_ports(server)
    ok = [varz(ports[i], local=True)['stun_requests{disposition="success"}'] for i in (0, 1)]
    assert sum(ok) >= 12 and min(ok) >= 1, ok  # one worker taking all 12: p = 2/4096


async def test_go_derpprobe_over_tls_relays_across_workers(tmp_path: Path) -> None:
    """derpprobe (Go's DERP client, TLS, a test-CA certificate) against -workers 2 with
    -certmode manual: four map nodes all name the shared port, so its 16 mesh probes land
    on both workers and most cross between them; every probe must pass."""
    from tests.interop.pki import TestCA

    derpprobe = require_go_tool("derpprobe")
    ca = TestCA.create(tmp_path / "ca")
    ca.issue("localhost", ["localhost"], ["127.0.0.1"])
    port = free_port()
    sp = await start_serve("-a", f"localhost:{port}", "-stun-port", "0", "-http-port", "-1", "-workers", "2",
                           "-certmode", "manual", "-hostname", "localhost", "-certdir", str(ca.dir), timeout=40)
    try:
        m = derp_map(910, "wk", [{"Name": f"910{c}", "HostName": "localhost", "IPv4": "127.0.0.1",
                                  "DERPPort": port, "STUNPort": sp.stun_port} for c in "abcd"])
        argv = [derpprobe, "-once", "-derp-map", write_map(tmp_path / "map.json", m), "-spread=false",
                "-interval", "5s", "-tls-interval", "5s", "-stun-interval", "5s", "-mesh-interval", "5s"]
        run = await run_go(argv, env={**os.environ, "SSL_CERT_FILE": str(ca.cert_path)}, timeout=40)
        good, bad = probe_lines(run.output)
        # udp6: "localhost" here resolves to ::1 for derpprobe, STUN listens on 127.0.0.1.
        assert not [name for name in bad if not name.endswith("/udp6")], run.output
        assert sum(1 for name in good if name.endswith("/mesh")) == 16, run.output
        ports = private_ports(sp)
        w = [varz(ports[i], local=True) for i in (0, 1)]
        assert min(v["derp_packets_forwarded_out"] for v in w) >= 1, w  # both sent across
    finally:
        await sp.stop()


async def test_go_client_across_workers_then_sigterm_sends_restarting() -> None:
    """A real Go derphttp client on worker 1 gets a packet and a PeerGone from a client on
    worker 0, then a Restarting frame when the parent is told to stop; all processes exit."""
    from tests.interop.test_go_client import run_goclient

    binary = build_go_program(GOCLIENT, "the tailscale.com/derp client across workers")
    sp = await start_workers("-restart-notice", "3s")
    try:
        ports = private_ports(sp)
        pids = [int(p) for p in _PIDS_RE.search("".join(sp.log)).group(1).split(", ")]  # type: ignore[union-attr]
        async with run_goclient(binary, url(ports[1]), seconds=30) as gc:
            dst = bytes.fromhex(gc.msgs[0]["key"])
            sender = await DerpClient.connect(url(ports[0]))
            async with asyncio.timeout(5):
                while not gc.of("packet"):
                    await sender.send(dst, b"hello from worker 0")
                    await asyncio.sleep(0.1)
            pkt = gc.of("packet")[0]
            assert pkt["data"] == "hello from worker 0" and pkt["src"] == sender.public_key.raw.hex()
            await sender.close()
            gone = await gc.wait_for(lambda m: m["type"] == "peer_gone", timeout=GONE_GRACE + 5)
            assert gone["peer"] == sender.public_key.raw.hex() and gone["reason"] == 0
            sp.proc.send_signal(signal.SIGTERM)
            r = await gc.wait_for(lambda m: m["type"] == "restarting")
            assert r["try_for_ms"] == 3000
            assert await sp.proc.wait() == 0
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        await sp.stop()


async def test_a_killed_worker_is_restarted_and_the_other_keeps_relaying(tmp_path: Path) -> None:
    rate = tmp_path / "rate.json"
    rate.write_text('{"PerClientRateLimitBytesPerSec": 0}')
    sp = await start_workers("-rate-config", str(rate))
    try:
        # SIGHUP to the parent reaches every worker (here: the -rate-config reload).
        sp.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(10):
            while not all(any(f"[w{i}] derper: received SIGHUP" in line for line in sp.log) for i in (0, 1)):
                await asyncio.sleep(0.05)
        ports = private_ports(sp)
        pids = [int(p) for p in _PIDS_RE.search("".join(sp.log)).group(1).split(", ")]  # type: ignore[union-attr]
        a = await DerpClient.connect(url(ports[0]))
        b = await DerpClient.connect(url(ports[0]))
        os.kill(pids[1], signal.SIGKILL)
        # Worker 0 goes on relaying between its own clients meanwhile.
        for i in range(5):
            await deliver_eventually(a, b, f"during {i}".encode(), within=3)
        async with asyncio.timeout(20):
            while private_ports(sp).get(1) in (None, ports[1]):
                await asyncio.sleep(0.1)
        assert any("worker 1" in line and "killed by signal 9" in line for line in sp.log), sp.log
        c = await DerpClient.connect(url(private_ports(sp)[1]))
        await deliver_eventually(a, c, b"to the new worker 1", within=10)
        await deliver_eventually(c, b, b"from the new worker 1", within=10)
        for x in (a, b, c):
            await x.close()
    finally:
        assert await sp.stop() == 0


async def test_external_mesh_peer_sees_one_server(tmp_path: Path) -> None:
    """A separate derpkit serve meshed (-mesh-with, one PSK) with a -workers 2 server."""
    psk = tmp_path / "mesh.key"
    psk.write_text(MeshKey.generate().hex() + "\n")
    with socket.socket() as s1, socket.socket() as s2:
        s1.bind(("127.0.0.1", 0))
        s2.bind(("127.0.0.1", 0))
        p_ext, p_ours = s1.getsockname()[1], s2.getsockname()[1]
    mesh = f"127.0.0.1:{p_ext},127.0.0.1:{p_ours}"
    ours = await start_serve("-a", f"127.0.0.1:{p_ours}", "-stun=false", "-workers", "2",
                             "-mesh-psk-file", str(psk), "-mesh-with", mesh, timeout=40)
    ext = await start_serve("-a", f"127.0.0.1:{p_ext}", "-stun=false", "-mesh-psk-file", str(psk), "-mesh-with", mesh)
    try:
        ports = private_ports(ours)
        e = await DerpClient.connect(url(p_ext))
        w = [await DerpClient.connect(url(ports[i])) for i in (0, 1)]
        # The external node's link to us lands on one worker; it must learn both workers'
        # clients and have its forwards for the other worker passed on.
        for c in w:
            await deliver_eventually(e, c, b"from outside", within=20)
            await deliver_eventually(c, e, b"to outside", within=20)
        for c in (e, *w):
            await c.close()
    finally:
        await ext.stop()
        await ours.stop()


def test_bad_values_stop_start_up_naming_the_flag() -> None:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "derpkit", "serve", "-a", "127.0.0.1:0", *args],
                              capture_output=True, text=True, timeout=20, env={**os.environ, **(env or {})})

    r = run("-workers", "-2")
    assert r.returncode == 2 and 'invalid value "-2" for flag -workers' in r.stderr
    r = run(env={"WORKERS": "two"})
    assert r.returncode == 2 and "-workers (from env WORKERS): not an integer" in r.stderr
    r = run("-workers", "0x2", "-a", ":443", "-certmode", "letsencrypt")
    assert r.returncode == 1 and "-workers 2 needs -certmode manual" in r.stderr


async def test_one_worker_is_one_process() -> None:
    """The default: no supervisor, no children (the single-process path, unchanged)."""
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false")
    try:
        with open(f"/proc/{sp.proc.pid}/task/{sp.proc.pid}/children") as f:  # noqa: ASYNC230
            children = f.read().split()
        assert children == [] and not any("worker" in line for line in sp.log)
    finally:
        await sp.stop()
