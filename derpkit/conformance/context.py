"""What a running case works with: the target, its wire log, and connections it opens.

Everything a case opens through its context is closed when the case ends, whatever the
outcome, so one case cannot leak a client into the next (a leftover client would turn up
in the next case's WatchConns flood).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Any

from . import http
from .conn import Conn, RawConn
from .registry import Fail
from .target import Target
from .wire import WireLog


class CaseContext:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.log = WireLog()
        self._conns: list[Conn | RawConn] = []
        self._socks: list[Any] = []
        self._n = 0

    def _label(self, label: str | None) -> str:
        self._n += 1
        return label or f"c{self._n}"

    async def conn(self, label: str | None = None, **kw: Any) -> Conn:
        """A DERP client that has finished the handshake (see ``Conn.open`` for options)."""
        c = await Conn.open(self.log, self._label(label), self.target, **kw)
        self._conns.append(c)
        return c

    async def raw(self, label: str | None = None, **kw: Any) -> RawConn:
        c = await RawConn.open(self.log, self._label(label), self.target, **kw)
        self._conns.append(c)
        return c

    async def http(self, method: str, path: str, headers: dict[str, str] | None = None) -> http.HttpResponse:
        return await http.request(self.log, self.target, method, path, headers, label=self._label("http"))

    def close(self) -> None:
        for c in self._conns:
            with contextlib.suppress(Exception):
                c.close()
        for s in self._socks:
            with contextlib.suppress(Exception):
                s.close()

    # ------------------------------------------------------------------ common checks

    async def closes(self, c: Conn | RawConn, what: str, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """``Fail`` unless the server closes ``c`` within the patience, naming ``what`` it was sent."""
        t = self.target.patience if timeout is None else timeout
        if isinstance(c, RawConn):
            problem = await c.closed_without_reply(t)
            if problem:
                raise Fail(f"after {what}: {problem}")
            return
        if not await c.wait_closed(t):
            raise Fail(f"connection still open {t:g} s after {what}")

    async def quiet(self, c: Conn, what: str, seconds: float | None = None, ignore: tuple[type, ...] = ()) -> None:
        """``Fail`` if ``c`` receives any frame (bar ``ignore``) within ``seconds``, or is dead.

        The Ping at the end proves the link was alive the whole time, so a closed or stuck
        connection cannot pass for "nothing arrived".
        """
        from derpkit.protocol.frames import KeepAlive

        got = [e for e in await c.collect(self.target.quiet if seconds is None else seconds)
               if not isinstance(e, (KeepAlive, *ignore))]
        if got:
            raise Fail(f"{c.label} received {type(got[0]).__name__} but expected {what}")
        if c.closed:
            raise Fail(f"{c.label} was closed ({c.close_reason}) while checking for {what}")
        await c.ping()
        got = [e for e in c.events if not isinstance(e, (KeepAlive, *ignore))]
        if got:
            raise Fail(f"{c.label} received {type(got[0]).__name__} but expected {what}")

    # ------------------------------------------------------------------ STUN

    async def stun_exchange(
        self, datagram: bytes, timeout: float = 1.0, label: str = "stun",  # noqa: ASYNC109
    ) -> tuple[bytes | None, tuple[str, int]]:
        """Send one UDP datagram to the target's STUN address: (first reply or None, our address)."""
        assert self.target.stun is not None
        host, port = self.target.stun
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise Fail(f"cannot resolve STUN host {host}")
        fam, _, _, _, addr = infos[0]
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        class _P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, a: Any) -> None:
                if not fut.done():
                    fut.set_result(data)

            def error_received(self, exc: Exception) -> None:
                if not fut.done():
                    fut.set_exception(exc)

        sock = socket.socket(fam, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.connect(addr[:2])
        except OSError as e:
            sock.close()
            raise Fail(f"STUN {host}:{port}: {e.strerror or e}") from None
        transport, _ = await loop.create_datagram_endpoint(_P, sock=sock)
        self._socks.append(transport)
        self.log.add(label, "send", "udp", len=len(datagram), hex=datagram[:64].hex())
        local = sock.getsockname()[:2]
        if datagram:
            transport.sendto(datagram)
        else:
            sock.send(b"")  # asyncio's sendto() silently skips empty datagrams
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                data = await fut
        except TimeoutError:
            self.log.note(label, f"no reply within {timeout:g} s")
            return None, local
        except OSError as e:
            raise Fail(f"STUN {host}:{port}: {e.strerror or e}") from None
        finally:
            transport.close()
        self.log.add(label, "recv", "udp", len=len(data), hex=data[:64].hex(), after_s=round(time.monotonic() - t0, 4))
        return data, local

