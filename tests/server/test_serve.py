"""``derpkit serve`` as a process: start-up, signals and the Restarting notice."""

from __future__ import annotations

import asyncio
import signal

from derpkit.client import DerpClient
from derpkit.protocol import frames as F

from .helpers import exchange, recv_kind
from .serve_proc import start_serve


async def test_sigterm_sends_restarting_to_every_client_then_exits_zero() -> None:
    sp = await start_serve("-a", "127.0.0.1:0", "-stun-port", "0", "-restart-notice", "3s")
    try:
        clients = [await DerpClient.connect(sp.url) for _ in range(3)]
        await exchange(clients[0], clients[1], 1)
        sp.proc.send_signal(signal.SIGTERM)
        for c in clients:
            r = await recv_kind(c, F.Restarting)
            assert r.try_for_ms == 3000
            assert 0 <= r.reconnect_in_ms <= 1000
        rc = await asyncio.wait_for(sp.proc.wait(), 10)
        assert rc == 0
    finally:
        if sp.proc.returncode is None:
            sp.proc.kill()


async def test_sigint_is_graceful_too_and_zero_notice_sends_nothing() -> None:
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-restart-notice", "0")
    try:
        c = await DerpClient.connect(sp.url)
        sp.proc.send_signal(signal.SIGINT)
        got = []
        try:
            async with asyncio.timeout(5):
                while True:
                    got.append(await c.recv())
        except Exception:
            pass
        assert not any(isinstance(f, F.Restarting) for f in got)
        assert await asyncio.wait_for(sp.proc.wait(), 10) == 0
    finally:
        if sp.proc.returncode is None:
            sp.proc.kill()


async def test_server_key_is_stable_across_restarts(tmp_path) -> None:  # noqa: ANN001
    key = str(tmp_path / "derper.key")
    first = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-c", key)
    c = await DerpClient.connect(first.url)
    k1 = c.server_key
    await c.close()
    await first.stop()
    second = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-c", key)
    c = await DerpClient.connect(second.url)
    assert c.server_key == k1
    await c.close()
    await second.stop()
    assert '"PrivateKey": "privkey:' in (tmp_path / "derper.key").read_text()
