"""A fault-injecting DERP proxy: a real server behind it, one deliberate bug in front.

Each ``Fault`` breaks one rule of the protocol on the wire (drops PeerGone frames, leaks a
packet to a third client, swallows a 70 KiB frame instead of closing, answers 200 where the
server said 426, …). The proxy parses both directions into the HTTP head and DERP frames
(with the protocol core's header layout) and lets the fault rewrite them; everything it
does not touch passes unchanged, and WebSocket connections pass as raw bytes. A STUN fault
runs a UDP relay in front of the server's STUN port instead.

Labelled stand-in: this is not a server anyone runs, it is a server with a known defect,
so that each conformance case is shown able to FAIL, and only the cases that should.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from dataclasses import dataclass, field

from derpkit.protocol import frames as F
from derpkit.protocol.constants import FRAME_HEADER_LEN, KEY_LEN, MAX_PACKET_SIZE, FrameType
from derpkit.stun import codec

_HDR = struct.Struct(">BI")


@dataclass(eq=False)
class ProxyConn:
    """One proxied client connection."""

    proxy: FaultProxy
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    admitted: bool = False  # ServerInfo went to this client
    closed: bool = False

    def to_client(self, data: bytes) -> None:
        if not self.closed and not self.client.is_closing():
            self.client.write(data)

    def to_server(self, data: bytes) -> None:
        if not self.closed and not self.upstream.is_closing():
            self.upstream.write(data)


class Fault:
    """Pass-through; subclasses override the hooks for their one defect."""

    name = "transparent"
    #: Cases this defect must turn into FAIL (and no others).
    expected: frozenset[str] = frozenset()
    #: Run the suite one case at a time (the defect reaches across connections).
    sequential = False
    mesh = True
    #: mesh/15 compares PeerPresent's address with the client's; through any TCP proxy the
    #: server sees the proxy, so it fails by construction and is left out, except for
    #: ``ProxyAddress``, which is exactly that defect.
    exclude: tuple[str, ...] = ("mesh/15",)

    def response_head(self, head: bytes) -> bytes:
        return head

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        """Client frame; return False when the hook took care of it (not forwarded)."""
        return True

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return True

    def swallow_c2s(self, ftype: int, length: int) -> bool:
        """Drop this client frame whatever its size, without closing anything."""
        return False


class DropPeerGone(Fault):
    name = "drop PeerGone"
    expected = frozenset({"peer-gone/1", "peer-gone/2", "peer-gone/4", "peer-gone/5", "peer-gone/6",
                          "mesh/6", "mesh/14"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return ftype != FrameType.PEER_GONE


class LeakToThird(Fault):
    name = "leak a packet to a third client"
    # relay/8: A gets a copy of its own packet to B before B's answer.
    expected = frozenset({"relay/2", "relay/8", "peer-gone/5"})
    sequential = True

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.RECV_PACKET:
            for other in list(pc.proxy.conns):
                if other is not pc and other.admitted:
                    other.to_client(frame)
        return True


class ProxyAddress(Fault):
    """No rewriting at all: the server reports the proxy's address in PeerPresent."""

    name = "PeerPresent names the wrong address"
    expected = frozenset({"mesh/15"})
    exclude = ()


class AcceptOversized(Fault):
    name = "accept a 70 KiB frame (swallowed, connection kept)"
    expected = frozenset({"framing/3", "framing/4", "framing/12"})

    def swallow_c2s(self, ftype: int, length: int) -> bool:
        return ftype == FrameType.SEND_PACKET and length > KEY_LEN + MAX_PACKET_SIZE


class OkInsteadOf426(Fault):
    name = "200 instead of 426"
    expected = frozenset({"upgrade/1", "upgrade/2", "upgrade/7"})

    def response_head(self, head: bytes) -> bytes:
        if head.startswith(b"HTTP/1.1 426"):
            return b"HTTP/1.1 200 OK" + head[head.index(b"\r\n"):]
        return head


