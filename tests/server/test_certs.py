"""Certificates: derper's manual mode, self-signed IP certs and CertName, the meta-certificate,
SNI rules, hot reload. Real TLS handshakes on loopback, real files in a temp certdir."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtensionOID, NameOID
from OpenSSL import SSL

from derpkit.client import DerpClient
from derpkit.client.errors import DerpCertificateError, DerpConnectionError
from derpkit.protocol.keys import NodePrivate
from derpkit.server.config import ServeConfig
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs

from .serve_proc import start_serve

GO_DERPER = Path(os.environ.get("GOPATH", Path.home() / "go")) / "bin" / "derper"
# The meta-certificate's CN is 71 characters, over X.520's 64 that cryptography warns about.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
CERTNAME_RE = re.compile(r'\{"Name":"custom","RegionID":900,"HostName":"[^"]+","CertName":"(sha256-raw:[0-9a-f]{64})"\}')


# --- helpers --------------------------------------------------------------------------------------


def make_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derpkit test CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca, names: list[str], cn: str = "leaf") -> tuple[bytes, bytes]:
    """A leaf signed by ``ca`` for ``names`` (DNS or IP): (chain PEM with the CA, key PEM)."""
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for n in names:
        ip = certs.parse_ip(n)
        sans.append(x509.IPAddress(ip) if ip is not None else x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=10))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return chain, key_pem


def handshake(port: int, sni: str | None = None, max_tls12: bool = False) -> dict:
    """A blocking pyOpenSSL handshake that sees the whole chain the server sends."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if max_tls12:
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_alpn_protos([b"h2", b"http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        # pyOpenSSL wants a blocking socket; bound it with kernel timeouts instead.
        s.settimeout(None)
        for opt in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            s.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", 5, 0))
        conn = SSL.Connection(ctx, s)
        if sni:
            conn.set_tlsext_host_name(sni.encode())
        conn.set_connect_state()
        conn.do_handshake()
        chain = [c.to_cryptography() for c in conn.get_peer_cert_chain()]
        out = {
            "chain": chain,
            "version": conn.get_protocol_version_name(),
            "alpn": conn.get_alpn_proto_negotiated(),
            "leaf_sha256": hashlib.sha256(chain[0].public_bytes(serialization.Encoding.DER)).hexdigest(),
        }
        return out


async def ahandshake(port: int, sni: str | None = None, max_tls12: bool = False) -> dict:
    return await asyncio.to_thread(handshake, port, sni, max_tls12)


def manual_provider(certdir: str, hostname: str, poll: float = 0.0) -> certs.ManualCertProvider:
    return certs.ManualCertProvider(certdir, hostname, poll_interval=poll)


async def tls_node(provider: certs.CertProvider) -> DerpNode:
    key = NodePrivate.generate()
    ctx = provider.ssl_context(key.public())
    node = DerpNode(NodeOptions(ssl_context=ctx, private_key=key, stun_port=None, services=[provider]))
    await node.start()
    return node


# --- pure functions ---------------------------------------------------------------------------------


def test_file_names_follow_derper() -> None:
    assert certs.safe_name("derp.example.com") == "derp.example.com"
    assert certs.safe_name("2001:db8::1") == "2001db81"
    assert certs.safe_name("we!rd_host/../x") == "werdhost..x"
    assert certs.manual_paths("/c", "::1") == ("/c/1.crt", "/c/1.key")


def test_meta_certificate_fields() -> None:
    key = NodePrivate.generate().public()
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    cert = x509.load_der_x509_certificate(certs.make_meta_cert(key, now))
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "derpkey" + key.hex() and len(cn) == 71
    assert cert.issuer == cert.subject
    assert cert.serial_number == 2
    assert cert.not_valid_before_utc == now - dt.timedelta(days=30)
    assert cert.not_valid_after_utc == now + dt.timedelta(days=30)
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    assert [e.oid for e in cert.extensions] == [ExtensionOID.BASIC_CONSTRAINTS]
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    cert.public_key().verify(cert.signature, cert.tbs_certificate_bytes)  # self-signed


def test_self_signed_ip_cert_matches_derper_template() -> None:
    now = dt.datetime(2028, 2, 29, 1, 2, 3, tzinfo=dt.UTC)
    cert_pem, key_pem = certs.make_self_signed_ip_cert("192.0.2.7", now)
    assert key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.rfc4514_string() == "CN=192.0.2.7" and cert.issuer == cert.subject
    assert cert.not_valid_before_utc == now
    assert cert.not_valid_after_utc == dt.datetime(2029, 3, 1, 1, 2, 3, tzinfo=dt.UTC)  # Go AddDate
    assert 0 < cert.serial_number < 2**128
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and ku.value.key_encipherment
    assert not ku.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert san.get_values_for_type(x509.DNSName) == []


def test_verify_hostname_like_go() -> None:
    ca = make_ca()
    chain, _ = issue(ca, ["derp.example.com", "*.wild.example.com", "10.0.0.1"])
    cert = x509.load_pem_x509_certificates(chain)[0]
    for ok in ("derp.example.com", "DERP.example.com.", "a.wild.example.com", "10.0.0.1", "[10.0.0.1]"):
        certs.verify_hostname(cert, ok)
    for bad, msg in (
        ("other.example.com", "certificate is valid for derp.example.com, *.wild.example.com, not other.example.com"),
        ("a.b.wild.example.com", "not a.b.wild.example.com"),
        ("wild.example.com", "not wild.example.com"),
        ("10.0.0.2", "certificate is valid for 10.0.0.1, not 10.0.0.2"),
    ):
        with pytest.raises(ValueError, match=re.escape(msg)):
            certs.verify_hostname(cert, bad)
    only_dns = x509.load_pem_x509_certificates(issue(ca, ["x.example"])[0])[0]
    with pytest.raises(ValueError, match="doesn't contain any IP SANs"):
        certs.verify_hostname(only_dns, "192.0.2.1")


def test_eab_key_decoding_tries_raw_url_then_standard() -> None:
    assert certs.decode_eab_key("-_8") == b"\xfb\xff"
    assert certs.decode_eab_key("+/8=") == b"\xfb\xff"
    with pytest.raises(certs.CertProviderError, match="invalid base64 encoding for EAB key"):
        certs.decode_eab_key("not base64!")


# --- manual mode, in process -----------------------------------------------------------------------


async def test_ip_hostname_self_signed_chain_ends_with_meta_cert(tmp_path: Path) -> None:
    certdir = tmp_path / "certs"
    provider = manual_provider(str(certdir), "127.0.0.1")
    crt, key = certdir / "127.0.0.1.crt", certdir / "127.0.0.1.key"
    assert (certdir.stat().st_mode & 0o777) == 0o700
    assert (crt.stat().st_mode & 0o777) == 0o644 and (key.stat().st_mode & 0o777) == 0o600
    node = await tls_node(provider)
    try:
        for max12 in (False, True):
            got = await ahandshake(node.port, max_tls12=max12)
            assert got["version"] == ("TLSv1.2" if max12 else "TLSv1.3")
            assert got["alpn"] == b"http/1.1"
            chain = got["chain"]
            assert len(chain) == 2, "leaf + meta-certificate only (a CertName pin allows one real cert)"
            meta = chain[-1]
            assert meta.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "derpkey" + node.public_key.hex()
            assert meta.serial_number == 2
            assert "sha256-raw:" + got["leaf_sha256"] == provider.cert_name
            # Any SNI (or none) gets the certificate for an IP hostname.
            assert (await ahandshake(node.port, sni="anything.example"))["leaf_sha256"] == got["leaf_sha256"]
        # derpkit's client pins the CertName: right pin connects, wrong pin is refused. Over
        # TLS 1.3 it reads the server key from the meta-certificate and uses fast start.
        c = await DerpClient.connect(node.url, cert_name=provider.cert_name, timeout=5)
        assert c.fast_start and c.server_key == node.public_key
        assert node.server.stats.fast_start_accepts == 1
        assert c.server_key_received  # the ServerKey frame still came, and matched
        await c.send(c.public_key, b"to myself")
        assert (await asyncio.wait_for(c.recv(), 5)).data == b"to myself"
        await c.close()
        wrong = "sha256-raw:" + "00" * 32
        with pytest.raises(DerpCertificateError, match="does not match the CertName pin"):
            await DerpClient.connect(node.url, cert_name=wrong, timeout=5)
    finally:
        await node.stop()
    # Kept across restarts: the same files, the same CertName.
    again = manual_provider(str(certdir), "127.0.0.1")
    assert again.cert_name == provider.cert_name


async def test_dns_hostname_needs_exact_sni_and_sends_the_chain(tmp_path: Path) -> None:
    ca = make_ca()
    chain, key = issue(ca, ["derp.example.test"])
    (tmp_path / "derp.example.test.crt").write_bytes(chain)
    (tmp_path / "derp.example.test.key").write_bytes(key)
    provider = manual_provider(str(tmp_path), "derp.example.test")
    node = await tls_node(provider)
    try:
        got = await ahandshake(node.port, sni="derp.example.test")
        names = [c.subject.rfc4514_string() for c in got["chain"]]
        assert names == ["CN=leaf", "CN=derpkit test CA", "CN=derpkey" + node.public_key.hex()]
        for bad_sni in (None, "other.example.test", "DERP.example.test"):
            with pytest.raises(SSL.Error):
                await ahandshake(node.port, sni=bad_sni)
        assert provider.handshakes_refused == 3
        # A verifying client trusting the CA (Python's own ssl) connects and gets 200.
        ctx = ssl.create_default_context(cadata=ca[0].public_bytes(serialization.Encoding.PEM).decode())
        r, w = await asyncio.open_connection("127.0.0.1", node.port, ssl=ctx, server_hostname="derp.example.test")
        w.write(b"GET /derp/probe HTTP/1.1\r\nHost: derp.example.test\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 200")
        w.close()
    finally:
        await node.stop()


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", 'can not load x509 key pair for hostname "derp.example.test": open {dir}/derp.example.test.crt: no such file or directory'),
        ("wrong-name", 'cert invalid for hostname "derp.example.test": x509: certificate is valid for other.example.test, not derp.example.test'),
        ("key-mismatch", 'can not load x509 key pair for hostname "derp.example.test": tls: private key does not match public key'),
        ("garbage", 'can not load x509 key pair for hostname "derp.example.test": tls: failed to find any PEM data in certificate input'),
    ],
)
def test_manual_refusals(tmp_path: Path, setup: str, message: str) -> None:
    ca = make_ca()
    crt, key = tmp_path / "derp.example.test.crt", tmp_path / "derp.example.test.key"
    if setup == "wrong-name":
        c, k = issue(ca, ["other.example.test"])
        crt.write_bytes(c)
        key.write_bytes(k)
    elif setup == "key-mismatch":
        crt.write_bytes(issue(ca, ["derp.example.test"])[0])
        key.write_bytes(issue(ca, ["derp.example.test"])[1])
    elif setup == "garbage":
        crt.write_text("hello\n")
        key.write_bytes(issue(ca, ["derp.example.test"])[1])
    with pytest.raises(certs.CertProviderError) as info:
        manual_provider(str(tmp_path), "derp.example.test")
    assert str(info.value) == message.format(dir=tmp_path)


