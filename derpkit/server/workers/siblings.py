"""A worker's link to one sibling worker: derper's mesh watch loop with claims.

A ``MeshLink`` to the sibling's private loopback listener, logged in with this worker's
own throw-away identity and the internal mesh key (siblings share the server key, so the
usual self-connect check does not apply). Claims (``relay.claim_frames``) and PeerGone
frames go to the ``WorkerServer``; the ForwardPacket path is MeshLink's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from derpkit.protocol import frames as F
from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.relay.mesh import MeshLink

from .relay import claim_stamp_of

if TYPE_CHECKING:
    from .relay import WorkerServer

#: A sibling that restarts comes back on a new port (the supervisor says which), so a
#: retry only covers a brief failure; no need to wait derper's 5 s.
SIBLING_RETRY = 0.5


class SiblingLink(MeshLink):
    def __init__(self, server: WorkerServer, index: int, port: int, identity: NodePrivate, key: MeshKey) -> None:
        super().__init__(
            server, f"127.0.0.1:{port}", scheme="http", retry_interval=SIBLING_RETRY,
            private_key=identity, mesh_key=key, same_server_key=True,
        )
        self.worker = server
        self.index = index
        self.port = port
        #: The client's own PeerPresent of the claim being received (its first frame).
        self._present: dict[bytes, bytes] = {}

    def __repr__(self) -> str:
        return f"SiblingLink(w{self.index} at {self.port})"

    def on_frame(self, f: object) -> None:
        if isinstance(f, F.PeerPresent):
            stamp = claim_stamp_of(f)
            if stamp is None:
                self._present[f.key] = f.encode()
                return
            present = self._present.pop(f.key, None) or F.PeerPresent(f.key).encode()
            self.seen.add(f.key)
            self.worker.sibling_claim(self, f.key, stamp, present)
        elif isinstance(f, F.PeerGone):
            self.seen.discard(f.key)
            self.worker.sibling_gone(self, f.key)

    def _forget_all(self) -> None:
        self.seen.clear()
        self._present.clear()
        self.worker.sibling_lost(self)
