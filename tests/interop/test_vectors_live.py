"""Record again from the installed Go derper and compare with the committed vectors.

tests/protocol/test_go_vectors.py checks our codec against tests/vectors/go_derper.json
without Go; this test checks that file still describes what Go sends, so a Go upgrade that
changes a frame shows up here. Bytes that Go randomises (nonces, ports, the server key,
Date headers) are compared by shape only.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.goderper import require_derper, start_derper

from . import record_vectors as R

COMMITTED = {k: bytes.fromhex(v["hex"]) for k, v in json.loads(R.VECTORS.read_text())["vectors"].items()}

pytestmark = pytest.mark.timeout(60)


def _no_date(raw: bytes) -> bytes:
    return re.sub(rb"Date: [^\r]*\r\n", b"", raw)


async def test_go_derper_still_sends_the_committed_vectors(tmp_path) -> None:
    binary = require_derper()
    d = start_derper(tmp_path, mesh_key_hex=R.MESH.hex())
    try:
        v = await R.record_derp(d.port)
        v.update(await R.record_http(d.port))
        v["stun_ipv4"] = await R.stun_exchange(R.socket.AF_INET, ("127.0.0.1", d.stun_port), bytes(range(1, 13)))
        server_hex = d.public_key.hex()
    finally:
        d.stop()
    old_key = COMMITTED["server_key"][13:45].hex()
    assert v["head_101"] == COMMITTED["head_101"].replace(old_key.encode(), server_hex.encode())
    assert v["server_key"][:13] == COMMITTED["server_key"][:13] and len(v["server_key"]) == 45
    assert v["server_key"][13:].hex() == server_hex
    assert len(v["server_info"]) == len(COMMITTED["server_info"])
    assert v["server_info"][:5] == COMMITTED["server_info"][:5]
    for name in ("present_self_mesh", "present_regular", "present_prober"):
        # Everything but the 2 port bytes (ephemeral client ports).
        assert v[name][:53] == COMMITTED[name][:53] and v[name][55:] == COMMITTED[name][55:], name
    for name in ("pong", "recv_packet", "peer_gone_not_here", "peer_gone_disconnected",
                 "peer_gone_to_watcher"):
        assert v[name] == COMMITTED[name], name
    for name in ("http_426", "http_probe"):
        assert _no_date(v[name]) == _no_date(COMMITTED[name]), name
    # STUN: header, attribute and family are fixed; the port and address bytes follow ours.
    assert v["stun_ipv4"][:26] == COMMITTED["stun_ipv4"][:26]
    assert len(v["stun_ipv4"]) == len(COMMITTED["stun_ipv4"])
    if R.netns_available():
        ns = R.netns_stun(binary)
        for name in ("stun_v4_on_dual_stack", "stun_ipv6"):
            assert ns[name][:26] == COMMITTED[name][:26], name
            # The address part (after the XOR port) is fixed: our txid, loopback addresses.
            assert ns[name][28:] == COMMITTED[name][28:], name
