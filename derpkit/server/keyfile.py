"""derper's server-key file (``-c``): JSON ``{"PrivateKey": "privkey:<hex>"}``.

Keeping the key stable across restarts keeps the server's DERP identity (clients and mesh
peers see the same public key), so the file is created once, atomically, mode 0600.
"""

from __future__ import annotations

import json
import os

from derpkit.atomicfile import write_atomic
from derpkit.protocol.keys import KeyError_, NodePrivate

ROOT_DEFAULT = "/var/lib/derper/derper.key"


class KeyFileError(Exception):
    """The key file exists but cannot be used; the message says how to fix it."""


def default_path() -> str | None:
    """derper uses a fixed path when running as root and insists on ``-c`` otherwise."""
    return ROOT_DEFAULT if os.geteuid() == 0 else None


def load_or_create(path: str) -> tuple[NodePrivate, bool]:
    """Return the key in ``path``, creating the file if it is missing; bool = created."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        key = NodePrivate.generate()
        write(path, key)
        return key, True
    except OSError as e:
        raise KeyFileError(f"derper: config: cannot read {path}: {e}") from None
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise KeyFileError(f"derper: config: {path}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise KeyFileError(f"derper: config: {path}: want a JSON object")
    # Go matches field names case-insensitively; an exact match wins.
    text = obj.get("PrivateKey")
    if text is None:
        text = next((v for k, v in obj.items() if k.lower() == "privatekey"), None)
    if not isinstance(text, str) or not text:
        raise KeyFileError(
            f"derper: config: {path} has no PrivateKey; delete the file to generate a new key"
        )
    try:
        key = NodePrivate.parse(text)
    except KeyError_ as e:
        raise KeyFileError(f"derper: config: {path}: {e}") from None
    if key.is_zero():
        raise KeyFileError(f"derper: config: {path}: PrivateKey is all zeros")
    return key, False


def write(path: str, key: NodePrivate) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    body = json.dumps({"PrivateKey": str(key)}, indent="\t").encode()
    write_atomic(path, body, 0o600)
