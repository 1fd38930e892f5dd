"""TLS settings for DERP connections, including DERP-map ``CertName`` pins.

A DERP-map node's ``CertName`` either pins the SHA-256 of the leaf certificate's DER bytes
(``sha256-raw:<hex>``, used for self-signed IP-address servers) or names the TLS server
name to verify against instead of the dial host. A pin replaces chain verification: the
certificate is typically self-signed, so the hash *is* the trust decision.

A DNS ``CertName`` is domain fronting, as Tailscale's client does it (spec derp-map §9): the
SNI stays the node's ``HostName`` (a fronting proxy routes by it) and the chain must be
valid for ``CertName``. Python's ``server_hostname`` is both SNI and the name checked, so
the chain is verified with the hostname check off and the name checked after the handshake
(``check_name``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass

from cryptography import x509

from derpkit.protocol.constants import META_CERT_CN_PREFIX
from derpkit.protocol.keys import NodePublic

from .errors import DerpCertificateError

SHA256_RAW_PREFIX = "sha256-raw:"


@dataclass(frozen=True, slots=True)
class TLSPlan:
    """How to set up TLS for one connection."""

    context: ssl.SSLContext
    server_name: str  # SNI (and, unless verify_name is set, the name the chain is checked for)
    pin_sha256: bytes | None = None  # leaf DER hash to require after the handshake
    #: domain fronting: the chain was verified without a name; the leaf must be valid for
    #: this name, checked after the handshake with ``check_name``
    verify_name: str | None = None


#: Contexts shared by every connection of the process, keyed by the trust settings they
#: were built from. Building a default context loads every system root (about 26 ms with
#: Debian's 144), and a probe cycle over a 100-node map opens ~900 connections: without
#: sharing that alone took 27 s of CPU per cycle. Nothing changes a context after it is
#: built, so one per setting is safe; tests that point SSL_CERT_FILE elsewhere get another.
_SHARED: dict[tuple[str, str | None, str | None], ssl.SSLContext] = {}


def _trust_key(kind: str) -> tuple[str, str | None, str | None]:
    return (kind, os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


def default_context() -> ssl.SSLContext:
    """The verifying client context (system roots, or SSL_CERT_FILE/SSL_CERT_DIR), shared."""
    key = _trust_key("default")
    ctx = _SHARED.get(key)
    if ctx is None:
        ctx = _SHARED[key] = ssl.create_default_context()
    return ctx


def unverified_context() -> ssl.SSLContext:
    """A shared context that checks nothing (pins are checked after the handshake)."""
    key = ("unverified", None, None)
    ctx = _SHARED.get(key)
    if ctx is None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # derper's floor too
        _SHARED[key] = ctx
    return ctx


def parse_pin(cert_name: str) -> bytes | None:
    """Return the pinned hash of a ``sha256-raw:`` CertName, or None for a server name."""
    if not cert_name.startswith(SHA256_RAW_PREFIX):
        return None
    text = cert_name[len(SHA256_RAW_PREFIX) :].strip()
    try:
        pin = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"CertName {cert_name!r}: not hexadecimal") from None
    if len(pin) != 32:
        raise ValueError(f"CertName {cert_name!r}: want 64 hex digits of SHA-256")
    return pin


def plan_tls(
    url_host: str,
    *,
    cert_name: str | None = None,
    insecure: bool = False,
    context: ssl.SSLContext | None = None,
) -> TLSPlan:
    """Decide the SSL context, SNI and pin.

    A caller-supplied context is used as is for ordinary verification; pins and
    ``insecure`` need verification off, so they get a fresh context rather than silently
    changing the caller's shared one.
    """
    if cert_name:
        pin = parse_pin(cert_name)
        if pin is not None:
            return TLSPlan(unverified_context(), url_host, pin)
        if insecure:
            return TLSPlan(unverified_context(), url_host)
        if cert_name == url_host:
            return TLSPlan(context or default_context(), url_host)
        return TLSPlan(_chain_only(context), url_host, verify_name=cert_name)
    if insecure:
        return TLSPlan(unverified_context(), url_host)
    return TLSPlan(context or default_context(), url_host)


def _chain_only(context: ssl.SSLContext | None) -> ssl.SSLContext:
    """A context that verifies the chain but not the name, trusting what ``context`` trusts.

    The caller's context is not changed (it may be shared); its CA certificates are copied
    into a fresh default context (which has the system roots as well). Without a caller's
    context the result depends only on the trust settings, so it is shared like the others.
    """
    key = _trust_key("chain-only")
    if context is None and key in _SHARED:
        return _SHARED[key]
    ctx = ssl.create_default_context()
    if context is not None:
        for der in context.get_ca_certs(binary_form=True):
            ctx.load_verify_locations(cadata=der)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if context is None:
        _SHARED[key] = ctx
    return ctx


def _name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 DNS-ID matching: case-insensitive, a ``*`` only as the whole left label."""
    p, n = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if p.startswith("*."):
        head, _, rest = n.partition(".")
        return bool(head) and rest == p[2:] and "." in p[2:]
    return p == n


