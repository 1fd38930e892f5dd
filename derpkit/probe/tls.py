"""The TLS probe (``derp/<rc>/<node>/tls``): is the node's certificate what clients accept?

derpprobe checks against system roots only and ignores ``CertName`` (Q1), so every
self-signed IP node fails it. Here the node is verified exactly as a Tailscale client does
(derp-map.md §10): ``sha256-raw:`` pins, a DNS ``CertName``, ``InsecureForTests``, system roots
otherwise (``SSL_CERT_FILE`` honoured). Then, like Go, every certificate presented except
derper's meta-certificate and self-signed roots is checked for NotBefore/NotAfter, and the
leaf's CRL when it names one.

Expiry warning: Go fails any certificate with less than 7 days left, which makes a 6-day IP
certificate "expiring" from birth. The window here is 7 days or a third of the
certificate's lifetime, whichever is shorter.

TCP and TLS are separate steps so a refused or silent port is never reported as a TLS error.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import ssl
import warnings
from typing import Any

from derpkit.client.tls import default_context, parse_pin, unverified_context
from derpkit.protocol.constants import META_CERT_CN_PREFIX

from .derpconn import ProbeEnv, _is_ip, presented_leaf
from .diagnose import _fmt_age, cert_summary, pin_mismatch, tcp_failure, tls_failure
from .dmap import Node
from .model import Failed

__all__ = ["EXPIRY_WINDOW", "expiry_window", "probe_tls"]

EXPIRY_WINDOW = dt.timedelta(days=7)
_ENCODING_DER = 2  # _ssl.ENCODING_DER


def expiry_window(not_before: dt.datetime, not_after: dt.datetime) -> dt.timedelta:
    """How close to NotAfter counts as "expiring": 7 days, or a third of a shorter lifetime."""
    return min(EXPIRY_WINDOW, (not_after - not_before) / 3)


def _chain(sslobj: Any) -> list[bytes]:
    """Every certificate the server sent, leaf first, as DER."""
    inner = getattr(sslobj, "_sslobj", sslobj)
    get_chain = getattr(inner, "get_unverified_chain", None)
    if get_chain is not None:
        with contextlib.suppress(ssl.SSLError, ValueError):
            return [c.public_bytes(_ENCODING_DER) for c in (get_chain() or [])]
    leaf = sslobj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def _handshake(host: str, port: int, ctx: ssl.SSLContext, sni: str | None, timeout: float) -> list[bytes]:
    """TCP connect, then TLS; Failed with the right diagnosis for each step."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as e:
        raise tcp_failure(e, host, port, timeout) from None
    try:
        async with asyncio.timeout(timeout):
            await writer.start_tls(ctx, server_hostname=sni)
        return _chain(writer.get_extra_info("ssl_object"))
    finally:
        writer.transport.abort()


async def probe_tls(node: Node, env: ProbeEnv, timeout: float) -> dict[str, Any]:
    host = node.dial_host() or node.host_name
    port = node.port
    pin = parse_pin(node.cert_name) if node.cert_name.startswith("sha256-raw:") else None
    check_name = node.cert_name if node.cert_name and pin is None else node.host_name
    sni = None if _is_ip(node.host_name) else node.host_name
    if pin is not None or node.insecure_for_tests:
        ctx = unverified_context()
    else:
        ctx = default_context()
    server_hostname = sni if ctx.verify_mode == ssl.CERT_NONE else check_name
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        chain = await _handshake(host, port, ctx, server_hostname, timeout)
    except Failed:
        raise
    except ssl.SSLError as e:
        presented = None
        if isinstance(e, ssl.SSLCertVerificationError):
            presented = await presented_leaf(host, port, sni, max(0.5, deadline - loop.time()))
        raise tls_failure(e, host, port, presented, expect_name=check_name) from None
    except (OSError, TimeoutError, EOFError) as e:
        raise tls_failure(e, host, port, None, expect_name=check_name, timeout=timeout) from None
    if not chain:
        raise Failed(f"connecting to {host}:{port}: no certificate presented", "the server sent no certificate")
    leaf = chain[0]
    if pin is not None and hashlib.sha256(leaf).digest() != pin:
        raise pin_mismatch(host, port, node.cert_name, leaf)
    details = _check_dates(chain, env, node)
    await check_crl(chain, max(0.5, deadline - loop.time()))
    return details


