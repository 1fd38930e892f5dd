"""The one asyncio STUN client: Binding requests over UDP, matched to replies by transaction id.

``derpkit stunc`` (and its NAT discovery), ``derpkit healthcheck`` and ``derpkit probe`` all
ask the same question ("what address does this server see for my socket?"), so the socket
handling lives here once, over the sans-IO :mod:`derpkit.stun.codec`:

* :func:`query` — resolve a name, open a socket, ask once (optionally retransmitting), close.
* :class:`StunEndpoint` — one local UDP socket that can carry many requests, to one or several
  servers, concurrently. NAT mapping tests (RFC 5780 §4.3, ``shared/spec/stun.md`` §13) need
  exactly that: the same local port asking different server addresses.

Replies are matched by transaction id only (like Tailscale's netcheck and prober; the source
address is reported, not checked). Datagrams that match nothing are counted in
:class:`EndpointStats` and ignored, unless a request is ``strict``: then the first such datagram
fails it, which is how Go's ``stunc`` behaves and what ``derpkit stunc`` reproduces.

ICMP errors: an unconnected UDP socket normally never hears about ICMP port unreachable. On Linux
the endpoint sets ``IP_RECVERR``/``IPV6_RECVERR``, so the kernel queues each ICMP error with the
datagram that caused it; asyncio then calls ``error_received`` and the endpoint reads the error
queue to fail exactly the request whose transaction id bounced (:class:`StunUnreachable`).
Elsewhere an unattributable ICMP error fails every pending request.

Every expected failure is a :class:`StunClientError` subclass whose ``str()`` is one line for
people and whose ``kind`` is a stable label for programs (JSON output, metrics).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from derpkit.gosyntax import join_host_port
from derpkit.stun.codec import (
    ATTR_ERROR_CODE,
    ATTR_OTHER_ADDRESS,
    ATTR_RESPONSE_ORIGIN,
    ATTR_XOR_MAPPED_ADDRESS,
    ATTR_XOR_MAPPED_ADDRESS_ALT,
    BINDING_ERROR,
    BINDING_REQUEST,
    BINDING_SUCCESS,
    HEADER_LEN,
    StunError,
    build_plain_request,
    build_request,
    decode_address,
    decode_error_code,
    is_stun,
    new_txid,
    parse_attrs,
    parse_response,
)

__all__ = [
    "DEFAULT_PORT",
    "EndpointStats",
    "RequestShape",
    "StunBadReply",
    "StunClientError",
    "StunErrorResponse",
    "StunLookupError",
    "StunResult",
    "StunSendError",
    "StunTimeout",
    "StunTxidMismatch",
    "StunUnreachable",
    "StunEndpoint",
    "local_ip_toward",
    "query",
    "resolve",
]

DEFAULT_PORT: Final = 3478  # Tailscale's and the RFC's STUN port
_LATE_MEMORY: Final = 4096  # finished transaction ids remembered to recognise late replies
_ERRQUEUE_BUF: Final = 2048  # our requests are < 100 bytes; the kernel quotes them back

# Linux numbers (socket module lacks the names): queue ICMP errors for unconnected sockets.
_IP_RECVERR: Final = 11
_IPV6_RECVERR: Final = 25

RequestShape = Literal["tailscale", "plain"]

Addr = tuple[str, int]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# --- errors ------------------------------------------------------------------------------------


class StunClientError(Exception):
    """An expected STUN failure: ``str()`` is one line for people, ``kind`` a stable label."""

    kind: str = "error"


class StunLookupError(StunClientError):
    """The server name did not resolve (to an address of the requested family)."""

    kind = "lookup"


class StunSendError(StunClientError):
    """The OS refused to send the request (no route, wrong family, socket closed...)."""

    kind = "send"


class StunTimeout(StunClientError):
    """No matching reply before the deadline; ``sent`` says how many datagrams went out."""

    kind = "timeout"

    def __init__(self, message: str, *, server: Addr, timeout: float, sent: int) -> None:
        super().__init__(message)
        self.server = server
        self.timeout = timeout
        self.sent = sent


class StunUnreachable(StunClientError):
    """An ICMP error came back for the request; ``kind`` is ``refused`` for port unreachable."""

    def __init__(self, message: str, *, server: Addr, err: int) -> None:
        super().__init__(message)
        self.server = server
        self.errno = err
        self.kind = "refused" if err == errno.ECONNREFUSED else "unreachable"


class StunBadReply(StunClientError):
    """A reply that cannot answer the request; ``name`` is the codec's error label."""

    kind = "bad_reply"

    def __init__(self, message: str, *, name: str, origin: Addr, raw: bytes) -> None:
        super().__init__(message)
        self.name = name
        self.origin = origin
        self.raw = raw


