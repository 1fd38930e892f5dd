"""derpkit/client/tls.py: reading derper's meta-certificate off a real TLS connection."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from derpkit.client.tls import meta_cert_server_key
from derpkit.protocol.keys import NodePrivate
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs


async def _ssl_object(port: int, max_version: ssl.TLSVersion | None = None) -> tuple[object, asyncio.StreamWriter]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    _r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    return w.get_extra_info("ssl_object"), w


@pytest.mark.parametrize("with_meta", [True, False])
async def test_key_from_the_chain_over_tls13_only(tmp_path: Path, with_meta: bool) -> None:
    key = NodePrivate.generate()
    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1")
    ctx = provider.ssl_context(key.public())
    if not with_meta:  # the same certificate without the meta-certificate appended
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(tmp_path / "127.0.0.1.crt", tmp_path / "127.0.0.1.key")
    node = DerpNode(NodeOptions(ssl_context=ctx, private_key=key, stun_port=None))
    await node.start()
    try:
        obj, w = await _ssl_object(node.port)
        assert meta_cert_server_key(obj) == (key.public() if with_meta else None)
        w.close()
        obj, w = await _ssl_object(node.port, ssl.TLSVersion.TLSv1_2)
        assert meta_cert_server_key(obj) is None  # Go trusts the meta-certificate only on 1.3
        w.close()
    finally:
        await node.stop()


def test_non_tls_objects_give_none() -> None:
    assert meta_cert_server_key(None) is None
    assert meta_cert_server_key(object()) is None