def check_name(der: bytes | None, name: str, where: str) -> None:
    """Require the (already chain-verified) leaf to be valid for ``name`` (a CertName)."""
    if der is None:
        raise DerpCertificateError(f"{where}: server presented no certificate to check against CertName {name!r}")
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = x509.SubjectAlternativeName([])
    dns = san.get_values_for_type(x509.DNSName)
    ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    try:
        ok = str(ipaddress.ip_address(name)) in ips
    except ValueError:
        ok = any(_name_matches(d, name) for d in dns)
    if not ok:
        valid = ", ".join(dns + ips) or "no names"
        raise DerpCertificateError(
            f"{where}: TLS certificate is not valid for CertName {name!r} (it is valid for {valid})"
        )


def peer_der(ssl_object: object) -> bytes | None:
    """The leaf certificate (DER) of a TLS connection's ``ssl_object``, if there is one."""
    getpeercert = getattr(ssl_object, "getpeercert", None)
    return getpeercert(binary_form=True) if getpeercert is not None else None


def check_after_handshake(plan: TLSPlan, ssl_object: object, where: str) -> None:
    """What ``plan`` leaves to be checked once TLS is up: the CertName pin or name.

    Every TLS shell (the client, the conformance suite's connections) calls this with the
    connection's ``ssl_object``; ``DerpCertificateError`` says what did not match.
    """
    if plan.pin_sha256 is None and plan.verify_name is None:
        return
    der = peer_der(ssl_object)
    if plan.pin_sha256 is not None:
        check_pin(der, plan.pin_sha256, where)
    elif plan.verify_name is not None:
        check_name(der, plan.verify_name, where)


def check_pin(der: bytes | None, pin: bytes, where: str) -> None:
    """Compare the leaf certificate with a CertName pin, naming both hashes on mismatch."""
    if der is None:
        raise DerpCertificateError(
            f"{where}: server presented no certificate to check against the CertName pin"
        )
    got = hashlib.sha256(der).digest()
    if got != pin:
        raise DerpCertificateError(
            f"{where}: TLS certificate does not match the CertName pin: "
            f"want {SHA256_RAW_PREFIX}{pin.hex()}, server presented {SHA256_RAW_PREFIX}{got.hex()}"
        )


def meta_cert_server_key(ssl_object: object) -> NodePublic | None:
    """The server key from derper's TLS meta-certificate, as Go's client reads it.

    derper (and derpkit) append a certificate whose CN is ``derpkey<hex key>`` and whose
    serial is the protocol version to every chain. A client that finds it over TLS 1.3
    knows the server key before any DERP byte and can use fast start, saving a round trip.
    Python's public ``ssl`` API exposes only the leaf, so this reads the chain through the
    private ``get_unverified_chain`` that CPython has had since 3.10 (public from 3.13);
    wherever that is missing it returns None and the client does the ordinary upgrade.
    Go's conditions are kept: TLS 1.3 only, and a serial of at most 8 bits that is not 0.
    """
    version = getattr(ssl_object, "version", None)
    if version is None or version() != "TLSv1.3":
        return None
    inner = getattr(ssl_object, "_sslobj", ssl_object)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is None:
        return None
    try:
        chain = get_chain() or []
    except (ssl.SSLError, ValueError):
        return None
    for cert in chain:
        try:
            info = cert.get_info()
        except (AttributeError, ValueError):
            continue
        cn = next((v for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName"), "")
        if not cn.startswith(META_CERT_CN_PREFIX):
            continue
        try:
            key = NodePublic(bytes.fromhex(cn[len(META_CERT_CN_PREFIX):]))
            serial = int(info.get("serialNumber", "0"), 16)
        except ValueError:
            continue
        if 0 < serial < 256:
            return key
    return None
