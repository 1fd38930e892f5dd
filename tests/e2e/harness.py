"""The parts of the end-to-end suite: control server, relays and real tailscaled nodes.

Everything here runs inside the private network namespace tests/e2e/scenario_netns.py lives
in, so every address is loopback and fixed ports collide with nothing. Each process writes
its log to a file of its own; a failing step quotes the tail of the logs that matter
(:class:`StepError`), so a red run says what broke and shows why.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class StepError(Exception):
    """A step's check failed: the message says what, ``logs`` holds the relevant tails."""

    def __init__(self, msg: str, *procs: Proc) -> None:
        super().__init__(msg)
        self.logs = {p.name: p.tail() for p in procs}


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A currently free port on 127.0.0.1 (TCP by default)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the scenario process dies (Linux PR_SET_PDEATHSIG), so
    a scenario killed by its timeout leaves no tailscaled or relay behind."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


@dataclass
class Proc:
    """One child process with its log file (stdout and stderr together)."""

    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                      stderr=subprocess.STDOUT, env={**os.environ, **self.env},
                                      start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        return self

    def text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process and wait (bounded); SIGKILL if it does not go."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        return self.popen.returncode

    def wait_log(self, pattern: str, timeout: float, what: str) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (bounded); the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            if m := rx.search(self.text()):
                return m
            if not self.alive:
                raise StepError(f"{self.name} exited (code {self.popen and self.popen.returncode}) before {what}", self)
            if time.monotonic() > deadline:
                raise StepError(f"{self.name}: no {what} within {timeout:.0f}s", self)
            time.sleep(0.1)


def wait_until(fn: Callable[[], T | None], timeout: float, what: str, *procs: Proc,
               interval: float = 0.2) -> T:
    """Call ``fn`` until it returns something truthy (bounded); exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            v = fn()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"; the last is reported
            last = e
        if time.monotonic() > deadline:
            extra = f" (last error: {last})" if last else ""
            raise StepError(f"{what}: not within {timeout:.0f}s{extra}", *procs)
        time.sleep(interval)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - loopback only
        return r.read().decode("utf-8", "replace")


def varz(port: int, scheme: str = "http", sni: str = "") -> dict[str, float]:
    """A relay's /debug/varz (Prometheus text) as name -> value, labelled series summed."""
    import ssl

    if scheme == "https":
        ctx = ssl._create_unverified_context()  # noqa: S323 - reading our own test relay
        c = _SNIConnection("127.0.0.1", port, sni or None, ctx)
    else:
        import http.client

        c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", "/debug/varz")
        body = c.getresponse().read().decode()
    finally:
        c.close()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        base = name.split("{", 1)[0]
        try:
            out[base] = out.get(base, 0.0) + float(value)
        except ValueError:
            continue
    return out


# --------------------------------------------------------------------------- control


