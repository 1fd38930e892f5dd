"""What is under test and how to reach it: the URL, TLS trust, mesh key, STUN address.

Built once from the command line (or the pytest options) and shared read-only by every
case. Bad input raises ``TargetError`` with a message naming the flag, which the CLI prints
as one line.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from derpkit.client.conn import DerpURL, parse_url
from derpkit.client.tls import TLSPlan, plan_tls
from derpkit.gosyntax import join_host_port, parse_uint, split_host_port
from derpkit.protocol.keys import MeshKey


class TargetError(ValueError):
    """A flag or value the suite cannot use; the message says which."""


@dataclass(frozen=True)
class Target:
    url: str
    derp: DerpURL
    mesh_key: MeshKey | None = None
    cert_name: str | None = None
    insecure: bool = False
    stun: tuple[str, int] | None = None
    #: Run cases that wait for the server's own timers (keepalive 60-65 s, handshake 10 s).
    long: bool = False
    #: Default wait for "the server closes the connection" and "nothing arrives" checks.
    patience: float = 3.0
    quiet: float = 0.4
    #: How long to wait for an expected HTTP head or frame, and for a whole connect.
    io_timeout: float = 5.0
    connect_timeout: float = 8.0

    @property
    def tls(self) -> bool:
        return self.derp.tls

    @property
    def base_url(self) -> str:
        """scheme://host:port with no path, for the HTTP routes."""
        return f"{'https' if self.tls else 'http'}://{join_host_port(self.derp.host, self.derp.port)}"

    def tls_plan(self) -> TLSPlan:
        return plan_tls(self.derp.host, cert_name=self.cert_name, insecure=self.insecure)

    def ssl_context(self) -> ssl.SSLContext | None:
        return self.tls_plan().context if self.tls else None


def make_target(
    url: str,
    *,
    mesh_key_file: str | None = None,
    mesh_key: MeshKey | None = None,
    cert_name: str | None = None,
    insecure: bool = False,
    stun: str | None = None,
    long: bool = False,
) -> Target:
    """Check and combine the options; every refusal names its flag."""
    if "://" not in url:
        raise TargetError(f"URL {url!r}: want http://host[:port] or https://host[:port]")
    try:
        derp = parse_url(url)
    except ValueError as e:
        raise TargetError(str(e)) from None
    if derp.path.split("?", 1)[0] != "/derp":
        raise TargetError(f"URL {url!r}: the path must be /derp or empty, not {derp.path!r}")
    if cert_name and insecure:
        raise TargetError("--cert-name and --insecure cannot be used together")
    if (cert_name or insecure) and not derp.tls:
        raise TargetError(f"--cert-name/--insecure need an https:// URL, not {url!r}")
    if cert_name:
        try:
            plan_tls(derp.host, cert_name=cert_name)
        except ValueError as e:
            raise TargetError(f"--cert-name: {e}") from None
    if mesh_key_file:
        try:
            with open(mesh_key_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise TargetError(f"--mesh-key-file {mesh_key_file}: {e.strerror or e}") from None
        try:
            mesh_key = MeshKey.parse(text)
        except ValueError as e:
            raise TargetError(f"--mesh-key-file {mesh_key_file}: {e}") from None
    stun_addr = None
    if stun:
        try:
            host, port_s = split_host_port(stun)
            port = parse_uint(port_s, 16)
            if port == 0:
                raise ValueError("port 0")
        except ValueError as e:
            raise TargetError(f"--stun {stun!r}: want HOST:PORT ({e})") from None
        stun_addr = (host or "127.0.0.1", port)
    return Target(url, derp, mesh_key, cert_name, insecure, stun_addr, long)
