"""From an exception or an observation to one line that names the cause.

Go's derpprobe reports the raw error (``dial tcp 127.0.0.1:443: connect: connection refused``)
and leaves the operator to guess what is misconfigured. Every function here returns a
:class:`~derpkit.probe.model.Failed` whose ``error`` stays close to that raw text (scripts and
people compare it with derpprobe's) and whose ``diagnosis`` says what to look at. The
``correlate`` pass adds what only several probes together show (IPv4 works, IPv6 does not;
one node answering with several server keys).
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import socket
import ssl
import warnings
from dataclasses import dataclass

from derpkit.client.errors import (
    DerpCertificateError,
    DerpConnectionError,
    DerpTimeoutError,
    DerpUpgradeError,
)
from derpkit.gosyntax import join_host_port
from derpkit.stun.client import StunClientError, StunTimeout, StunUnreachable

from .model import Failed, Probe

__all__ = ["cert_summary", "correlate", "derp_failure", "stun_failure", "tcp_failure", "tls_failure"]


def _fmt_age(seconds: float) -> str:
    s = abs(seconds)
    if s >= 2 * 86400:
        return f"{s / 86400:.0f} days"
    if s >= 7200:
        return f"{s / 3600:.0f} hours"
    if s >= 120:
        return f"{s / 60:.0f} minutes"
    return f"{s:.0f} s"


@dataclass(frozen=True, slots=True)
class CertSummary:
    """What an operator needs to recognise a certificate."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    pin: str
    self_signed: bool

    @property
    def names_text(self) -> str:
        return ", ".join(self.names) if self.names else f"CN={self.subject}"


def cert_summary(der: bytes) -> CertSummary | None:
    """Subject, names, dates and pin of a DER certificate (None if it cannot be parsed)."""
    from cryptography import x509

    try:
        c = x509.load_der_x509_certificate(der)
    except ValueError:
        return None
    names: list[str] = []
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(n) for n in san.get_values_for_type(x509.DNSName)]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    with warnings.catch_warnings():  # derper's meta-cert CN is longer than X.509 allows
        warnings.simplefilter("ignore")
        cn = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    icn = c.issuer.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return CertSummary(
        subject=str(cn[0].value) if cn else c.subject.rfc4514_string(),
        issuer=str(icn[0].value) if icn else c.issuer.rfc4514_string(),
        names=tuple(names),
        not_before=c.not_valid_before_utc,
        not_after=c.not_valid_after_utc,
        pin="sha256-raw:" + hashlib.sha256(der).hexdigest(),
        self_signed=c.subject == c.issuer,
    )


# --- TCP ---------------------------------------------------------------------------------------


def tcp_failure(exc: BaseException, host: str, port: int, timeout: float) -> Failed:
    """A TCP connect that did not work: refused, timed out, unreachable, or DNS."""
    where = join_host_port(host, port)
    if isinstance(exc, socket.gaierror):
        return Failed(
            f"lookup {host}: {exc.strerror or exc}",
            f"DNS: HostName {host!r} does not resolve; fix the name or set IPv4/IPv6 in the map",
        )
    if isinstance(exc, ConnectionRefusedError) or getattr(exc, "errno", None) == errno.ECONNREFUSED:
        return Failed(
            f"dial tcp {where}: connect: connection refused",
            f"TCP connection refused: the host is up but nothing listens on {where} "
            "(derper stopped, or the map's DERPPort is wrong)",
        )
    if isinstance(exc, TimeoutError):
        return Failed(
            f"dial tcp {where}: i/o timeout",
            f"TCP connect to {where} timed out after {timeout:g} s: packets are dropped on the way "
            "(firewall or security group, wrong address, host down)",
        )
    code = getattr(exc, "errno", None)
    if code in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return Failed(
            f"dial tcp {where}: connect: {exc.strerror if isinstance(exc, OSError) else exc}",
            f"no route to {host}: the address in the map is not reachable from here",
        )
    return Failed(f"dial tcp {where}: {exc}", f"TCP connect to {where} failed: {exc}")


# --- TLS ---------------------------------------------------------------------------------------


