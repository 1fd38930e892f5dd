"""Connecting a DERP client to one node, the way mesh, bw and qd probes need it.

Built on :class:`derpkit.client.DerpClient` (no handshake here). The connect is split in two
stages so a failure says where it happened: *connect* (TCP, TLS, HTTP upgrade) and
*admission* (the server's ServerInfo, which a ``--verify-clients`` server withholds from
clients it refuses). Every server key a node answers with is recorded, so a load balancer
that spreads one HostName over several derpers shows up.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import time
from dataclasses import dataclass, field

from derpkit.client import DerpCertificateError, DerpClient, DerpConnectionError, DerpTimeoutError
from derpkit.client.tls import unverified_context
from derpkit.protocol.keys import MeshKey

from .diagnose import derp_failure, tls_failure
from .dmap import Node
from .model import Failed

__all__ = ["ProbeEnv", "connect_node", "presented_leaf"]


@dataclass
class ProbeEnv:
    """Settings and shared observations every probe of one prober sees."""

    mesh_key: MeshKey | None = None
    websocket: bool = False
    #: node name -> server keys (hex) seen recently, from TLS meta-certs and DERP handshakes.
    server_keys: dict[str, dict[str, float]] = field(default_factory=dict)
    key_memory: float = 300.0

    def saw_key(self, node: str, key_hex: str) -> None:
        now = time.monotonic()
        seen = self.server_keys.setdefault(node, {})
        seen[key_hex] = now
        for k, t in list(seen.items()):
            if now - t > self.key_memory:
                del seen[k]

    def keys_seen(self) -> dict[str, set[str]]:
        return {n: set(d) for n, d in self.server_keys.items()}


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


async def presented_leaf(host: str, port: int, sni: str | None, timeout: float) -> bytes | None:
    """The server's leaf certificate, unverified, to explain why verification failed."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port, ssl=unverified_context(), server_hostname=sni)
    except (OSError, TimeoutError, ssl.SSLError):
        return None
    try:
        obj = writer.get_extra_info("ssl_object")
        return obj.getpeercert(binary_form=True) if obj is not None else None
    finally:
        writer.transport.abort()


async def connect_node(node: Node, env: ProbeEnv, *, is_prober: bool, timeout: float) -> DerpClient:
    """A connected, admitted client on ``node``; Failed (with a diagnosis) otherwise."""
    dial = node.dial_host()
    if dial is None:
        raise Failed(
            f"both IPv4 and IPv6 are explicitly disabled for node {node.name!r}",
            f"node {node.name}: IPv4 and IPv6 are both switched off in the map, nothing to dial",
        )
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        client = await DerpClient.connect(
            node.url,
            mesh_key=env.mesh_key,
            is_prober=is_prober,
            cert_name=node.cert_name or None,
            insecure_tls=node.insecure_for_tests,
            dial_host=None if dial == node.host_name else dial,
            websocket=env.websocket,
            timeout=timeout,
            wait_for_server_info=False,
        )
    except DerpCertificateError as e:
        cause = e.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            # Explain with the certificate the server presents (its names, dates, pin).
            leaf = await presented_leaf(dial, node.port, None if _is_ip(node.host_name) else node.host_name,
                                        min(2.0, timeout))
            expect = node.cert_name if node.cert_name and not node.cert_name.startswith("sha256-raw:") else node.host_name
            raise tls_failure(cause, dial, node.port, leaf, expect_name=expect) from None
        raise derp_failure(e, dial, node.port, stage="connect", mesh_key=env.mesh_key is not None,
                           timeout=timeout, node=node.name) from None
    except Exception as e:
        raise derp_failure(e, dial, node.port, stage="connect", mesh_key=env.mesh_key is not None,
                           timeout=timeout, node=node.name) from None
    try:
        left = max(0.05, deadline - asyncio.get_running_loop().time())
        try:
            await client.wait_server_info(left)
        except TimeoutError as e:
            if client.error is not None:
                raise client.error from None
            raise e
    except Exception as e:
        client.abort()
        if isinstance(e, TimeoutError) and not isinstance(e, DerpConnectionError):
            e = DerpTimeoutError(f"{node.url}: timed out waiting for ServerInfo")
        raise derp_failure(e, dial, node.port, stage="admission", mesh_key=env.mesh_key is not None,
                           timeout=timeout, node=node.name) from None
    if client.server_key is not None:
        env.saw_key(node.name, client.server_key.raw.hex())
    return client
