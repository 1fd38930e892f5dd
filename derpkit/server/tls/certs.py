"""Where the server's TLS certificate comes from: derper's three ``-certmode`` values.

Every provider hands ``derpkit serve`` one ``ssl.SSLContext`` for the main listener. That
context never changes; its SNI callback checks the server name the way derper does and then
switches the connection to the context that holds the *current* certificate. Replacing that
inner context is how a new certificate reaches new connections without a restart, while
connections already open keep theirs.

Each inner context presents the real chain followed by the DERP meta-certificate (spec
derp-protocol §1.5): a throw-away Ed25519 certificate whose CN is ``derpkey<server key hex>``.
Go clients that see it over TLS 1.3 skip a round trip ("fast start").

* ``manual``: ``<certdir>/<name>.crt`` and ``.key``, ``<name>`` being ``-hostname`` with every
  character outside ``[A-Za-z0-9.-]`` removed, as derper does. An IP ``-hostname`` without
  those files gets a self-signed certificate written there (kept across restarts) and the
  ``CertName`` line derper prints. Beyond derper: the files are watched (mtime, every few
  seconds, and on SIGHUP) and a valid replacement is used for new connections.
* ``letsencrypt`` / ``gcp``: ACME through certbot's ``acme`` library, HTTP-01 answered on the
  port-80 listener, certificates cached in certdir (autocert's file layout for host names,
  derper's ``<ip>.crt``/``.key`` layout for ``-acme-ip-certs``) and renewed before expiry.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import ssl
import tempfile
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from derpkit.atomicfile import write_atomic
from derpkit.gosyntax import format_duration
from derpkit.protocol.constants import PROTOCOL_VERSION
from derpkit.server import metrics

if TYPE_CHECKING:
    from derpkit.protocol.keys import NodePublic
    from derpkit.server.config import ServeConfig

log = logging.getLogger("derpkit.serve")

META_CERT_CN_PREFIX = "derpkey"
ALPN = ["http/1.1"]
LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
GCP_DIRECTORY = "https://dv.acme-v02.api.pki.goog/directory"
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
DERPMAP_HELP = "(https://tailscale.com/s/custom-derp)"
_UNSAFE_CHARS = re.compile(r"[^a-zA-Z0-9.\-]")
_PROD_HOST_RE = re.compile(r"^derp([^.]*)\.tailscale\.com\.?$")
#: How often manual certificate files are checked for a replacement (seconds).
POLL_INTERVAL = float(os.environ.get("DERPKIT_CERT_POLL_INTERVAL", "5") or 5)


class CertProviderError(Exception):
    """The provider cannot start; app.py prefixes ``derper: can not start cert provider:``."""


# --- small facts shared with the tests and the health check --------------------------------


def safe_name(hostname: str) -> str:
    """derper's file stem for ``-hostname``: characters outside ``[A-Za-z0-9.-]`` dropped."""
    return _UNSAFE_CHARS.sub("", hostname)


def parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP literal as Go's ``net.ParseIP`` sees it (no zone, no brackets), else None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
        return None
    return ip


def cert_name(der: bytes) -> str:
    """The DERP-map ``CertName`` pin of a leaf: ``sha256-raw:`` + hex SHA-256 of its DER."""
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def derp_node_json(hostname: str, cert_name_value: str = "") -> str:
    """The DERP-map node snippet derper logs: compact, derper's field order."""
    node: dict[str, Any] = {"Name": "custom", "RegionID": 900, "HostName": hostname}
    if cert_name_value:
        node["CertName"] = cert_name_value
    return json.dumps(node, separators=(",", ":"))


def manual_paths(certdir: str, hostname: str) -> tuple[str, str]:
    stem = safe_name(hostname)
    return os.path.join(certdir, stem + ".crt"), os.path.join(certdir, stem + ".key")


def go_time(t: dt.datetime) -> str:
    """A UTC time as Go's ``time.Time`` prints it (``2026-01-02 15:04:05 +0000 UTC``)."""
    return t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S +0000 UTC")


