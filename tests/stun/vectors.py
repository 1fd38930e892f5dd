"""Loader for the shared STUN test vectors (``/work/shared/vectors/stun`` beside the repo).

Shared by the codec, server and stunc tests so every suite reads the same 58 vectors.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from derpkit.stun.codec import MAGIC_COOKIE, fingerprint

VECTOR_DIR = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors" / "stun"
VECTOR_FILES = ("go_tests.json", "synthesized.json", "derived_malformed.json", "external.json")


def load_vectors() -> list[dict[str, Any]]:
    """Every vector of all four files, each tagged with the file it came from."""
    out: list[dict[str, Any]] = []
    for name in VECTOR_FILES:
        doc = json.loads((VECTOR_DIR / name).read_text())
        assert doc["count"] == len(doc["vectors"]), name
        for v in doc["vectors"]:
            out.append({**v, "file": name})
    return out


VECTORS = load_vectors()


def build_message(
    mtype: int,
    txid: bytes,
    attrs: list[tuple[int, bytes]],
    *,
    with_fingerprint: bool = False,
    pad: bytes = b"\x00",
) -> bytes:
    """An independent little STUN encoder for tests (not the codec under test)."""
    body = b""
    for atype, value in attrs:
        body += struct.pack("!HH", atype, len(value)) + value + pad * (-len(value) % 4)
    if with_fingerprint:
        head = struct.pack("!HH", mtype, len(body) + 8) + MAGIC_COOKIE + txid + body
        return head + struct.pack("!HHI", 0x8028, 4, fingerprint(head))
    return struct.pack("!HH", mtype, len(body)) + MAGIC_COOKIE + txid + body