class StunTxidMismatch(StunClientError):
    """A strict request saw a reply for a transaction id that is not ours."""

    kind = "txid_mismatch"

    def __init__(self, message: str, *, got: bytes, want: bytes, origin: Addr) -> None:
        super().__init__(message)
        self.got = got
        self.want = want
        self.origin = origin


class StunErrorResponse(StunClientError):
    """The server answered with a Binding error response (e.g. 420 for CHANGE-REQUEST)."""

    kind = "error_response"

    def __init__(self, message: str, *, code: int, reason: str, origin: Addr) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.origin = origin


# --- results -----------------------------------------------------------------------------------


def _norm(addr: Sequence[object]) -> Addr:
    """A socket address as (ip, port): IPv4-mapped IPv6 unmapped, flow info and scope id dropped.

    Replies on a dual-stack socket come from ``::ffff:a.b.c.d``; callers compare and print the
    plain IPv4, which is what the server actually is.
    """
    host, port = str(addr[0]), int(addr[1])  # type: ignore[call-overload]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return host, port


@dataclass(frozen=True, slots=True)
class StunResult:
    """One answered Binding request.

    ``mapped_ip``/``mapped_port`` is the address the server saw (XOR-MAPPED-ADDRESS, else the
    legacy MAPPED-ADDRESS; ``addr_attr`` says which). ``origin`` is where the reply came from,
    ``server`` where the request went, ``local`` our socket's own address. ``rtt`` is measured
    from the latest send of this transaction (a retransmission restarts the clock, so the figure
    is never inflated by a lost first datagram). ``raw``/``attrs`` keep the whole reply for
    callers that read RESPONSE-ORIGIN, OTHER-ADDRESS or SOFTWARE.
    """

    txid: bytes
    mapped_ip: IPAddress
    mapped_port: int
    addr_attr: int
    rtt: float
    server: Addr
    origin: Addr
    local: Addr
    attempts: int
    raw: bytes
    attrs: tuple[tuple[int, bytes], ...]

    @property
    def mapped(self) -> str:
        """The mapped address as ``ip:port`` (IPv6 bracketed)."""
        return join_host_port(str(self.mapped_ip), self.mapped_port)

    def attr(self, atype: int) -> bytes | None:
        """The last value of attribute ``atype`` in the reply, or ``None``."""
        found = None
        for t, v in self.attrs:
            if t == atype:
                found = v
        return found

    def address_attr(self, atype: int) -> tuple[IPAddress, int] | None:
        """Decode an address-valued attribute (XOR for 0x0020/0x8020, plain otherwise)."""
        value = self.attr(atype)
        if value is None:
            return None
        xor = atype in (ATTR_XOR_MAPPED_ADDRESS, ATTR_XOR_MAPPED_ADDRESS_ALT)
        return decode_address(value, self.txid, xor=xor)

    def _addr_or_none(self, atype: int) -> Addr | None:
        try:
            found = self.address_attr(atype)
        except StunError:
            return None  # a broken optional attribute is as good as none for the caller
        return (str(found[0]), found[1]) if found else None

    @property
    def response_origin(self) -> Addr | None:
        """RFC 5780 RESPONSE-ORIGIN: where the server says it answered from (None if absent)."""
        return self._addr_or_none(ATTR_RESPONSE_ORIGIN)

    @property
    def other_address(self) -> Addr | None:
        """RFC 5780 OTHER-ADDRESS: the server's alternate IP and port (None if absent)."""
        return self._addr_or_none(ATTR_OTHER_ADDRESS)


