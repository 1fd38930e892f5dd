"""asyncio STUN server: a thin datagram shell around :mod:`derpkit.stun`.

Behaviour, and why it differs from Go derper:

* Tailscale-shaped requests (SOFTWARE ``tailnode`` + FINGERPRINT) are answered exactly as Go
  derper answers them, using Tailscale's own quirky acceptance rules.
* Other RFC 5389/8489 Binding requests are dropped, as Go derper drops them (``strict``, the
  default). ``strict=False`` (``-stun-strict=false``) answers any well-formed Binding request
  too, so an operator checking the port with an ordinary STUN tool does not wrongly conclude
  that UDP 3478 is blocked. RFC 5780 mode always answers them (it needs plain requests).
* IPv4 clients on a dual-stack socket are answered with family 0x01, not Go's ``::ffff:``
  family-0x02 form.
* Nothing else is ever answered: no error responses, no replies to garbage. Every datagram is
  counted, so a flood of junk shows up in metrics rather than in logs.
* RFC 5780 mode (``rfc5780=(second IP, second port)``, ``-stun-rfc5780``): four sockets, the
  primary IP and a second one, each on the primary and a second port. RFC-shaped requests get
  RESPONSE-ORIGIN and OTHER-ADDRESS and have CHANGE-REQUEST and RESPONSE-PORT obeyed, so a
  client can classify its NAT against the operator's own relay. Tailscale-shaped requests are
  still answered with Go's exact bytes, from the socket they arrived on. Off by default.

Counters live in :attr:`StunServer.counts`, a plain :class:`collections.Counter` keyed by
``(group, label)`` tuples that the metrics layer can read without importing anything asyncio.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
from typing import Any, cast

from derpkit.stun.codec import (
    RfcRequest,
    StunError,
    build_response,
    build_rfc5780_response,
    parse_binding_request,
    parse_rfc_binding_request,
    parse_rfc_request,
)

__all__ = [
    "MAX_SEND_BUFFER",
    "Rfc5780Group",
    "StunServer",
    "format_sockname",
    "start_stun_server",
]

log = logging.getLogger("derpkit.stun")

#: Above this many bytes queued in the transport we drop replies (counted as write_error)
#: instead of letting a flood grow memory without bound. Go's blocking WriteTo applies
#: back-pressure by itself; asyncio would buffer forever.
MAX_SEND_BUFFER = 256 * 1024

#: errno values meaning "this host has no usable IPv6", the only case where "" falls back to
#: an IPv4-only socket.
_NO_IPV6_ERRNOS = frozenset(
    {errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL, errno.EPROTONOSUPPORT, errno.EINVAL}
)


def format_sockname(addr: tuple[Any, ...]) -> str:
    """``host:port`` with IPv6 bracketed, like Go prints addresses (``[::]:3478``)."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StunServer(asyncio.DatagramProtocol):
    """One UDP socket answering STUN Binding requests; stateless, one reply per request.

    ``counts`` keys (all start at zero and only grow):

    * ``("requests", "success")``: Tailscale-shaped requests answered (Go's ``success``).
    * ``("requests", "rfc")``: other RFC 5389/8489 Binding requests answered (not in strict mode).
    * ``("requests", "not_stun")``: datagrams dropped unanswered (Go's ``not_stun``).
    * ``("requests", "write_error")``: replies that could not be sent.
    * ``("requests", "read_error")``: socket errors reported outside a send.
    * ``("addrfamily", "ipv4" | "ipv6")``: answered requests by client family (mapped IPv4
      counts as ipv4).
    * ``("dropped", <reason>)``: why a datagram was dropped, using :class:`StunError` names
      (``ErrNotSTUN``, ``ErrWrongSoftware``, ``ErrBadLength``...) or ``send_buffer_full``.
    """

    def __init__(
        self,
        *,
        strict: bool = True,
        group: Rfc5780Group | None = None,
        slot: tuple[int, int] = (0, 0),
    ) -> None:
        self.strict = strict
        #: RFC 5780 mode: the four sockets, and which one this is (IP index, port index).
        self.group = group
        self.slot = slot
        self.counts: collections.Counter[tuple[str, str]] = (
            group.counts if group is not None else collections.Counter()
        )
        self.transport: asyncio.DatagramTransport | None = None
        self.sockname: tuple[Any, ...] | None = None
        self._sending = False
        self._closed: asyncio.Future[None] | None = None

    # --- asyncio protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # CPython's selector UDP transport does not subclass DatagramTransport; trust the API.
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.sockname = transport.get_extra_info("sockname")
        self._closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Answer ``data`` if it is an acceptable Binding request; otherwise count and drop it.

        Must never raise: a single malformed datagram must not take the endpoint down.
        """
        try:
            txid, kind, rfc = self._classify(data)
        except StunError as e:
            self.counts["requests", "not_stun"] += 1
            self.counts["dropped", e.name] += 1
            return
        try:
            ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
        except ValueError:  # an address family we cannot describe on the wire (never seen)
            self.counts["requests", "not_stun"] += 1
            self.counts["dropped", "bad_source_address"] += 1
            return
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        sender, dest = self, addr
        if rfc is not None and self.group is not None:
            sender, reply, dest = self.group.reply(self, rfc, ip, addr)
        else:
            reply = build_response(txid, ip, addr[1])
        transport = sender.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            self.counts["requests", "write_error"] += 1
            self.counts["dropped", "send_buffer_full"] += 1
            return
        errors_before = self.counts["requests", "write_error"]
        sender._sending = True
        try:
            transport.sendto(reply, dest)
        except (OSError, RuntimeError, ValueError):
            # Some event loops raise instead of calling error_received.
            self.counts["requests", "write_error"] += 1
        finally:
            sender._sending = False
        if self.counts["requests", "write_error"] != errors_before:
            return
        self.counts["requests", kind] += 1
        self.counts["addrfamily", "ipv4" if ip.version == 4 else "ipv6"] += 1

    def error_received(self, exc: Exception) -> None:
        """asyncio reports send failures (and ICMP errors) here rather than raising."""
        if self._sending:
            self.counts["requests", "write_error"] += 1
        else:
            self.counts["requests", "read_error"] += 1
            log.debug("STUN socket error: %s", exc)

    # --- decisions -----------------------------------------------------------------------------

    def _classify(self, data: bytes) -> tuple[bytes, str, RfcRequest | None]:
        """Return (transaction id, counter label, RFC request in RFC 5780 mode) or raise
        :class:`StunError`.

        The Tailscale parser runs first so Tailscale clients get Go's exact verdicts (including
        its acceptance of a wrong header length). In RFC mode a rejected datagram gets a second
        chance through the RFC parser, whose error then names the drop reason.
        """
        try:
            return parse_binding_request(data), "success", None
        except StunError as e:
            if self.strict or e.name in ("ErrNotSTUN", "ErrNotBindingRequest"):
                raise
        if self.group is not None:
            req = parse_rfc_request(data)
            return req.txid, "rfc", req
        return parse_rfc_binding_request(data), "rfc", None

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address as Go would print it (``[::]:3478``)."""
        return format_sockname(self.sockname) if self.sockname else "<unbound>"

    def close(self) -> None:
        """Stop answering and release the socket (idempotent); RFC 5780: all four sockets."""
        for srv in self.group.servers.values() if self.group is not None else (self,):
            if srv.transport is not None:
                srv.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the transport(s) have really released the socket(s)."""
        for srv in self.group.servers.values() if self.group is not None else (self,):
            if srv._closed is not None:
                await srv._closed


class Rfc5780Group:
    """The four sockets of an RFC 5780 server, keyed (IP index, port index), and its replies.

    Index 0 is the primary (``-a``'s IP, ``-stun-port``), 1 the second one. OTHER-ADDRESS is
    always the socket differing in both; CHANGE-REQUEST flips the index it names; RESPONSE-PORT
    replaces the destination port. Counters are shared, so metrics see one server.
    """

    def __init__(self) -> None:
        self.servers: dict[tuple[int, int], StunServer] = {}
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def addr(self, slot: tuple[int, int]) -> tuple[str, int]:
        name = self.servers[slot].sockname
        assert name is not None
        return str(name[0]), int(name[1])

    def reply(
        self,
        at: StunServer,
        req: RfcRequest,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        addr: tuple[Any, ...],
    ) -> tuple[StunServer, bytes, tuple[Any, ...]]:
        """(socket to send from, reply bytes, destination) for ``req`` received by ``at``."""
        i, j = at.slot
        target = (i ^ int(req.change_ip), j ^ int(req.change_port))
        if req.change_ip:
            self.counts["rfc5780", "change_ip"] += 1
        if req.change_port:
            self.counts["rfc5780", "change_port"] += 1
        dest = addr
        if req.response_port is not None:
            self.counts["rfc5780", "response_port"] += 1
            dest = (addr[0], req.response_port, *addr[2:])
        sender = self.servers[target]
        reply = build_rfc5780_response(
            req.txid, ip, addr[1],
            response_origin=self.addr(target), other_address=self.addr((1 - i, 1 - j)),
        )  # fmt: skip
        return sender, reply, dest


def _make_socket(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Create and bind the UDP socket ourselves so dual-stack is explicit, not OS-default.

    ``host == ""`` means every address: ``::`` with IPV6_V6ONLY off (one socket for both
    families, like Go's ``:3478``), falling back to ``0.0.0.0`` on hosts without IPv6.
    ``reuse_port`` sets SO_REUSEPORT first, so -workers siblings share the port.
    """
    if host == "":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                sock.bind(("::", port))
            except BaseException:
                sock.close()
                raise
            return sock
        except OSError as e:
            if e.errno not in _NO_IPV6_ERRNOS:
                raise  # e.g. the port is taken: falling back would hide that
        host = "0.0.0.0"
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)
    family, _, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_DGRAM, proto)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # An explicit IPv6 address serves IPv6 only, as in Go.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def _serve(host: str, port: int, server: StunServer, reuse_port: bool = False) -> StunServer:
    sock = _make_socket(host, port, reuse_port)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        await loop.create_datagram_endpoint(lambda: server, sock=sock)
    except BaseException:
        sock.close()
        raise
    return server


