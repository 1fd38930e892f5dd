"""derp_tcp_rtt: the kernel's TCP RTT of each client, sampled as derper samples it.

The sampler runs inside a real node with real client sockets; only its period is
shortened (10 s in production) so the test does not sit idle.
"""

from __future__ import annotations

import asyncio
import re
import socket

import aiohttp
import pytest

from derpkit.client import DerpClient
from derpkit.server.metrics import tcp_rtt_label
from derpkit.server.relay import rtt as rtt_mod

from .helpers import running_node


@pytest.mark.parametrize(("us", "label"), [
    (0, "10ms"), (10_000, "10ms"), (10_001, "20ms"), (20_000, "20ms"), (49_999, "50ms"),
    (100_000, "100ms"), (150_000, "150ms"), (250_000, "250ms"), (500_000, "500ms"),
    (500_001, "inf"), (3_000_000, "inf"),
])
def test_labels_follow_derper_bounds(us: int, label: str) -> None:
    assert tcp_rtt_label(us) == label


def test_kernel_rtt_of_a_loopback_connection() -> None:
    """TCP_INFO parsing against a real connection: loopback RTT is tiny but measured."""
    srv = socket.create_server(("127.0.0.1", 0))
    with srv, socket.create_connection(srv.getsockname()) as c:
        peer, _ = srv.accept()
        with peer:
            for _ in range(5):  # a few exchanges so the kernel has RTT samples
                c.sendall(b"x")
                peer.recv(1)
                peer.sendall(b"y")
                c.recv(1)
            us = rtt_mod.read_rtt_us(c)
    assert 0 < us < 10_000  # microseconds; loopback stays well under 10 ms


def test_plain_objects_and_unix_sockets_are_not_tcp() -> None:
    class NoSocket:
        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    assert rtt_mod.tcp_socket(NoSocket()) is None
    a, b = socket.socketpair()
    with a, b:

        class Unix:
            def get_extra_info(self, name: str, default: object = None) -> object:
                return a if name == "socket" else default

        assert rtt_mod.tcp_socket(Unix()) is None


def _rtt_lines(text: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r'^derp_tcp_rtt\{le="([^"]+)"\} (\d+)$', text, re.M)}


async def _varz(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/debug/varz") as r:
        return await r.text()


async def test_each_client_sampled_on_its_own_cadence_until_it_leaves() -> None:
    async with running_node() as node:
        sampler = node.server.rtt
        sampler.interval, sampler.tick = 0.5, 0.05
        counts = node.server.stats.tcp_rtt
        loop = asyncio.get_running_loop()
        a = await DerpClient.connect(node.url)
        t_a = loop.time()
        b = await DerpClient.connect(node.url)
        t_b = loop.time()
        assert sum(counts.values()) == 0  # nobody is due yet: the first sample is one interval in
        async with asyncio.timeout(10):
            while counts["10ms"] < 4:  # two samples each
                await asyncio.sleep(0.02)
        now = loop.time()
        # Never more often than once per interval per client (each joined before t_a/t_b).
        assert counts["10ms"] <= int((now - t_a) / 0.5) + int((now - t_b) / 0.5) + 2, dict(counts)
        assert set(counts) == {"10ms"}  # loopback
        lines = _rtt_lines(await _varz(node.port))
        assert lines["10ms"] >= 4
        await a.close()
        await b.close()
        await asyncio.sleep(0.2)
        frozen = counts["10ms"]
        await asyncio.sleep(0.6)
        assert counts["10ms"] == frozen  # gone clients are not sampled
        assert sampler._timer is None  # noqa: SLF001 - and the timer stopped with the last one


async def test_websocket_clients_count_as_non_tcp_once() -> None:
    async with running_node() as node:
        node.server.rtt.interval, node.server.rtt.tick = 0.2, 0.05
        ws = await DerpClient.connect(node.url, websocket=True)
        await asyncio.sleep(0.5)
        assert dict(node.server.stats.tcp_rtt) == {"non-tcp": 1}
        assert _rtt_lines(await _varz(node.port)) == {"non-tcp": 1}
        await ws.close()


async def test_derper_switch_turns_sampling_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rtt_mod.DISABLE_ENV, "true")
    async with running_node() as node:
        node.server.rtt.interval, node.server.rtt.tick = 0.2, 0.05
        c = await DerpClient.connect(node.url)
        await asyncio.sleep(0.5)
        assert not node.server.stats.tcp_rtt
        assert _rtt_lines(await _varz(node.port)) == {}
        await c.close()
