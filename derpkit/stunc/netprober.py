"""The real :class:`derpkit.stunc.discover.Prober`: numbered UDP sockets over StunEndpoint.

Thin on purpose: every decision is in :mod:`derpkit.stunc.discover`; this file turns "ask
server S from socket n" into a STUN transaction and its outcome into an
:class:`~derpkit.stunc.nat.Observation`.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from derpkit.stun.client import StunClientError, StunEndpoint, local_ip_toward
from derpkit.stun.codec import (
    ATTR_RESPONSE_PORT,
    build_plain_request,
    change_request,
    new_txid,
)
from derpkit.stunc.nat import Observation

__all__ = ["EndpointProber"]

Addr = tuple[str, int]


class EndpointProber:
    """Sockets opened on first use, all of one family; close them with :meth:`close`.

    ``timeout`` bounds each transaction; an ``evidence`` transaction (its silence is a
    verdict) sends ``evidence_copies`` datagrams with doubling gaps inside that time.
    """

    def __init__(
        self,
        family: int,
        *,
        timeout: float = 2.0,
        evidence_copies: int = 4,
        binds: dict[int, tuple[str, int]] | None = None,
    ) -> None:
        self._family = family
        self._binds = dict(binds or {})  # socket number -> local address (-local)
        self.family = "ipv6" if family == socket.AF_INET6 else "ipv4"
        self.timeout = timeout
        self.evidence_copies = evidence_copies
        self._socks: dict[int, StunEndpoint] = {}
        self._lock = asyncio.Lock()

    async def _sock(self, n: int) -> StunEndpoint:
        async with self._lock:
            ep = self._socks.get(n)
            if ep is None:
                ep = await StunEndpoint.open(self._family, local=self._binds.get(n))
                self._socks[n] = ep
            return ep

    def close(self) -> None:
        for ep in self._socks.values():
            ep.close()
        self._socks.clear()

    async def ask(
        self,
        sock: int,
        server: Addr,
        *,
        shape: str = "plain",
        change_ip: bool = False,
        change_port: bool = False,
        evidence: bool = False,
    ) -> Observation:
        ep = await self._sock(sock)
        change = "ip+port" if change_ip and change_port else "ip" if change_ip else (
            "port" if change_port else "")
        attrs = [change_request(change_ip=change_ip, change_port=change_port)] if change else []
        retries = self.evidence_copies - 1 if evidence else 1
        before = ep.stats.sent
        try:
            r = await ep.request(
                server, timeout=self.timeout, shape="plain" if attrs else shape,  # type: ignore[arg-type]
                attrs=attrs, retries=retries, backoff=2.0,
            )
        except StunClientError as e:
            kind = e.kind
            if kind == "error_response":
                kind = f"error_response {getattr(e, 'code', '?')}"
            sent = getattr(e, "sent", None) or ep.stats.sent - before
            return Observation(sock, server, None, change=change, sent=sent, error=kind)
        return Observation(
            sock, server, (str(r.mapped_ip), r.mapped_port), origin=r.origin,
            response_origin=r.response_origin, other_address=r.other_address, change=change,
            sent=r.attempts, rtt=r.rtt,
        )

    def local_addr(self, sock: int, toward: Addr) -> Addr | None:
        ep = self._socks.get(sock)
        ip = local_ip_toward(toward)
        if ep is None or ip is None:
            return None
        return ip, ep.local[1]

    async def _watch_after_sends(
        self, watcher: StunEndpoint, sender: StunEndpoint, data: bytes, txid: bytes, dest: Addr
    ) -> bool:
        fut = watcher.watch(txid)
        gap = self.timeout / (2**self.evidence_copies - 1)
        try:
            for k in range(self.evidence_copies):
                try:
                    sender.send_raw(data, dest)
                except (StunClientError, OSError):
                    break
                try:
                    await asyncio.wait_for(asyncio.shield(fut), gap * 2**k)
                    return True
                except TimeoutError:
                    continue
            return fut.done() and not fut.cancelled()
        finally:
            fut.cancel()

    async def hairpin(self, from_sock: int, to_sock: int, target: Addr) -> bool:
        txid = new_txid()
        return await self._watch_after_sends(
            await self._sock(to_sock), await self._sock(from_sock),
            build_plain_request(txid), txid, target,
        )

    async def redirected(self, via_sock: int, to_sock: int, server: Addr, port: int) -> bool:
        txid = new_txid()
        value = struct.pack("!HH", port, 0)  # RESPONSE-PORT: port + 2 bytes of padding
        return await self._watch_after_sends(
            await self._sock(to_sock), await self._sock(via_sock),
            build_plain_request(txid, [(ATTR_RESPONSE_PORT, value)]), txid, server,
        )

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
