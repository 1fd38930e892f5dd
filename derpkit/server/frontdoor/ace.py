"""derper's CONNECT handling ("ACE", spec derper-cli §3.12): target rules and the splice.

derper answers a CONNECT on its TLS listener itself instead of routing it: with ``-ace=false``
it refuses (403), with ``-ace=true`` it is a narrow CONNECT proxy that Tailscale clients may
use to reach the control plane (``*.tailscale.com``, never a DERP host) when only the DERP
server is reachable. The front door (frontdoor.py) reads the request head and calls in here;
this module holds what is worth testing on its own:

- :func:`check_target`, the allow rule, as a pure function with Go's error texts (they end
  up in the log line an operator greps for);
- :func:`request_uri_ok`, the subset of Go's request-URI parsing that turns a malformed
  CONNECT target into a 400 *before* any ACE rule runs, so the status codes match derper's;
- :class:`Tunnel`, the byte pump once the upstream is dialled. It uses transports and
  protocols rather than streams so that flow control is the transports' own: when one
  side's write buffer is full we stop reading the other side, and no byte is held in a
  Python buffer beyond what the transports already bound.

Each server's settings and counters live in an :class:`Ace` object looked up by server
(:func:`for_server`), because the front door is constructed with the DERP server alone.
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
from collections.abc import Callable, Iterator
from typing import Any

from derpkit.gosyntax import GoValueError, split_host_port
from derpkit.server import metrics

log = logging.getLogger("derpkit.server")

#: How long derper waits for the upstream TCP connection (connectproxy's context timeout).
DIAL_TIMEOUT = 15.0
#: After a tunnel ends, how long a transport may spend flushing to a peer that reads
#: nothing before it is aborted (Go closes at once; asyncio's close() would wait forever).
CLOSE_GRACE = 5.0
ALLOWED_PORTS = ("443", "80")
#: The status line Go's connectproxy writes on the hijacked connection, and nothing else.
CONNECTED = b"HTTP/1.1 200 OK\r\n\r\n"
#: Go's answer to a request line it cannot parse; it closes the connection afterwards.
GO_BAD_REQUEST = (
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Connection: close\r\n\r\n400 Bad Request"
)

#: Results counted in derpkit_ace_requests.
RESULTS = ("disabled", "invalid_target", "dial_failed", "connected")


class TargetError(ValueError):
    """A CONNECT target the ACE rule refuses; ``str()`` is Go's error text."""


def check_target(target: str) -> tuple[str, int]:
    """derper's ACE rule: ``(host, port)`` to dial, or :class:`TargetError` with Go's text.

    The target is the raw request URI. The port must be exactly ``443`` or ``80`` (the
    control plane's HTTPS and its Noise-over-HTTP port); the host must end with
    ``.tailscale.com`` and not contain ``derp``, so the proxy cannot be pointed at DERP
    servers or anywhere else. Both tests are case-sensitive string tests, as in Go: a
    trailing dot or an upper-case suffix fails, an upper-case ``DERP`` is not caught.
    """
    try:
        host, port = split_host_port(target)  # Go's net.SplitHostPort, with its error texts
    except GoValueError as e:
        raise TargetError(str(e)) from None
    if port not in ALLOWED_PORTS:
        raise TargetError("only ports 443 and 80 are allowed")
    if not host.endswith(".tailscale.com") or "derp" in host:
        raise TargetError("bad host")
    return host, int(port)


# Bytes Go's URL parser accepts unescaped in a host (RFC 3986 sub-delims plus a few).
_HOST_OK = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~!$&'()*+,;=:[]<>\""
)
_USERINFO_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._:~!$&'()*+,;=%@")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def _escapes_ok(s: bytes, host: bool) -> bool:
    i = 0
    while i < len(s):
        c = s[i]
        if c == 0x25:  # '%'
            if i + 2 >= len(s) or s[i + 1] not in _HEX or s[i + 2] not in _HEX:
                return False
            # In a host only escapes of non-ASCII bytes (and %25) are allowed.
            if host and int(s[i + 1 : i + 2], 16) < 8 and s[i : i + 3] != b"%25":
                return False
            i += 3
            continue
        if host and c < 0x80 and c not in _HOST_OK:
            return False
        i += 1
    return True


def _port_ok(colon_port: bytes) -> bool:
    # Go's validOptionalPort: empty, or a colon and digits (none at all is fine too).
    return colon_port == b"" or (colon_port[:1] == b":" and all(0x30 <= c <= 0x39 for c in colon_port[1:]))