async def test_replaced_certificate_is_served_without_restart(tmp_path: Path) -> None:
    ca = make_ca()
    crt, key = tmp_path / "derp.example.test.crt", tmp_path / "derp.example.test.key"
    c1, k1 = issue(ca, ["derp.example.test"], cn="first")
    crt.write_bytes(c1)
    key.write_bytes(k1)
    provider = manual_provider(str(tmp_path), "derp.example.test", poll=0.1)
    node = await tls_node(provider)
    try:
        first = await ahandshake(node.port, sni="derp.example.test")
        assert first["chain"][0].subject.rfc4514_string() == "CN=first"
        # A half-written replacement (new cert, old key) is refused and the old cert kept.
        c2, k2 = issue(ca, ["derp.example.test"], cn="second")
        crt.write_bytes(c2)
        await asyncio.sleep(0.4)
        assert (await ahandshake(node.port, sni="derp.example.test"))["leaf_sha256"] == first["leaf_sha256"]
        assert provider.reloads["error"] == 1
        key.write_bytes(k2)
        for _ in range(50):
            await asyncio.sleep(0.1)
            if provider.reloads["ok"]:
                break
        second = await ahandshake(node.port, sni="derp.example.test")
        assert second["chain"][0].subject.rfc4514_string() == "CN=second"
        assert second["leaf_sha256"] != first["leaf_sha256"]
        assert second["chain"][-1].serial_number == 2  # still followed by the meta-certificate
        # A certificate for another name is not taken.
        c3, k3 = issue(ca, ["else.example.test"], cn="third")
        crt.write_bytes(c3)
        key.write_bytes(k3)
        assert provider.reload() is False
        assert (await ahandshake(node.port, sni="derp.example.test"))["leaf_sha256"] == second["leaf_sha256"]
        fams = {f.name: f for f in provider.metrics()}
        assert dict((lab["result"], v) for lab, v in fams["derpkit_tls_cert_reloads"].samples) == {"ok": 1, "error": 2}
    finally:
        await node.stop()


