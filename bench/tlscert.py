"""A throw-away test CA and a ``localhost`` certificate for the bench's TLS rows.

Both servers run in ``-certmode manual -certdir DIR -hostname localhost``: Go derper's
manual mode loads ``<certdir>/<hostname>.crt`` and ``.key`` (shared/spec/derper-cli.md §2.5),
and derpkit serve reads the same names. The generator trusts the CA through
``derpgen -tls-ca``. The CA code is the interop tests' (tests/interop/pki.TestCA), reused
rather than copied, so the bench and the tests make certificates the same way.
"""

from __future__ import annotations

import ssl
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HOSTNAME = "localhost"

_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BenchTLS:
    """Where the certificate lives and how a client checks it."""

    certdir: str   # holds localhost.crt / localhost.key
    ca_file: str   # PEM of the CA that signed them
    hostname: str = HOSTNAME

    def server_flags(self) -> list[str]:
        """The flags both derpkit serve and Go derper take for this certificate."""
        return ["-certmode", "manual", "-certdir", self.certdir, "-hostname", self.hostname]

    def client_context(self) -> ssl.SSLContext:
        """A Python client context trusting the CA (the harness's readiness checks)."""
        ctx = ssl.create_default_context(cafile=self.ca_file)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        return ctx


def make_tls(directory: str | None = None) -> BenchTLS:
    """A fresh CA and a leaf for ``localhost`` with a 127.0.0.1 SAN, in ``directory``."""
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    from tests.interop.pki import TestCA

    base = Path(directory or tempfile.mkdtemp(prefix="bench-tls-"))
    ca = TestCA.create(base / "ca")
    certdir = base / "certs"
    ca.issue(HOSTNAME, [HOSTNAME], ["127.0.0.1"], directory=certdir)
    return BenchTLS(str(certdir), str(ca.cert_path))
