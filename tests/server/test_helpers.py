"""The test helpers' own promises: a silence check must not pass on a dead connection."""

from __future__ import annotations

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F

from .helpers import nothing_arrives, running_node


async def test_nothing_arrives_is_true_only_on_a_live_connection() -> None:
    async with running_node() as node:
        c = await DerpClient.connect(node.url)
        try:
            assert await nothing_arrives(c, F.RecvPacket, within=0.1)
        finally:
            await c.close()


async def test_nothing_arrives_fails_when_the_server_is_gone() -> None:
    async with running_node() as node:
        c = await DerpClient.connect(node.url)
    # The node has stopped: the connection is dead, so silence must not count as a pass.
    try:
        with pytest.raises(AssertionError, match="connection died|no longer answers"):
            await nothing_arrives(c, F.RecvPacket, within=0.3)
    finally:
        await c.close()


async def test_nothing_arrives_sees_the_frame_it_waits_for() -> None:
    async with running_node() as node:
        a = await DerpClient.connect(node.url)
        b = await DerpClient.connect(node.url)
        try:
            await a.send(b.public_key, b"here")
            assert not await nothing_arrives(b, F.RecvPacket, within=2)
        finally:
            await a.close()
            await b.close()
