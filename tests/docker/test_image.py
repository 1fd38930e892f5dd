"""The image built from the unchanged Dockerfile, run as docs/docker.md says (the seed
image's way: env variables, CERT_MODE=manual with an IP HOSTNAME, the certificate and key
volumes, ports published on loopback), judged by real peers: Go derpprobe, derpkit probe and
two DERP clients through the published port, podman's own HEALTHCHECK runner, a restart.

The base image is a STAND-IN for python:3.11-slim (see podman.py); the rest is real."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import pytest

from derpkit.client import DerpClient, DerpConnectionError
from tests.goderper import require_go_tool
from tests.interop.helpers import derp_map, probe_lines, run_go, write_map
from tests.server.helpers import exchange

from .conftest import CERTNAME_RE, TREE_HASH, Built, Running
from .podman import BASE, IMAGE, ROOT, container_gone, doc_command, health, run, run_doc, wait_log

pytestmark = pytest.mark.timeout(180)


def test_image_is_the_dockerfile_on_the_base_stand_in(image: Built) -> None:
    # The stand-in carries the exact name every FROM of the Dockerfile uses, and its label
    # says it is not the real image.
    froms = {ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.startswith("FROM ")} - {"build"}
    assert {"docker.io/library/" + f for f in froms} == {BASE}, froms
    assert "stand-in" in image.stand_in
    cfg = json.loads(run(["podman", "image", "inspect", "--format", "{{json .Config}}", IMAGE],
                         check=True).stdout)
    assert cfg["User"] == "derp" and cfg["WorkingDir"] == "/home/derp"
    assert cfg["Cmd"] == ["derpkit", "serve"]
    hc = json.loads(run(["podman", "image", "inspect", "--format", "{{json .HealthCheck}}", IMAGE],
                        check=True).stdout)
    assert hc["Test"] == ["CMD", "derpkit", "healthcheck", "--quiet"], hc  # kept: docker format
    assert set(cfg["ExposedPorts"]) == {"80/tcp", "443/tcp", "3478/udp"}
    assert image.size < 400e6, image.size  # 296 MB on the stand-in when written


def test_image_holds_this_working_tree(image: Built) -> None:
    """The installed package is the source the build read (no stale layer)."""
    where = "import derpkit, os; print(os.path.dirname(derpkit.__file__))"
    pkg = run(["podman", "run", "--rm", IMAGE, "python3", "-c", where], check=True).stdout.strip()
    there = run(["podman", "run", "--rm", IMAGE, "python3", "-c", TREE_HASH, pkg], check=True).stdout.strip()
    assert there == image.tree_hash, (there, image.tree_hash)


def test_runs_as_the_seed_readme_does(derp: Running) -> None:
    # Not root, from the first process on.
    assert run(["podman", "exec", "derp", "id", "-u"], check=True).stdout.strip() == "1000"
    top = run(["podman", "top", "derp", "user", "args"], check=True).stdout
    assert "derpkit serve" in top and "root" not in top, top
    # The env table's variables reached the server, and the self-signed IP certificate is in
    # the certificate volume, its CertName logged as the DERP-map node.
    for line in ("env CERT_MODE=manual -> -certmode", "env HOSTNAME=203.0.113.7 -> -hostname",
                 "env VERIFY_CLIENTS=false -> -verify-clients", "env CERT_DIR=derper-certs -> -certdir",
                 "derper: wrote new server key to /var/lib/derper/derper.key"):
        assert line in derp.log, derp.log
    assert '"HostName":"203.0.113.7","CertName":"' + derp.pin in derp.log
    ls = run(["podman", "exec", "derp", "ls", "/home/derp/derper-certs"], check=True).stdout.split()
    assert "203.0.113.7.crt" in ls and "203.0.113.7.key" in ls
    # Published on loopback only.
    ports = run(["podman", "port", "derp"], check=True).stdout
    assert all("127.0.0.1:" in line for line in ports.splitlines() if line.strip()), ports
    logs = run_doc(doc_command("podman logs derp"))
    assert derp.pin in logs.stdout + logs.stderr


def _map(tmp_path: Path, derp: Running, pin: str) -> str:
    m = derp_map(900, "docker", [{"Name": "900a", "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                                  "DERPPort": derp.derp_port, "STUNPort": derp.stun_port,
                                  "CertName": pin}])
    return write_map(tmp_path / "map.json", m)


# The TLS and mesh probes check the chain against HostName (an IP with a self-signed
# certificate fails them on Go derper too); the bandwidth probe's DERP clients and the STUN
# probe are what a pinned IP node is judged by (tests/interop/test_derpprobe_serve.py).
PROBE = ["-once", "-spread=false", "-interval", "5s", "-tls-interval", "0", "-stun-interval", "5s",
         "-mesh-interval", "0", "-bw-interval", "5s", "-bw-probe-size-bytes", "4096"]
WANT = {"derpmap-probe", "derp/docker/900a/900a/bw", "derp/docker/900a/udp"}


@pytest.mark.parametrize("prober", ["go derpprobe", "derpkit probe"])
async def test_probe_once_passes_pinned_by_the_logged_certname(
    prober: str, derp: Running, tmp_path: Path
) -> None:
    if prober == "go derpprobe":
        argv = [require_go_tool("derpprobe")]
    else:
        argv = [sys.executable, "-m", "derpkit", "probe"]
    url = _map(tmp_path, derp, derp.pin)
    r = await run_go([*argv, "-derp-map", url, *PROBE], timeout=60)
    good, bad = probe_lines(r.output)
    assert r.returncode == 0 and not bad and set(good) == WANT, r.output
    # The pin is what lets it in: another certificate's CertName fails the DERP probe.
    wrong = "sha256-raw:" + ("0" * 64)
    r = await run_go([*argv, "-derp-map", _map(tmp_path, derp, wrong), *PROBE], timeout=60)
    good, bad = probe_lines(r.output)
    assert r.returncode != 0 and "derp/docker/900a/900a/bw" in bad, r.output


async def test_two_clients_relay_through_the_container(derp: Running) -> None:
    a = await DerpClient.connect(derp.url, cert_name=derp.pin, timeout=10)
    b = await DerpClient.connect(derp.url, cert_name=derp.pin, timeout=10)
    try:
        await exchange(a, b, 5)
    finally:
        await a.close()
        await b.close()
    with pytest.raises(DerpConnectionError):  # no pin, no trust: the chain is self-signed
        await DerpClient.connect(derp.url, timeout=10)


def _health_state() -> dict:
    return json.loads(run(["podman", "inspect", "--format", "{{json .State.Health}}", "derp"],
                          check=True).stdout)


def test_healthcheck_healthy_then_unhealthy_when_the_relay_is_stopped(derp: Running) -> None:
    rc = run_doc(doc_command("podman healthcheck run derp"), check=False).returncode
    assert rc == 0
    out = run_doc(doc_command("podman exec derp derpkit healthcheck")).stdout
    assert "DERP ok: https://127.0.0.1:443/derp" in out and "STUN ok: 127.0.0.1:3478" in out, out
    # Stopped (SIGSTOP to the relay, the container's only process): wedged, not gone.
    run_doc(doc_command("podman kill --signal STOP derp"))
    try:
        t0 = time.monotonic()
        rc, out = health("derp")
        took = time.monotonic() - t0
        assert rc == 1 and "unhealthy" in out, out
        assert took < 25, took  # bounded by the check's own timeouts, inside HEALTHCHECK's 20 s
        state = _health_state()
        assert state["Log"][-1]["ExitCode"] == 1 and "FAIL DERP" in state["Log"][-1]["Output"], state
        # HEALTHCHECK --retries=3: podman's status turns unhealthy after three failed checks
        # (fewer if some already failed; a check inside --start-period=15s does not count).
        for _ in range(5):
            if state["Status"] == "unhealthy":
                break
            assert health("derp")[0] == 1
            state = _health_state()
        assert state["Status"] == "unhealthy" and state["FailingStreak"] >= 3, state
    finally:
        run_doc(doc_command("podman kill --signal CONT derp"))
    assert health("derp")[0] == 0
    assert _health_state()["Status"] == "healthy"


async def test_server_key_and_certificate_survive_a_restart_and_a_new_container(derp: Running) -> None:
    c = await DerpClient.connect(derp.url, cert_name=derp.pin, timeout=10)
    key = c.server_key
    await c.close()
    run_doc(doc_command("podman restart derp"), timeout=90)
    log = await asyncio.to_thread(wait_log, "derp", "DERP on port")
    deadline = time.monotonic() + 30
    while log.count("DERP on port") < 2:
        assert time.monotonic() < deadline, log
        await asyncio.sleep(0.2)
        log = await asyncio.to_thread(wait_log, "derp", "DERP on port")
    second = log[log.index("DERP on port") + 1:]
    assert CERTNAME_RE.findall(second) == [derp.pin], second  # same certificate, same pin
    assert log.count("wrote new server key") == 1 and log.count("wrote a self-signed") == 1, log
    c = await DerpClient.connect(derp.url, cert_name=derp.pin, timeout=10)
    try:
        assert c.server_key == key
    finally:
        await c.close()
    assert health("derp")[0] == 0
    # A restart keeps the container's own filesystem too; a NEW container (an upgrade: rm,
    # then the same `podman run`) has only the volumes to go on.
    await asyncio.to_thread(container_gone, "derp")
    await asyncio.to_thread(run_doc, doc_command("podman run -d --name derp"), derp.loc)
    log = await asyncio.to_thread(wait_log, "derp", "DERP on port")
    assert "wrote new server key" not in log and "wrote a self-signed" not in log, log
    assert CERTNAME_RE.findall(log) == [derp.pin], log
    c = await DerpClient.connect(derp.url, cert_name=derp.pin, timeout=10)
    try:
        assert c.server_key == key
    finally:
        await c.close()
