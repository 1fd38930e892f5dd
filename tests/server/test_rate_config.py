"""-rate-config on a running ``derpkit serve``: backpressure, SIGHUP reload, mesh exemption."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from derpkit.client import DerpClient
from derpkit.protocol.keys import MeshKey

from .helpers import recv_packet
from .serve_proc import start_serve

PAYLOAD = b"r" * 10_000
COUNT = 30  # 300 kB: about 65 kB of burst, the rest at the configured rate


async def _timed_transfer(sender: DerpClient, receiver: DerpClient) -> float:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    for _ in range(COUNT):
        await sender.send(receiver.public_key, PAYLOAD)
    for _ in range(COUNT):
        assert (await recv_packet(receiver, timeout=15)).data == PAYLOAD
    return loop.time() - t0


def _write(path: Path, rate: int, burst: int = 0) -> None:
    path.write_text(json.dumps({"PerClientRateLimitBytesPerSec": rate, "PerClientRateBurstBytes": burst}))


async def test_rate_config_slows_senders_reloads_on_sighup_and_exempts_mesh(tmp_path: Path) -> None:
    rc = tmp_path / "rate.json"
    _write(rc, 200_000)
    mesh = MeshKey.generate()
    psk = tmp_path / "mesh.key"
    psk.write_text(mesh.hex())
    sp = await start_serve(
        "-a", "127.0.0.1:0", "-stun=false", "-rate-config", str(rc), "-mesh-psk-file", str(psk)
    )
    try:
        assert any("client-rate=200000 bytes/sec, client-burst=65568 bytes" in ln for ln in sp.log)
        a = await DerpClient.connect(sp.url)
        b = await DerpClient.connect(sp.url)
        slow = await _timed_transfer(a, b)
        assert slow > 0.8, slow  # ~235 kB past the burst at 200 kB/s
        # A mesh peer is never limited.
        m = await DerpClient.connect(sp.url, mesh_key=mesh)
        fast_mesh = await _timed_transfer(m, b)
        assert fast_mesh < slow / 2, (fast_mesh, slow)
        # Rate 0 disables limiting; SIGHUP applies it to connections that already exist.
        _write(rc, 0)
        sp.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while not any("rate config reloaded successfully" in ln for ln in sp.log):
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the old bucket's pause (if any) run out
        fast = await _timed_transfer(a, b)
        assert fast < slow / 2, (fast, slow)
        # A broken file on reload is logged and the running limits stay.
        rc.write_text("{not json")
        sp.proc.send_signal(signal.SIGHUP)
        async with asyncio.timeout(5):
            while not any("rate config reload failed" in ln for ln in sp.log):
                await asyncio.sleep(0.05)
        assert sp.proc.returncode is None
    finally:
        await sp.stop()


async def test_unreadable_rate_config_stops_startup(tmp_path: Path) -> None:
    bad = tmp_path / "rate.json"
    bad.write_text('{"PerClientRateLimitBytesPerSec": "fast"}')
    try:
        sp = await start_serve("-a", "127.0.0.1:0", "-stun=false", "-rate-config", str(bad), timeout=10)
    except RuntimeError as e:
        assert "loading rate config" in str(e) and "PerClientRateLimitBytesPerSec" in str(e)
    else:
        await sp.stop()
        raise AssertionError("derpkit serve started with a broken -rate-config")
