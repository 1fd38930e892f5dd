"""What a DERP connection core reports to its shell.

Every value ``ClientConnection`` or ``ServerConnection`` hands back is an ``Event``. The
frame values of ``frames.py`` (``RecvPacket``, ``PeerGone``, ``Ping``…) are events too:
what the peer said, decoded. The classes here are what the *connection* concluded from
it: the handshake finished, the upgrade was refused, the peer broke a rule, a timer ran
out. Like h11's events they are small frozen values, so tests compare them with ``==``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .errors import ProtocolError
    from .handshake import ClientInfo, ServerInfo
    from .keys import NodePublic


class Event:
    """Base of everything a connection core returns; frame values included."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class ServerKeyReceived(Event):
    """The server's ServerKey frame arrived (also under fast start, where it confirms)."""

    key: NodePublic
    extra: bytes = b""


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """ServerInfo arrived and opened: the server admitted and registered this client."""

    server_info: ServerInfo


@dataclass(frozen=True, slots=True)
class UpgradeRefused(Event):
    """The server answered /derp with something other than 101 Switching Protocols."""

    status: int
    reason: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str:
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return ""


@dataclass(frozen=True, slots=True)
class PingAnswered(Event):
    """A Pong matched a Ping this end sent with ``ping(now)``; ``rtt`` in the caller's clock."""

    data: bytes
    rtt: float


@dataclass(frozen=True, slots=True)
class ClientInfoReceived(Event):
    """Server side: the client's key and opened ClientInfo; admission is the shell's call.

    ``is_mesh`` is whether the ClientInfo carried this server's mesh key. The shell answers
    with ``ServerConnection.admit`` or ``ServerConnection.refuse``.
    """

    key: NodePublic
    info: ClientInfo
    is_mesh: bool


@dataclass(frozen=True, slots=True)
class ReadingPaused(Event):
    """Server side, -rate-config: stop reading this client until ``until`` (the core's clock).

    Not reading is what slows a sender down, as in derper; the frames already read wait in
    the core and are handled by ``handle_timer`` once the bucket has refilled.
    """

    until: float


@dataclass(frozen=True, slots=True)
class ReadingResumed(Event):
    """Server side: the rate-limit pause is over; resume reading the transport."""


@dataclass(frozen=True, slots=True)
class ConnectionFailed(Event):
    """The connection is over because of ``error``; the shell closes it and counts the reason.

    Always the last event of a batch: everything the peer said before the fault comes
    first, as a Go peer reading sequentially would have acted on it.
    """

    error: ProtocolError

    @property
    def reason(self) -> str:
        return self.error.reason
