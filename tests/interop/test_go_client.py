"""Tailscale's own DERP client (``tailscale.com/derp/derphttp``) against derpkit.

``tests/interop/goclient`` is a few lines of Go around the client every Tailscale node runs;
it prints each message it receives as JSON. It shows what a real Go client makes of the
frames derpkit sends beyond Go derper: the Restarting notice on shutdown (and that the
client then reconnects to the restarted server), and liveness Pings, which it answers so
derpkit keeps it. Go derper itself never sends either, so only a Go client can judge them.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from derpkit.client import DerpClient
from derpkit.protocol.keys import NodePublic
from derpkit.server.node import DerpNode, NodeOptions
from tests.goderper import build_go_program, free_port
from tests.server.serve_proc import start_serve

pytestmark = pytest.mark.timeout(90)

SRC = Path(__file__).parent / "goclient"


@pytest.fixture(scope="module")
def goclient() -> str:
    return build_go_program(SRC, "the tailscale.com/derp client tests")


class GoClient:
    """One goclient process and the messages it has reported so far."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.msgs: list[dict] = []
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            self.msgs.append(json.loads(line))

    async def wait_for(self, pred, timeout: float = 10.0) -> dict:  # noqa: ANN001
        async with asyncio.timeout(timeout):
            while True:
                for m in self.msgs:
                    if pred(m):
                        return m
                if self._task.done():
                    raise AssertionError(f"goclient ended; it reported {self.msgs}")
                await asyncio.sleep(0.05)

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.msgs if m["type"] == kind]


@asynccontextmanager
async def run_goclient(binary: str, url: str, *args: str, seconds: float = 20) -> AsyncIterator[GoClient]:
    proc = await asyncio.create_subprocess_exec(
        binary, "-url", url, "-for", f"{seconds}s", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, stdin=asyncio.subprocess.DEVNULL)
    gc = GoClient(proc)
    try:
        await gc.wait_for(lambda m: m["type"] in ("ready", "fatal"))
        assert gc.msgs[0]["type"] == "ready", gc.msgs
        yield gc
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await gc._task  # noqa: SLF001


async def test_go_client_takes_restarting_and_reconnects_to_the_restarted_server(goclient: str, tmp_path: Path) -> None:
    port = free_port()
    args = ("-a", f"127.0.0.1:{port}", "-stun=false", "-c", str(tmp_path / "derper.key"), "-restart-notice", "3s")
    sp = await start_serve(*args)
    try:
        async with run_goclient(goclient, f"http://127.0.0.1:{port}/derp") as gc:
            first = await gc.wait_for(lambda m: m["type"] == "server_info")
            assert (first["gen"], first["rate"], first["burst"]) == (1, 0, 0)
            sp.proc.send_signal(signal.SIGTERM)
            r = await gc.wait_for(lambda m: m["type"] == "restarting")
            assert r["try_for_ms"] == 3000 and 0 <= r["reconnect_in_ms"] <= 1000, r
            assert r["gen"] == 1
            assert await sp.proc.wait() == 0
            await gc.wait_for(lambda m: m["type"] == "recv_error")  # the old connection ended
            sp = await start_serve(*args)  # same key, same port, within the 3 s notice
            again = await gc.wait_for(lambda m: m["type"] == "server_info" and m["gen"] > 1, timeout=15)
            assert again["gen"] >= 2
            # The reconnected Go client is reachable again through the new process.
            sender = await DerpClient.connect(f"http://127.0.0.1:{port}/derp")
            dst = NodePublic(bytes.fromhex(gc.msgs[0]["key"]))
            await sender.send(dst, b"after restart")
            pkt = await gc.wait_for(lambda m: m["type"] == "packet")
            assert pkt["data"] == "after restart" and pkt["src"] == sender.public_key.raw.hex()
            await sender.close()
    finally:
        await sp.stop()


async def test_a_go_client_that_promised_pongs_but_sends_none_is_closed(goclient: str) -> None:
    """CanAckPings declared, Pings ignored (a hung node): derpkit closes it, and the Go
    client sees its connection end."""
    node = DerpNode(NodeOptions(stun_port=None, keepalive_interval=0.5, keepalive_jitter=0.0))
    await node.start()
    try:
        async with run_goclient(goclient, node.url, "-ack-pings", "-mute-pongs", seconds=15) as gc:
            await gc.wait_for(lambda m: m["type"] == "recv_error", timeout=5)
            assert gc.of("ping")
            assert node.server.stats.dead_clients_closed >= 1
            assert node.server.stats.conn_errors["dead_client"] >= 1
    finally:
        await node.stop()


@pytest.mark.parametrize("ack", [True, False])
async def test_go_client_answers_liveness_pings_only_when_it_said_it_would(goclient: str, ack: bool) -> None:
    """With CanAckPings the Go client gets server Pings, answers them, and is kept; without
    it derpkit never pings it (and never closes it for silence)."""
    node = DerpNode(NodeOptions(stun_port=None, keepalive_interval=0.5, keepalive_jitter=0.0))
    await node.start()
    try:
        extra = ("-ack-pings",) if ack else ()
        async with run_goclient(goclient, node.url, *extra, seconds=15) as gc:
            await asyncio.sleep(3.2)  # six keepalive periods of silence from the client
            stats = node.server.stats
            assert len(gc.of("keepalive")) >= 4
            assert stats.dead_clients_closed == 0
            assert not gc.of("recv_error"), gc.msgs  # never disconnected
            if ack:
                pings = gc.of("ping")
                assert len(pings) >= 2 and stats.server_pings_sent == len(pings)
                assert len({p["data"] for p in pings}) == len(pings)  # fresh random bytes each time
            else:
                assert stats.server_pings_sent == 0 and not gc.of("ping")
            assert node.server.gauges()["current_connections"] == 1
    finally:
        await node.stop()
