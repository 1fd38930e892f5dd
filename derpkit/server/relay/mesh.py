"""Outbound mesh links: one DERP client per ``-mesh-with`` peer.

Each link logs in to the peer with this server's own key and the mesh key, subscribes
with WatchConns, and turns the peer's PeerPresent/PeerGone stream into routes in our
forwarder table. Packets for keys on the peer go out on the same connection as
ForwardPacket frames. A broken link drops every route it taught us and retries every
5 s, like derper's watch loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

from derpkit.protocol import frames as F
from derpkit.protocol.constants import MESH_RETRY_INTERVAL

if TYPE_CHECKING:
    from derpkit.client.conn import DerpClient
    from derpkit.protocol.keys import MeshKey, NodePrivate

    from .derp import DerpServer

log = logging.getLogger("derpkit.mesh")

#: A forward that cannot be written for this long closes the link (derper: 5 s).
FORWARD_WRITE_TIMEOUT = 5.0


class MeshLink:
    """Our connection to one mesh peer, and the forwarder for the keys it announces."""

    def __init__(
        self,
        server: DerpServer,
        host: str,
        dial_host: str | None = None,
        *,
        scheme: str = "https",
        insecure_tls: bool = False,
        cert_name: str | None = None,
        retry_interval: float = MESH_RETRY_INTERVAL,
        private_key: NodePrivate | None = None,
        mesh_key: MeshKey | None = None,
        same_server_key: bool = False,
    ) -> None:
        self.server = server
        #: Who the link logs in as and with which mesh key; None means the server's own
        #: (derper's rule). ``same_server_key`` is for -workers siblings, which share the
        #: server key by design and so must not take it as a self-connect.
        self.private_key = private_key
        self.mesh_key = mesh_key
        self.same_server_key = same_server_key
        self.host = host
        self.dial_host = dial_host
        self.url = f"{scheme}://{host}/derp"
        self.insecure_tls = insecure_tls
        self.cert_name = cert_name
        self.retry_interval = retry_interval
        self.client: DerpClient | None = None
        self.seen: set[bytes] = set()
        self.task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        self.forwarded = 0
        self.forward_errors = 0
        self._stall: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"MeshLink({self.url})"

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run(), name=f"mesh {self.host}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
            self.task = None
        if self.client is not None:
            await self.client.close()
            self.client = None
        self._forget_all()

    # -------------------------------------------------------------- forwarding

    def forward_packet(self, src: bytes, dst: bytes, data: bytes) -> None:
        """Called synchronously from routing; a dead link loses the packet, as in Go."""
        c = self.client
        if c is None or c.closed:
            self.forward_errors += 1
            return
        try:
            c.forward_packet_nowait(src, dst, data)
        except Exception:
            self.forward_errors += 1
            return
        self.forwarded += 1
        if c.write_stalled and self._stall is None:
            self._stall = asyncio.get_running_loop().call_later(FORWARD_WRITE_TIMEOUT, self._stalled, c)

    def _stalled(self, c: DerpClient) -> None:
        self._stall = None
        if c.write_stalled:
            log.warning("mesh %s: forward write stalled for %ss; reconnecting", self.host, FORWARD_WRITE_TIMEOUT)
            asyncio.get_running_loop().create_task(c.close())

    # -------------------------------------------------------------- watch loop

    def on_frame(self, f: object) -> None:
        """One frame of the peer's watch stream: PeerPresent/PeerGone become routes."""
        if isinstance(f, F.PeerPresent):
            self.seen.add(f.key)
            self.server.add_forwarder(f.key, self)
        elif isinstance(f, F.PeerGone):
            self.seen.discard(f.key)
            self.server.remove_forwarder(f.key, self)

    def _forget_all(self) -> None:
        for key in list(self.seen):
            self.server.remove_forwarder(key, self)
        self.seen.clear()

    async def _run(self) -> None:
        from derpkit.client.conn import DerpClient

        server = self.server
        while True:
            try:
                client = await DerpClient.connect(
                    self.url,
                    private_key=self.private_key or server.private_key,
                    mesh_key=self.mesh_key if self.mesh_key is not None else server.mesh_key,
                    can_ack_pings=False,
                    watch_conns=True,
                    dial_host=self.dial_host,
                    insecure_tls=self.insecure_tls,
                    cert_name=self.cert_name,
                )
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("mesh %s: connect failed: %s; retrying in %ss", self.host, e, self.retry_interval)
                await asyncio.sleep(self.retry_interval * random.uniform(0.9, 1.1))
                continue
            if client.server_key == server.public_key and not self.same_server_key:
                log.info("mesh %s: detected self-connect; not meshing with myself", self.host)
                await client.close()
                return
            log.info("mesh %s: connected, watching %s", self.host, client.server_key)
            self.client = client
            self.connected.set()
            try:
                while True:
                    self.on_frame(await client.recv())
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("mesh %s: link lost: %s; retrying in %ss", self.host, e, self.retry_interval)
            finally:
                self.connected.clear()
                self.client = None
                self._forget_all()
                await client.close()
            await asyncio.sleep(self.retry_interval)