def verify_hostname(cert: x509.Certificate, hostname: str) -> None:
    """Go's ``x509.Certificate.VerifyHostname``: SANs only, one-label wildcards, IP SANs for
    IP names. Raises ValueError with Go's wording."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = san.get_values_for_type(x509.DNSName)
        ips = san.get_values_for_type(x509.IPAddress)
    except x509.ExtensionNotFound:
        dns_names, ips = [], []
    host = hostname
    if len(host) >= 3 and host[0] == "[" and host[-1] == "]":
        host = host[1:-1]
    ip = parse_ip(host)
    if ip is not None:
        if not ips:
            raise ValueError(
                f"x509: cannot validate certificate for {host} because it doesn't contain any IP SANs"
            )
        for cand in ips:
            if cand == ip or (
                isinstance(cand, ipaddress.IPv6Address) and cand.ipv4_mapped == ip
            ):
                return
        raise ValueError(f"x509: certificate is valid for {', '.join(map(str, ips))}, not {host}")
    want = host.lower().rstrip(".")
    for pattern in dns_names:
        if _match_hostname(pattern.lower().rstrip("."), want):
            return
    if not dns_names:
        raise ValueError(f"x509: certificate is not valid for any names, but wanted to match {hostname}")
    raise ValueError(f"x509: certificate is valid for {', '.join(dns_names)}, not {hostname}")


def _match_hostname(pattern: str, host: str) -> bool:
    if pattern == host:
        return bool(host)
    p_labels, h_labels = pattern.split("."), host.split(".")
    if len(p_labels) != len(h_labels) or len(p_labels) < 3 or p_labels[0] != "*":
        return False
    return bool(h_labels[0]) and p_labels[1:] == h_labels[1:]


def make_meta_cert(server_key: NodePublic, now: dt.datetime | None = None) -> bytes:
    """derper's meta-certificate (DER): CN ``derpkey<hex>``, serial = protocol version,
    valid ±30 days, fresh Ed25519 key, only a Basic Constraints extension."""
    now = now or dt.datetime.now(dt.UTC)
    key = ed25519.Ed25519PrivateKey.generate()
    # 71 characters: longer than X.520's 64-character CN bound, which Go does not enforce.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(NameOID.COMMON_NAME, META_CERT_CN_PREFIX + server_key.hex(), _validate=False)
    name = x509.Name([cn])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.DER)


def make_self_signed_ip_cert(ip_text: str, now: dt.datetime | None = None) -> tuple[bytes, bytes]:
    """derper's self-signed certificate for an IP hostname: (cert PEM, SEC1 key PEM)."""
    ip = ipaddress.ip_address(ip_text)
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip_text)])
    try:
        not_after = now.replace(year=now.year + 1)
    except ValueError:  # 29 February: Go's AddDate normalises to 1 March
        not_after = now.replace(year=now.year + 1, month=3, day=1)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(os.urandom(16)))
        .not_valid_before(now)
        .not_valid_after(not_after)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ip)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
    return cert_pem, key_pem