@dataclass
class Control:
    """tests/e2e/control: Tailscale's testcontrol with a replaceable DERP map and a proxy trap."""

    proc: Proc
    url: str = ""
    trap_url: str = ""

    @classmethod
    def start(cls, binary: str, work: Path, derp_map: dict[str, Any]) -> Control:
        mp = work / "derpmap.json"
        mp.write_text(json.dumps(derp_map))
        p = Proc("control", [binary, "-derpmap", str(mp)], work / "control.log").start()
        c = cls(p)
        c.trap_url = p.wait_log(r"trap listening on (http://\S+)", 20, "trap address").group(1)
        c.url = p.wait_log(r"control: listening on (http://\S+)", 20, "control address").group(1)
        return c

    def set_map(self, derp_map: dict[str, Any]) -> None:
        req = urllib.request.Request(self.url + "/e2e/derpmap", data=json.dumps(derp_map).encode(), method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:  # noqa: S310 - loopback
            r.read()

    def trapped(self) -> list[str]:
        """Every request the refusing proxy saw (nodes trying to reach the internet)."""
        return [ln for ln in self.proc.text().splitlines() if "TRAP:" in ln]


def region(region_id: int, code: str, *nodes: dict[str, Any]) -> dict[str, Any]:
    return {"RegionID": region_id, "RegionCode": code, "RegionName": f"derpkit e2e {code}",
            "Nodes": list(nodes)}


def derp_node(name: str, region_id: int, port: int, stun_port: int, *, host: str = "127.0.0.1",
              insecure: bool = False, cert_name: str = "") -> dict[str, Any]:
    n: dict[str, Any] = {"Name": name, "RegionID": region_id, "HostName": host, "IPv4": "127.0.0.1",
                         "IPv6": "none", "DERPPort": port, "STUNPort": stun_port}
    if insecure:
        n["InsecureForTests"] = True
    if cert_name:
        n["CertName"] = cert_name
    return n


# --------------------------------------------------------------------------- relays


@dataclass
class Relay:
    """A DERP server: ``derpkit serve`` (kind "derpkit") or Go ``derper`` (kind "derper")."""

    name: str
    kind: str
    proc: Proc
    port: int
    stun_port: int
    tls: bool = False
    sni: str = ""

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def varz(self) -> dict[str, float]:
        return varz(self.port, self.scheme, self.sni)


def start_relay(name: str, kind: str, work: Path, *extra: str, derper: str = "",
                tls: bool = False, sni: str = "", env: dict[str, str] | None = None,
                port: int = 0, stun_port: int = 0) -> Relay:
    """Start a relay on 127.0.0.1 with fresh ports (or the given ones) and wait until it serves."""
    port = port or free_port()
    stun_port = stun_port or free_port(socket.SOCK_DGRAM)
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    common = ["-a", f"127.0.0.1:{port}", "-stun-port", str(stun_port), "-http-port", "-1",
              "-c", str(d / "derper.key"), *extra]
    if kind == "derpkit":
        argv = [sys.executable, "-m", "derpkit", "serve", *common]
    else:
        argv = [derper, *common]
    p = Proc(name, argv, work / f"{name}.log", env=dict(env or {})).start()
    r = Relay(name, kind, p, port, stun_port, tls, sni)
    wait_until(lambda: _probe(r), 30, f"{name} answering /derp/probe", p)
    return r


def _probe(r: Relay) -> bool:
    """Is /derp/probe answering 200? Over TLS, with the SNI the relay's certificate is for."""
    import http.client
    import ssl

    if not r.proc.alive:
        raise StepError(f"{r.name} exited before serving", r.proc)
    c: http.client.HTTPConnection
    if r.tls:
        ctx = ssl._create_unverified_context()  # noqa: S323 - readiness only; the nodes check the cert
        c = _SNIConnection("127.0.0.1", r.port, r.sni or None, ctx)
    else:
        c = http.client.HTTPConnection("127.0.0.1", r.port, timeout=2)
    try:
        c.request("GET", "/derp/probe")
        return c.getresponse().status == 200
    finally:
        c.close()


class _SNIConnection:
    """An HTTPS connection to an IP that sends a chosen SNI name (or none)."""

    def __new__(cls, host: str, port: int, sni: str | None, ctx: Any) -> Any:
        import http.client

        class Conn(http.client.HTTPSConnection):
            def connect(self) -> None:
                http.client.HTTPConnection.connect(self)
                self.sock = ctx.wrap_socket(self.sock, server_hostname=sni)

        return Conn(host, port, timeout=2, context=ctx)


# --------------------------------------------------------------------------- nodes


@dataclass
class Node:
    """A real tailscaled (userspace networking) plus the tailscale CLI pointed at its socket."""

    name: str
    proc: Proc
    cli_path: str
    sock: Path
    socks_port: int
    env: dict[str, str]
    ip: str = ""

    def cli(self, *args: str, timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([self.cli_path, f"--socket={self.sock}", *args], capture_output=True,
                           text=True, timeout=timeout, env={**os.environ, **self.env})
        if check and p.returncode != 0:
            raise StepError(f"{self.name}: `tailscale {' '.join(args)}` exited {p.returncode}: "
                            f"{(p.stderr or p.stdout).strip()[-500:]}", self.proc)
        return p

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)

    def home_region(self) -> int:
        """The DERP region this node's own netcheck report says it is homed on (0: none)."""
        st = self.status()
        relay = (st.get("Self") or {}).get("Relay") or ""
        return _region_code_to_id.get(relay, 0)


_region_code_to_id: dict[str, int] = {}

#: The private DNS suffix of the suite's relay hostnames (never resolvable outside).
TEST_DOMAIN = "e2e.derpkit.test"
NO_PROXY = "." + TEST_DOMAIN


def register_regions(derp_map: dict[str, Any]) -> None:
    """Remember region codes so :meth:`Node.home_region` can turn a code into an ID."""
    for rid, r in derp_map["Regions"].items():
        _region_code_to_id[r["RegionCode"]] = int(rid)


def start_node(name: str, work: Path, tailscaled: str, cli: str, control: Control,
               *, env: dict[str, str] | None = None) -> Node:
    """Start tailscaled in userspace mode with its own state, socket, port and SOCKS5 proxy,
    then ``tailscale up`` against the test control server; waits for a tailnet IPv4."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    sock = d / "tailscaled.sock"
    socks_port = free_port()
    node_env = {
        "HTTP_PROXY": control.trap_url, "HTTPS_PROXY": control.trap_url,
        "http_proxy": control.trap_url, "https_proxy": control.trap_url,
        # The relay hostnames of the test CA's certificates are dialled directly, as an
        # operator would exempt their own DERP names; anything else meets the trap.
        "NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY,
        # No direct path: UDP stays open for STUN (netcheck must measure regions, or a node
        # never leaves a dead home region), but peer traffic never uses it.
        # TS_DEBUG_ALWAYS_USE_DERP=1 would close UDP altogether, see docs/e2e.md.
        "TS_DEBUG_NEVER_DIRECT_UDP": "1",
        "TS_NETCHECK_GENERATE_204_URL": control.url + "/generate_204",
        "TS_ASSUME_NETWORK_UP_FOR_TEST": "1",
        "TS_PANIC_IF_HIT_MAIN_CONTROL": "1",
        "TS_DISABLE_PORTMAPPER": "1",
        "TS_LOGS_DIR": str(d),
        "TS_NO_LOGS_NO_SUPPORT": "true",
        **(env or {}),
    }
    argv = [tailscaled, "--tun=userspace-networking", f"--statedir={d}", f"--socket={sock}",
            f"--port={free_port(socket.SOCK_DGRAM)}", f"--socks5-server=127.0.0.1:{socks_port}",
            "--no-logs-no-support"]
    p = Proc(name, argv, work / f"{name}.log", env=node_env).start()
    n = Node(name, p, cli, sock, socks_port, node_env)
    wait_until(lambda: sock.exists() and n.cli("status", "--json", check=False).returncode in (0, 1), 30,
               f"{name}: LocalAPI socket", p)
    n.cli("up", f"--login-server={control.url}", f"--hostname={name}", "--reset", timeout=60)
    n.ip = wait_until(lambda: _self_ipv4(n), 30, f"{name}: tailnet IPv4", p)
    return n


def _self_ipv4(n: Node) -> str | None:
    for ip in n.status().get("TailscaleIPs") or []:
        if ":" not in ip:
            return str(ip)
    return None
