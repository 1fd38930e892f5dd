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
import socket
import ssl
import struct
import time
from collections.abc import Awaitable
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
    request: bytes = b""  # the HTTP request head the client sent
    key: bytes | None = None  # the client's key, from its ClientInfo
    frames_in: int = 0  # client frames seen
    replace_body: bool = False  # drop the server's response body (the fault wrote its own)
    mesh: bool = False  # the ClientInfo carried the server's mesh key (faults that open it)
    last_c2s: float = 0.0

    @property
    def path(self) -> str:
        line = self.request.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        return parts[1] if len(parts) > 1 else ""

    def req_header(self, name: str) -> str | None:
        for line in self.request.decode("latin-1").split("\r\n")[1:]:
            k, sep, v = line.partition(":")
            if sep and k.strip().lower() == name.lower():
                return v.strip()
        return None

    def abort(self) -> None:
        self.closed = True
        self.client.transport.abort()
        self.upstream.transport.abort()

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
    #: Terminate TLS in the proxy (its own certificate) in front of the plain server.
    tls = False
    #: With ``tls``: also serve plain HTTP on the same port (a sniffing listener).
    plain_too = False

    #: Drop whatever the client wrote in the same segment as its request head.
    drop_after_head = False

    def request_head(self, pc: ProxyConn, head: bytes) -> bytes | None:
        """The client's request head; None when the fault answered it itself (then closed)."""
        return head

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return head

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        """Decide on a client frame from its header: "swallow" (drop it, keep the
        connection), "close" (drop the connection), or None (read it whole)."""
        return None

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool | Awaitable[bool]:
        """Client frame; return False when the hook took care of it (not forwarded)."""
        return True

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return True

    def admitted(self, pc: ProxyConn) -> None:
        """ServerInfo just went to this client."""


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

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "swallow" if ftype == FrameType.SEND_PACKET and length > KEY_LEN + MAX_PACKET_SIZE else None


