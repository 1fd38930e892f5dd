"""A pcap recorded on loopback (tcpdump -i lo) of a plain-HTTP DERP session and a STUN
query, dissected with derpkit.layers into exactly the frames the session exchanged.

Plain HTTP is what derper's dev mode speaks (dev mode itself pins port 3340, which tests
running side by side cannot share, so the server is `derpkit serve` on a free port).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from derpkit.client.conn import DerpClient
from derpkit.layers import derp as L
from derpkit.layers import pcap
from derpkit.layers import stun as S
from derpkit.protocol.frames import PeerGone, RecvPacket
from derpkit.stun.client import query
from tests.conformance import servers
from tests.goderper import REQUIRE_ENV


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    s = servers.serve(tmp_path_factory.mktemp("pcap"), mesh=False)
    try:
        yield s
    finally:
        s.stop()


def _need_tcpdump() -> str:
    path = shutil.which("tcpdump")
    if path is None:
        msg = "tcpdump NOT INSTALLED: the pcap dissection test needs it (bash scripts/install-matrix-peers.sh)"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)
    return path


async def _start_tcpdump(out: Path, bpf: str) -> asyncio.subprocess.Process:
    p = await asyncio.create_subprocess_exec(
        _need_tcpdump(), "-i", "lo", "-U", "--immediate-mode", "-s", "0", "-w", str(out), bpf,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    assert p.stderr is not None
    try:
        async with asyncio.timeout(10):
            while True:
                line = await p.stderr.readline()
                if not line:
                    raise RuntimeError("tcpdump exited")
                if b"listening on" in line:
                    await asyncio.sleep(0.2)  # the socket filter is attached just after this line
                    return p
    except (TimeoutError, RuntimeError) as e:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        err = (await p.stderr.read()).decode(errors="replace") if p.stderr else ""
        msg = f"tcpdump could not capture on lo ({e}): {err.strip()[:200]}"
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(msg, pytrace=False)
        pytest.skip(msg)


async def test_pcap_of_a_session_dissects_into_its_frames(server: servers.Server, tmp_path: Path) -> None:
    port = int(server.url.rsplit(":", 1)[1])
    assert server.stun is not None
    stun_port = int(server.stun.rsplit(":", 1)[1])
    out = tmp_path / "session.pcap"
    dump = await _start_tcpdump(out, f"tcp port {port} or udp port {stun_port}")
    try:
        a = await DerpClient.connect(server.url + "/derp")
        b = await DerpClient.connect(server.url + "/derp")
        await a.send(b.public_key, b"hello")
        got = await b.recv(5)
        assert isinstance(got, RecvPacket) and got.data == b"hello"
        await a.ping()
        a_addr, b_addr = a.local_address, b.local_address
        await a.close()
        gone = await b.recv(5)
        assert isinstance(gone, PeerGone)
        await b.close()
        res = await query("127.0.0.1", stun_port, local=("127.0.0.1", 0))
        await asyncio.sleep(0.5)  # let the last segments reach the capture
    finally:
        with contextlib.suppress(ProcessLookupError):
            dump.send_signal(signal.SIGINT)
        await asyncio.wait_for(dump.wait(), 10)

    sessions = {s.client: s for s in pcap.derp_sessions(str(out), port)}
    sa, sb = sessions[a_addr], sessions[b_addr]
    assert sa.c2s.head.startswith(b"GET /derp HTTP/1.1\r\n") and b"Upgrade: DERP" in sa.c2s.head
    assert sa.s2c.head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert sa.types("c2s") == ["ClientInfo", "SendPacket", "Ping"]
    assert sa.types("s2c") == ["ServerKey", "ServerInfo", "Pong"]
    assert sb.types("c2s") == ["ClientInfo"]
    assert sb.types("s2c") == ["ServerKey", "ServerInfo", "RecvPacket", "PeerGone"]
    send = sa.c2s.frames[1][L.DERPSendPacket]
    assert send.dst == b.public_key.raw and send.data == b"hello"
    recv = sb.s2c.frames[2][L.DERPRecvPacket]
    assert recv.src == a.public_key.raw and recv.data == b"hello"
    assert sb.s2c.frames[3][L.DERPPeerGone].key == a.public_key.raw
    assert sa.s2c.frames[0][L.DERPServerKey].key == a.server_key.raw
    assert sa.c2s.frames[0][L.DERPClientInfo].key == a.public_key.raw
    assert sa.c2s.frames[2][L.DERPPing].data == sa.s2c.frames[2][L.DERPPong].data

    msgs = pcap.stun_messages(str(out), stun_port)
    assert len(msgs) == 2
    (_, _, req), (_, _, resp) = msgs
    assert isinstance(req.attributes[0], S.STUNSoftware) and req.attributes[0].software == b"tailnode"
    assert resp.transaction_id == req.transaction_id
    xma = resp.attributes[0]
    assert isinstance(xma, S.STUNXorMappedAddress) and (xma.xip, xma.xport) == (str(res.mapped_ip), res.mapped_port) == (res.local[0], res.local[1])
