"""Helpers for the prober's tests: maps, an in-process prober run, certificates with any dates."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from derpkit.probe.derpconn import ProbeEnv
from derpkit.probe.dmap import MapHolder
from derpkit.probe.flags import parse_args
from derpkit.probe.model import Outcome
from derpkit.probe.scheduler import Prober
from derpkit.protocol.keys import MeshKey
from tests.interop.pki import Leaf, TestCA, _name, _pem_key

#: Short intervals: each probe's deadline is 80 % of its interval.
FAST = ["-spread=false", "-interval", "5s", "-tls-interval", "3s", "-stun-interval", "3s",
        "-mesh-interval", "3s"]


def node(name: str, port: int, *, host: str = "localhost", stun: int = -1, **extra: Any) -> dict[str, Any]:
    e: dict[str, Any] = {"Name": name, "HostName": host, "DERPPort": port, "STUNPort": stun}
    if host == "localhost":
        e["IPv4"] = "127.0.0.1"
    e.update(extra)
    return e


def dmap(*regions: tuple[int, str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"Regions": {}}
    for rid, code, nodes in regions:
        for n in nodes:
            n.setdefault("RegionID", rid)
        out["Regions"][str(rid)] = {"RegionID": rid, "RegionCode": code, "RegionName": code, "Nodes": nodes}
    return out


def write(tmp_path: Path, m: dict[str, Any], name: str = "map.json") -> str:
    p = tmp_path / name
    p.write_text(json.dumps(m))
    return str(p)


async def probe_once(tmp_path: Path, m: dict[str, Any], *args: str, mesh_key: MeshKey | None = None) -> Prober:
    """Run every probe of map ``m`` once in this process, as ``derpkit probe -once`` does."""
    opts = parse_args([*FAST, *args, write(tmp_path, m)])
    prober = Prober(opts, ProbeEnv(mesh_key=mesh_key), MapHolder(opts.derp_map))
    await prober.run_once()
    return prober


def result(prober: Prober, name: str) -> Outcome:
    p = prober.probes.get(name)
    assert p is not None and p.last is not None, f"no result for {name}; have {sorted(prober.probes)}"
    return p.last


def issue(ca: TestCA, directory: Path, stem: str, dns: list[str], *, ips: tuple[str, ...] = ("127.0.0.1",),
          not_before: dt.timedelta = dt.timedelta(hours=-1), not_after: dt.timedelta = dt.timedelta(days=20),
          crl_url: str | None = None, fullchain: bool = False) -> Leaf:
    """A CA-signed leaf valid from now+not_before to now+not_after (either may be in the past);
    ``crl_url`` adds a CRL distribution point, ``fullchain`` puts the CA after the leaf."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(dns[0] if dns else ips[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + not_before)
        .not_valid_after(now + not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if crl_url:
        builder = builder.add_extension(x509.CRLDistributionPoints([x509.DistributionPoint(
            [x509.UniformResourceIdentifier(crl_url)], None, None, None)]), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    crt, keyp = directory / f"{stem}.crt", directory / f"{stem}.key"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    if fullchain:
        pem += ca.cert.public_bytes(serialization.Encoding.PEM)
    crt.write_bytes(pem)
    keyp.write_bytes(_pem_key(key))
    return Leaf(crt, keyp, cert.public_bytes(serialization.Encoding.DER))


def crl(ca: TestCA, revoked: list[int]) -> bytes:
    """A DER CRL signed by ``ca`` listing ``revoked`` serial numbers, next update in a day."""
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
         .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=1)))
    for serial in revoked:
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now - dt.timedelta(hours=2)).build())
    return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
