"""Pings that arrive while a Pong is still pending, side by side with Go derper (spec §5.11).

derper keeps a 1-slot pong queue that its writer goroutine drains; a Ping that finds the
slot taken is ignored ("pinging too fast"). Observed against Go derper v1.102.3: five Pings
in one write always get exactly two Pongs, for the first two Pings (the idle writer takes
the first out of the slot at once, the second waits in it, the rest find it full). derpkit
answers the same pattern, so this test runs the identical exchange against both servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from derpkit.protocol import frames as F
from derpkit.protocol.events import ConnectionFailed
from tests.goderper import start_derper

from .helpers import RawConn, running_node

pytestmark = pytest.mark.timeout(60)


async def _read_pongs(raw: RawConn, within: float) -> list[bytes]:
    """Every Pong payload that arrives within ``within`` seconds (bounded wait)."""
    pongs: list[bytes] = []
    try:
        async with asyncio.timeout(within):
            while True:
                events = await raw.read_events(within)
                assert not any(isinstance(e, ConnectionFailed) for e in events), events
                pongs += [e.data for e in events if isinstance(e, F.Pong)]
    except TimeoutError:
        pass
    return pongs


async def _burst(port: int) -> tuple[list[bytes], list[bytes]]:
    """Five Pings in one write, then (after the answers) one more Ping."""
    raw = await RawConn.open(port)
    raw.hello()
    await asyncio.sleep(0.05)
    raw.send(b"".join(F.Ping(b"ping-%03d" % i).encode() for i in range(5)))
    first = await _read_pongs(raw, 0.5)
    raw.send(F.Ping(b"ping-end").encode())
    later = await _read_pongs(raw, 0.5)
    raw.close()
    return first, later


@pytest.fixture(params=["go-derper", "derpkit"])
async def server_port(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, int, object]]:
    if request.param == "go-derper":
        d = await asyncio.to_thread(start_derper)
        try:
            yield request.param, d.port, None
        finally:
            await asyncio.to_thread(d.stop)
    else:
        async with running_node() as node:
            yield request.param, node.port, node


async def test_pipelined_pings_get_two_pongs_then_the_slot_frees(server_port: tuple[str, int, object]) -> None:
    name, port, node = server_port
    first, later = await _burst(port)
    assert first == [b"ping-000", b"ping-001"], name
    assert later == [b"ping-end"], name
    if node is not None:
        s = node.server.stats  # type: ignore[attr-defined]
        assert s.got_ping == 6 and s.sent_pong == 3
        assert sum(s.conn_errors.values()) == 0