def _check_dates(chain: list[bytes], env: ProbeEnv, node: Node) -> dict[str, Any]:
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    problems: list[tuple[str, str]] = []
    details: dict[str, Any] = {}
    for i, der in enumerate(chain):
        try:
            c = x509.load_der_x509_certificate(der)
        except ValueError:
            continue
        with warnings.catch_warnings():  # derper's meta-cert CN is longer than X.509 allows
            warnings.simplefilter("ignore")
            cn = c.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        cn_text = str(cn[0].value) if cn else c.subject.rfc4514_string()
        if cn_text.startswith(META_CERT_CN_PREFIX):
            key_hex = cn_text[len(META_CERT_CN_PREFIX):]
            details["server_key"] = "nodekey:" + key_hex
            env.saw_key(node.name, key_hex)
            continue
        if i > 0 and c.subject == c.issuer:
            continue  # a root sent along; trust decided above
        nb, na = c.not_valid_before_utc, c.not_valid_after_utc
        if i == 0:
            info = cert_summary(der)
            details.update(subject=cn_text, not_after=na.isoformat(), pin=info.pin if info else "",
                           days_left=round((na - now).total_seconds() / 86400, 2))
        if nb > now:
            problems.append((
                f"one of the certs has NotBefore in the future ({nb:%Y-%m-%d %H:%M:%S} UTC): {cn_text}",
                f"certificate {cn_text!r} not valid until {nb:%Y-%m-%d %H:%M} UTC (in "
                f"{_fmt_age((nb - now).total_seconds())}): a clock is wrong here or on the server",
            ))
        elif na <= now:
            problems.append((
                f"one of the certs expired {_fmt_age((now - na).total_seconds())} ago: {cn_text}",
                f"certificate {cn_text!r} expired {_fmt_age((now - na).total_seconds())} ago "
                f"(NotAfter {na:%Y-%m-%d %H:%M} UTC): renew it",
            ))
        elif na - now < expiry_window(nb, na):
            left = _fmt_age((na - now).total_seconds())
            problems.append((
                f"one of the certs expires in {left}: {cn_text}",
                f"certificate {cn_text!r} expires in {left} (NotAfter {na:%Y-%m-%d %H:%M} UTC, lifetime "
                f"{_fmt_age((na - nb).total_seconds())}): renewal is not happening",
            ))
    if problems:
        raise Failed("\n".join(p[0] for p in problems), "; ".join(p[1] for p in problems), **details)
    return details


# --- revocation (CRL, as derpprobe) -----------------------------------------------------------

#: Let's Encrypt leaves issued from this day on must name a CRL (derpprobe.md §2.2).
LE_CRL_REQUIRED = dt.datetime(2025, 5, 7, tzinfo=dt.UTC)
_MAX_CRL = 10 << 20
#: url -> (CRL DER, time.time() until which it may be reused: its NextUpdate).
_crl_cache: dict[str, tuple[bytes, float]] = {}


async def _fetch_crl(url: str, timeout: float) -> bytes:
    import time

    import aiohttp

    hit = _crl_cache.get(url)
    if hit is not None and hit[1] > time.time():
        return hit[0]
    async with aiohttp.ClientSession() as s:
        async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                raise ValueError(f"fetching {url}: HTTP {r.status}")
            return await r.content.read(_MAX_CRL)


async def check_crl(chain: list[bytes], timeout: float) -> None:
    """Fail if the leaf is revoked by the first CRL it names (the CRL is cached until NextUpdate).

    As derpprobe: no CRL distribution point is fine, except for a Let's Encrypt leaf issued
    since 2025-05-07. Every problem is ``CRL verification failed for <subject>: <detail>``.
    """
    import aiohttp
    from cryptography import x509

    certs = []
    for der in chain:
        with contextlib.suppress(ValueError):
            certs.append(x509.load_der_x509_certificate(der))
    if not certs:
        return
    leaf = certs[0]
    subject = leaf.subject.rfc4514_string()
    try:
        dps = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        urls = [n.value for dp in dps for n in (dp.full_name or []) if isinstance(n, x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        urls = []
    if not urls:
        org = leaf.issuer.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        if org and org[0].value == "Let's Encrypt" and leaf.not_valid_before_utc >= LE_CRL_REQUIRED:
            raise Failed(f"no CRL server presented in leaf cert for {subject}",
                         "a Let's Encrypt certificate without a CRL URL: re-issue it")
        return

    def fail(detail: str, why: str) -> Failed:
        return Failed(f"CRL verification failed for {subject}: {detail}", why)

    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        aki = None
    issuer = None
    for c in certs[1:]:
        with contextlib.suppress(x509.ExtensionNotFound):
            if c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == aki:
                issuer = c
    if issuer is None:
        raise fail("issuer certificate not in the chain the server sent",
                   "the server does not send its intermediate certificate, so the CRL cannot be checked "
                   "(serve the full chain: fullchain.pem)")
    try:
        data = await _fetch_crl(urls[0], timeout)
        crl = x509.load_der_x509_crl(data) if data[:1] == b"\x30" else x509.load_pem_x509_crl(data)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
        raise fail(f"{e or type(e).__name__}", f"the certificate's CRL at {urls[0]} could not be read: {e}") from None
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise fail("CRL signature invalid", f"the CRL at {urls[0]} is not signed by the certificate's issuer")
    nxt = crl.next_update_utc
    if nxt is not None:
        _crl_cache[urls[0]] = (data, nxt.timestamp())
    revoked = crl.get_revoked_certificate_by_serial_number(leaf.serial_number)
    if revoked is not None:
        when = revoked.revocation_date_utc
        raise fail(f"cert for {subject} has been revoked on {when:%Y-%m-%d %H:%M:%S} UTC",
                   f"the certificate was revoked by its CA on {when:%Y-%m-%d}: issue a new one")
