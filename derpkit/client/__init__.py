"""asyncio DERP client: TLS, HTTP or WebSocket upgrade, handshake, send/recv/ping, reconnect."""

from .conn import DerpClient, DerpURL, parse_url
from .errors import (
    DerpCertificateError,
    DerpClosedError,
    DerpConnectionError,
    DerpError,
    DerpTimeoutError,
    DerpUpgradeError,
)
from .reconnect import ReconnectingClient, backoff_delay

__all__ = [
    "DerpCertificateError",
    "DerpClient",
    "DerpClosedError",
    "DerpConnectionError",
    "DerpError",
    "DerpTimeoutError",
    "DerpURL",
    "DerpUpgradeError",
    "ReconnectingClient",
    "backoff_delay",
    "parse_url",
]
