"""Client-side errors.

Everything that ends a connection is a ``DerpConnectionError`` so callers (mesh links,
the prober, ``ReconnectingClient``) can catch one type and reconnect; the subclasses say
*why* for people reading logs and for tests.
"""

from __future__ import annotations


class DerpError(Exception):
    """Base class of every error the DERP client raises on purpose."""


class DerpConnectionError(DerpError):
    """The connection is unusable (it failed, the server closed it, or we closed it).

    Receive errors are sticky: once raised, every later ``recv()``/``send()`` on the same
    ``DerpClient`` raises again, as Go's client does. Make a new client to go on.
    """


class DerpClosedError(DerpConnectionError):
    """The connection was closed by ``close()`` on our side."""


class DerpTimeoutError(DerpConnectionError, TimeoutError):
    """Connecting took too long, or the server was silent past the read timeout."""


class DerpUpgradeError(DerpConnectionError):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        text = body.decode("utf-8", "replace").strip()
        super().__init__(
            f"DERP upgrade refused: HTTP {status} {reason}".rstrip() + (f": {text}" if text else "")
        )
        self.status = status
        self.reason = reason
        self.body = body


class DerpCertificateError(DerpConnectionError):
    """TLS verification failed: bad chain, wrong name, or a CertName pin mismatch."""
