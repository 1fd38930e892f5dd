"""WebSocket close codes side by side with Go derper: 1003 for a text message, 1008 when
``derp`` is not among the offered subprotocols (though the header mentions "derp").

The same aiohttp client runs against Go derper and derpkit; docs/protocol.md records the
codes and close reasons observed from Go.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.goderper import start_derper

from .helpers import running_node

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["go-derper", "derpkit"])
async def derp_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    if request.param == "go-derper":
        d = await asyncio.to_thread(start_derper)
        try:
            yield d.url
        finally:
            await asyncio.to_thread(d.stop)
    else:
        async with running_node() as node:
            yield node.url


async def _close_of(url: str, protocols: tuple[str, ...], text: bool) -> tuple[int | None, str | None]:
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(url, protocols=protocols, autoclose=False, compress=0)
        try:
            if text:
                assert ws.protocol == "derp"
                await ws.receive_bytes(timeout=5)  # ServerKey
                await ws.send_str("not binary")
            async with asyncio.timeout(5):
                while True:
                    m = await ws.receive()
                    if m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                        return ws.close_code, ws.protocol
        finally:
            await ws.close()


async def test_text_message_closes_with_1003(derp_url: str) -> None:
    code, proto = await _close_of(derp_url, ("derp",), text=True)
    assert (code, proto) == (1003, "derp")


async def test_no_derp_subprotocol_among_the_offers_closes_with_1008(derp_url: str) -> None:
    code, proto = await _close_of(derp_url, ("derp-v9",), text=False)
    assert (code, proto) == (1008, None)
