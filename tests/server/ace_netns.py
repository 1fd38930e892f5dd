"""CONNECT tunnels end to end, run inside a private network and mount namespace.

An allowed CONNECT target must end in ``.tailscale.com``, so a test of the success and
dial-failure paths has to resolve such a name. Run outside a namespace, that would send a
real DNS query for a real Tailscale name off the machine. Instead the calling test runs::

    unshare -rnm python3 -m tests.server.ace_netns OUT_DIR [GO_DERPER]

and this script first bind-mounts its own ``/etc/hosts`` (``controlplane.tailscale.com``
is 127.0.0.1) and ``/etc/resolv.conf`` (a name server on the namespace's own loopback,
where nothing listens), so every lookup stays inside the namespace, whose only network is
a private loopback. Then it runs a TCP echo server on 127.0.0.1:443, ``derpkit serve -ace``
over TLS and, when given, Go ``derper -ace``, drives each through the same CONNECT
requests, and prints one JSON object for the test to judge.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ALLOWED = "controlplane.tailscale.com"
ECHO_PORT = 443


def isolate(out_dir: Path) -> None:
    """Private /etc/hosts and /etc/resolv.conf, loopback up (we are root in the namespace)."""
    hosts = out_dir / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n::1 localhost\n127.0.0.1 {ALLOWED}\n")
    resolv = out_dir / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


class Echo(asyncio.Protocol):
    """Echoes bytes. ``BYE`` makes it hang up; a first chunk starting ``HOLD`` makes it
    stop reading, so the tunnel's flow control has something to push against."""

    log: list[dict[str, Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t: Any = transport
        self.rec: dict[str, Any] = {"bytes": 0, "eof": False, "first": ""}
        Echo.log.append(self.rec)

    def data_received(self, data: bytes) -> None:
        if self.rec["bytes"] == 0:
            self.rec["first"] = data[:16].decode("latin-1")
            if data.startswith(b"HOLD"):
                self.t.pause_reading()
        self.rec["bytes"] += len(data)
        if data.endswith(b"BYE"):
            self.t.write(data)
            self.t.close()
            return
        self.t.write(data)

    def eof_received(self) -> None:
        self.rec["eof"] = True


def tls_client(port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the servers' self-signed IP certificates
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(s, server_hostname="127.0.0.1")


def read_head(s: ssl.SSLSocket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            break
        buf += d
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def read_response(s: ssl.SSLSocket) -> bytes:
    head, rest = read_head(s)
    m = re.search(rb"\r\nContent-Length: (\d+)", head)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        d = s.recv(65536)
        if not d:
            break
        rest += d
    return head + rest


def recv_exact(s: ssl.SSLSocket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        d = s.recv(min(1 << 20, n - len(buf)))
        if not d:
            break
        buf += d
    return buf


def connect(port: int, target: str, early: bytes = b"") -> tuple[ssl.SSLSocket, bytes, bytes]:
    s = tls_client(port)
    s.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + early)
    head, rest = read_head(s)
    return s, head, rest


def at_eof(s: ssl.SSLSocket, timeout: float = 5.0) -> bool:
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError):
        return True


def drive(port: int) -> dict[str, Any]:
    """The same CONNECT requests against one server; returns what happened."""
    out: dict[str, Any] = {}
    # 1. A tunnel: bytes sent with the CONNECT, then round trips, then a bulk transfer.
    Echo.log.clear()
    s, head, rest = connect(port, f"{ALLOWED}:{ECHO_PORT}", early=b"early;")
    out["ok_head"] = head.decode("latin-1")
    got = rest + recv_exact(s, len(b"early;") - len(rest))
    out["early_echo"] = got.decode("latin-1")
    s.sendall(b"ping")
    out["ping_echo"] = recv_exact(s, 4).decode()
    blob = os.urandom(4 << 20)
    s.sendall(blob)  # the echo comes back as we go; the kernel buffers hold the rest
    out["bulk_ok"] = recv_exact(s, len(blob)) == blob
    # 2. Client hangs up: the target side must see the tunnel end too.
    s.close()
    deadline = time.monotonic() + 5
    while not Echo.log[0]["eof"] and time.monotonic() < deadline:
        time.sleep(0.02)
    out["client_close_reaches_target"] = Echo.log[0]["eof"]
    out["target_bytes"] = Echo.log[0]["bytes"]
    # 3. Target hangs up: the client sees EOF.
    s, head, _ = connect(port, f"{ALLOWED}:{ECHO_PORT}")
    s.sendall(b"BYE")
    out["bye_echo"] = recv_exact(s, 3).decode()
    out["target_close_reaches_client"] = at_eof(s)
    s.close()
    # 4. Flow control: the target stops reading; how much can the client push in?
    s, head, _ = connect(port, f"{ALLOWED}:{ECHO_PORT}", early=b"HOLD")
    s.setblocking(False)
    pushed, chunk = 0, b"x" * 65536
    last_progress = time.monotonic()
    limit = 96 << 20
    while pushed < limit and time.monotonic() - last_progress < 2.0:
        try:
            pushed += s.send(chunk)
            last_progress = time.monotonic()
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            time.sleep(0.01)
    out["held_pushed"] = pushed
    out["held_limit"] = limit
    s.close()
    # 5. Dial failures: a name with no address, and a port where nothing listens.
    for key, target in (("unresolvable", "nowhere.tailscale.com:443"), ("refused", f"{ALLOWED}:80")):
        s = tls_client(port)
        s.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\nGET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        first = read_response(s)
        second = read_response(s)
        out[key] = {"first": first.decode("latin-1"), "second_status": second.split(b"\r\n", 1)[0].decode()}
        s.close()
    # 6. The TLS-version gauges while a tunnel is open and after it ends (derper counts a
    #    tunnel as a request in flight; the scrape is one too).
    s, head, _ = connect(port, f"{ALLOWED}:{ECHO_PORT}")
    s.sendall(b"live")
    recv_exact(s, 4)
    out["active_during_tunnel"] = tls_active(varz(port))
    s.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        out["active_after_tunnel"] = tls_active(varz(port))
        if out["active_after_tunnel"] == out["active_during_tunnel"] - 1:
            break
        time.sleep(0.05)
    return out


def tls_active(text: str) -> int:
    """The sum of derper_tls_active_version over its versions."""
    return sum(int(v) for v in re.findall(r'^derper_tls_active_version\{version="[^"]+"\} (\d+)', text, re.M))


async def start_echo() -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(Echo, "127.0.0.1", ECHO_PORT)


def varz(port: int) -> str:
    s = tls_client(port)
    s.sendall(b"GET /debug/varz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    buf = b""
    while d := s.recv(65536):
        buf += d
    s.close()
    return buf.decode("latin-1")


async def main_async(out_dir: Path, go_derper: str | None) -> dict[str, Any]:
    from tests.server.serve_proc import start_serve

    echo = await start_echo()
    result: dict[str, Any] = {}
    certdir = Path(tempfile.mkdtemp(dir=out_dir))
    sp = await start_serve("-a", "127.0.0.1:0", "-certmode", "manual", "-hostname", "127.0.0.1",
                           "-certdir", str(certdir), "-http-port", "-1", "-stun=false", "-ace")
    try:
        result["derpkit"] = await asyncio.to_thread(drive, sp.port)
        result["derpkit"]["varz"] = await asyncio.to_thread(varz, sp.port)
    finally:
        await sp.stop()
        result["derpkit_log"] = "".join(sp.log)
    if go_derper:
        from tests.goderper import start_derper

        d = await asyncio.to_thread(start_derper, Path(tempfile.mkdtemp(dir=out_dir)), tls=True,
                                    extra_args=("-ace",))
        try:
            result["go"] = await asyncio.to_thread(drive, d.port)
        finally:
            d.stop()
            result["go_log"] = d.log()
    echo.close()
    return result


def main() -> int:
    out_dir = Path(sys.argv[1])
    go_derper = sys.argv[2] if len(sys.argv) > 2 else None
    isolate(out_dir)
    print(json.dumps(asyncio.run(main_async(out_dir, go_derper))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