def tls_failure(
    exc: BaseException, host: str, port: int, presented: bytes | None, *, expect_name: str,
    timeout: float | None = None,
) -> Failed:
    """A TLS handshake or verification failure, explained with the certificate presented."""
    where = join_host_port(host, port)
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g} s" if timeout else ""
        return Failed(
            f"connecting to {where!r}: TLS handshake timeout",
            f"TCP to {where} works, but no TLS answer came{within}: the port does not speak "
            "TLS (a plain-HTTP derper waits silently for a request line), or something in "
            "front holds the connection",
        )
    error = f"connecting to {where!r}: {getattr(exc, 'verify_message', None) or exc}"
    info = cert_summary(presented) if presented else None
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        now = dt.datetime.now(dt.UTC)
        if code == 62 and info is not None:  # X509_V_ERR_HOSTNAME_MISMATCH (also IP mismatch)
            return Failed(
                error,
                f"certificate is for {info.names_text}, not {expect_name}: the server presents "
                "another name's certificate (wrong -hostname/cert file, or set CertName in the map)",
                presented_pin=info.pin,
            )
        if code == 64 and info is not None:  # X509_V_ERR_IP_ADDRESS_MISMATCH
            return Failed(
                error,
                f"certificate is for {info.names_text}, not the IP {expect_name}",
                presented_pin=info.pin,
            )
        if code == 10 and info is not None:  # CERT_HAS_EXPIRED
            return Failed(
                error,
                f"certificate expired {_fmt_age((now - info.not_after).total_seconds())} ago "
                f"(NotAfter {info.not_after:%Y-%m-%d %H:%M} UTC): renew it",
            )
        if code == 9 and info is not None:  # CERT_NOT_YET_VALID
            return Failed(
                error,
                f"certificate not valid until {info.not_before:%Y-%m-%d %H:%M} UTC "
                f"(in {_fmt_age((info.not_before - now).total_seconds())}): a clock is wrong here "
                "or on the server",
            )
        if code in (18, 19, 20, 21) and info is not None:
            what = "self-signed" if info.self_signed else f"issued by {info.issuer!r}, which this machine does not trust"
            return Failed(
                error,
                f"certificate for {info.names_text} is {what}: pin it in the map with "
                f'"CertName": "{info.pin}" or use a CA clients trust',
                presented_pin=info.pin,
            )
        return Failed(error, f"TLS verification failed: {exc.verify_message}")
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", "") or ""
        if reason in ("WRONG_VERSION_NUMBER", "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
            return Failed(
                f"connecting to {where!r}: {exc.strerror or exc}",
                f"{where} does not speak TLS (plain HTTP?): derper runs without TLS there, or "
                "another service owns the port",
            )
        return Failed(f"connecting to {where!r}: {exc}", f"TLS handshake with {where} failed: {reason or exc}")
    if isinstance(exc, (ConnectionResetError, EOFError, ssl.SSLEOFError)):
        return Failed(
            f"connecting to {where!r}: {exc or 'EOF'}",
            f"{where} accepted TCP but closed the connection during the TLS handshake "
            "(not a TLS server, or it rejects our SNI)",
        )
    return Failed(error, f"TLS to {where} failed: {exc}")


def pin_mismatch(host: str, port: int, want: str, got_der: bytes | None) -> Failed:
    got = "sha256-raw:" + hashlib.sha256(got_der).hexdigest() if got_der else "(no certificate)"
    return Failed(
        f"connecting to {join_host_port(host, port)!r}: TLS certificate does not match the CertName pin",
        f"pin mismatch: the map pins {want}, the server presents {got} "
        "(certificate regenerated? put the new CertName into the map)",
        presented_pin=got,
    )


# --- DERP connections --------------------------------------------------------------------------


def derp_failure(
    exc: BaseException, host: str, port: int, *, stage: str, mesh_key: bool, timeout: float, node: str
) -> Failed:
    """A DerpClient connect/admission failure; ``stage`` is connect / admission."""
    if isinstance(exc, Failed):
        return exc
    cause = exc.__cause__ if exc.__cause__ is not None else exc.__context__
    if isinstance(exc, DerpUpgradeError):
        return Failed(
            f"{exc}",
            f"TLS is fine but GET /derp answered HTTP {exc.status} without upgrading to DERP: "
            "an HTTP proxy or another web server is in front of derper (it must pass "
            "'Upgrade: DERP' through, or expose derper's port directly)",
            http_status=exc.status,
        )
    if isinstance(exc, DerpCertificateError):
        text = str(exc)
        if "server presented sha256-raw:" in text:
            got = text.rsplit("server presented ", 1)[1].strip()
            want = text.split("want ", 1)[1].split(",", 1)[0] if "want " in text else "?"
            return Failed(text, f"pin mismatch: the map pins {want}, the server presents {got} "
                          "(certificate regenerated? put the new CertName into the map)", presented_pin=got)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return tls_failure(cause, host, port, None, expect_name=host)
        return Failed(text, f"TLS certificate of {node} not accepted: {text}")
    if stage == "admission" and isinstance(exc, DerpConnectionError) and not isinstance(exc, DerpTimeoutError):
        if mesh_key:
            why = ("the server closed the connection after our ClientInfo, although we sent a mesh "
                   "key: the mesh key is not this server's (so it was checked as an ordinary "
                   "client, e.g. by --verify-clients, and refused)")
        else:
            why = ("the server closed the connection after our ClientInfo: it refuses unknown "
                   "clients (--verify-clients or -verify-client-url); give the prober the mesh "
                   "key (-mesh-psk-file) so it is admitted as a mesh peer")
        return Failed(f"rejected by {node} after the handshake: {exc}", why)
    if isinstance(exc, DerpTimeoutError):
        text = str(exc)
        if stage == "admission" or "ServerInfo" in text:
            return Failed(text, f"{node} accepted the DERP upgrade but never admitted us "
                          f"(no ServerInfo within {timeout:g} s): admission check hanging?")
        if "(TCP connect)" in text:
            return tcp_failure(TimeoutError(), host, port, timeout)
        if "(TLS handshake)" in text:
            return tls_failure(TimeoutError(), host, port, None, expect_name=host, timeout=timeout)
        return Failed(text, f"{node} did not finish the DERP handshake within {timeout:g} s ({text.rsplit('(', 1)[-1].rstrip(')')})")
    if isinstance(cause, (OSError,)) and not isinstance(cause, ssl.SSLError):
        return tcp_failure(cause, host, port, timeout)
    if isinstance(cause, ssl.SSLError):
        return tls_failure(cause, host, port, None, expect_name=host)
    return Failed(str(exc), f"DERP connection to {node} failed: {exc}")


# --- STUN --------------------------------------------------------------------------------------


def stun_failure(exc: BaseException, ip: str, port: int, family: str) -> Failed:
    where = join_host_port(ip, port)
    if isinstance(exc, StunUnreachable):
        if exc.kind == "refused":
            return Failed(
                f"error reading from {where}: read udp: connection refused",
                f"STUN port unreachable: {ip} answered ICMP port unreachable, so the host is up "
                f"but nothing listens on UDP {port} (STUN off with -stun=false, or STUNPort wrong)",
            )
        return Failed(f"error reading from {where}: {exc}", f"STUN: {exc}")
    if isinstance(exc, StunTimeout):
        return Failed(
            f"timeout reading from {where}: no reply after {exc.sent} requests",
            f"STUN silent: no reply and no ICMP error from {where} in {exc.timeout:g} s: UDP {port} "
            "is dropped on the way (firewall/security group) or the node is down",
        )
    if isinstance(exc, StunClientError):
        return Failed(f"STUN {where}: {exc}", f"STUN ({family}) to {where} failed: {exc}")
    return Failed(f"STUN {where}: {exc}", f"STUN ({family}) to {where} failed: {exc}")


# --- across probes -----------------------------------------------------------------------------


def correlate(probes: list[Probe], server_keys: dict[str, set[str]]) -> list[str]:
    """Add diagnoses that need several probes; return node-level warnings."""
    warnings: list[str] = []
    by_name = {p.name: p for p in probes}
    for p in probes:
        if p.cls != "derp_udp" or not p.name.endswith("/udp6") or p.last is None or p.last.ok:
            continue
        v4 = by_name.get(p.name[:-1])
        if v4 is not None and v4.last is not None and v4.last.ok:
            p.last.diagnosis = (
                "IPv4 STUN to this node works, IPv6 does not: " + (p.last.diagnosis or p.last.error)
                + " (check the IPv6 firewall and that the server listens on [::])"
            )
    for node, keys in sorted(server_keys.items()):
        if len(keys) > 1:
            short = ", ".join(sorted(k[:16] + "…" for k in keys))
            line = (f"node {node} answered with {len(keys)} different server keys ({short}): a load "
                    "balancer spreads its HostName over several derpers; clients need one derper per "
                    "DERPNode (or mesh them and list each as its own node)")
            warnings.append(line)
            for p in probes:
                if p.node == node and p.last is not None and not p.last.ok and "server key" not in p.last.diagnosis:
                    p.last.diagnosis = line + "; " + (p.last.diagnosis or p.last.error)
    return warnings