# --- derpkit serve as a process --------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_serve_logs_certname_and_reloads_on_sighup(tmp_path: Path) -> None:
    certdir = tmp_path / "certs"
    sp = await start_serve(
        "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(certdir),
        "-a", "127.0.0.1:0", "-http-port", "-1", "-stun=false",
        env={"DERPKIT_CERT_POLL_INTERVAL": "0"},
    )
    try:
        text = "".join(sp.log)
        m = CERTNAME_RE.search(text)
        assert m, text
        assert 'Using self-signed certificate for IP address "127.0.0.1". Configure it in DERPMap using: (https://tailscale.com/s/custom-derp)\n  {' in text
        assert text.index("serving on 127.0.0.1:0 with TLS") < text.index("Using self-signed")
        got = await ahandshake(sp.port)
        assert "sha256-raw:" + got["leaf_sha256"] == m.group(1)
        # Replace the files with a new self-signed pair, then SIGHUP.
        new_crt, new_key = certs.make_self_signed_ip_cert("127.0.0.1")
        (certdir / "127.0.0.1.key").write_bytes(new_key)
        (certdir / "127.0.0.1.crt").write_bytes(new_crt)
        sp.proc.send_signal(signal.SIGHUP)
        want = hashlib.sha256(ssl.PEM_cert_to_DER_cert(new_crt.decode())).hexdigest()
        for _ in range(50):
            await asyncio.sleep(0.1)
            if (await ahandshake(sp.port))["leaf_sha256"] == want:
                break
        else:
            raise AssertionError("new certificate not served after SIGHUP:\n" + "".join(sp.log))
        assert any(f"sha256-raw:{want}" in line for line in sp.log)
        assert sp.proc.returncode is None  # SIGHUP did not stop it
    finally:
        assert await sp.stop() == 0


