"""Record DERP byte vectors from Tailscale's Go derper over raw loopback sockets.

Run ``python3 -m tests.interop.record_vectors [--keepalive] [-o tests/vectors/go_derper.json]``
to (re)write the committed vectors; ``tests/interop/test_vectors_live.py`` records again on
every CI run and checks Go still sends the same shapes. Every byte in the output came off
the socket from derper; derpkit code is used only to *build* what we send (a ClientInfo
box, a Ping), never to produce what is recorded.

The client private keys used are throw-away test keys and are stored in the JSON, so the
unit tests can open Go's sealed ServerInfo box with our codec.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from derpkit.protocol import frames as F
from derpkit.protocol import handshake
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.constants import FrameType
from derpkit.protocol.events import ServerKeyReceived
from derpkit.protocol.keys import MeshKey, NodePrivate

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "go_derper.json"
DISCO_MAGIC = "TS💬".encode()

# Fixed throw-away keys so re-recording changes only what Go randomises.
KEY_A = NodePrivate.parse("privkey:" + "a0" * 31 + "60")
KEY_B = NodePrivate.parse("privkey:" + "b0" * 31 + "70")
KEY_W = NodePrivate.parse("privkey:" + "c0" * 31 + "40")
MESH = MeshKey.parse("ab" * 32)


class Raw:
    """One hand-driven TCP connection to derper; records bytes exactly as received."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r, self.w = r, w
        self.buf = b""

    @classmethod
    async def open(cls, port: int) -> Raw:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def _fill(self, timeout: float) -> None:
        data = await asyncio.wait_for(self.r.read(65536), timeout)
        if not data:
            raise EOFError("derper closed the connection")
        self.buf += data

    async def head(self, timeout: float = 5.0) -> bytes:
        while b"\r\n\r\n" not in self.buf:
            await self._fill(timeout)
        i = self.buf.index(b"\r\n\r\n") + 4
        h, self.buf = self.buf[:i], self.buf[i:]
        return h

    async def frame(self, timeout: float = 5.0) -> bytes:
        """The next whole frame, header included, as raw bytes."""
        while len(self.buf) < 5:
            await self._fill(timeout)
        n = int.from_bytes(self.buf[1:5], "big")
        while len(self.buf) < 5 + n:
            await self._fill(timeout)
        f, self.buf = self.buf[: 5 + n], self.buf[5 + n :]
        return f

    async def frame_of(self, ftype: int, timeout: float = 5.0) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                f = await self.frame(timeout)
                if f[0] == ftype:
                    return f

    def close(self) -> None:
        self.w.close()


def go_version(binary: str) -> str:
    try:
        out = subprocess.run(["go", "version", "-m", binary], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0] == "mod" and parts[1] == "tailscale.com":
            return parts[2]
    return "unknown"


async def login(port: int, key: NodePrivate, info: handshake.ClientInfo) -> tuple[Raw, dict[str, bytes]]:
    """Upgrade and log in through the client core; returns the raw 101 head, ServerKey and
    ServerInfo exactly as derper sent them (the core only decides what we send)."""
    c = await Raw.open(port)
    core = ClientConnection(key, info=info, host=f"127.0.0.1:{port}", read_timeout=None)
    core.start(0.0)
    c.w.write(core.data_to_send())
    head = await c.head()
    sk = await c.frame()
    events = core.receive_data(head + sk, 0.0)
    assert any(isinstance(ev, ServerKeyReceived) for ev in events), events
    c.w.write(core.data_to_send())  # the ClientInfo, sealed for the key derper sent
    si = await c.frame()
    return c, {"head": head, "server_key": sk, "server_info": si}


