"""Locust users for the kill -9 test in test_faults.py (a locustfile; never imported by pytest).

    DERPKIT_FAULT_NODES=url0,url1,url2 DERPKIT_FAULT_LOG=events.jsonl \\
        locust -f tests/server/locust_faults.py --headless ...

Three pairs of our PacketPair users (loadtests/users.py) across three meshed nodes:
``Survivor01`` sends on node 0 to a receiver on node 1, ``Survivor10`` the other way,
``ToVictim`` sends on node 0 to a receiver on node 2, the node the test kills. On top of
PacketPair's loss and latency, every receiver checks each packet: the source key must be
one of its own sender's keys and the payload must name the receiving key (written after
the stamp), else it fires a ``misdelivered`` failure. Every request event also goes to
``DERPKIT_FAULT_LOG`` as one JSON line with its wall-clock time, so the test can place
each loss in time against the kill and the restart.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from locust import events  # noqa: E402

from derpkit.protocol.frames import RecvPacket  # noqa: E402
from loadtests.derpclient import BlockingDerpClient, DerpLoadError  # noqa: E402
from loadtests.users import _MAGIC, _STAMP, PacketPair  # noqa: E402

NODES = os.environ.get("DERPKIT_FAULT_NODES", "http://127.0.0.1:1/derp,,").split(",")
_log = open(os.environ.get("DERPKIT_FAULT_LOG", os.devnull), "a", buffering=1)  # noqa: SIM115


@events.request.add_listener
def _record(request_type: str, name: str, response_time: float, response_length: int,
            exception: BaseException | None = None, **_: Any) -> None:
    _log.write(json.dumps({"t": time.time(), "name": name, "ms": response_time,
                           "ok": exception is None, "err": "" if exception is None else str(exception)}) + "\n")


class CheckedPair(PacketPair):
    """PacketPair whose receiver refuses any packet not from its sender or not meant for it."""

    abstract = True
    receiver_node = 1

    def __init__(self, environment: Any) -> None:
        super().__init__(environment)
        self.sender_keys: set[bytes] = set()

    def receiver_url(self) -> str:
        return NODES[self.receiver_node]

    def connect(self, url: str | None = None, name: str = "connect") -> BlockingDerpClient | None:
        return super().connect(url, f"connect {self.label}")  # per class: only the victim's may fail

    def _ensure(self) -> bool:
        ok = super()._ensure()
        if ok and self.sender is not None and self.receiver is not None:
            self.sender_keys.add(self.sender.public_raw)
            # The receiving key rides in every payload, after the stamp.
            self._pad = self.receiver.public_raw + bytes(self.size - _STAMP.size - 32)
        return ok

    def _read_loop(self, conn: BlockingDerpClient) -> None:
        pending = self.pending
        while not conn.closed:
            try:
                f = conn.recv()
            except (DerpLoadError, OSError, TimeoutError):
                return
            if not isinstance(f, RecvPacket):
                continue
            now = time.perf_counter_ns()
            body = f.data[_STAMP.size:_STAMP.size + 32]
            if len(f.data) < _STAMP.size + 32 or f.src not in self.sender_keys or body != conn.public_raw:
                self.fire("misdelivered", 0.0, len(f.data), AssertionError(
                    f"packet from {(f.src or b'').hex()[:16]} naming {body.hex()[:16]} reached {conn.public_raw.hex()[:16]}"))
                continue
            magic, seq, sent = _STAMP.unpack_from(f.data)
            if magic != _MAGIC or pending.pop(seq, None) is None:
                continue
            self.fire(self.name, (now - sent) / 1e6, len(f.data))


class Survivor01(CheckedPair):
    fixed_count = 2
    host = NODES[0]
    receiver_node = 1
    label = "survivor 0->1"


class Survivor10(CheckedPair):
    fixed_count = 2
    host = NODES[1]
    receiver_node = 0
    label = "survivor 1->0"


class ToVictim(CheckedPair):
    fixed_count = 2
    host = NODES[0]
    receiver_node = 2
    label = "to victim 0->2"
