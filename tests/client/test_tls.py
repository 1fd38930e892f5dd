"""derpkit/client/tls.py over real TLS connections: derper's meta-certificate, CertName."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from derpkit.client import DerpCertificateError, DerpClient
from derpkit.client.tls import _name_matches, meta_cert_server_key
from derpkit.protocol.keys import NodePrivate
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs
from tests.interop.pki import TestCA


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


# ------------------------------------------------------------------ CertName as a DNS name


@pytest.mark.parametrize("websocket", [False, True], ids=["tcp", "websocket"])
async def test_dns_certname_is_domain_fronting(tmp_path: Path, websocket: bool) -> None:
    """A DNS CertName keeps the SNI at the URL's host (a fronting proxy routes by it) and
    requires the chain to be valid for CertName, as Tailscale's client does (derp-map §9)."""
    ca = TestCA.create(tmp_path / "ca")
    leaf = ca.issue("backend", ["backend.example"], [])
    server_ctx = leaf.server_context()
    seen: list[str | None] = []
    server_ctx.sni_callback = lambda _obj, name, _ctx: seen.append(name)  # type: ignore[assignment,func-returns-value]
    node = DerpNode(NodeOptions(ssl_context=server_ctx, stun_port=None))
    await node.start()
    url = f"https://localhost:{node.port}/derp"
    try:
        c = await DerpClient.connect(url, cert_name="backend.example", ssl_context=ca.client_context(),
                                     websocket=websocket, timeout=5)
        await c.close()
        assert seen and set(seen) == {"localhost"}, seen
        # The chain is fine, but the leaf is not valid for this CertName.
        with pytest.raises(DerpCertificateError, match=r"not valid for CertName 'elsewhere.example' "
                                                       r"\(it is valid for backend.example\)"):
            await DerpClient.connect(url, cert_name="elsewhere.example", ssl_context=ca.client_context(),
                                     websocket=websocket, timeout=5)
        # A name the chain is valid for, but from a CA the client does not trust: refused.
        with pytest.raises(DerpCertificateError):
            await DerpClient.connect(url, cert_name="backend.example", websocket=websocket, timeout=5)
    finally:
        await node.stop()


@pytest.mark.parametrize(("pattern", "name", "ok"), [
    ("backend.example", "BACKEND.example.", True),
    ("*.example.com", "derp.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.com", "example.com", False),
    ("derp.example.com", "other.example.com", False),
])
def test_certname_matching(pattern: str, name: str, ok: bool) -> None:
    assert _name_matches(pattern, name) is ok
