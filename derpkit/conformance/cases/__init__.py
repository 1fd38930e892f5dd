"""The cases, one module per area; importing this package registers all of them."""

from . import (  # noqa: F401
    fast_start,
    framing,
    handshake,
    http_routes,
    keepalive,
    mesh,
    peer_gone,
    ping,
    relay,
    stun,
    tls,
    upgrade,
    websocket,
)