@dataclass(slots=True)
class EndpointStats:
    """What one endpoint saw; the datagrams that matched no request are not silently lost.

    ``garbage``: not STUN, or STUN that is neither a response nor our own request.
    ``unmatched``: a STUN response with a transaction id this endpoint never sent.
    ``late``: a reply to one of our transactions that had already finished (timed out,
    answered, or a duplicate). ``looped``: our own request came back (a hairpinning NAT or a
    reflector). ``icmp_errors``: ICMP errors the kernel reported for our datagrams.
    """

    sent: int = 0
    answered: int = 0
    garbage: int = 0
    unmatched: int = 0
    late: int = 0
    looped: int = 0
    icmp_errors: int = 0


def _go_bytes(b: bytes) -> str:
    """Bytes the way Go's ``%v`` prints a byte slice (what Go stunc shows for ids)."""
    return "[" + " ".join(str(x) for x in b) + "]"


_WHAT = {
    "ErrNotSTUN": "is not STUN at all",
    "ErrNotSuccessResponse": (
        "is not a Binding success response (an error response, or a request looped back to us?)"
    ),
    "ErrMalformedAttrs": "is a STUN response without a usable mapped address",
}


def _bad_reply(data: bytes, origin: Addr, name: str) -> StunBadReply:
    what = _WHAT.get(name, "could not be parsed")
    return StunBadReply(
        f"reply from {join_host_port(*origin)} ({len(data)} bytes) {what}: {name}",
        name=name,
        origin=origin,
        raw=data,
    )


def _icmp_error(server: Addr, err: int) -> StunUnreachable:
    where = join_host_port(*server)
    if err == errno.ECONNREFUSED:
        msg = (
            f"{where} refused the request (ICMP port unreachable): nothing listens on UDP "
            f"port {server[1]} there"
        )
    elif err == errno.EHOSTUNREACH:
        msg = f"{where} is unreachable (ICMP host unreachable)"
    elif err == errno.ENETUNREACH:
        msg = f"{where} is unreachable (ICMP network unreachable)"
    else:
        msg = f"{where}: ICMP error: {os.strerror(err)}"
    return StunUnreachable(msg, server=server, err=err)


# --- the endpoint ------------------------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Pending:
    txid: bytes
    server: Addr  # as given (unmapped), for messages and ICMP matching
    sendto: Addr  # as the socket needs it (IPv4-mapped on an IPv6 socket)
    strict: bool
    future: asyncio.Future[StunResult]
    sends: list[float] = field(default_factory=list)