async def record_derp(port: int, *, keepalive: bool = False) -> dict[str, Any]:
    """Everything we can make derper send on one DERP port (derper needs mesh key ``MESH``)."""
    v: dict[str, Any] = {}
    # A mesh watcher first, so it sees PeerPresent for everyone who arrives after.
    w, got = await login(port, KEY_W, handshake.ClientInfo(mesh_key=MESH, can_ack_pings=True))
    w.w.write(F.frame(FrameType.WATCH_CONNS))
    v["present_self_mesh"] = await w.frame_of(FrameType.PEER_PRESENT)

    a, got = await login(port, KEY_A, handshake.ClientInfo(can_ack_pings=True))
    v["head_101"] = got["head"]
    v["server_key"] = got["server_key"]
    v["server_info"] = got["server_info"]
    v["present_regular"] = await w.frame_of(FrameType.PEER_PRESENT)
    v["_a_port"] = a.w.get_extra_info("sockname")[1]

    b, got_b = await login(port, KEY_B, handshake.ClientInfo(is_prober=True))
    v["present_prober"] = await w.frame_of(FrameType.PEER_PRESENT)

    # Ping -> Pong (test vector bytes from the spec).
    a.w.write(bytes.fromhex("12000000080102030405060708"))
    v["pong"] = await a.frame_of(FrameType.PONG)

    # A -> B "hi": RecvPacket as B sees it.
    a.w.write(F.frame(FrameType.SEND_PACKET, KEY_B.public().raw + b"hi"))
    v["recv_packet"] = await b.frame_of(FrameType.RECV_PACKET)

    # Disco-looking packet to an unknown key: PeerGone(NotHere).
    nobody = NodePrivate.parse("privkey:" + "d0" * 31 + "50").public().raw
    disco = DISCO_MAGIC + KEY_A.public().raw + bytes(24) + b"x"
    a.w.write(F.frame(FrameType.SEND_PACKET, nobody + disco))
    v["peer_gone_not_here"] = await a.frame_of(FrameType.PEER_GONE)

    # B sends to A, then leaves: A (who heard from B) and the watcher get PeerGone(Disconnected).
    b.w.write(F.frame(FrameType.SEND_PACKET, KEY_A.public().raw + b"yo"))
    await a.frame_of(FrameType.RECV_PACKET)
    b.close()
    v["peer_gone_disconnected"] = await a.frame_of(FrameType.PEER_GONE)
    v["peer_gone_to_watcher"] = await w.frame_of(FrameType.PEER_GONE)

    if keepalive:
        # derper's keepalive cadence is 60 s plus up to 5 s of jitter.
        v["keep_alive"] = await a.frame_of(FrameType.KEEP_ALIVE, timeout=70)
    a.close()
    w.close()
    return v