class OkInsteadOf426(Fault):
    name = "200 instead of 426"
    expected = frozenset({"upgrade/1", "upgrade/2", "upgrade/7"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
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


class FaultProxy:
    """TCP proxy from a loopback port to the real server, applying ``fault``."""

    def __init__(self, upstream: tuple[str, int], fault: Fault, ssl_context: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.ssl_context = ssl_context
        self.fault = fault
        self.conns: set[ProxyConn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None
        self.port = 0

    async def start(self) -> FaultProxy:
        if self.fault.plain_too and self.ssl_context is not None:
            return await self._start_sniffing()
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _start_sniffing(self) -> FaultProxy:
        """One port, two protocols: a TLS ClientHello (first byte 0x16) gets TLS, anything
        else is served in the clear, as a listener that sniffs would."""
        loop = asyncio.get_running_loop()
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(64)
        lsock.setblocking(False)
        self.port = lsock.getsockname()[1]
        self._lsock = lsock

        async def serve_one(sock: socket.socket) -> None:
            first = b""
            for _ in range(100):
                try:
                    first = sock.recv(1, socket.MSG_PEEK)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            reader = asyncio.StreamReader()
            proto = asyncio.StreamReaderProtocol(reader, self._handle)
            await loop.connect_accepted_socket(
                lambda: proto, sock, ssl=self.ssl_context if first == b"\x16" else None)

        async def accept_loop() -> None:
            while True:
                sock, _ = await loop.sock_accept(lsock)
                t = asyncio.ensure_future(serve_one(sock))
                self._tasks.add(t)
                t.add_done_callback(self._tasks.discard)

        self._accept = asyncio.ensure_future(accept_loop())
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        if getattr(self, "_accept", None) is not None:
            self._accept.cancel()
            self._lsock.close()
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
        fault = self.fault
        buf = bytearray()
        mode = "head"
        discard = 0
        try:
            while data := await r.read(1 << 16):
                pc.last_c2s = time.monotonic()
                buf += data
                if mode == "head":
                    i = buf.find(b"\r\n\r\n")
                    if i < 0:
                        continue
                    head = bytes(buf[: i + 4])
                    del buf[: i + 4]
                    pc.request = head
                    out = fault.request_head(pc, head)
                    if out is None:
                        await pc.client.drain()
                        break
                    pc.to_server(out)
                    if fault.drop_after_head:
                        buf.clear()
                    mode = "raw" if b"websocket" in head.lower() else "frames"
                while buf and mode in ("frames", "discard"):
                    if mode == "discard":
                        take = min(discard, len(buf))
                        del buf[:take]
                        discard -= take
                        if discard:
                            break
                        mode = "frames"
                        continue
                    if len(buf) < FRAME_HEADER_LEN:
                        break
                    ftype, n = _HDR.unpack_from(buf)
                    act = fault.c2s_header(pc, ftype, n)
                    if act == "close":
                        pc.abort()
                        return
                    if act == "swallow":
                        del buf[:FRAME_HEADER_LEN]
                        mode, discard = "discard", n
                        continue
                    if n > 2 * KEY_LEN + MAX_PACKET_SIZE:
                        # No hook needs a frame this big: let it through as it comes, so
                        # the server (not the proxy) decides when to give up on it.
                        mode = "raw"
                        break
                    if len(buf) < FRAME_HEADER_LEN + n:
                        break
                    frame = bytes(buf[: FRAME_HEADER_LEN + n])
                    del buf[: FRAME_HEADER_LEN + n]
                    pc.frames_in += 1
                    if pc.frames_in == 1 and ftype == FrameType.CLIENT_INFO and n >= KEY_LEN:
                        pc.key = frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN]
                    ok = fault.c2s(pc, ftype, frame)
                    if not isinstance(ok, bool):
                        ok = await ok
                    if pc.closed:
                        return
                    if ok:
                        pc.to_server(frame)
                if mode == "raw" and buf:
                    pc.to_server(bytes(buf))
                    buf.clear()
                await pc.upstream.drain()
        finally:
            pc.abort()

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
                    pc.to_client(self.fault.response_head(pc, head))
                    mode = "frames" if head.startswith(b"HTTP/1.1 101") and b"websocket" not in head.lower() else "raw"
                    if pc.replace_body:
                        mode = "drop"
                if mode == "drop":
                    buf.clear()
                while mode == "frames" and len(buf) >= FRAME_HEADER_LEN:
                    ftype, n = _HDR.unpack_from(buf)
                    if len(buf) < FRAME_HEADER_LEN + n:
                        break
                    frame = bytes(buf[: FRAME_HEADER_LEN + n])
                    del buf[: FRAME_HEADER_LEN + n]
                    if self.fault.s2c(pc, ftype, frame):
                        pc.to_client(frame)
                    if ftype == FrameType.SERVER_INFO and not pc.admitted:
                        pc.admitted = True
                        self.fault.admitted(pc)
                if mode == "raw" and buf:
                    pc.to_client(bytes(buf))
                    buf.clear()
                await pc.client.drain()
        finally:
            pc.abort()

    def by_key(self, key: bytes) -> list[ProxyConn]:
        return [pc for pc in self.conns if pc.key == key and pc.admitted and not pc.closed]


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


# =========================================================================== more faults
# One class per defect; ``expected`` is the exact set of cases it must turn into FAIL.

DISCO_MAGIC = b"TS\xf0\x9f\x92\xac"


def _status(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def _set_status(head: bytes, status: int, reason: str) -> bytes:
    return f"HTTP/1.1 {status} {reason}".encode() + head[head.index(b"\r\n"):]


def _drop_header(head: bytes, name: str) -> bytes:
    lines = head.split(b"\r\n")
    low = name.lower().encode() + b":"
    return b"\r\n".join(ln for ln in lines if not ln.lower().startswith(low))


def _add_header(head: bytes, line: str) -> bytes:
    return head[:-2] + line.encode() + b"\r\n\r\n"


class _HttpFault(Fault):
    paths: tuple[str, ...] = ()

    def applies(self, pc: ProxyConn) -> bool:
        return pc.path.split("?", 1)[0] in self.paths


class ProbeNotFound(_HttpFault):
    name = "/derp/probe answers 404"
    expected = frozenset({"http/1", "http/2", "http/5"})
    paths = ("/derp/probe", "/derp/latency-check")

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _set_status(head, 404, "Not Found") if self.applies(pc) and _status(head) == 200 else head


class ProbeNoCors(_HttpFault):
    name = "/derp/probe without Access-Control-Allow-Origin"
    expected = frozenset({"http/3"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _drop_header(head, "Access-Control-Allow-Origin")


class ProbeAnyMethod(_HttpFault):
    name = "/derp/probe answers POST with 200"
    expected = frozenset({"http/4"})
    paths = ("/derp/probe",)

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _set_status(head, 200, "OK") if self.applies(pc) and _status(head) == 405 else head


class Generate204As200(_HttpFault):
    name = "/generate_204 answers 200"
    expected = frozenset({"http/6", "http/8"})
    paths = ("/generate_204",)

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _set_status(head, 200, "OK") if self.applies(pc) and _status(head) == 204 else head


class ChallengeIgnored(Fault):
    name = "X-Tailscale-Challenge not answered"
    expected = frozenset({"http/7"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _drop_header(head, "X-Tailscale-Response")


class ChallengeUnchecked(Fault):
    name = "X-Tailscale-Challenge echoed whatever it holds"
    expected = frozenset({"http/8", "http/9"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        c = pc.req_header("X-Tailscale-Challenge")
        if c is not None and b"x-tailscale-response:" not in head.lower():
            return _add_header(head, f"X-Tailscale-Response: response {c}")
        return head


class NoCacheControl(_HttpFault):
    name = "/generate_204 without Cache-Control"
    expected = frozenset({"http/10"})
    paths = ("/generate_204",)

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _drop_header(head, "Cache-Control") if self.applies(pc) else head


class Wrong426Body(Fault):
    name = "426 with another body"
    expected = frozenset({"upgrade/2"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        if _status(head) != 426:
            return head
        pc.replace_body = True
        body = b"upgrade required\n"
        head = _add_header(_drop_header(head, "Content-Length"), f"Content-Length: {len(body)}")
        return head + body


class No101Upgrade(Fault):
    name = "101 without Upgrade: DERP"
    expected = frozenset({"upgrade/4"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        if _status(head) != 101 or (pc.req_header("Upgrade") or "").lower() == "websocket":
            return head
        return _add_header(_drop_header(head, "Upgrade"), "Upgrade: derp-ish")


class NoDerpVersion(Fault):
    name = "101 without Derp-Version"
    expected = frozenset({"upgrade/5"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        return _drop_header(head, "Derp-Version")


class WrongPublicKeyHeader(Fault):
    name = "Derp-Public-Key names another key"
    expected = frozenset({"upgrade/6"})

    def response_head(self, pc: ProxyConn, head: bytes) -> bytes:
        if _status(head) != 101:
            return head
        return _add_header(_drop_header(head, "Derp-Public-Key"), "Derp-Public-Key: " + os.urandom(32).hex())


class CaseSensitiveUpgrade(Fault):
    name = "Upgrade matched case-sensitively"
    expected = frozenset({"upgrade/8"})

    def request_head(self, pc: ProxyConn, head: bytes) -> bytes | None:
        up = pc.req_header("Upgrade")
        if up is not None and up.lower() == "derp" and up != "DERP":
            pc.to_client(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 33\r\n\r\nDERP requires connection upgrade\n")
            return None
        return head


class DropPipelinedBytes(Fault):
    name = "bytes after the request head discarded"
    expected = frozenset({"upgrade/11", "fast-start/2", "fast-start/3"})
    drop_after_head = True


class FastStartIgnored(Fault):
    name = "Derp-Fast-Start ignored (101 sent anyway)"
    expected = frozenset({"fast-start/1"})

    def request_head(self, pc: ProxyConn, head: bytes) -> bytes | None:
        return _drop_header(head, "Derp-Fast-Start")


class FastStartAnyValue(Fault):
    name = "any Derp-Fast-Start value means fast start"
    expected = frozenset({"fast-start/4"})

    def request_head(self, pc: ProxyConn, head: bytes) -> bytes | None:
        v = pc.req_header("Derp-Fast-Start")
        return _add_header(_drop_header(head, "Derp-Fast-Start"), "Derp-Fast-Start: 1") if v is not None else head


class NoWebSocket(Fault):
    name = "WebSocket refused"
    expected = frozenset({"websocket/1", "websocket/2", "websocket/3", "websocket/4"})

    def request_head(self, pc: ProxyConn, head: bytes) -> bytes | None:
        if "derp" in (pc.req_header("Sec-WebSocket-Protocol") or ""):
            pc.to_client(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
            return None
        return head


class _ServerKeyFault(Fault):
    """Faults that must open ClientInfo, so they hold the server's private key."""

    def __init__(self, server_key: object = None, mesh_key: object = None) -> None:
        self.server_key = server_key
        self.mesh_key = mesh_key

    def _note_mesh(self, pc: ProxyConn, payload: bytes) -> None:
        from derpkit.protocol.errors import ProtocolError
        from derpkit.protocol.handshake import open_client_info

        try:
            _, info = open_client_info(self.server_key, payload)  # type: ignore[arg-type]
        except ProtocolError:
            return
        pc.mesh = self.mesh_key is not None and self.mesh_key.matches(info.mesh_key)  # type: ignore[attr-defined]

    def _admit_here(self, pc: ProxyConn, key: bytes) -> None:
        from derpkit.protocol.handshake import server_info_frame
        from derpkit.protocol.keys import NodePublic

        pc.to_client(server_info_frame(self.server_key, NodePublic(key)))  # type: ignore[arg-type]
        pc.admitted = True


class AdmitUnopenable(_ServerKeyFault):
    name = "a ClientInfo that does not open is admitted"
    expected = frozenset({"handshake/5", "handshake/6", "handshake/13", "handshake/14", "handshake/15"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if pc.frames_in != 1 or ftype != FrameType.CLIENT_INFO:
            return True
        from derpkit.protocol.errors import ProtocolError
        from derpkit.protocol.handshake import open_client_info

        if len(frame) < FRAME_HEADER_LEN + 56:
            return True  # a size the server refuses before opening anything
        try:
            open_client_info(self.server_key, frame[FRAME_HEADER_LEN:])  # type: ignore[arg-type]
        except ProtocolError as e:
            if e.reason in ("bad_box", "bad_json", "bad_mesh_key"):
                self._admit_here(pc, frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN])
                return False
        return True


class StrictClientInfo(_ServerKeyFault):
    name = "ClientInfo JSON must be exactly what Go writes"
    expected = frozenset({"handshake/10", "handshake/11", "handshake/12"})
    GO_KEYS = frozenset({"meshKey", "version", "CanAckPings", "IsProber", "AppName"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if pc.frames_in != 1 or ftype != FrameType.CLIENT_INFO:
            return True
        import json

        from derpkit.protocol.errors import ProtocolError
        from derpkit.protocol.handshake import open_box
        from derpkit.protocol.keys import NodePublic

        p = frame[FRAME_HEADER_LEN:]
        try:
            obj = json.loads(open_box(self.server_key, NodePublic(p[:KEY_LEN]), p[KEY_LEN:]))  # type: ignore[arg-type]
        except (ProtocolError, ValueError):
            return True
        if not isinstance(obj, dict) or not set(obj) <= self.GO_KEYS or obj.get("version") != 2:
            pc.abort()
            return False
        return True


class _FirstFrame(Fault):
    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "swallow" if pc.frames_in == 0 and self.bad(ftype, length) else None

    def bad(self, ftype: int, length: int) -> bool:
        return False


class TolerateWrongFirstFrame(_FirstFrame):
    name = "a first frame other than ClientInfo is ignored"
    expected = frozenset({"handshake/4"})

    def bad(self, ftype: int, length: int) -> bool:
        return ftype != FrameType.CLIENT_INFO


class TolerateShortClientInfo(_FirstFrame):
    name = "a short ClientInfo is ignored"
    expected = frozenset({"handshake/7"})

    def bad(self, ftype: int, length: int) -> bool:
        return ftype == FrameType.CLIENT_INFO and length < 56


class TolerateLongClientInfo(_FirstFrame):
    name = "an oversized ClientInfo is ignored"
    expected = frozenset({"handshake/8"})

    def bad(self, ftype: int, length: int) -> bool:
        return ftype == FrameType.CLIENT_INFO and length > 256 << 10


class TolerateZeroKey(Fault):
    name = "a ClientInfo from the zero key is ignored"
    expected = frozenset({"handshake/9"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return not (pc.frames_in == 1 and ftype == FrameType.CLIENT_INFO and pc.key == bytes(KEY_LEN))


CLIENT_TYPES = {FrameType.CLIENT_INFO, FrameType.SEND_PACKET, FrameType.NOTE_PREFERRED, FrameType.FORWARD_PACKET,
                FrameType.WATCH_CONNS, FrameType.CLOSE_PEER, FrameType.PING}


class CloseOnUnknown(Fault):
    name = "unknown frame types close the connection"
    expected = frozenset({"framing/1", "framing/10", "framing/11"})

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "close" if ftype not in CLIENT_TYPES else None


class TruncateBigPackets(Fault):
    name = "packets over 60 000 bytes truncated"
    expected = frozenset({"framing/2"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.RECV_PACKET and len(frame) > FRAME_HEADER_LEN + KEY_LEN + 60000:
            body = frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN + 60000]
            pc.to_client(_HDR.pack(ftype, len(body)) + body)
            return False
        return True


class _Swallow(Fault):
    ftype = 0

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "swallow" if pc.frames_in > 0 and ftype == self.ftype and self.bad(length) else None

    def bad(self, length: int) -> bool:
        return True


class TolerateShortSendPacket(_Swallow):
    name = "a SendPacket shorter than a key is ignored"
    expected = frozenset({"framing/5"})
    ftype = FrameType.SEND_PACKET

    def bad(self, length: int) -> bool:
        return length < KEY_LEN


class CloseOnNotePreferred(Fault):
    name = "NotePreferred closes the connection"
    expected = frozenset({"framing/6", "fast-start/5"})

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "close" if ftype == FrameType.NOTE_PREFERRED else None


class TolerateBadNotePreferred(_Swallow):
    name = "NotePreferred of the wrong size is ignored"
    expected = frozenset({"framing/7"})
    ftype = FrameType.NOTE_PREFERRED

    def bad(self, length: int) -> bool:
        return length != 1


class DropEmptyPackets(Fault):
    name = "empty packets dropped"
    expected = frozenset({"relay/3"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return not (ftype == FrameType.RECV_PACKET and len(frame) == FRAME_HEADER_LEN + KEY_LEN)


class NotHereForEverything(Fault):
    name = "PeerGone(NotHere) for non-disco packets too"
    expected = frozenset({"relay/5", "peer-gone/3"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.SEND_PACKET and len(frame) >= FRAME_HEADER_LEN + KEY_LEN:
            dst = frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN]
            data = frame[FRAME_HEADER_LEN + KEY_LEN :]
            if pc.admitted and dst != pc.key and not data.startswith(DISCO_MAGIC) and not pc.proxy.by_key(dst):
                pc.to_client(F.PeerGone(dst, 1).encode())
        return True


class Reorder(Fault):
    """Each RecvPacket is held until the next one has gone out (or 50 ms pass)."""

    name = "packets reordered"
    expected = frozenset({"relay/6", "framing/9"})

    def __init__(self) -> None:
        self.held: dict[int, bytes] = {}

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype != FrameType.RECV_PACKET:
            return True
        k = id(pc)
        prev = self.held.pop(k, None)
        if prev is None:
            self.held[k] = frame
            asyncio.get_running_loop().call_later(0.05, self._flush, pc, frame)
            return False
        pc.to_client(frame)
        pc.to_client(prev)
        return False

    def _flush(self, pc: ProxyConn, frame: bytes) -> None:
        if self.held.get(id(pc)) is frame:
            del self.held[id(pc)]
            pc.to_client(frame)


#: Bytes waiting for a client above which it counts as not reading (the proxy's own
#: writer stops reading the server at asyncio's 64 KiB high-water mark).
STALLED = 48 << 10


class HeadOfLineBlocking(Fault):
    """A sender waits whenever its destination is not reading (one shared writer)."""

    name = "a stalled receiver blocks its senders"
    expected = frozenset({"relay/7"})

    async def _wait(self, dests: list[ProxyConn]) -> bool:
        for d in dests:
            while not d.closed and d.client.transport.get_write_buffer_size() > STALLED:
                await asyncio.sleep(0.05)
        return True

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool | Awaitable[bool]:
        if ftype == FrameType.SEND_PACKET and len(frame) >= FRAME_HEADER_LEN + KEY_LEN:
            dests = pc.proxy.by_key(frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN])
            if any(d.client.transport.get_write_buffer_size() > STALLED for d in dests):
                return self._wait(dests)
        return True


class MangleDisco(Fault):
    name = "disco packets altered in transit"
    expected = frozenset({"relay/10"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.RECV_PACKET and frame[FRAME_HEADER_LEN + KEY_LEN :].startswith(DISCO_MAGIC):
            pc.to_client(frame[:-1] + bytes([frame[-1] ^ 0xFF]))
            return False
        return True


class NotHereUnlimited(Fault):
    name = "PeerGone(NotHere) not rate-limited (sent twice)"
    expected = frozenset({"peer-gone/4", "peer-gone/6"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.PEER_GONE and frame[-1:] == b"\x01":
            pc.to_client(frame)
        return True


class ShortPeerGone(Fault):
    name = "PeerGone without its reason byte"
    expected = frozenset({"peer-gone/2", "peer-gone/4", "peer-gone/6", "mesh/14"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.PEER_GONE and len(frame) > FRAME_HEADER_LEN + KEY_LEN:
            body = frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN]
            pc.to_client(_HDR.pack(ftype, KEY_LEN) + body)
            return False
        return True


class NoPongForLongPing(_Swallow):
    name = "Pings longer than 8 bytes unanswered"
    expected = frozenset({"ping/2"})
    ftype = FrameType.PING

    def bad(self, length: int) -> bool:
        return 8 < length <= 1000


class TolerateBadPing(_Swallow):
    name = "Pings of a bad size ignored"
    expected = frozenset({"ping/3", "ping/4"})
    ftype = FrameType.PING

    def bad(self, length: int) -> bool:
        return length < 8 or length > 1000


class PaddedPong(Fault):
    name = "Pong padded to 12 bytes"
    expected = frozenset({"ping/6"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.PONG:
            body = frame[FRAME_HEADER_LEN:] + b"\x00" * 4
            pc.to_client(_HDR.pack(ftype, len(body)) + body)
            return False
        return True


class IdleClose(Fault):
    name = "idle connections closed after 1.5 s"
    expected = frozenset({"keepalive/1"})

    def admitted(self, pc: ProxyConn) -> None:
        async def watch() -> None:
            while not pc.closed:
                await asyncio.sleep(0.1)
                if time.monotonic() - pc.last_c2s > 1.5:
                    pc.abort()

        asyncio.ensure_future(watch())


class KeepAliveStorm(Fault):
    name = "KeepAlive every 100 ms"
    expected = frozenset({"keepalive/3"})

    def admitted(self, pc: ProxyConn) -> None:
        async def storm() -> None:
            t0 = time.monotonic()
            while not pc.closed and time.monotonic() - t0 < 2.0:  # keepalive/3 watches 1.5 s
                await asyncio.sleep(0.1)
                pc.to_client(F.KEEPALIVE_BYTES)

        asyncio.ensure_future(storm())


class MeshUnchecked(Fault):
    """Mesh frames honoured from anyone (the suite runs without the key, so only the
    refusal cases run): WatchConns answered, ClosePeer obeyed, ForwardPacket delivered."""

    name = "mesh privilege not checked"
    expected = frozenset({"mesh/1", "mesh/2", "mesh/3"})
    mesh = False

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        body = frame[FRAME_HEADER_LEN:]
        if ftype == FrameType.WATCH_CONNS and not body:
            pc.to_client(F.PeerPresent(os.urandom(32)).encode())
            return False
        if ftype == FrameType.CLOSE_PEER and len(body) == KEY_LEN:
            for t in pc.proxy.by_key(body):
                t.abort()
            return False
        if ftype == FrameType.FORWARD_PACKET and len(body) >= 2 * KEY_LEN:
            for t in pc.proxy.by_key(body[KEY_LEN : 2 * KEY_LEN]):
                t.to_client(F.encode_recv_packet(body[:KEY_LEN], body[2 * KEY_LEN :]))
            return False
        return True


class WrongMeshKeyRefused(_ServerKeyFault):
    name = "a wrong mesh key refuses the client"
    expected = frozenset({"mesh/4"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if pc.frames_in != 1 or ftype != FrameType.CLIENT_INFO:
            return True
        from derpkit.protocol.errors import ProtocolError
        from derpkit.protocol.handshake import open_client_info

        try:
            _, info = open_client_info(self.server_key, frame[FRAME_HEADER_LEN:])  # type: ignore[arg-type]
        except ProtocolError:
            return True
        if info.mesh_key is not None and not info.mesh_key.matches(self.mesh_key):  # type: ignore[arg-type]
            pc.abort()
            return False
        return True


class NoSelfInFlood(Fault):
    name = "a watcher is not told about itself"
    expected = frozenset({"mesh/5", "mesh/6", "mesh/7", "mesh/10", "mesh/11", "mesh/13"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return not (ftype == FrameType.PEER_PRESENT and frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN] == pc.key)


class NoPresenceFlags(Fault):
    name = "PeerPresent without flags (50 bytes, as an old server)"
    expected = frozenset({"mesh/7", "mesh/10", "mesh/11", "mesh/13"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.PEER_PRESENT and len(frame) >= FRAME_HEADER_LEN + 51:
            body = frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + 50]
            pc.to_client(_HDR.pack(ftype, 50) + body)
            return False
        return True


class ForwardNamesMeshPeer(_ServerKeyFault):
    name = "forwarded packets name the mesh peer as their source"
    expected = frozenset({"mesh/8"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        body = frame[FRAME_HEADER_LEN:]
        if pc.frames_in == 1 and ftype == FrameType.CLIENT_INFO:
            self._note_mesh(pc, body)
        if ftype == FrameType.FORWARD_PACKET and len(body) >= 2 * KEY_LEN and pc.key is not None and pc.mesh:
            dests = pc.proxy.by_key(body[KEY_LEN : 2 * KEY_LEN])
            if dests:
                for t in dests:
                    t.to_client(F.encode_recv_packet(pc.key, body[2 * KEY_LEN :]))
                return False
        return True


class ClosePeerIgnored(Fault):
    name = "ClosePeer ignored"
    expected = frozenset({"mesh/2", "mesh/9"})

    def c2s_header(self, pc: ProxyConn, ftype: int, length: int) -> str | None:
        return "swallow" if ftype == FrameType.CLOSE_PEER else None


class WatchConnsLengthUnchecked(Fault):
    name = "WatchConns with a payload accepted"
    expected = frozenset({"mesh/12"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.WATCH_CONNS and len(frame) > FRAME_HEADER_LEN:
            pc.to_server(F.WatchConns().encode())
            return False
        return True


# --------------------------------------------------------------------------- STUN, more


class StunWrongTxid(StunFault):
    name = "STUN reply with another transaction id"
    expected = frozenset({"stun/1", "stun/2", "stun/8"})

    def reply(self, request: bytes, answer: bytes | None) -> bytes | None:
        if answer is None or len(answer) < 20:
            return answer
        return answer[:8] + bytes(b ^ 0x55 for b in answer[8:20]) + answer[20:]


class StunOncePerTransaction(StunFault):
    name = "STUN answers each transaction id once"
    expected = frozenset({"stun/8"})

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def reply(self, request: bytes, answer: bytes | None) -> bytes | None:
        txid = request[8:20]
        if answer is not None and txid in self.seen:
            return None
        self.seen.add(txid)
        return answer


class DropToSelf(Fault):
    name = "packets to one's own key dropped"
    # relay/4 checks it; the others send to themselves to see a frame go through.
    expected = frozenset({"relay/4", "fast-start/3", "fast-start/5", "framing/1", "framing/8"})

    def c2s(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        return not (ftype == FrameType.SEND_PACKET and pc.key is not None
                    and frame[FRAME_HEADER_LEN : FRAME_HEADER_LEN + KEY_LEN] == pc.key)


class WrongSource(Fault):
    name = "RecvPacket names the wrong sender"
    # Every case that checks the source key, and relay/8, which answers to it.
    expected = frozenset({"relay/1", "relay/4", "relay/8", "fast-start/3", "fast-start/5", "mesh/8", "websocket/2"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.RECV_PACKET and len(frame) >= FRAME_HEADER_LEN + KEY_LEN:
            pc.to_client(frame[:FRAME_HEADER_LEN] + os.urandom(KEY_LEN) + frame[FRAME_HEADER_LEN + KEY_LEN :])
            return False
        return True


class PongMismatch(Fault):
    name = "Pong echoes other bytes"
    # ping/1 and ping/2 check the echo; the rest prove a link alive with a Ping.
    expected = frozenset({"ping/1", "ping/2", "framing/4", "framing/6", "framing/10", "framing/11", "relay/2",
                          "relay/5", "relay/7", "peer-gone/3", "peer-gone/5", "mesh/2", "mesh/4", "mesh/9"})

    def s2c(self, pc: ProxyConn, ftype: int, frame: bytes) -> bool:
        if ftype == FrameType.PONG:
            pc.to_client(frame[:FRAME_HEADER_LEN] + bytes(b ^ 0xA5 for b in frame[FRAME_HEADER_LEN:]))
            return False
        return True


class TlsWithoutMetaCert(Fault):
    """A TLS terminator (its own self-signed certificate) in front of a plain-HTTP server:
    DERP works, but the chain has no meta-certificate."""

    name = "TLS without the meta-certificate"
    expected = frozenset({"tls/2", "tls/3", "tls/5"})
    tls = True


class PlainOnTlsPort(TlsWithoutMetaCert):
    """The same TLS terminator, but a client speaking plain HTTP on its port gets DERP too."""

    name = "plain HTTP DERP on the TLS port"
    expected = frozenset({"tls/2", "tls/3", "tls/5", "tls/6"})
    plain_too = True
