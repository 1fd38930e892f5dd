"""VERIFY_CLIENTS=true in the container (the image's default), as docs/docker.md runs it:
the host's tailscaled socket mounted at the default path, or missing.

The socket is served by tests/server/test_admission.py's ``LocalAPIStandIn`` — a
**stand-in for tailscaled's LocalAPI** (whois/status in tailscaled's shape), because a real
tailscaled here is logged out and knows no node to admit."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol.keys import NodePrivate
from tests.server.helpers import exchange
from tests.server.test_admission import LocalAPIStandIn

from .conftest import CERTNAME_RE, Built, first_healthy
from .podman import Localizer, container_gone, doc_command, run, run_doc, wait_log

pytestmark = pytest.mark.timeout(180)
SOCKET = "/var/run/tailscale/tailscaled.sock"


async def _start(name: str, loc: Localizer) -> str:
    """Run the documented container; its pin, once it is healthy."""
    await asyncio.to_thread(container_gone, name)
    t0 = time.monotonic()
    await asyncio.to_thread(run_doc, doc_command(f"podman run -d --name {name}"), loc)
    log = await asyncio.to_thread(wait_log, name, "DERP on port")
    await asyncio.to_thread(first_healthy, name, t0)
    pins = CERTNAME_RE.findall(log)
    assert len(pins) == 1, log
    return pins[0]


async def _logs(name: str) -> str:
    p = await asyncio.to_thread(run, ["podman", "logs", name])
    return p.stdout + p.stderr


@pytest.fixture
async def tailscaled() -> AsyncIterator[LocalAPIStandIn]:
    async with LocalAPIStandIn() as ts:
        os.chmod(ts.path, 0o666)  # as tailscaled makes it: the container's uid 1000 connects
        yield ts


async def test_socket_mounted_admits_a_known_node_and_refuses_an_unknown_key(
    image: Built, tailscaled: LocalAPIStandIn
) -> None:
    loc = Localizer(paths={SOCKET: tailscaled.path})
    try:
        pin = await _start("derp-verify", loc)
        url = f"https://127.0.0.1:{loc.port(8443)}/derp"
        k1, k2, stranger = NodePrivate.generate(), NodePrivate.generate(), NodePrivate.generate()
        tailscaled.known |= {str(k1.public()), str(k2.public())}
        a = await DerpClient.connect(url, private_key=k1, cert_name=pin, timeout=10)
        b = await DerpClient.connect(url, private_key=k2, cert_name=pin, timeout=10)
        try:
            await exchange(a, b, 2)
        finally:
            await a.close()
            await b.close()
        with pytest.raises(DerpConnectionError):
            await DerpClient.connect(url, private_key=stranger, cert_name=pin, timeout=10)
        # The container asked the mounted socket about each of them.
        asked = {addr for _, addr, _ in tailscaled.requests}
        assert {str(k1.public()), str(k2.public()), str(stranger.public())} <= asked, asked
        log = await _logs("derp-verify")
        assert f"peer {stranger.public()} not authorized (not found in local tailscaled)" in log, log
        assert f"peer {k1.public()} not authorized" not in log
    finally:
        await asyncio.to_thread(container_gone, "derp-verify")


async def test_socket_missing_refuses_every_client_but_stays_healthy(image: Built) -> None:
    loc = Localizer()
    try:
        pin = await _start("derp-nosocket", loc)  # _start waited for a healthy check
        url = f"https://127.0.0.1:{loc.port(8444)}/derp"
        key = NodePrivate.generate()
        with pytest.raises(DerpConnectionError):
            await DerpClient.connect(url, private_key=key, cert_name=pin, timeout=10)
        log = await _logs("derp-nosocket")
        assert "failed to query local tailscaled status" in log, log
        assert "env VERIFY_CLIENTS=true -> -verify-clients" in log  # the image default
    finally:
        await asyncio.to_thread(container_gone, "derp-nosocket")