async def record_http(port: int) -> dict[str, bytes]:
    """Raw responses for a plain GET /derp (426) and a GET /derp/probe."""
    out = {}
    for name, req in (
        ("http_426", b"GET /derp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
        ("http_probe", b"GET /derp/probe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
    ):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        out[name] = await asyncio.wait_for(r.read(), 5)
        w.close()
    return out


async def stun_exchange(family: int, server: tuple[str, int], txid: bytes) -> bytes:
    """One Tailscale STUN request from a socket of ``family``; the raw reply."""
    from derpkit.stun.client import query

    r = await query(server[0], server[1], family=family, timeout=3, txid=txid)
    return r.raw


def describe(v: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    notes = {
        "head_101": "Response head to GET /derp with Upgrade: DERP (non fast-start); "
        "Derp-Public-Key is the server key (server_public below).",
        "server_key": "First frame after the 101: ServerKey, 40-byte payload.",
        "server_info": "ServerInfo frame, sealed to client_a with a random nonce: the bytes "
        "vary per run, the length does not. Open with client_a's private key.",
        "present_self_mesh": "PeerPresent the mesh watcher receives about itself (flags IsMeshPeer).",
        "present_regular": "PeerPresent for client_a (regular client, flags IsRegular).",
        "present_prober": "PeerPresent for client_b, which sent IsProber (flags IsProber).",
        "pong": "Reply to Ping 01..08.",
        "recv_packet": "client_a sent 'hi' to client_b; what client_b received.",
        "peer_gone_not_here": "client_a sent a disco-looking packet to an unknown key.",
        "peer_gone_disconnected": "client_b sent to client_a, then left; what client_a received.",
        "peer_gone_to_watcher": "The same departure, as the mesh watcher receives it.",
        "keep_alive": "Waited up to 70 s on client_a for derper's periodic KeepAlive.",
        "http_426": "Raw response to GET /derp without Upgrade (Date header varies).",
        "http_probe": "Raw response to GET /derp/probe (Date header varies).",
        "stun_ipv4": "STUN reply of derper -a 127.0.0.1:P to an IPv4 client (IPv4-only socket).",
        "stun_v4_on_dual_stack": "STUN reply of derper -dev (listens ':3478', dual-stack) to an "
        "IPv4 client (127.0.0.1) — recorded inside a private network namespace.",
        "stun_ipv6": "STUN reply of derper -dev to an IPv6 client (::1).",
    }
    frames = {}
    for k, data in v.items():
        if k.startswith("_") or not isinstance(data, bytes):
            continue
        frames[k] = {"hex": data.hex(), "len": len(data), "note": notes.get(k, "")}
    return {"provenance": provenance, "vectors": frames}


async def record_all(binary: str, *, keepalive: bool) -> dict[str, Any]:
    from tests.goderper import start_derper

    wd = Path(tempfile.mkdtemp(prefix="record-vectors-"))
    d = start_derper(wd, mesh_key_hex=MESH.hex())
    try:
        v = await record_derp(d.port, keepalive=keepalive)
        v.update(await record_http(d.port))
        txid = bytes(range(1, 13))
        v["stun_ipv4"] = await stun_exchange(socket.AF_INET, ("127.0.0.1", d.stun_port), txid)
        server_public = d.public_key
    finally:
        d.stop()
    v.update(netns_stun(binary))
    prov = {
        "go_program": "derper",
        "tailscale_version": go_version(binary),
        "go_binary": Path(binary).name,
        "platform": platform.platform(),
        "how": "tests/interop/record_vectors.py: derper on loopback (plain HTTP, "
        "-certmode letsencrypt on a non-443 port, -mesh-psk-file); raw asyncio sockets; "
        "STUN dual-stack bytes from derper -dev inside `unshare -rn`.",
        "server_public": str(server_public),
        "client_a": {"private": str(KEY_A), "public": str(KEY_A.public())},
        "client_b": {"private": str(KEY_B), "public": str(KEY_B.public())},
        "watcher": {"private": str(KEY_W), "public": str(KEY_W.public())},
        "mesh_key": MESH.hex(),
        "stun_txid": bytes(range(1, 13)).hex(),
        "restarting": "not recorded: Go derper never sends Restarting (0x15) nor Health (0x14) "
        "in this release; the frame types are defined for clients only.",
    }
    return describe(v, prov)


NETNS_SCRIPT = r"""
import asyncio, json, socket, subprocess, sys, time
from derpkit.stun.client import StunClientError, query
binary = sys.argv[1]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
p = subprocess.Popen([binary, "-dev"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def ask(fam, host, deadline):
    # derper -dev needs a moment to bind 3478; until then the port refuses or stays silent.
    while True:
        try:
            r = await query(host, 3478, family=fam, timeout=0.3, txid=bytes(range(1, 13)))
            return r.raw.hex()
        except StunClientError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


try:
    deadline = time.monotonic() + 10
    out = {}
    for name, fam, host in (("stun_v4_on_dual_stack", socket.AF_INET, "127.0.0.1"),
                            ("stun_ipv6", socket.AF_INET6, "::1")):
        out[name] = asyncio.run(ask(fam, host, deadline))
    print(json.dumps(out))
finally:
    p.kill()
    p.wait()
"""


def netns_available() -> bool:
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def netns_stun(binary: str) -> dict[str, bytes]:
    """derper -dev's STUN answers on its dual-stack ':3478', in a private network namespace.

    -dev forces the fixed ports 3340/3478 and listens on every address; inside
    ``unshare -rn`` the only interface is a private loopback, so nothing collides with
    other tests and nothing is exposed.
    """
    p = subprocess.run(
        ["unshare", "-rn", sys.executable, "-c", NETNS_SCRIPT, binary],
        capture_output=True, text=True, timeout=30,
    )
    if p.returncode != 0:
        raise RuntimeError(f"netns STUN recording failed: {p.stderr[-2000:]}")
    return {k: bytes.fromhex(h) for k, h in json.loads(p.stdout).items()}


def main(argv: list[str] | None = None) -> int:
    from tests.goderper import find_derper

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", type=Path, default=VECTORS)
    ap.add_argument("--keepalive", action="store_true", help="also wait ~60 s for a KeepAlive")
    args = ap.parse_args(argv)
    binary = find_derper()
    if binary is None:
        print("record_vectors: derper not found; run scripts/install-go-peers.sh", file=sys.stderr)
        return 1
    out = asyncio.run(record_all(binary, keepalive=args.keepalive))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {args.output}: {', '.join(out['vectors'])}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
