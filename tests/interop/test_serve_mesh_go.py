"""A ``derpkit serve`` process and a Go derper in one mesh, each ``-mesh-with`` the other.

Unlike ``test_mesh_go.py`` (an in-process ``DerpNode`` with a ``MeshLink``), our side here is
the command an operator runs: ``derpkit serve -certmode manual -hostname localhost
-mesh-psk-file F -mesh-with localhost:P``. Both programs serve TLS for ``localhost`` with a
certificate from the test CA and trust that CA through ``SSL_CERT_FILE``. Ports are chosen
before either starts so that each can name the other.

Go is started first: our process then finds Go listening and dials it at once, while Go's
first dial to us is refused and its mesh client tries again 5 s later (its fixed retry
interval); every test below therefore spends about 5 s waiting for Go. Nothing here reads
derpkit's internals: our side is judged by its log and its ``/debug/varz``, Go's by its log
and its ``/debug/varz``.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.constants import PeerGoneReason
from derpkit.protocol.keys import MeshKey
from tests.goderper import GoDerper, free_port, require_derper
from tests.server.serve_proc import ServeProc, start_serve

from .helpers import deliver_eventually, recv_kind, recv_packet, tls_varz
from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(60)

_KEY_RE = re.compile(r"server public key (nodekey:[0-9a-f]{64})")




@dataclass
class Pair:
    """One Go derper and one ``derpkit serve`` process meshed with each other."""

    ca: TestCA
    dir: Path
    go: GoDerper
    our_port: int
    our_psk: Path
    ours: ServeProc | None = None
    #: Log lines of every ``derpkit serve`` process started so far, oldest first.
    past_logs: list[list[str]] = field(default_factory=list)

    @property
    def our_base_url(self) -> str:
        return f"https://localhost:{self.our_port}"

    @property
    def our_url(self) -> str:
        return self.our_base_url + "/derp"

    @property
    def our_key_file(self) -> Path:
        return self.dir / "ours.key"

    def our_log(self) -> str:
        return "".join(self.ours.log) if self.ours is not None else ""

    def logs(self) -> str:
        """Both logs, for assertion messages."""
        return f"--- Go derper:\n{self.go.log()}\n--- derpkit serve:\n{self.our_log()}"

    def our_args(self) -> list[str]:
        return [
            "-a", f"127.0.0.1:{self.our_port}",
            "-c", str(self.our_key_file),
            "-certmode", "manual", "-hostname", "localhost", "-certdir", str(self.ca.dir),
            "-http-port", "-1",  # no port-80 listener (manual cert mode would open one)
            "-stun=false",
            "-mesh-psk-file", str(self.our_psk),
            "-mesh-with", f"localhost:{self.go.port}",
        ]

    async def start_ours(self) -> ServeProc:
        self.ours = await start_serve(*self.our_args(), env={"SSL_CERT_FILE": str(self.ca.cert_path)})
        self.past_logs.append(self.ours.log)
        return self.ours

    def our_server_key(self) -> str:
        m = _KEY_RE.search(self.our_log())
        assert m, self.our_log()
        return m.group(1)

    async def stop(self) -> None:
        if self.ours is not None and self.ours.proc.returncode is None:
            self.ours.proc.kill()
            await self.ours.proc.wait()
        await asyncio.to_thread(self.go.stop)


async def start_pair(tmp_path: Path, ca: TestCA, go_key: MeshKey, our_key: MeshKey) -> Pair:
    """Go first, then ours; both read ``localhost.crt`` from the CA directory (the tests ask
    for the ``localhost_leaf`` fixture, which writes it there)."""
    binary = require_derper()  # skips, or fails under DERPKIT_REQUIRE_GO_PEERS=1
    go_port, our_port = free_port(), free_port()
    our_psk = tmp_path / "ours-mesh.key"
    our_psk.write_text(our_key.hex() + "\n")
    (tmp_path / "go").mkdir()
    go = GoDerper(
        binary, tmp_path / "go", True, go_port, free_port(socket.SOCK_DGRAM), go_key.hex(),
        ("-mesh-with", f"localhost:{our_port}"),
        hostname="localhost", certdir=ca.dir, env={"SSL_CERT_FILE": str(ca.cert_path)},
    )
    pair = Pair(ca, tmp_path, go, our_port, our_psk)
    try:
        await asyncio.to_thread(go.start)
        await pair.start_ours()
    except BaseException:
        await pair.stop()
        raise
    return pair


async def wait_for(cond: Callable[[], bool], what: str, pair: Pair, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}\n{pair.logs()}")
        await asyncio.sleep(0.05)


async def test_serve_process_and_go_derper_mesh_both_ways_and_heal_after_restart(
    tmp_path: Path, test_ca: TestCA, localhost_leaf: Leaf
) -> None:
    psk = MeshKey.generate()
    pair = await start_pair(tmp_path, test_ca, psk, psk)
    go = pair.go
    ctx = test_ca.client_context()
    clients: list[DerpClient] = []
    try:
        go_key = str(go.public_key)
        our_key = pair.our_server_key()
        # Our process dialled Go, which was already listening, and logged in with our key.
        await wait_for(
            lambda: f"mesh localhost:{go.port}: connected, watching {go_key}" in pair.our_log(),
            "our mesh link to Go", pair,
        )

        x = await DerpClient.connect(go.url, ssl_context=ctx)
        y1 = await DerpClient.connect(pair.our_url, ssl_context=ctx)
        y2 = await DerpClient.connect(pair.our_url, ssl_context=ctx)
        clients += [x, y1, y2]
        # Go -> derpkit needs Go's own mesh link to us, which connects on Go's 5 s retry.
        await deliver_eventually(x, y1, b"x on Go to y1 on derpkit serve")
        await deliver_eventually(y1, x, b"y1 on derpkit serve to x on Go")
        await deliver_eventually(y2, x, b"y2 to x")
        await deliver_eventually(x, y2, b"x to y2")

        gv = tls_varz(go.base_url, test_ca)
        ov = tls_varz(pair.our_base_url, test_ca)
        both = f"Go: {gv}\nours: {ov}"
        assert gv["derp_packets_forwarded_out"] >= 2, both  # Go -> us
        assert gv["derp_packets_forwarded_in"] >= 2, both  # us -> Go
        assert ov["derp_packets_forwarded_out"] >= 2, both  # us -> Go
        assert ov["derp_packets_forwarded_in"] >= 2, both  # Go -> us
        assert gv["derp_clients_remote"] >= 2, both  # y1, y2, learned from our PeerPresent
        assert ov["derp_clients_remote"] >= 1, both  # x, learned from Go's PeerPresent
        assert gv["derp_watchers"] == 1 and ov["derp_watchers"] == 1, both  # each watches the other
        # Both mesh logins carried the right key: nobody refused anybody.
        assert "insufficient permissions" not in go.log(), pair.logs()
        assert "not_mesh_peer" not in pair.our_log(), pair.logs()
        # Go had been refused by the closed port once, and reported nothing wrong since.
        assert "connection refused" in go.log() and "Recv:" not in go.log(), pair.logs()

        # PeerGone crosses derpkit -> Go: y1 leaves; Go tells x, who had heard from y1.
        await y1.close()
        gone = await recv_kind(x, F.PeerGone)
        assert gone.key == y1.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        # ... and Go -> derpkit: x leaves; our process tells y2.
        await x.close()
        gone = await recv_kind(y2, F.PeerGone)
        assert gone.key == x.public_key.raw and gone.reason == PeerGoneReason.DISCONNECTED
        assert tls_varz(go.base_url, test_ca)["derp_peer_gone_disconnected_frames"] >= 1
        assert tls_varz(pair.our_base_url, test_ca)["derp_peer_gone_disconnected_frames"] >= 1

        # Stop our process as an operator would (SIGTERM) and start it again with the same
        # key file and port. Go notices the mesh link break and clears the routes it had
        # learned from us: y2, and (timing permitting) its own mesh connection's key, which
        # our server announces to watchers as Go's does.
        x2 = await DerpClient.connect(go.url, ssl_context=ctx)
        clients.append(x2)
        assert pair.ours is not None
        assert await pair.ours.stop() == 0, pair.logs()
        await y2.close()
        cleared = re.compile(
            re.escape(f'mesh("localhost:{pair.our_port}"): reconnected; clearing ')
            + r"[1-9]\d* forwarding mappings"
        )
        await wait_for(
            lambda: cleared.search(go.log()) is not None,
            "Go's mesh client dropping the routes via the stopped process", pair,
        )
        varz_before = tls_varz(go.base_url, test_ca)
        await pair.start_ours()
        assert pair.our_server_key() == our_key, pair.logs()  # same -c file, same identity
        assert "wrote new server key" not in pair.our_log(), pair.logs()
        y3 = await DerpClient.connect(pair.our_url, ssl_context=ctx)
        clients.append(y3)
        # Ours dials Go at once; Go reconnects on its next retry (at most 5 s after the break).
        await deliver_eventually(y3, x2, b"y3 on the restarted process to x2 on Go")
        await deliver_eventually(x2, y3, b"x2 on Go to y3 on the restarted process")
        assert f"mesh localhost:{go.port}: connected, watching {go_key}" in pair.our_log()
        gv = tls_varz(go.base_url, test_ca)
        ov = tls_varz(pair.our_base_url, test_ca)
        both = f"Go before: {varz_before}\nGo: {gv}\nours: {ov}"
        assert gv["derp_packets_forwarded_out"] > varz_before["derp_packets_forwarded_out"], both
        assert gv["derp_packets_forwarded_in"] > varz_before["derp_packets_forwarded_in"], both
        assert ov["derp_packets_forwarded_in"] >= 1 and ov["derp_packets_forwarded_out"] >= 1, both
        assert ov["derp_watchers"] == 1, both  # Go's mesh client watches the new process
    finally:
        for c in clients:
            await c.close()
        await pair.stop()


async def test_wrong_psk_refused_by_both_programs(
    tmp_path: Path, test_ca: TestCA, localhost_leaf: Leaf
) -> None:
    pair = await start_pair(tmp_path, test_ca, MeshKey.generate(), MeshKey.generate())
    go = pair.go
    ctx = test_ca.client_context()
    try:
        go_key = str(go.public_key)
        # Our link logs in to Go (a wrong mesh key is still a valid client login), asks to
        # watch, and Go refuses the watch and hangs up. Both say so.
        await wait_for(
            lambda: re.search(r"derp: 127\.0\.0\.1:\d+: insufficient permissions", go.log()) is not None,
            "Go refusing our mesh link", pair,
        )
        await wait_for(
            lambda: f"mesh localhost:{go.port}: link lost: https://localhost:{go.port}/derp: "
            "connection closed by the server; retrying in 5.0s" in pair.our_log(),
            "our log of Go's refusal", pair,
        )
        # Go's mesh client (on its 5 s retry) gets the same from us.
        await wait_for(
            lambda: f"derp: closing {go_key}: not_mesh_peer: WATCH_CONNS without the mesh key"
            in pair.our_log(),
            "our refusal of Go's mesh link", pair,
        )
        await wait_for(
            lambda: f'mesh("localhost:{pair.our_port}"): Recv: derp.Recv: EOF' in go.log(),
            "Go's log of our refusal", pair,
        )

        # Nothing crossed, and nothing does: packets both ways are dropped.
        x = await DerpClient.connect(go.url, ssl_context=ctx)
        y = await DerpClient.connect(pair.our_url, ssl_context=ctx)
        try:
            for _ in range(4):
                await x.send(y.public_key, b"x nowhere")
                await y.send(x.public_key, b"y nowhere")
                await asyncio.sleep(0.1)
            with pytest.raises(TimeoutError):
                await recv_packet(y, timeout=0.5)
            with pytest.raises(TimeoutError):
                await recv_packet(x, timeout=0.2)
        finally:
            await x.close()
            await y.close()
        gv = tls_varz(go.base_url, test_ca)
        ov = tls_varz(pair.our_base_url, test_ca)
        both = f"Go: {gv}\nours: {ov}"
        assert gv.get("derp_watchers", 0) == 0 and ov.get("derp_watchers", 0) == 0, both
        assert gv.get("derp_packets_forwarded_out", 0) == 0, both
        assert ov.get("derp_packets_forwarded_out", 0) == 0, both
        assert gv.get("derp_clients_remote", 0) == 0 and ov.get("derp_clients_remote", 0) == 0, both
    finally:
        await pair.stop()