def request_uri_ok(uri: bytes) -> bool:
    """Would Go's HTTP server accept this CONNECT request URI (else: 400, connection closed)?

    Go parses an authority-form target as ``http://<uri>`` with its URL parser before any
    handler runs. The checks that matter for CONNECT are reproduced: control bytes, the
    userinfo alphabet, a bracketed host that must be an IPv6 literal, a numeric port, no
    colon in an unbracketed host, the host alphabet and ``%`` escapes. A URI starting with
    ``/`` is a plain path and always parses.
    """
    if any(c < 0x20 or c == 0x7F for c in uri):
        return False
    if uri.startswith(b"/"):
        return _escapes_ok(uri.split(b"?", 1)[0], host=False)
    rest = uri.split(b"?", 1)[0]
    authority, slash, path = rest.partition(b"/")
    if slash and not _escapes_ok(b"/" + path, host=False):
        return False
    at = authority.rfind(b"@")
    if at >= 0:
        if any(c not in _USERINFO_OK for c in authority[:at]):
            return False
        authority = authority[at + 1 :]
    if authority.startswith(b"["):
        end = authority.rfind(b"]")
        if end < 0 or not _port_ok(authority[end + 1 :]):
            return False
        literal, _, zone = authority[1:end].partition(b"%25")
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return False
        return _escapes_ok(zone, host=False)
    i = authority.rfind(b":")
    if i >= 0:
        if not _port_ok(authority[i:]) or b":" in authority[:i]:
            return False
        authority = authority[:i]
    return _escapes_ok(authority, host=True)


class Ace:
    """One server's CONNECT settings and counters (rendered as ``derpkit_ace_*``)."""

    __slots__ = ("enabled", "requests", "bytes_to_target", "bytes_from_target", "tunnels")

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.requests: collections.Counter[str] = collections.Counter(dict.fromkeys(RESULTS, 0))
        self.bytes_to_target = 0
        self.bytes_from_target = 0
        self.tunnels: set[Tunnel] = set()

    def families(self) -> Iterator[metrics.Family]:
        req = metrics.Family("derpkit_ace_requests", "counter", "CONNECT requests on the TLS listener, by result")
        for result in RESULTS:
            req.add(self.requests[result], result=result)
        yield req
        b = metrics.Family("derpkit_ace_bytes", "counter", "bytes copied through CONNECT tunnels")
        b.add(self.bytes_to_target, direction="to_target")
        b.add(self.bytes_from_target, direction="from_target")
        yield b
        yield metrics.gauge("derpkit_ace_tunnels", len(self.tunnels), "CONNECT tunnels open now")




class _Side(asyncio.Protocol):
    """One end of a tunnel: what it reads is written to the other end."""

    __slots__ = ("tunnel", "transport", "other", "to_target")

    def __init__(self, tunnel: Tunnel, to_target: bool) -> None:
        self.tunnel = tunnel
        self.to_target = to_target  # True for the client side (its bytes go to the target)
        self.transport: Any = None
        self.other: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The upstream side: hold its bytes in the kernel until the client side is wired.
        self.transport = transport
        transport.pause_reading()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is None or other.transport is None:
            return
        other.transport.write(data)
        ace = self.tunnel.ace
        if self.to_target:
            ace.bytes_to_target += len(data)
        else:
            ace.bytes_from_target += len(data)

    def pause_writing(self) -> None:
        # Our write buffer is full: stop reading the side that fills it.
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None and not self.other.transport.is_closing():
            self.other.transport.resume_reading()

    def eof_received(self) -> bool:
        # Go's proxy ends the tunnel when either copy ends; there is no half-close.
        self.tunnel.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.close()


class Tunnel:
    """A spliced client/target pair, alive until either side ends."""

    __slots__ = ("ace", "client", "target", "closed", "on_close", "__weakref__")

    def __init__(self, ace: Ace) -> None:
        self.ace = ace
        #: Called once when the tunnel ends (the front door's in-flight request counter).
        self.on_close: Callable[[], None] | None = None
        self.client = _Side(self, to_target=True)
        self.target = _Side(self, to_target=False)
        self.client.other = self.target
        self.target.other = self.client
        self.closed = False

    async def dial(self, host: str, port: int, timeout: float = DIAL_TIMEOUT) -> None:
        """Connect the target side (raises OSError or TimeoutError)."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            await loop.create_connection(lambda: self.target, host, port)

    def attach(self, client_transport: Any, pending: bytes) -> None:
        """Take over the client connection: answer 200, forward what it already sent."""
        self.ace.tunnels.add(self)
        self.client.transport = client_transport
        client_transport.set_protocol(self.client)
        client_transport.write(CONNECTED)
        if pending:
            self.client.data_received(pending)
        client_transport.resume_reading()
        self.target.transport.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ace.tunnels.discard(self)
        if self.on_close is not None:
            self.on_close()
            self.on_close = None
        loop = asyncio.get_running_loop()
        for side in (self.client, self.target):
            t = side.transport
            if t is not None and not t.is_closing():
                t.close()
                # close() flushes first; a peer that never reads must not pin us forever.
                loop.call_later(CLOSE_GRACE, t.abort)
