"""asyncio STUN server: a thin datagram shell around :mod:`derpkit.stun`.

Behaviour, and why it differs from Go derper:

* Tailscale-shaped requests (SOFTWARE ``tailnode`` + FINGERPRINT) are answered exactly as Go
  derper answers them, using Tailscale's own quirky acceptance rules.
* By default any well-formed RFC 5389/8489 Binding request is answered too. Go derper drops
  those silently, so an operator checking the port with an ordinary STUN tool wrongly concludes
  that UDP 3478 is blocked. ``strict=True`` (``-stun-strict``) restores Go's behaviour.
* IPv4 clients on a dual-stack socket are answered with family 0x01, not Go's ``::ffff:``
  family-0x02 form.
* Nothing else is ever answered: no error responses, no replies to garbage. Every datagram is
  counted, so a flood of junk shows up in metrics rather than in logs.

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
    StunError,
    build_response,
    parse_binding_request,
    parse_rfc_binding_request,
)

__all__ = ["MAX_SEND_BUFFER", "StunServer", "format_sockname", "start_stun_server"]

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

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
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
            txid, kind = self._classify(data)
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
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_SEND_BUFFER:
            self.counts["requests", "write_error"] += 1
            self.counts["dropped", "send_buffer_full"] += 1
            return
        reply = build_response(txid, ip, addr[1])
        errors_before = self.counts["requests", "write_error"]
        self._sending = True
        try:
            transport.sendto(reply, addr)
        except (OSError, RuntimeError, ValueError):
            # Some event loops raise instead of calling error_received.
            self.counts["requests", "write_error"] += 1
        finally:
            self._sending = False
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

    def _classify(self, data: bytes) -> tuple[bytes, str]:
        """Return (transaction id, counter label) or raise :class:`StunError`.

        The Tailscale parser runs first so Tailscale clients get Go's exact verdicts (including
        its acceptance of a wrong header length). In RFC mode a rejected datagram gets a second
        chance through the RFC parser, whose error then names the drop reason.
        """
        try:
            return parse_binding_request(data), "success"
        except StunError as e:
            if self.strict or e.name in ("ErrNotSTUN", "ErrNotBindingRequest"):
                raise
        return parse_rfc_binding_request(data), "rfc"

    # --- lifecycle -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address as Go would print it (``[::]:3478``)."""
        return format_sockname(self.sockname) if self.sockname else "<unbound>"

    def close(self) -> None:
        """Stop answering and release the socket (idempotent)."""
        if self.transport is not None:
            self.transport.close()

    async def wait_closed(self) -> None:
        """Wait until the transport has really released the socket."""
        if self._closed is not None:
            await self._closed


def _make_socket(host: str, port: int) -> socket.socket:
    """Create and bind the UDP socket ourselves so dual-stack is explicit, not OS-default.

    ``host == ""`` means every address: ``::`` with IPV6_V6ONLY off (one socket for both
    families, like Go's ``:3478``), falling back to ``0.0.0.0`` on hosts without IPv6.
    """
    if host == "":
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            try:
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
        if family == socket.AF_INET6:
            # An explicit IPv6 address serves IPv6 only, as in Go.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


async def start_stun_server(host: str, port: int, *, strict: bool = False) -> StunServer:
    """Bind ``host:port`` (``""`` = dual-stack all addresses; ``0`` = ephemeral) and serve.

    Raises :class:`OSError` if the port cannot be bound; the caller decides whether that is
    fatal (Go derper logs it and keeps serving DERP without STUN).
    """
    sock = _make_socket(host, port)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    server = StunServer(strict=strict)
    try:
        await loop.create_datagram_endpoint(lambda: server, sock=sock)
    except BaseException:
        sock.close()
        raise
    log.info("STUN server listening on %s", server.address)
    return server
