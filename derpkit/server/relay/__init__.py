"""The relay: DERP connections after the upgrade, the client registry, mesh links.

``DerpServer`` (derp.py) owns the registry and routes packets; ``ClientConn`` (conn.py)
is the asyncio shell around the protocol core for one client; websocket.py carries the
same frames over an aiohttp WebSocket. Nothing here imports the front door, admission,
TLS or settings: they hand the relay a transport, a callable or plain values, so the relay
can be tested and benchmarked without HTTP. See docs/architecture.md ("The server's layers").
"""