async def test_serve_dns_hostname_without_files_is_fatal(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        "python3", "-m", "derpkit", "serve", "-c", str(tmp_path / "k"), "-certmode", "manual",
        "-hostname", "derp.example.test", "-certdir", str(tmp_path), "-a", "127.0.0.1:0",
        "-stun=false", stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert (
        f'derper: can not start cert provider: can not load x509 key pair for hostname "derp.example.test": '
        f"open {tmp_path}/derp.example.test.crt: no such file or directory"
    ) in err.decode()


@pytest.mark.interop
async def test_certname_matches_go_derper_both_ways(tmp_path: Path) -> None:
    """Go derper generates a cert; derpkit serves it and logs the same CertName line; and the
    other way round: Go derper loads the cert derpkit generated and logs our CertName."""
    if not GO_DERPER.exists():
        from tests.goderper import require_go_tool

        require_go_tool("derper")
    go_dir, py_dir = tmp_path / "go", tmp_path / "py"

    def run_go(certdir: Path) -> str:
        p = subprocess.Popen(
            [str(GO_DERPER), "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(certdir),
             "-a", f"127.0.0.1:{_free_port()}", "-http-port", "-1", "-stun=false", "-c", str(tmp_path / "go.key")],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        try:
            assert p.stderr is not None
            lines = []
            for line in p.stderr:
                lines.append(line)
                if CERTNAME_RE.search(line):
                    break
            return "".join(lines)
        finally:
            p.kill()
            p.wait(5)

    go_log = await asyncio.to_thread(run_go, go_dir)
    go_json = CERTNAME_RE.search(go_log)
    assert go_json, go_log
    # derpkit on a copy of Go's certdir.
    shutil.copytree(go_dir, py_dir)
    sp = await start_serve("-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(py_dir),
                           "-a", "127.0.0.1:0", "-http-port", "-1", "-stun=false")
    try:
        py_json = CERTNAME_RE.search("".join(sp.log))
        assert py_json and py_json.group(0) == go_json.group(0)
    finally:
        await sp.stop()
    # Go derper on a certdir derpkit generated.
    ours = tmp_path / "ours"
    provider = manual_provider(str(ours), "127.0.0.1")
    go_log2 = await asyncio.to_thread(run_go, ours)
    m = CERTNAME_RE.search(go_log2)
    assert m and m.group(1) == provider.cert_name
    assert json.loads(m.group(0))["CertName"] == provider.cert_name


def test_certname_is_sha256_of_leaf_der() -> None:
    cert_pem, _ = certs.make_self_signed_ip_cert("127.0.0.1")
    der = ssl.PEM_cert_to_DER_cert(cert_pem.decode())
    assert certs.cert_name(der) == "sha256-raw:" + hashlib.sha256(der).hexdigest()
    assert certs.derp_node_json("127.0.0.1", "sha256-raw:ab") == (
        '{"Name":"custom","RegionID":900,"HostName":"127.0.0.1","CertName":"sha256-raw:ab"}'
    )
    assert certs.derp_node_json("192.0.2.1") == '{"Name":"custom","RegionID":900,"HostName":"192.0.2.1"}'


def test_build_provider_refusals(tmp_path: Path) -> None:
    cfg = ServeConfig(certmode="letsencrypt", hostname="127.0.0.1", certdir=str(tmp_path))
    with pytest.raises(certs.CertProviderError, match="--hostname is an IP address"):
        certs.build_cert_provider(cfg)
    cfg = ServeConfig(certmode="manual", hostname="127.0.0.1", certdir="")
    with pytest.raises(certs.CertProviderError, match="missing required --certdir flag"):
        certs.build_cert_provider(cfg)
    cfg = ServeConfig(certmode="gcp", hostname="derp.example.test", certdir=str(tmp_path),
                      acme_eab_kid="k", acme_eab_key="!!!", acme_email="a@b.c")
    with pytest.raises(certs.CertProviderError, match="invalid base64 encoding for EAB key"):
        certs.build_cert_provider(cfg)


async def test_failed_connect_is_not_a_cert_error_for_plain_refusal(tmp_path: Path) -> None:
    """A DNS-named server refuses a client that sends the wrong SNI: the client sees a
    connection error, not a hang."""
    ca = make_ca()
    c, k = issue(ca, ["derp.example.test"])
    (tmp_path / "derp.example.test.crt").write_bytes(c)
    (tmp_path / "derp.example.test.key").write_bytes(k)
    node = await tls_node(manual_provider(str(tmp_path), "derp.example.test"))
    try:
        with pytest.raises(DerpConnectionError):
            await DerpClient.connect(node.url, insecure_tls=True, timeout=5)
    finally:
        await node.stop()



