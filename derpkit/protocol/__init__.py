"""Sans-IO DERP: bytes in, frames out; frames in, bytes out. No sockets here."""

from .constants import FrameType, PeerGoneReason, PeerPresentFlags
from .errors import ProtocolError
from .keys import MeshKey, NodePrivate, NodePublic

__all__ = [
    "FrameType",
    "MeshKey",
    "NodePrivate",
    "NodePublic",
    "PeerGoneReason",
    "PeerPresentFlags",
    "ProtocolError",
]