class FrameBeforeServerInfo(Fault):
    name = "KeepAlive before ServerInfo"
    expected = frozenset({"handshake/2", "handshake/10", "handshake/11", "handshake/12", "handshake/17",
                          "fast-start/5", "upgrade/11"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.SERVER_INFO:
            pc.to_client(F.KEEPALIVE_BYTES)
        return True


class AnswerWatchConns(Fault):
    """WatchConns answered by the proxy with a PeerPresent instead of closing the sender."""

    name = "answer WatchConns without the mesh key"
    expected = frozenset({"mesh/1"})
    mesh = False  # run without the key: the privileged cases SKIP

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.WATCH_CONNS and len(frame) == FRAME_HEADER_LEN:
            pc.to_client(F.PeerPresent(os.urandom(32)).encode())
            return False
        return True


class FaultProxy:
    """TCP proxy from a loopback port to the real server, applying ``fault``."""

    def __init__(self, upstream: tuple[str, int], fault: Fault) -> None:
        self.upstream = upstream
        self.fault = fault
        self.conns: set[ProxyConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pc in list(self.conns):
            pc.closed = True
            pc.client.transport.abort()
            pc.upstream.transport.abort()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.close()
            return
        pc = ProxyConn(self, cw, uw)
        self.conns.add(pc)
        try:
            await asyncio.gather(self._c2s(pc, cr), self._s2c(pc, ur), return_exceptions=True)
        finally:
            pc.closed = True
            self.conns.discard(pc)
            for w in (cw, uw):
                with contextlib.suppress(Exception):
                    w.transport.abort()

    async def _c2s(self, pc: ProxyConn, r: asyncio.StreamReader) -> None:
        buf = bytearray()
        mode = "head"
        discard = 0
        try:
            while data := await r.read(1 << 16):
                buf += data
                if mode == "head":
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        continue
                    head = bytes(buf[: i + 4])
                    del buf[: i + 4]
                    pc.to_server(head)
                    mode = "raw" if b"websocket" in head.lower() else "frames"
                while mode == "frames" and len(buf) >= FRAME_HEADER_LEN:
                    ftype, n = _HDR.unpack_from(buf)
                    if self.fault.swallow_c2s(ftype, n):
                        del buf[:FRAME_HEADER_LEN]
                        mode, discard = "discard", n
                        break
                    if n > 2 * KEY_LEN + MAX_PACKET_SIZE:
                        # No hook needs a frame this big: let it through as it comes, so
                        # the server (not the proxy) decides when to give up on it.
                        mode = "raw"
                        break
                    if len(buf) < FRAME_HEADER_LEN + n:
                        break
                    frame = bytes(buf[: FRAME_HEADER_LEN + n])
                    del buf[: FRAME_HEADER_LEN + n]
                    if self.fault.c2s(pc, ftype, frame):
                        pc.to_server(frame)
                if mode == "discard":
                    take = min(discard, len(buf))
                    del buf[:take]
                    discard -= take
                    if discard == 0:
                        mode = "frames"
                if mode == "raw" and buf:
                    pc.to_server(bytes(buf))
                    buf.clear()
                await pc.upstream.drain()
        finally:
            pc.closed = True
            pc.client.transport.abort()
            pc.upstream.transport.abort()

    async def _s2c(self, pc: ProxyConn, r: asyncio.StreamReader) -> None:
        buf = bytearray()
        mode = "first"
        try:
            while data := await r.read(1 << 16):
                buf += data
                if mode == "first":
                    if len(buf) < 5:
                        continue
                    mode = "head" if buf.startswith(b"HTTP/") else "frames"
                if mode == "head":
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        continue
                    head = bytes(buf[: i + 4])
                    del buf[: i + 4]
                    pc.to_client(self.fault.response_head(head))
                    mode = "frames" if head.startswith(b"HTTP/1.1 101") and b"websocket" not in head.lower() else "raw"
                while mode == "frames" and len(buf) >= FRAME_HEADER_LEN:
                    ftype, n = _HDR.unpack_from(buf)
                    if len(buf) < FRAME_HEADER_LEN + n:
                        break
                    frame = bytes(buf[: FRAME_HEADER_LEN + n])
                    del buf[: FRAME_HEADER_LEN + n]
                    if self.fault.s2c(pc, ftype, frame):
                        pc.to_client(frame)
                    if ftype == FrameType.SERVER_INFO:
                        pc.admitted = True
                if mode == "raw" and buf:
                    pc.to_client(bytes(buf))
                    buf.clear()
                await pc.client.drain()
        finally:
            pc.closed = True
            pc.client.transport.abort()
            pc.upstream.transport.abort()


# --------------------------------------------------------------------------- STUN


class StunFault:
    """UDP relay in front of the STUN port; subclasses bend one rule."""

    name = "transparent STUN"
    expected: frozenset[str] = frozenset()

    def reply(self, request: bytes, answer: bytes | None) -> bytes | None:
        return answer


class StunAnswersGarbage(StunFault):
    """Answers what the server dropped (garbage, empty, bad fingerprints) with a success."""

    name = "STUN answers datagrams the server dropped"
    expected = frozenset({"stun/5", "stun/6", "stun/7"})

    def reply(self, request: bytes, answer: bytes | None) -> bytes | None:
        if answer is not None:
            return answer
        txid = request[8:20] if len(request) >= 20 else bytes(12)
        return codec.build_response(txid, "127.0.0.1", 9)


class StunWrongAddress(StunFault):
    name = "STUN reports a wrong mapped port"
    expected = frozenset({"stun/1"})

    def reply(self, request: bytes, answer: bytes | None) -> bytes | None:
        if answer is None or len(answer) < 28:
            return answer
        b = bytearray(answer)
        b[26] ^= 0x01  # flip a bit of the XOR-ed port
        return bytes(b)


@dataclass
class StunProxy:
    upstream: tuple[str, int]
    fault: StunFault
    port: int = 0
    _transport: asyncio.DatagramTransport | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> StunProxy:
        loop = asyncio.get_running_loop()
        proxy = self

        class _P(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                t = asyncio.ensure_future(proxy._one(data, addr))
                proxy._tasks.add(t)
                t.add_done_callback(proxy._tasks.discard)

        self._transport, _ = await loop.create_datagram_endpoint(_P, local_addr=("127.0.0.1", 0))
        self.port = self._transport.get_extra_info("sockname")[1]
        return self

    async def _one(self, data: bytes, client: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        class _U(asyncio.DatagramProtocol):
            def datagram_received(self, d: bytes, a: tuple[str, int]) -> None:
                if not fut.done():
                    fut.set_result(d)

        up, _ = await loop.create_datagram_endpoint(_U, remote_addr=self.upstream)
        up.sendto(data)
        try:
            answer: bytes | None = await asyncio.wait_for(fut, 0.2)
        except TimeoutError:
            answer = None
        finally:
            up.close()
        if answer is not None and len(answer) >= 32:
            # The server saw the proxy, not the client: put the client's address back.
            answer = codec.build_response(answer[8:20], client[0], client[1])
        out = self.fault.reply(data, answer)
        if out is not None and self._transport is not None:
            self._transport.sendto(out, client)

    def stop(self) -> None:
        if self._transport is not None:
            self._transport.close()
