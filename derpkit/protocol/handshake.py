"""The ClientInfo / ServerInfo exchange: JSON sealed in a NaCl box.

Field names and their order are what Go writes; parsing follows Go's ``encoding/json``:
keys match case-insensitively (an exact match wins), unknown keys are ignored, and a value
of the wrong JSON type fails the whole handshake.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError
from nacl.exceptions import RuntimeError as NaclRuntimeError
from nacl.public import Box, PrivateKey, PublicKey

from .constants import KEY_LEN, NONCE_LEN, PROTOCOL_VERSION, FrameType
from .errors import ProtocolError
from .frames import frame
from .keys import MeshKey, NodePrivate, NodePublic


def seal(sender: NodePrivate, recipient: NodePublic, plaintext: bytes) -> bytes:
    """nonce || tag || ciphertext, as Go's key.NodePrivate.SealTo writes it.

    libsodium refuses a low-order recipient key (all zeros, say) where Go would seal with
    an all-zero secret: that is ``ProtocolError("bad_key")`` here, so a hostile server's
    ServerKey cannot crash the client core with nacl's RuntimeError (found by atheris).
    """
    try:
        box = Box(PrivateKey(sender.raw), PublicKey(recipient.raw))
    except NaclRuntimeError as e:
        raise ProtocolError("bad_key", f"cannot seal to {recipient}: a low-order key ({e})") from None
    return bytes(box.encrypt(plaintext, os.urandom(NONCE_LEN)))


def open_box(receiver: NodePrivate, sender: NodePublic, sealed: bytes) -> bytes:
    """Open a sealed blob or raise ``ProtocolError("bad_box")``.

    libsodium refuses low-order public keys where Go would derive an all-zero secret; we
    treat that refusal as a box failure too (a documented deviation for a pathological key).
    """
    if len(sealed) < NONCE_LEN:
        raise ProtocolError("bad_box", "sealed data shorter than a nonce")
    if sender.is_zero():
        raise ProtocolError("zero_key", "all-zero public key")
    try:
        box = Box(PrivateKey(receiver.raw), PublicKey(sender.raw))
        return bytes(box.decrypt(sealed[NONCE_LEN:], sealed[:NONCE_LEN]))
    except (CryptoError, ValueError) as e:
        raise ProtocolError("bad_box", f"cannot open box from {sender}: {e}") from None


def _go_fields(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """Map a decoded JSON object onto Go struct fields the way encoding/json does."""
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", "info is not a JSON object")
    out: dict[str, Any] = {}
    exact: set[str] = set()
    lower = {n.lower(): n for n in names}
    for k, v in obj.items():
        if k in lower.values():
            out[k] = v
            exact.add(k)
            continue
        name = lower.get(k.lower())
        if name is not None and name not in exact:
            out[name] = v
    return out


def _int(v: Any, name: str) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int | float) or (isinstance(v, float) and not v.is_integer()):
        raise ProtocolError("bad_json", f"{name}: want an integer, got {v!r}")
    return int(v)


def _bool(v: Any, name: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ProtocolError("bad_json", f"{name}: want a boolean, got {v!r}")
    return v


def _str(v: Any, name: str) -> str:
    if v is None:
        return ""
    if not isinstance(v, str):
        raise ProtocolError("bad_json", f"{name}: want a string, got {v!r}")
    return v


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError("bad_json", str(e)) from None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client tells the server about itself, inside the box."""

    mesh_key: MeshKey | None = None
    version: int = PROTOCOL_VERSION
    can_ack_pings: bool = False
    is_prober: bool = False
    app_name: str = ""

    _FIELDS = ("meshKey", "version", "CanAckPings", "IsProber", "AppName")

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        if self.mesh_key is not None and not self.mesh_key.is_zero():
            d["meshKey"] = self.mesh_key.hex()
        if self.version:
            d["version"] = self.version
        d["CanAckPings"] = self.can_ack_pings
        if self.is_prober:
            d["IsProber"] = True
        if self.app_name:
            d["AppName"] = self.app_name
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClientInfo:
        f = _go_fields(_loads(data), cls._FIELDS)
        mesh = None
        if "meshKey" in f:
            v = f["meshKey"]
            if not isinstance(v, str):
                raise ProtocolError("bad_mesh_key", f"meshKey: want a string, got {v!r}")
            try:
                mesh = MeshKey(bytes.fromhex(v)) if len(v) == 2 * KEY_LEN else None
            except ValueError:
                mesh = None
            if mesh is None:
                raise ProtocolError("bad_mesh_key", "meshKey is not 64 hex digits")
        return cls(
            mesh_key=mesh,
            version=_int(f.get("version"), "version"),
            can_ack_pings=_bool(f.get("CanAckPings"), "CanAckPings"),
            is_prober=_bool(f.get("IsProber"), "IsProber"),
            app_name=_str(f.get("AppName"), "AppName"),
        )


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the server tells a client; Go servers send only the version."""

    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0
    token_bucket_bytes_burst: int = 0

    _FIELDS = ("version", "TokenBucketBytesPerSecond", "TokenBucketBytesBurst")

    def to_json(self) -> bytes:
        d: dict[str, Any] = {}
        if self.version:
            d["version"] = self.version
        if self.token_bucket_bytes_per_second:
            d["TokenBucketBytesPerSecond"] = self.token_bucket_bytes_per_second
        if self.token_bucket_bytes_burst:
            d["TokenBucketBytesBurst"] = self.token_bucket_bytes_burst
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ServerInfo:
        f = _go_fields(_loads(data), cls._FIELDS)
        return cls(
            version=_int(f.get("version"), "version"),
            token_bucket_bytes_per_second=_int(f.get("TokenBucketBytesPerSecond"), "TokenBucketBytesPerSecond"),
            token_bucket_bytes_burst=_int(f.get("TokenBucketBytesBurst"), "TokenBucketBytesBurst"),
        )


def client_info_frame(client: NodePrivate, server: NodePublic, info: ClientInfo) -> bytes:
    """The complete ClientInfo frame a client sends first."""
    return frame(FrameType.CLIENT_INFO, client.public().raw + seal(client, server, info.to_json()))


def open_client_info(server: NodePrivate, payload: bytes) -> tuple[NodePublic, ClientInfo]:
    """Server side: split, open and parse a ClientInfo payload.

    The server core size-checks the frame first; the opener refuses a short payload too,
    with a ProtocolError rather than a key error, for any other caller (found by fuzzing).
    """
    if len(payload) < KEY_LEN:
        raise ProtocolError("short_client_info", f"{len(payload)} bytes")
    client = NodePublic(payload[:KEY_LEN])
    if client.is_zero():
        raise ProtocolError("zero_key", "client presented the all-zero key")
    return client, ClientInfo.from_json(open_box(server, client, payload[KEY_LEN:]))


def server_info_frame(server: NodePrivate, client: NodePublic, info: ServerInfo | None = None) -> bytes:
    return frame(FrameType.SERVER_INFO, seal(server, client, (info or ServerInfo()).to_json()))


def open_server_info(client: NodePrivate, server: NodePublic, sealed: bytes) -> ServerInfo:
    return ServerInfo.from_json(open_box(client, server, sealed))
