"""``derpkit stunc -nat`` against real RFC 5780 servers on loopback, checked against coturn.

Servers: coturn's ``turnserver`` on 127.0.0.1 + 127.0.0.2 (its RFC 5780 mode), and a real
``derpkit serve -stun-rfc5780`` process. Judge: coturn's ``turnutils_natdiscovery`` run against
the same servers; mapped addresses and behaviour verdicts must agree. Loopback has no NAT, so
the expected verdict is "no NAT, endpoint-independent filtering" — the NAT cases are in
test_nat_netns.py. The CLI runs as a real subprocess (``python -m derpkit stunc``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.goderper import REQUIRE_ENV
from tests.stunc.peers import free_pair, wait_answering

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[2]
A1, A2 = "127.0.0.1", "127.0.0.2"
TURNSERVER = shutil.which("turnserver")
NATDISCOVERY = shutil.which("turnutils_natdiscovery")


def require(tool: str | None, what: str) -> str:
    if tool:
        return tool
    msg = f"{what} missing (apt-get install coturn; scripts/install-peers.sh)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def stunc(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "derpkit", "stunc", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def nat_json(*argv: str) -> dict[str, Any]:
    p = stunc("-nat", "-json", "-timeout", "1s", *argv)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def coturn() -> Iterator[int]:
    binary = require(TURNSERVER, "turnserver")
    port = free_pair()
    work = tempfile.mkdtemp(prefix="coturn-")
    proc = subprocess.Popen(
        [binary, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls", "-L", A1, "-L", A2,
         "-p", str(port), "--log-file", "stdout", "--pidfile", f"{work}/turn.pid"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_answering(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def serve() -> Iterator[tuple[int, int]]:
    """A real ``derpkit serve -stun-rfc5780`` process: (primary STUN port, second port)."""
    port = free_pair()
    key = os.path.join(tempfile.mkdtemp(prefix="derpkit-key-"), "derper.key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpkit", "serve", "-c", key, "-a", f"{A1}:0", "-http-port",
         "-1", "-stun-port", str(port), "-stun-rfc5780", A2],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_answering(port)
        yield port, port + 1
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def natdiscovery(port: int) -> str:
    binary = require(NATDISCOVERY, "turnutils_natdiscovery")
    p = subprocess.run([binary, "-m", "-f", "-p", str(port), A1], capture_output=True,
                       text=True, timeout=30)
    return p.stdout + p.stderr


def coturn_reflexive(out: str) -> set[str]:
    return set(re.findall(r"UDP reflexive addr: (\S+)", out))


@pytest.mark.parametrize("server", ["coturn", "serve"])
def test_nat_verdict_agrees_with_natdiscovery(server: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue("coturn") if server == "coturn" else request.getfixturevalue(
        "serve")[0]
    doc = nat_json(A1, str(port))
    assert doc["ok"] and doc["rfc5780"] is True
    assert doc["other_address"] == f"{A2}:{port + 1}"
    assert doc["nat"] is False and doc["mapped_addr"] == doc["local_addr"]
    assert doc["mapping"] == "endpoint-independent"
    assert doc["filtering"] == "endpoint-independent"
    assert "No NAT" in doc["verdict"] and "directly reachable" in doc["tailscale"]
    changed = {o["change"]: o["origin"] for o in doc["observations"] if o["change"]}
    assert changed == {"ip+port": f"{A2}:{port + 1}", "port": f"{A1}:{port + 1}"}

    out = natdiscovery(port)
    assert "NAT with Endpoint Independent Mapping!" in out, out
    assert "NAT with Endpoint Independent Filtering!" in out, out
    # natdiscovery binds 0.0.0.0 and the server sees the kernel's source 127.0.0.1: same IP as
    # ours, and like ours equal to the local address (coturn prints it as "Local addr").
    for addr in coturn_reflexive(out):
        assert addr.startswith(f"{A1}:")
    assert doc["mapped_addr"].startswith(f"{A1}:")


def test_default_output_and_plain_against_rfc5780_serve(serve: tuple[int, int]) -> None:
    port = serve[0]
    p = stunc(A1, str(port))
    assert p.returncode == 0 and re.fullmatch(
        rf"sent addr: {A1}:{port}\nfrom addr: {A1}:{port}\nstun addr: {A1}:\d+\n", p.stderr
    ), p.stderr
    p = stunc("-plain", "-json", A1, str(port))
    doc = json.loads(p.stdout)
    assert doc["ok"] and doc["shape"] == "plain" and doc["fallback"] is None


def test_lifetime_probe_against_rfc5780_serve(serve: tuple[int, int]) -> None:
    """No NAT, so the "mapping" (the plain socket) outlives any wait: RESPONSE-PORT works."""
    doc = nat_json("-lifetime", "2s", A1, str(serve[0]))
    assert doc["lifetime_min_s"] == 2 and doc["lifetime_max_s"] is None
    assert doc["lifetime_detail"] == "1 s alive, 2 s alive"


def test_go_shaped_server_then_mapping_from_other_servers(coturn: int) -> None:
    """``derpkit serve`` by default behaves like Go derper: silent to plain requests, no
    OTHER-ADDRESS. The discovery still measures the mapping with -nat-servers (coturn on the
    second IP) and says what it could not measure."""
    port = free_pair()
    key = os.path.join(tempfile.mkdtemp(prefix="derpkit-key-"), "derper.key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "derpkit", "serve", "-c", key, "-a", f"{A1}:0", "-http-port",
         "-1", "-stun-port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from derpkit.stun import build_request

        end = time.monotonic() + 15
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            while True:
                try:
                    s.sendto(build_request(), (A1, port))
                    s.recvfrom(2048)
                    break
                except OSError:
                    assert time.monotonic() < end, "strict serve never answered"
                    time.sleep(0.05)
        doc = nat_json("-nat-servers", f"{A2}:{coturn}", A1, str(port))
        assert doc["rfc5780"] is False and doc["filtering"] == "unknown"
        assert doc["mapping"] == "endpoint-independent"
        assert [m["server"] for m in doc["mapping_table"]] == [f"{A1}:{port}", f"{A2}:{coturn}"]
        assert any("not an RFC 5780 server" in n for n in doc["notes"])
        assert "Filtering not measured" in doc["verdict"]
        # The human form: the paragraph on stdout, the observations on stderr.
        p = stunc("-nat", "-timeout", "1s", A1, str(port))
        assert p.returncode == 0 and "Filtering not measured" in p.stdout
        assert p.stdout.startswith("no NAT: unknown filtering\n\n"), p.stdout
        assert f"sock 0 -> {A1}:{port}: mapped {A1}:" in p.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_nat_against_silence_is_one_clear_line() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((A1, 0))
        p = stunc("-nat", "-timeout", "300ms", A1, str(s.getsockname()[1]))
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "to a plain or a Tailscale-shaped request" in p.stderr


# --- Tailscale's own programs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_derper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.goderper import start_derper

    d = start_derper(tmp_path_factory.mktemp("derper"))
    try:
        yield d
    finally:
        d.stop()


def test_real_go_derper_ignores_plain_and_stunc_says_so(go_derper: Any, coturn: int) -> None:
    """The claim behind the silence hint, against Tailscale's derper itself: a plain request
    gets nothing, the Tailscale-shaped retry gets the answer, and -nat still measures the
    mapping with Tailscale-shaped requests plus another server."""
    port = str(go_derper.stun_port)
    p = stunc("-plain", "-timeout", "500ms", A1, port)
    assert p.returncode == 0, p.stderr
    assert "ignored the plain RFC 5389 request but answered a Tailscale-shaped one" in p.stderr
    assert re.search(rf"stun addr: {A1}:\d+\n\Z", p.stderr), p.stderr
    doc = nat_json("-nat-servers", f"{A2}:{coturn}", A1, port)
    assert doc["rfc5780"] is False and doc["mapping"] == "endpoint-independent"
    first = doc["observations"][0]
    assert first["server"] == f"{A1}:{port}" and first["other_address"] is None


def test_go_stunc_against_rfc5780_serve(serve: tuple[int, int]) -> None:
    """Go's stunc gets derper's exact answer from every socket of the RFC 5780 server."""
    from tests.goderper import require_go_tool

    go_stunc = require_go_tool("stunc")
    for ip, port in ((A1, serve[0]), (A1, serve[1]), (A2, serve[0]), (A2, serve[1])):
        p = subprocess.run([go_stunc, ip, str(port)], capture_output=True, text=True, timeout=20)
        assert p.returncode == 0, p.stderr
        assert re.search(rf"sent addr: {re.escape(ip)}:{port}\n.*stun addr: 127\.0\.0\.1:\d+",
                         p.stderr, re.S), p.stderr
