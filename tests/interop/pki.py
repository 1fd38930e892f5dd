"""A throw-away test CA for interop tests, made with ``cryptography``.

Go programs trust it through ``SSL_CERT_FILE`` (Go's crypto/x509 reads that variable on
Linux); Python gets an ``ssl.SSLContext`` built from the same files. Nothing here touches
derpkit's own certificate code, on purpose: the tests must not depend on it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "derpkit interop tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Leaf:
    cert_path: Path
    key_path: Path
    der: bytes

    @property
    def cert_name(self) -> str:
        """The DERP-map ``CertName`` pin of this certificate (``sha256-raw:<hex>``)."""
        return "sha256-raw:" + hashlib.sha256(self.der).hexdigest()

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.load_cert_chain(self.cert_path, self.key_path)
        return ctx


@dataclass
class TestCA:
    __test__ = False  # not a pytest class

    dir: Path
    cert_path: Path
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, directory: Path) -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        name = _name("derpkit interop test CA")
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        path = directory / "ca.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(directory, path, key, cert)

    def issue(
        self,
        stem: str,
        dns: list[str],
        ips: list[str],
        *,
        directory: Path | None = None,
        not_before: dt.timedelta = dt.timedelta(hours=-1),
        not_after: dt.timedelta = dt.timedelta(days=20),
        crl_url: str | None = None,
        fullchain: bool = False,
    ) -> Leaf:
        """A server certificate signed by this CA, written as ``<stem>.crt``/``<stem>.key``
        (in ``directory``, default the CA's own), valid from now+``not_before`` to
        now+``not_after`` (either may be in the past). ``crl_url`` adds a CRL distribution
        point; ``fullchain`` writes the CA certificate after the leaf."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        where = directory if directory is not None else self.dir
        where.mkdir(parents=True, exist_ok=True)
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(dns[0] if dns else ips[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + not_before)
            # derpprobe's TLS probe fails certificates expiring within 7 days.
            .not_valid_after(now + not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            # derpprobe skips certificates whose SKI equals their AKI (it takes them for
            # self-signed meta certificates), so the leaf carries both, and they differ.
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if crl_url:
            builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
                [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        crt = where / f"{stem}.crt"
        keyp = where / f"{stem}.key"
        pem = cert.public_bytes(serialization.Encoding.PEM)
        if fullchain:
            pem += self.cert.public_bytes(serialization.Encoding.PEM)
        crt.write_bytes(pem)
        keyp.write_bytes(_pem_key(key))
        keyp.chmod(0o600)
        return Leaf(crt, keyp, cert.public_bytes(serialization.Encoding.DER))

    def crl(self, revoked: list[int]) -> bytes:
        """A DER CRL signed by this CA listing ``revoked`` serial numbers, next update in a day."""
        now = dt.datetime.now(dt.UTC)
        b = (x509.CertificateRevocationListBuilder().issuer_name(self.cert.subject)
             .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1)))
        for serial in revoked:
            b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                          .revocation_date(now - dt.timedelta(hours=2)).build())
        return b.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.cert_path))
        return ctx


def self_signed_ip(directory: Path, ip: str = "127.0.0.1") -> Leaf:
    """A self-signed certificate for an IP address, like derper's ``-certmode manual`` one."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ip)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    crt = directory / "ip.crt"
    keyp = directory / "ip.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyp.write_bytes(_pem_key(key))
    return Leaf(crt, keyp, cert.public_bytes(serialization.Encoding.DER))