class _Protocol(asyncio.DatagramProtocol):
    """Forwards asyncio's callbacks to the endpoint (kept apart so the endpoint API stays small)."""

    def __init__(self, endpoint: StunEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple[object, ...]) -> None:
        self.endpoint._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.endpoint._on_error(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.endpoint._on_lost(exc)


class StunEndpoint:
    """One local UDP socket for many STUN transactions, to any number of servers.

    Open with ``await StunEndpoint.open(family)`` (or ``async with await ...``); every
    :meth:`request` sends from the same local address, so comparing their mapped addresses
    tells how a NAT maps this socket. Requests may run concurrently.
    """

    def __init__(self, sock: socket.socket) -> None:
        """Use :meth:`open`; this only wraps an already-bound non-blocking socket."""
        self._sock = sock
        self._transport: asyncio.DatagramTransport | None = None
        self._pending: dict[bytes, _Pending] = {}
        self._finished: OrderedDict[bytes, None] = OrderedDict()
        self._sending: _Pending | None = None
        self._others_error = False  # the failed send only reported an earlier ICMP error
        self._watched: dict[bytes, asyncio.Future[Addr]] = {}
        self.stats = EndpointStats()
        self.family = sock.family
        self.local: Addr = _norm(sock.getsockname())

    @classmethod
    async def open(
        cls, family: int = socket.AF_INET, local: tuple[str, int] | None = None
    ) -> StunEndpoint:
        """Bind a UDP socket of ``family`` (to ``local``, default any address, ephemeral port).

        The socket stays unconnected so it can reach several servers; ICMP errors are still
        reported on Linux through the error queue (see the module docstring).
        """
        if family not in (socket.AF_INET, socket.AF_INET6):
            raise ValueError(f"family must be AF_INET or AF_INET6, not {family!r}")
        if local is None:
            local = ("::", 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if sys.platform.startswith("linux"):
                # An AF_INET6 socket also carries IPv4-mapped traffic, whose errors IPv4 reports.
                sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
            if family == socket.AF_INET6:
                # Dual-stack, like Go's "udp" sockets, so one endpoint can also reach IPv4 servers.
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except OSError:
                    pass
            sock.bind(local)
        except OSError as e:
            sock.close()
            raise StunSendError(
                f"cannot open a UDP socket on {join_host_port(*local)}: {e.strerror or e}"
            ) from None
        endpoint = cls(sock)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: _Protocol(endpoint), sock=sock)
        endpoint._transport = transport
        return endpoint

    async def __aenter__(self) -> StunEndpoint:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran or the socket failed."""
        return self._transport is None or self._transport.is_closing()

    def close(self) -> None:
        """Close the socket; pending requests fail with a clear error, not a hang."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()
        self._fail_all(StunSendError("the STUN socket was closed"))

    # --- requests ------------------------------------------------------------------------------

    async def request(
        self,
        server: tuple[str, int],
        *,
        timeout: float = 3.0,
        shape: RequestShape = "tailscale",
        attrs: Sequence[tuple[int, bytes]] = (),
        retries: int = 0,
        retry_interval: float | None = None,
        strict: bool = False,
        txid: bytes | None = None,
        backoff: float = 1.0,
    ) -> StunResult:
        """Send one Binding transaction to ``server`` (an IP literal and port) and await its reply.

        ``shape="tailscale"`` sends Tailscale's exact 40 bytes, which every derper answers;
        ``"plain"`` an RFC 5389 request carrying ``attrs`` (e.g. CHANGE-REQUEST), which Go
        derper ignores. ``retries`` extra copies of the same transaction (same id, as RFC
        5389 and Tailscale's prober retransmit) go out every ``retry_interval`` seconds
        (default: ``timeout`` split evenly), all within ``timeout`` overall. ``backoff`` > 1
        multiplies the gap after each send (RFC 5389's doubling RTO is ``backoff=2``); the
        default first gap is then chosen so that every copy still fits in ``timeout``.
        ``strict`` makes the first unrelated datagram fatal, as in Go's ``stunc``.
        """
        if self._transport is None or self._transport.is_closing():
            raise StunSendError("the STUN socket is closed")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if backoff < 1:
            raise ValueError("backoff must be >= 1")
        if shape == "tailscale":
            if attrs:
                raise ValueError("a Tailscale-shaped request carries no extra attributes")
            txid = txid or new_txid()
            message = build_request(txid)
        elif shape == "plain":
            txid = txid or new_txid()
            message = build_plain_request(txid, tuple(attrs))
        else:
            raise ValueError(f"unknown request shape {shape!r}")
        if txid in self._pending:
            raise ValueError("transaction id already in flight on this endpoint")
        dest = _norm(server)
        loop = asyncio.get_running_loop()
        pending = _Pending(txid, dest, self._sendto_addr(dest), strict, loop.create_future())
        self._pending[txid] = pending
        if retry_interval is not None:
            interval = retry_interval
        else:  # gaps g, g*b, g*b^2... and a last wait of the same rule add up to ``timeout``
            interval = timeout / sum(backoff**k for k in range(retries + 1))
        deadline = loop.time() + max(timeout, 0.0)
        try:
            for attempt in range(retries + 1):
                self._send(message, pending)
                if pending.future.done():
                    break
                left = deadline - loop.time()
                wait = left if attempt == retries else min(interval * backoff**attempt, left)
                if wait > 0:
                    await asyncio.wait((pending.future,), timeout=wait)
                if pending.future.done() or loop.time() >= deadline:
                    break
            if pending.future.done():
                return pending.future.result()
            sent = len(pending.sends)
            copies = f" ({sent} requests sent)" if sent > 1 else ""
            raise StunTimeout(
                f"no STUN reply from {join_host_port(*dest)} within {timeout:g} s{copies}",
                server=dest,
                timeout=timeout,
                sent=sent,
            )
        finally:
            if not pending.future.done():
                pending.future.cancel()
            self._pending.pop(txid, None)
            self._finished[txid] = None
            while len(self._finished) > _LATE_MEMORY:
                self._finished.popitem(last=False)

    def watch(self, txid: bytes) -> asyncio.Future[Addr]:
        """A future for any STUN message with ``txid`` arriving on this socket; its source.

        For transactions another socket started: the RFC 5780 hairpinning test (a request sent
        to this socket's public address comes back here if the NAT hairpins) and the mapping
        lifetime test (a reply redirected with RESPONSE-PORT to this socket's mapping). Cancel
        the future to stop watching. A watched request counts in ``stats.looped``.
        """
        fut: asyncio.Future[Addr] = asyncio.get_running_loop().create_future()
        self._watched[txid] = fut
        fut.add_done_callback(lambda _f: self._watched.pop(txid, None))
        return fut

    def send_raw(self, data: bytes, dest: tuple[str, int]) -> None:
        """Send one datagram as is (a probe that expects no answer on this socket)."""
        if self._transport is None or self._transport.is_closing():
            raise StunSendError("the STUN socket is closed")
        self.stats.sent += 1
        self._transport.sendto(data, self._sendto_addr(_norm(dest)))

    def _sendto_addr(self, dest: Addr) -> Addr:
        """Check ``dest`` is an IP literal the socket can reach; map IPv4 for an IPv6 socket."""
        try:
            ip = ipaddress.ip_address(dest[0].split("%", 1)[0])
        except ValueError:
            raise ValueError(f"server must be an IP address, not {dest[0]!r} (see resolve())") from None
        if ip.version == 4 and self.family == socket.AF_INET6:
            return f"::ffff:{ip}", dest[1]
        if ip.version == 6 and self.family == socket.AF_INET:
            raise StunSendError(f"cannot send to {join_host_port(*dest)} from an IPv4 socket")
        return dest

    def _send(self, message: bytes, pending: _Pending) -> None:
        """Send once; asyncio reports a failed ``sendto`` synchronously, to ``error_received``.

        A socket holding an unreported ICMP error fails the *next* send with that error (Linux
        hands ``sk_err`` out once, to whichever call comes first) and sends nothing. On loopback
        the ICMP answer to one request arrives before the next request is even sent, so when
        the error turns out to be another transaction's, this datagram is sent again.
        """
        assert self._transport is not None
        pending.sends.append(time.perf_counter())
        self.stats.sent += 1
        for _ in range(2):
            self._others_error = False
            self._sending = pending
            try:
                self._transport.sendto(message, pending.sendto)
            finally:
                self._sending = None
            if not self._others_error or pending.future.done():
                break

    # --- callbacks -----------------------------------------------------------------------------

    def _resolve(self, pending: _Pending, result: StunResult | StunClientError) -> None:
        if pending.future.done():
            return
        if isinstance(result, StunClientError):
            pending.future.set_exception(result)
        else:
            pending.future.set_result(result)

    def _fail_all(self, exc: StunClientError, *, strict_only: bool = False) -> None:
        for p in list(self._pending.values()):
            if p.strict or not strict_only:
                self._resolve(p, exc)

    def _on_datagram(self, data: bytes, addr: tuple[object, ...]) -> None:
        now = time.perf_counter()
        origin = _norm(addr)
        if not is_stun(data):
            self.stats.garbage += 1
            self._fail_all(_bad_reply(data, origin, "ErrNotSTUN"), strict_only=True)
            return
        txid = data[8:HEADER_LEN]
        watched = self._watched.get(txid)
        if watched is not None:
            if data[0:2] == BINDING_REQUEST:
                self.stats.looped += 1
            if not watched.done():
                watched.set_result(origin)
            return
        pending = self._pending.get(txid)
        if pending is None or pending.future.done():  # done: answered, cleanup not yet run
            self._unrelated(data, origin, txid, done=pending is not None)
            return
        kind = data[0:2]
        if kind == BINDING_SUCCESS:
            try:
                resp = parse_response(data)
                attrs = tuple(parse_attrs(data))
            except StunError as e:
                self.stats.answered += 1
                self._resolve(pending, _bad_reply(data, origin, e.name))
                return
            self.stats.answered += 1
            self._resolve(
                pending,
                StunResult(
                    txid=txid,
                    mapped_ip=resp.ip,
                    mapped_port=resp.port,
                    addr_attr=resp.addr_attr,
                    rtt=now - pending.sends[-1],
                    server=pending.server,
                    origin=origin,
                    local=self.local,
                    attempts=len(pending.sends),
                    raw=data,
                    attrs=attrs,
                ),
            )
        elif kind == BINDING_ERROR:
            self.stats.answered += 1
            self._resolve(pending, self._error_response(data, origin))
        else:
            # Our own request back (a hairpinning NAT, a reflector) or some other message class:
            # netcheck ignores these; a strict request reports them.
            if kind == BINDING_REQUEST:
                self.stats.looped += 1
            else:
                self.stats.garbage += 1
            if pending.strict:
                self._resolve(pending, _bad_reply(data, origin, "ErrNotSuccessResponse"))

    def _unrelated(self, data: bytes, origin: Addr, txid: bytes, *, done: bool = False) -> None:
        """A STUN message for no transaction in flight: late, or someone else's."""
        if done or txid in self._finished:
            self.stats.late += 1
            return
        if data[0:2] == BINDING_SUCCESS:
            self.stats.unmatched += 1
        else:
            self.stats.garbage += 1
        for p in list(self._pending.values()):
            if not p.strict:
                continue
            try:
                parse_response(data)
            except StunError as e:
                self._resolve(p, _bad_reply(data, origin, e.name))
                continue
            self._resolve(
                p,
                StunTxidMismatch(
                    f"txid mismatch: got {_go_bytes(txid)}, want {_go_bytes(p.txid)}",
                    got=txid,
                    want=p.txid,
                    origin=origin,
                ),
            )

    @staticmethod
    def _error_response(data: bytes, origin: Addr) -> StunClientError:
        where = join_host_port(*origin)
        try:
            value = next((v for t, v in parse_attrs(data) if t == ATTR_ERROR_CODE), None)
            if value is None:
                raise StunError("ErrMalformedAttrs", "error response without ERROR-CODE")
            code, reason = decode_error_code(value)
        except StunError as e:
            return _bad_reply(data, origin, e.name)
        return StunErrorResponse(
            f"{where} answered with STUN error {code} {reason}".rstrip(),
            code=code,
            reason=reason,
            origin=origin,
        )

    def _drain_errqueue(self) -> list[tuple[int, bytes, Addr]]:
        """(errno, bounced datagram, its destination) for every ICMP error queued (Linux)."""
        out: list[tuple[int, bytes, Addr]] = []
        flag = getattr(socket, "MSG_ERRQUEUE", 0)
        if not flag or self._sock.fileno() < 0:
            return out
        for _ in range(256):  # bounded: the queue is finite, but never spin on a broken socket
            try:
                data, ancdata, _flags, addr = self._sock.recvmsg(_ERRQUEUE_BUF, 1024, flag)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            err = 0
            for _level, _type, cdata in ancdata:
                if len(cdata) >= 4:  # struct sock_extended_err starts with u32 ee_errno
                    err = int.from_bytes(cdata[:4], sys.byteorder)
            out.append((err, data, _norm(addr) if addr else ("", 0)))
        return out

    def _on_error(self, exc: Exception) -> None:
        entries = self._drain_errqueue()
        for err, bounced, dest in entries:
            self.stats.icmp_errors += 1
            if err == errno.EMSGSIZE:  # path MTU news, not a verdict on the request
                continue
            txid = bounced[8:HEADER_LEN] if is_stun(bounced) else None
            if txid is not None and txid in self._pending:
                targets = [self._pending[txid]]
            elif txid is not None:
                continue  # bounced a finished transaction: counted, nobody to tell
            else:
                targets = [p for p in self._pending.values() if p.server == dest]
            for p in targets:
                self._resolve(p, _icmp_error(p.server, err or errno.ECONNREFUSED))
        if entries:
            self._others_error = self._sending is not None
            return
        if self._sending is not None:
            p = self._sending
            reason = getattr(exc, "strerror", None) or str(exc)
            self._resolve(p, StunSendError(f"sending to {join_host_port(*p.server)}: {reason}"))
        elif isinstance(exc, OSError) and exc.errno is not None:
            # No error queue (not Linux): the error cannot be attributed, so fail everyone.
            self.stats.icmp_errors += 1
            for p in list(self._pending.values()):
                self._resolve(p, _icmp_error(p.server, exc.errno))

    def _on_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._fail_all(StunSendError(f"the STUN socket was closed{reason}"))


# --- one-shot helpers --------------------------------------------------------------------------


def local_ip_toward(server: tuple[str, int]) -> str | None:
    """The source IP the kernel would use to reach ``server`` (no packet is sent).

    A socket bound to the wildcard does not know its own address; NAT detection needs it to
    tell "the server saw my own address" (no NAT) from a translated one.
    """
    ip = _norm(server)[0]
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.connect((ip, server[1] or DEFAULT_PORT))
            return _norm(s.getsockname())[0]
    except OSError:
        return None


async def resolve(host: str, port: int, family: int = socket.AF_UNSPEC) -> tuple[int, str]:
    """(family, IP literal) for ``host``; an IPv4 answer wins when a name has both, as in Go.

    Brackets around an IPv6 literal are tolerated (``[::1]``), because people copy them from
    ``host:port`` strings.
    """
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise StunLookupError(f"lookup {host}: {reason}") from None
    infos = [i for i in infos if i[0] in (socket.AF_INET, socket.AF_INET6)]
    if not infos:
        raise StunLookupError(f"lookup {host}: no address of the requested family")
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    fam, *_rest, sockaddr = infos[0]
    return fam, _norm(sockaddr)[0]


async def query(
    host: str,
    port: int = DEFAULT_PORT,
    *,
    timeout: float = 3.0,
    family: int = socket.AF_UNSPEC,
    shape: RequestShape = "tailscale",
    attrs: Sequence[tuple[int, bytes]] = (),
    retries: int = 0,
    retry_interval: float | None = None,
    strict: bool = False,
    local: tuple[str, int] | None = None,
    txid: bytes | None = None,
    backoff: float = 1.0,
) -> StunResult:
    """Resolve ``host``, ask it once from a fresh socket, close the socket, return the answer.

    The arguments are those of :meth:`StunEndpoint.request`; ``family`` restricts resolution
    (``AF_INET`` for a ``udp4`` probe, ``AF_INET6`` for ``udp6``) and ``local`` binds the socket
    (a health check binds loopback so the mapped address can be compared with its own);
    ``txid`` fixes the transaction id (recorded test vectors), default a fresh random one.
    Raises :class:`StunClientError` subclasses only, for every expected failure.
    """
    fam, ip = await resolve(host, port, family)
    async with await StunEndpoint.open(fam, local=local) as endpoint:
        return await endpoint.request(
            (ip, port),
            timeout=timeout,
            shape=shape,
            attrs=attrs,
            retries=retries,
            retry_interval=retry_interval,
            strict=strict,
            txid=txid,
            backoff=backoff,
        )