def _pem_certs(data: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError("tls: failed to find any PEM data in certificate input") from None


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class LoadedCert:
    """A certificate chain and its key, ready to become an SSL context."""

    chain: list[x509.Certificate]
    key_pem: bytes

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def leaf_der(self) -> bytes:
        return _der(self.chain[0])

    @property
    def not_after(self) -> dt.datetime:
        return self.leaf.not_valid_after_utc

    @property
    def not_before(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc


def server_context(chain_ders: list[bytes], key_pem: bytes, meta_der: bytes | None) -> ssl.SSLContext:
    """A TLS server context presenting ``chain_ders`` (+ the meta-certificate last)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    pem = b"".join(ssl.DER_cert_to_PEM_cert(d).encode() for d in chain_ders)
    if meta_der is not None:
        pem += ssl.DER_cert_to_PEM_cert(meta_der).encode()
    with tempfile.TemporaryDirectory(prefix="derpkit-tls-") as tmp:
        cpath, kpath = os.path.join(tmp, "chain.pem"), os.path.join(tmp, "key.pem")
        with open(cpath, "wb") as f:
            f.write(pem)
        fd = os.open(kpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        try:
            ctx.load_cert_chain(cpath, kpath)
        except ssl.SSLError as e:
            if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
                raise ValueError("tls: private key does not match public key") from None
            raise ValueError(f"tls: {e.reason or e}") from None
    return ctx


# --- the provider interface --------------------------------------------------------------------


class CertProvider:
    """One ``-certmode``. Subclasses fill ``self._current`` (the inner context)."""

    mode = ""

    def __init__(self, hostname: str, certdir: str) -> None:
        self.hostname = hostname
        self.certdir = certdir
        self.host_ip = parse_ip(hostname)
        self.meta_der: bytes | None = None
        self._current: ssl.SSLContext | None = None
        self._listener: ssl.SSLContext | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self.handshakes_refused = 0
        self.reloads: dict[str, int] = {"ok": 0, "error": 0}
        self.not_after: dict[str, float] = {}

    # The listener context: fixed for the life of the server.
    def ssl_context(self, server_key: NodePublic) -> ssl.SSLContext:
        self.meta_der = make_meta_cert(server_key)
        self._rebuild()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(ALPN)
        ctx.sni_callback = self._sni
        self._listener = ctx
        return ctx

    def _rebuild(self) -> None:
        """(Re)build the inner context(s) from what is loaded; called when meta_der is known."""

    def _context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The inner context for this SNI, or None to refuse the handshake."""
        return self._current

    def _sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        try:
            ctx = self._context_for(server_name)
        except Exception:  # a callback that raises would kill the handshake noisily
            log.exception("tls: choosing a certificate")
            ctx = None
        if ctx is None:
            self.handshakes_refused += 1
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        sslobj.context = ctx
        return None

    # HTTP-01: path -> key authorization, for the port-80 listener.
    def acme_http01(self, host: str, path: str) -> tuple[int, str] | None:
        """Answer for ``/.well-known/acme-challenge/...`` or None when this mode has none."""
        return None

    def reload(self) -> None:
        """SIGHUP: look for a replaced certificate now."""

    async def start(self) -> None:
        """Background work (file watching, ACME issuance and renewal)."""

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()

    def metrics(self) -> Iterable[metrics.Family]:
        na = metrics.Family(
            "derpkit_tls_cert_not_after_seconds", "gauge",
            "expiry (Unix time) of the certificate served, by name",
        )
        for name, t in sorted(self.not_after.items()):
            na.add(t, name=name)
        yield na
        rl = metrics.Family("derpkit_tls_cert_reloads", "counter", "certificate loads after start-up, by result")
        for result, v in sorted(self.reloads.items()):
            rl.add(v, result=result)
        yield rl
        yield metrics.counter(
            "derpkit_tls_handshakes_refused", self.handshakes_refused,
            "TLS handshakes refused for a server name (SNI) that has no certificate",
        )


# --- manual ------------------------------------------------------------------------------------


class ManualCertProvider(CertProvider):
    """``-certmode manual``: files from certdir, self-signed for IP hostnames, hot reload."""

    mode = "manual"

    def __init__(self, certdir: str, hostname: str, poll_interval: float = POLL_INTERVAL) -> None:
        super().__init__(hostname, certdir)
        self.crt_path, self.key_path = manual_paths(certdir, hostname)
        self.poll_interval = poll_interval
        self.loaded = self._initial_load()
        self._stamp = self._file_stamp()
        self._bad_stamp: tuple[Any, ...] | None = None
        self._log_cert_name(self.loaded)

    def _file_stamp(self) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in (self.crt_path, self.key_path):
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _read(self) -> LoadedCert:
        with open(self.crt_path, "rb") as f:
            crt = f.read()
        with open(self.key_path, "rb") as f:
            key = f.read()
        chain = _pem_certs(crt)
        if self.host_ip is not None:
            # A CertName pin accepts exactly one non-meta certificate: send the leaf alone.
            chain = chain[:1]
        loaded = LoadedCert(chain, key)
        server_context([loaded.leaf_der], key, None)  # key matches, key parses
        return loaded

    def _initial_load(self) -> LoadedCert:
        stem = safe_name(self.hostname)
        try:
            loaded = self._read()
        except FileNotFoundError as e:
            if self.host_ip is None:
                raise CertProviderError(
                    f"can not load x509 key pair for hostname {json.dumps(stem)}: "
                    f"open {e.filename}: no such file or directory"
                ) from None
            loaded = self._create_self_signed()
        except (OSError, ValueError) as e:
            raise CertProviderError(
                f"can not load x509 key pair for hostname {json.dumps(stem)}: {_err_text(e)}"
            ) from None
        try:
            verify_hostname(loaded.leaf, self.hostname)
        except ValueError as e:
            raise CertProviderError(f"cert invalid for hostname {json.dumps(self.hostname)}: {e}") from None
        return loaded

    def _create_self_signed(self) -> LoadedCert:
        cert_pem, key_pem = make_self_signed_ip_cert(self.hostname)
        try:
            os.makedirs(self.certdir, mode=0o700, exist_ok=True)
            write_atomic(self.crt_path, cert_pem, 0o644)
            write_atomic(self.key_path, key_pem, 0o600)
        except OSError as e:
            raise CertProviderError(
                f"can not load x509 key pair for hostname {json.dumps(safe_name(self.hostname))}: "
                f"failed to write certificate to {self.crt_path}: {_err_text(e)}"
            ) from None
        log.info("derpkit: wrote a self-signed certificate for %s to %s", self.hostname, self.crt_path)
        return LoadedCert(_pem_certs(cert_pem), key_pem)

    def _log_cert_name(self, loaded: LoadedCert) -> None:
        if self.host_ip is None:
            return
        log.info(
            "Using self-signed certificate for IP address %s. Configure it in DERPMap using: %s\n  %s",
            json.dumps(self.hostname), DERPMAP_HELP, derp_node_json(self.hostname, cert_name(loaded.leaf_der)),
        )

    @property
    def cert_name(self) -> str:
        return cert_name(self.loaded.leaf_der)

    def _rebuild(self) -> None:
        self._current = server_context([_der(c) for c in self.loaded.chain], self.loaded.key_pem, self.meta_der)
        self.not_after = {self.hostname: self.loaded.not_after.timestamp()}

    def _context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        # derper: a DNS hostname needs SNI equal to it, byte for byte; an IP hostname takes
        # any SNI (clients do not send IP literals as SNI).
        if self.host_ip is None and server_name != self.hostname:
            return None
        return self._current

    def reload(self, *, force: bool = True) -> bool:
        """Load the files again if they changed (or always, with ``force``). True if a new
        certificate is now served."""
        stamp = self._file_stamp()
        if not force and (stamp == self._stamp or stamp == self._bad_stamp):
            return False
        try:
            loaded = self._read()
            verify_hostname(loaded.leaf, self.hostname)
        except (OSError, ValueError) as e:
            if stamp != self._bad_stamp or force:
                log.warning(
                    "derpkit: certificate reload from %s failed, keeping the current one: %s",
                    self.crt_path, _err_text(e),
                )
                self.reloads["error"] += 1
            self._bad_stamp = stamp
            return False
        self._stamp = stamp
        self._bad_stamp = None
        if loaded.leaf_der == self.loaded.leaf_der and loaded.key_pem == self.loaded.key_pem:
            return False
        self.loaded = loaded
        if self.meta_der is not None:
            self._rebuild()
        self.reloads["ok"] += 1
        log.info(
            "derpkit: loaded new certificate from %s (%s, expires %s)",
            self.crt_path, cert_name(loaded.leaf_der), go_time(loaded.not_after),
        )
        self._log_cert_name(loaded)
        return True

    async def start(self) -> None:
        if self.poll_interval > 0:
            self._tasks.append(asyncio.get_running_loop().create_task(self._watch()))

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                self.reload(force=False)
            except Exception:  # never let the watcher die
                log.exception("derpkit: certificate watcher")


def _err_text(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError) and e.filename:
        return f"open {e.filename}: no such file or directory"
    if isinstance(e, OSError) and e.filename:
        return f"open {e.filename}: {e.strerror}"
    return str(e)


# --- ACME (letsencrypt, gcp, -acme-ip-certs) ---------------------------------------------------


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )


def decode_eab_key(text: str) -> bytes:
    """derper's rule: base64url without padding first, then standard padded base64."""
    try:
        if "=" not in text:
            return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except ValueError:
        pass
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise CertProviderError("invalid base64 encoding for EAB key") from None


@dataclass
class _Entry:
    """One name the ACME provider keeps a certificate for."""

    ident: str  # host name or IP text
    is_ip: bool
    cert: LoadedCert | None = None
    ctx: ssl.SSLContext | None = None
    next_attempt: float = 0.0
    retry_delay: float = 0.0


class AcmeCertProvider(CertProvider):
    """``-certmode letsencrypt`` / ``gcp`` and ``-acme-ip-certs``.

    Unlike derper, which asks the CA during the first handshake that needs a certificate,
    certificates are requested in the background as soon as the server starts, and a
    handshake that arrives before one exists is refused. A handshake cannot wait for a CA
    in Python's ``ssl`` (the SNI callback is synchronous), and asking early means the first
    client does not pay for issuance.
    """

    mode = "letsencrypt"
    #: derper's IP-certificate manager: retries back off from 1 min to 30 min.
    first_retry = 60.0
    max_retry = 1800.0
    issue_timeout = 180.0

    def __init__(
        self,
        cfg: ServeConfig,
        *,
        directory_url: str = "",
        renew_before: float = 0.0,
        ip_addresses: list[str] | None = None,
        eab: tuple[str, bytes] | None = None,
    ) -> None:
        super().__init__(cfg.hostname, cfg.certdir)
        self.mode = cfg.certmode
        self.directory_url = directory_url or (GCP_DIRECTORY if cfg.certmode == "gcp" else LETSENCRYPT_DIRECTORY)
        self.renew_before = renew_before
        self.email = cfg.acme_email or ("security@tailscale.com" if cfg.hostname == "derp.tailscale.com" else "")
        self.eab = eab
        self.tokens: dict[str, str] = {}
        self.issued: dict[str, int] = {"ok": 0, "error": 0}
        self.entries: dict[str, _Entry] = {}
        if self.host_ip is None:
            self.entries[cfg.hostname] = _Entry(cfg.hostname, False)
        self.ip_certs = cfg.acme_ip_certs
        if self.ip_certs:
            for ip in ip_addresses or local_ip_addresses(cfg.listen_host):
                self.entries[str(ipaddress.ip_address(ip))] = _Entry(str(ipaddress.ip_address(ip)), True)
        try:
            os.makedirs(self.certdir, mode=0o700, exist_ok=True)
        except OSError as e:
            raise CertProviderError(f"{_err_text(e)}") from None
        self._account_keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        for e in self.entries.values():
            self._load_cached(e)

    # names and files
    def _account_key_path(self, is_ip: bool) -> str:
        # derper's IP manager and autocert keep their account keys under different names.
        return os.path.join(self.certdir, "acme-account.key" if is_ip else "acme_account+key")

    def _account_key(self, is_ip: bool) -> ec.EllipticCurvePrivateKey:
        path = self._account_key_path(is_ip)
        if path in self._account_keys:
            return self._account_keys[path]
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path}: not an EC key")
        except FileNotFoundError:
            key = ec.generate_private_key(ec.SECP256R1())
            write_atomic(path, _key_pem(key), 0o600)
        self._account_keys[path] = key
        return key

    def _cache_paths(self, e: _Entry) -> tuple[str, str | None]:
        if e.is_ip:
            base = e.ident.replace(":", ".")
            return os.path.join(self.certdir, base + ".crt"), os.path.join(self.certdir, base + ".key")
        # autocert's DirCache entry: key PEM then the chain, in one file named after the host.
        return os.path.join(self.certdir, e.ident), None

    def _load_cached(self, e: _Entry) -> None:
        crt, key = self._cache_paths(e)
        try:
            with open(crt, "rb") as f:
                data = f.read()
            if key is not None:
                with open(key, "rb") as f:
                    key_pem = f.read()
            else:
                key_pem = _first_key_block(data)
            chain = _pem_certs(data)
            loaded = LoadedCert(chain, key_pem)
            now = dt.datetime.now(dt.UTC)
            if not (loaded.not_before <= now < loaded.not_after):
                return
            verify_hostname(loaded.leaf, e.ident)
        except (OSError, ValueError):
            return
        e.cert = loaded
        self.not_after[e.ident] = loaded.not_after.timestamp()
        log.info("derper: acme: loaded cached cert for %s (expires %s)", e.ident, go_time(loaded.not_after))

    def _save(self, e: _Entry, loaded: LoadedCert) -> None:
        crt, key = self._cache_paths(e)
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in loaded.chain)
        if key is not None:
            write_atomic(key, loaded.key_pem, 0o600)
            write_atomic(crt, chain_pem, 0o644)
        else:
            write_atomic(crt, loaded.key_pem + chain_pem, 0o600)

    # contexts
    def _rebuild(self) -> None:
        for e in self.entries.values():
            if e.cert is not None:
                e.ctx = server_context([_der(c) for c in e.cert.chain], e.cert.key_pem, self.meta_der)

    def _host_allowed(self, name: str) -> bool:
        if self.hostname == "derp.tailscale.com":
            return bool(_PROD_HOST_RE.match(name))
        return name == self.hostname

    def _context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name and parse_ip(server_name) is None:
            if self.host_ip is not None or not self._host_allowed(server_name):
                return None
            e = self.entries.get(self.hostname)
            return e.ctx if e else None
        if not self.ip_certs:
            return None  # autocert: no SNI, no certificate
        ips = [e for e in self.entries.values() if e.is_ip and e.ctx is not None]
        if server_name:
            want = str(ipaddress.ip_address(server_name))
            ips = [e for e in ips if e.ident == want]
        return ips[0].ctx if ips else None

    def acme_http01(self, host: str, path: str) -> tuple[int, str] | None:
        if not path.startswith(CHALLENGE_PREFIX):
            return None
        if host.startswith("[") and "]" in host:
            name = host[1 : host.index("]")]
        else:
            name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if parse_ip(name) is None and not self._host_allowed(name):
            return 403, "acme/autocert: host not configured"
        answer = self.tokens.get(path)
        if answer is None:
            return 404, "404 page not found"
        return 200, answer

    # renewal
    def _renew_at(self, e: _Entry) -> float:
        """When the certificate of ``e`` is due: ``-acme-renew-before`` ahead of expiry if set,
        else derper's rules: a third of the lifetime for IP certificates, and autocert's
        30 days (at most a third of the lifetime) for host names."""
        assert e.cert is not None
        start, end = e.cert.not_before.timestamp(), e.cert.not_after.timestamp()
        if self.renew_before > 0:
            return end - self.renew_before
        third = (end - start) / 3
        return end - (third if e.is_ip else min(30 * 86400.0, third))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for e in self.entries.values():
            self._tasks.append(loop.create_task(self._maintain(e)))

    async def _maintain(self, e: _Entry) -> None:
        while True:
            now = time.time()
            if e.cert is not None and now < self._renew_at(e):
                await asyncio.sleep(min(3600.0, self._renew_at(e) - now))
                continue
            if now < e.next_attempt:
                await asyncio.sleep(e.next_attempt - now)
                continue
            try:
                loaded = await asyncio.wait_for(asyncio.to_thread(self._issue, e), self.issue_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as err:  # noqa: BLE001 - every failure is logged and retried
                self.issued["error"] += 1
                e.retry_delay = e.retry_delay or self.first_retry
                e.next_attempt = time.time() + e.retry_delay
                log.warning(
                    "derper: acme: getting cert for %s: %s (next attempt in %s)",
                    e.ident, _acme_err(err), format_duration(round(e.retry_delay) * 1_000_000_000),
                )
                e.retry_delay = min(e.retry_delay * 2, self.max_retry)
                continue
            e.retry_delay = 0.0
            e.next_attempt = 0.0
            self.issued["ok"] += 1
            try:
                self._save(e, loaded)
            except OSError as err:
                log.warning("derpkit: acme: cannot cache the certificate for %s: %s", e.ident, err)
            e.cert = loaded
            if self.meta_der is not None:
                e.ctx = server_context([_der(c) for c in loaded.chain], loaded.key_pem, self.meta_der)
            self.not_after[e.ident] = loaded.not_after.timestamp()
            if e.is_ip:
                log.info(
                    "derper: acme: got cert for %s (expires %s). Configure it in DERPMap using %s:\n  %s",
                    e.ident, go_time(loaded.not_after), DERPMAP_HELP, derp_node_json(e.ident),
                )
            else:
                log.info("derpkit: acme: got cert for %s (expires %s)", e.ident, go_time(loaded.not_after))

    def _issue(self, e: _Entry) -> LoadedCert:
        """Register (or find) the account, order, answer HTTP-01, finalize. Runs in a thread."""
        import josepy as jose
        from acme import challenges, client, crypto_util, errors, messages

        account_key = self._account_key(e.is_ip)
        jwk = jose.JWKEC(key=account_key)
        net = client.ClientNetwork(jwk, alg=jose.ES256, user_agent="derpkit (tailscale-derper compatible)", timeout=30)
        directory = client.ClientV2.get_directory(self.directory_url, net)
        acme = client.ClientV2(directory, net)
        eab = None
        if self.eab is not None:
            kid, hmac_key = self.eab
            eab = messages.ExternalAccountBinding.from_data(
                account_public_key=jwk.public_key(), kid=kid,
                hmac_key=base64.urlsafe_b64encode(hmac_key).rstrip(b"=").decode(), directory=directory,
            )
        reg = messages.NewRegistration.from_data(
            email=self.email or None, terms_of_service_agreed=True, external_account_binding=eab,
        )
        try:
            regr = acme.new_account(reg)
        except errors.ConflictError as conflict:
            regr = acme.query_registration(
                messages.RegistrationResource(uri=conflict.location, body=messages.Registration())
            )
        net.account = regr

        cert_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = _key_pem(cert_key)
        if e.is_ip:
            csr = crypto_util.make_csr(key_pem, ipaddrs=[ipaddress.ip_address(e.ident)])
        else:
            csr = crypto_util.make_csr(key_pem, domains=[e.ident])
        profile = None
        profiles = getattr(directory.meta, "profiles", None) or {}
        if e.is_ip and "shortlived" in profiles:
            profile = "shortlived"
        order = acme.new_order(csr, profile=profile)
        paths: list[str] = []
        try:
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                chall = next(
                    (c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None
                )
                if chall is None:
                    raise RuntimeError(f"no http-01 challenge offered for {e.ident}")
                response, validation = chall.response_and_validation(jwk)
                path = chall.chall.path
                self.tokens[path] = validation
                paths.append(path)
                acme.answer_challenge(chall, response)
            deadline = dt.datetime.now() + dt.timedelta(seconds=self.issue_timeout - 10)
            order = acme.poll_and_finalize(order, deadline)
        finally:
            for p in paths:
                self.tokens.pop(p, None)
        chain = _pem_certs(order.fullchain_pem.encode())
        verify_hostname(chain[0], e.ident)
        return LoadedCert(chain, key_pem)

    def metrics(self) -> Iterable[metrics.Family]:
        yield from super().metrics()
        fam = metrics.Family("derpkit_acme_orders", "counter", "ACME certificate orders, by result")
        for result, v in sorted(self.issued.items()):
            fam.add(v, result=result)
        yield fam


def _first_key_block(data: bytes) -> bytes:
    m = re.search(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.*?-----END \1-----\n?", data, re.S)
    if not m:
        raise ValueError("no private key in cache entry")
    return m.group(0)


def _acme_err(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text.replace("\n", " ")


def local_ip_addresses(listen_host: str) -> list[str]:
    """The addresses ``-acme-ip-certs`` gets certificates for: ``-a``'s IP when it names one,
    otherwise the machine's primary IPv4 and IPv6 source addresses (found by routing a UDP
    socket, which sends nothing)."""
    ip = parse_ip(listen_host.strip("[]")) if listen_host else None
    if ip is not None and not ip.is_unspecified:
        return [str(ip)]
    import socket

    out: list[str] = []
    for fam, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                addr = s.getsockname()[0]
        except OSError:
            continue
        a = ipaddress.ip_address(addr)
        if not (a.is_loopback or a.is_link_local or a.is_unspecified):
            out.append(str(a))
    return out


# --- choosing a provider ------------------------------------------------------------------------


def build_cert_provider(cfg: ServeConfig) -> CertProvider:
    """derper's ``certProviderByCertMode`` (spec §2.1). Raises CertProviderError."""
    from derpkit.server.config import cert_refusal

    reason = cert_refusal(cfg)
    if reason:
        raise CertProviderError(reason)
    if cfg.certmode == "manual":
        return ManualCertProvider(cfg.certdir, cfg.hostname)
    eab = None
    if cfg.certmode == "gcp":
        eab = (cfg.acme_eab_kid, decode_eab_key(cfg.acme_eab_key))
    try:
        import acme  # noqa: F401
        import josepy  # noqa: F401
    except ImportError:
        raise CertProviderError(
            f"-certmode {cfg.certmode} needs the 'acme' and 'josepy' packages "
            "(pip install 'derpkit[acme]')"
        ) from None
    return AcmeCertProvider(
        cfg,
        directory_url=cfg.acme_directory_url,
        renew_before=cfg.acme_renew_before,
        eab=eab,
    )


__all__ = [
    "AcmeCertProvider",
    "CertProvider",
    "CertProviderError",
    "ManualCertProvider",
    "build_cert_provider",
    "cert_name",
    "derp_node_json",
    "make_meta_cert",
    "make_self_signed_ip_cert",
    "manual_paths",
    "safe_name",
    "verify_hostname",
]