async def start_stun_server(
    host: str, port: int, *, strict: bool | None = None, rfc5780: tuple[str, int] | None = None,
    reuse_port: bool = False,
) -> StunServer:
    """Bind ``host:port`` (``""`` = dual-stack all addresses; ``0`` = ephemeral) and serve.

    ``rfc5780=(second IP, second port)`` also binds ``host:second port`` and the second IP on
    both ports (``host`` must be an IP; ephemeral ports are allowed: the second IP then takes
    the ports the primary got). The primary :class:`StunServer` is returned; its ``group``
    holds all four and ``close()`` closes them all.

    Raises :class:`OSError` if a port cannot be bound; the caller decides whether that is
    fatal (Go derper logs it and keeps serving DERP without STUN).
    """
    if rfc5780 is None:
        # Go's behaviour unless told otherwise: only Tailscale-shaped requests.
        server = await _serve(host, port, StunServer(strict=strict is not False), reuse_port)
        log.info("STUN server listening on %s", server.address)
        return server
    if strict:
        raise ValueError("RFC 5780 mode answers plain requests; it cannot be strict")
    alt_ip, alt_port = rfc5780
    group = Rfc5780Group()
    try:
        p1 = await _serve(host, port, StunServer(strict=False, group=group, slot=(0, 0)), reuse_port)
        group.servers[(0, 0)] = p1
        port1 = group.addr((0, 0))[1]
        p2 = await _serve(host, alt_port, StunServer(strict=False, group=group, slot=(0, 1)), reuse_port)
        group.servers[(0, 1)] = p2
        port2 = group.addr((0, 1))[1]
        group.servers[(1, 0)] = await _serve(alt_ip, port1, StunServer(strict=False, group=group, slot=(1, 0)), reuse_port)
        group.servers[(1, 1)] = await _serve(alt_ip, port2, StunServer(strict=False, group=group, slot=(1, 1)), reuse_port)
    except BaseException:
        for srv in group.servers.values():
            srv.close()
        raise
    others = ", ".join(group.servers[s].address for s in ((0, 1), (1, 0), (1, 1)))
    log.info("STUN server listening on %s (RFC 5780: also %s)", p1.address, others)
    return p1
