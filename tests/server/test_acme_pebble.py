"""ACME end to end against a real pebble (Let's Encrypt's test CA) on loopback.

pebble's validation authority really fetches the HTTP-01 token from our port-80 listener
(``httpPort`` in its config is the port our listener binds), so issuance goes through the
same path as in production. Clients then verify the served chain against pebble's root.
Install pebble with scripts/install-pebble.sh; without it these tests skip (or fail when
DERPKIT_REQUIRE_GO_PEERS=1, as in CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests
from cryptography import x509

from derpkit.client import DerpClient
from derpkit.protocol.keys import NodePrivate
from derpkit.server.config import ServeConfig
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs

pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")

VALIDITY = 40  # seconds: pebble's "default" profile in these tests, so renewal is quick to see


def _gobin() -> Path:
    gopath = os.environ.get("GOPATH") or str(Path.home() / "go")
    return Path(os.environ.get("GOBIN") or Path(gopath) / "bin")


def _pebble_binary() -> Path:
    exe = shutil.which("pebble") or str(_gobin() / "pebble")
    if not Path(exe).exists():
        if os.environ.get("DERPKIT_REQUIRE_GO_PEERS"):
            pytest.fail("pebble is not installed (scripts/install-pebble.sh)")
        pytest.skip("pebble is not installed (scripts/install-pebble.sh)")
    return Path(exe)


def _pebble_test_certs() -> Path:
    """pebble's own HTTPS certificate for its API (shipped in its module source)."""
    out = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=20)
    base = Path(out.stdout.strip() or Path.home() / "go" / "pkg" / "mod")
    version = "v2.10.1"
    marker = _gobin() / ".pebble.version"
    if marker.exists():
        version = marker.read_text().strip()
    d = base / "github.com" / "letsencrypt" / "pebble" / f"v2@{version}" / "test" / "certs"
    if not d.exists():
        pytest.skip(f"pebble's test certificates not found in {d}")
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pebble:
    def __init__(self, tmp: Path, http_port: int, eab: dict[str, str] | None = None) -> None:
        certdir = _pebble_test_certs()
        self.api_ca = str(certdir / "pebble.minica.pem")
        self.port, self.mgmt = _free_port(), _free_port()
        conf = {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.mgmt}",
            "certificate": str(certdir / "localhost" / "cert.pem"),
            "privateKey": str(certdir / "localhost" / "key.pem"),
            "httpPort": http_port,
            "tlsPort": _free_port(),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": bool(eab),
            "retryAfter": {"authz": 1, "order": 1},
            "keyAlgorithm": "ecdsa",
            "profiles": {
                "default": {"description": "test", "validityPeriod": VALIDITY},
                "shortlived": {"description": "short", "validityPeriod": VALIDITY},
            },
        }
        if eab:
            conf["externalAccountMACKeys"] = eab
        path = tmp / "pebble.json"
        path.write_text(json.dumps({"pebble": conf}))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self.log = open(tmp / "pebble.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(_pebble_binary()), "-config", str(path)], stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        deadline = time.monotonic() + 15
        while True:
            try:
                requests.get(self.directory, verify=self.api_ca, timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.close()
                    raise RuntimeError("pebble did not start: " + (tmp / "pebble.log").read_text()) from None
                time.sleep(0.1)

    def roots_pem(self) -> str:
        """pebble's root and intermediates, generated for this run, for clients to trust."""
        out = []
        for kind in ("roots", "intermediates"):
            r = requests.get(f"https://127.0.0.1:{self.mgmt}/{kind}/0", verify=self.api_ca, timeout=5)
            r.raise_for_status()
            out.append(r.text)
        return "".join(out)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def http_port() -> int:
    return _free_port()


@pytest.fixture
def pebble(tmp_path: Path, http_port: int, monkeypatch):
    p = Pebble(tmp_path, http_port)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", p.api_ca)  # the acme library trusts pebble's API
    try:
        yield p
    finally:
        p.close()


async def acme_node(cfg: ServeConfig, pebble: Pebble, http_port: int, **kw) -> tuple[DerpNode, certs.AcmeCertProvider]:
    provider = certs.AcmeCertProvider(cfg, directory_url=pebble.directory, **kw)
    key = NodePrivate.generate()
    node = DerpNode(NodeOptions(
        host="127.0.0.1", ssl_context=provider.ssl_context(key.public()), private_key=key,
        stun_port=None, http_port=http_port, acme_http01=provider.acme_http01, services=[provider],
    ))
    await node.start()
    return node, provider


async def wait_issued(provider: certs.AcmeCertProvider, ident: str, count: int = 1, timeout: float = 30) -> None:
    async with asyncio.timeout(timeout):
        while provider.issued["ok"] < count or provider.entries[ident].ctx is None:
            await asyncio.sleep(0.1)


def tls_leaf(port: int, sni: str | None, cafile_pem: str) -> x509.Certificate:
    ctx = ssl.create_default_context(cadata=cafile_pem)
    if sni is None:
        ctx.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as s:
            der = s.getpeercert(binary_form=True)
            if sni is None:  # check the IP SAN ourselves
                certs.verify_hostname(x509.load_der_x509_certificate(der), "127.0.0.1")
            return x509.load_der_x509_certificate(der)


async def test_letsencrypt_hostname_issued_over_http01_and_cached(tmp_path: Path, pebble: Pebble, http_port: int) -> None:
    certdir = tmp_path / "certs"
    cfg = ServeConfig(certmode="letsencrypt", hostname="localhost", certdir=str(certdir), addr="127.0.0.1:443")
    node, provider = await acme_node(cfg, pebble, http_port)
    try:
        await wait_issued(provider, "localhost")
        roots = pebble.roots_pem()
        leaf = await asyncio.to_thread(tls_leaf, node.port, "localhost", roots)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["localhost"]
        # A DERP client verifying against pebble's root connects and is admitted.
        ctx = ssl.create_default_context(cadata=roots)
        c = await DerpClient.connect(f"https://localhost:{node.port}/derp", ssl_context=ctx,
                                     dial_host="127.0.0.1", timeout=10)
        await c.close()
        # Without pebble's root, verification fails: the trust really comes from pebble.
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.to_thread(tls_leaf, node.port, "localhost", certs.make_self_signed_ip_cert("127.0.0.1")[0].decode())
        # autocert's cache layout: key then chain in <certdir>/<host>, and the account key.
        entry = (certdir / "localhost").read_bytes()
        assert entry.startswith(b"-----BEGIN EC PRIVATE KEY-----") and entry.count(b"BEGIN CERTIFICATE") >= 2
        assert (certdir / "acme_account+key").read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
        assert (certdir.stat().st_mode & 0o777) == 0o700
        # No SNI or a wrong SNI: refused, as autocert does.
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls_leaf, node.port, None, roots)
    finally:
        await node.stop()
    # A restart finds the cached certificate and orders nothing.
    again = certs.AcmeCertProvider(cfg, directory_url="https://127.0.0.1:1/unused")
    assert again.entries["localhost"].cert is not None
    assert again.entries["localhost"].cert.leaf_der == leaf.public_bytes(certs.serialization.Encoding.DER)


async def test_renewal_before_expiry_serves_the_new_cert(tmp_path: Path, pebble: Pebble, http_port: int) -> None:
    cfg = ServeConfig(certmode="letsencrypt", hostname="localhost", certdir=str(tmp_path / "c"), addr="127.0.0.1:443")
    # 40-second certificates renewed 36 s before expiry: the first renewal is due ~4 s in.
    node, provider = await acme_node(cfg, pebble, http_port, renew_before=VALIDITY - 4)
    try:
        await wait_issued(provider, "localhost")
        roots = pebble.roots_pem()
        first = await asyncio.to_thread(tls_leaf, node.port, "localhost", roots)
        await wait_issued(provider, "localhost", count=2, timeout=20)
        second = await asyncio.to_thread(tls_leaf, node.port, "localhost", roots)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        fams = {f.name: f for f in provider.metrics()}
        assert dict((lab["result"], v) for lab, v in fams["derpkit_acme_orders"].samples)["ok"] >= 2
    finally:
        await node.stop()


async def test_acme_ip_certs(tmp_path: Path, pebble: Pebble, http_port: int, caplog) -> None:
    certdir = tmp_path / "certs"
    cfg = ServeConfig(certmode="letsencrypt", hostname="127.0.0.1", acme_ip_certs=True,
                      certdir=str(certdir), addr="127.0.0.1:443")
    caplog.set_level("INFO", logger="derpkit.serve")
    node, provider = await acme_node(cfg, pebble, http_port)
    try:
        await wait_issued(provider, "127.0.0.1")
        roots = pebble.roots_pem()
        leaf = await asyncio.to_thread(tls_leaf, node.port, None, roots)  # no SNI: the IP cert
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert (certdir / "127.0.0.1.crt").exists() and (certdir / "acme-account.key").exists()
        assert ((certdir / "127.0.0.1.key").stat().st_mode & 0o777) == 0o600
        assert 'Configure it in DERPMap using (https://tailscale.com/s/custom-derp):\n  {"Name":"custom","RegionID":900,"HostName":"127.0.0.1"}' in caplog.text
        # A DNS-name SNI has no certificate on an IP-only server.
        with pytest.raises(ssl.SSLError):
            await asyncio.to_thread(tls_leaf, node.port, "localhost", roots)
    finally:
        await node.stop()


async def test_unreachable_ca_backs_off_and_logs(tmp_path: Path, caplog) -> None:
    cfg = ServeConfig(certmode="letsencrypt", hostname="localhost", certdir=str(tmp_path))
    provider = certs.AcmeCertProvider(cfg, directory_url=f"https://127.0.0.1:{_free_port()}/dir")
    caplog.set_level("INFO", logger="derpkit.serve")
    provider.ssl_context(NodePrivate.generate().public())
    await provider.start()
    try:
        async with asyncio.timeout(15):
            while not provider.issued["error"]:
                await asyncio.sleep(0.05)
    finally:
        await provider.stop()
    assert "derper: acme: getting cert for localhost:" in caplog.text
    assert "(next attempt in 1m0s)" in caplog.text
    assert provider.entries["localhost"].retry_delay == 120


@pytest.mark.skipif(os.geteuid() != 0, reason="binds 127.0.0.1:443 (TLS with letsencrypt needs port 443)")
async def test_serve_process_letsencrypt_ip_certs_on_443(tmp_path: Path, pebble: Pebble, http_port: int) -> None:
    """`derpkit serve` as an operator runs it, pointed at pebble with -acme-directory-url."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", 443))
        except OSError:
            pytest.skip("127.0.0.1:443 is busy")
    from .serve_proc import start_serve

    sp = await start_serve(
        "-a", "127.0.0.1:443", "-certmode", "letsencrypt", "-hostname", "127.0.0.1", "-acme-ip-certs",
        "-certdir", str(tmp_path / "c"), "-http-port", str(http_port), "-stun=false",
        env={"ACME_DIRECTORY_URL": pebble.directory, "REQUESTS_CA_BUNDLE": pebble.api_ca},
    )
    try:
        async with asyncio.timeout(30):
            while not any("acme: got cert for 127.0.0.1" in line for line in sp.log):
                await asyncio.sleep(0.1)
        leaf = await asyncio.to_thread(tls_leaf, 443, None, pebble.roots_pem())
        assert leaf.issuer != leaf.subject
    finally:
        with contextlib.suppress(Exception):
            assert await sp.stop() == 0
