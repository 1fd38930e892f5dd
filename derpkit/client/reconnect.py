"""A DERP client that reconnects on next use, as Go's derphttp.Client does (spec §8.4).

A failed operation raises (so the caller learns the connection broke and can, say, drop
routes learned over it) and forgets the connection; the *next* call dials again. Only the
caller holding the broken connection resets it, so a send failure and a receive failure
racing each other cause one reconnect, not two.

Optional backoff follows tailscaled: ``min(n² × 10 ms, 5 s) × U[0.5, 1.5)`` for the n-th
consecutive failure; a successful dial (which includes receiving ServerInfo, the first
frame tailscaled's receive loop gets) resets the count. A Restarting frame from the server is honoured: the next dial waits
until ``reconnect_in`` has passed, then keeps retrying until ``try_for`` runs out before it
gives up and raises.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from derpkit.protocol.frames import Frame, Restarting
from derpkit.protocol.handshake import ServerInfo
from derpkit.protocol.keys import NodePrivate, NodePublic

from .conn import DerpClient
from .errors import DerpClosedError, DerpConnectionError

__all__ = ["ReconnectingClient", "backoff_delay"]

_RESTART_RETRY = 0.05  # pause between dials inside a Restarting window
_DELAYS_KEPT = 32  # recent backoff waits kept in ``ReconnectingClient.delays``


def backoff_delay(failures: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next dial after ``failures`` consecutive failures."""
    if failures <= 0:
        return 0.0
    base = min(failures * failures * 0.010, 5.0)
    return base * (0.5 + (rng or random).random())


class ReconnectingClient:
    """Lazily (re)connecting wrapper with the same methods as ``DerpClient``.

    ``connect_kwargs`` are passed to ``DerpClient.connect`` on every dial. The private key
    is fixed up front so the client keeps its DERP address across reconnects; the
    NotePreferred and WatchConns state is remembered and re-sent after a reconnect.
    ``generation`` counts successful dials, so a mesh watch loop can tell that routes
    learned over an older connection are stale.
    """

    def __init__(
        self,
        url: str,
        *,
        private_key: NodePrivate | None = None,
        backoff: bool = False,
        rng: random.Random | None = None,
        **connect_kwargs: Any,
    ) -> None:
        self.url = url
        self.private_key = private_key or NodePrivate.generate()
        self.public_key: NodePublic = self.private_key.public()
        self.backoff = backoff
        self._rng = rng
        #: The most recent backoff waits in seconds, oldest first (for logs and tests).
        self.delays: list[float] = []
        self._kwargs = connect_kwargs
        self._client: DerpClient | None = None
        self._lock = asyncio.Lock()
        self._closed = False
        self.failures = 0
        self.generation = 0
        self._restart: tuple[float, float] | None = None  # (not before, give up after)

    @property
    def client(self) -> DerpClient | None:
        """The live connection, if any."""
        c = self._client
        return c if c is not None and not c.closed else None

    @property
    def server_key(self) -> NodePublic | None:
        c = self._client
        return c.server_key if c is not None else None

    @property
    def server_info(self) -> ServerInfo | None:
        c = self._client
        return c.server_info if c is not None else None

    async def connect(self) -> DerpClient:
        """Return the live connection, dialling if there is none."""
        c = self._client
        if c is not None and not c.closed:
            return c
        async with self._lock:
            c = self._client
            if c is not None and not c.closed:
                return c
            self._client = None
            if self._closed:
                raise DerpClosedError(f"{self.url}: client closed")
            c = await self._dial()
            self._client = c
            return c

    async def _dial(self) -> DerpClient:
        loop = asyncio.get_running_loop()
        while True:
            restart = self._restart
            now = loop.time()
            if restart is not None and now < restart[0]:
                await asyncio.sleep(restart[0] - now)
            elif restart is None and self.backoff and self.failures:
                delay = backoff_delay(self.failures, self._rng)
                self.delays.append(delay)
                del self.delays[:-_DELAYS_KEPT]
                await asyncio.sleep(delay)
            try:
                c = await DerpClient.connect(self.url, private_key=self.private_key, **self._kwargs)
            except DerpConnectionError:
                self.failures += 1
                if restart is not None and loop.time() < restart[1]:
                    await asyncio.sleep(_RESTART_RETRY)
                    continue
                self._restart = None
                raise
            self.failures = 0
            self._restart = None
            self.generation += 1
            return c

    def _drop(self, c: DerpClient) -> None:
        if self._client is c:
            self._client = None
            self.failures += 1
        c.abort()

    async def recv(self, timeout: float | None = None) -> Frame:  # noqa: ASYNC109
        """Next frame; reconnects first if the last connection broke."""
        c = await self.connect()
        try:
            f = await c.recv(timeout)
        except DerpConnectionError:
            self._drop(c)
            raise
        if isinstance(f, Restarting):
            now = asyncio.get_running_loop().time()
            start = now + f.reconnect_in_ms / 1000
            self._restart = (start, start + f.try_for_ms / 1000)
        return f

    async def send(self, dst: NodePublic | bytes, data: bytes) -> None:
        c = await self.connect()
        try:
            await c.send(dst, data)
        except DerpConnectionError:
            self._drop(c)
            raise

    async def forward_packet(
        self, src: NodePublic | bytes, dst: NodePublic | bytes, data: bytes
    ) -> None:
        c = await self.connect()
        try:
            await c.forward_packet(src, dst, data)
        except DerpConnectionError:
            self._drop(c)
            raise

    async def close_peer(self, key: NodePublic | bytes) -> None:
        c = await self.connect()
        try:
            await c.close_peer(key)
        except DerpConnectionError:
            self._drop(c)
            raise

    async def note_preferred(self, preferred: bool) -> None:
        """Remember the home flag (re-sent on reconnect) and tell the server if it changed."""
        if bool(self._kwargs.get("preferred", False)) == preferred and self.client is not None:
            return
        self._kwargs["preferred"] = preferred
        c = self.client
        if c is not None:
            try:
                await c.note_preferred(preferred)
            except DerpConnectionError:
                self._drop(c)
                raise

    async def watch_conns(self) -> None:
        """Subscribe now and on every reconnect."""
        self._kwargs["watch_conns"] = True
        c = await self.connect()
        try:
            await c.watch_conns()
        except DerpConnectionError:
            self._drop(c)
            raise

    async def ping(self, timeout: float = 5.0) -> float:  # noqa: ASYNC109
        c = await self.connect()
        try:
            return await c.ping(timeout)
        except DerpConnectionError:
            self._drop(c)
            raise

    async def send_ping(self, data: bytes) -> None:
        """Never reconnects (Go's SendPing neither): fails when not connected."""
        c = self.client
        if c is None:
            raise DerpConnectionError(f"{self.url}: not connected")
        await c.send_ping(data)

    async def send_pong(self, data: bytes) -> None:
        c = self.client
        if c is None:
            raise DerpConnectionError(f"{self.url}: not connected")
        await c.send_pong(data)

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """Close for good; later calls raise ``DerpClosedError``."""
        self._closed = True
        c, self._client = self._client, None
        if c is not None:
            await c.close()

    async def __aenter__(self) -> ReconnectingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
