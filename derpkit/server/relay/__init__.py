"""The relay: DERP connections after the upgrade, the client registry, mesh links.

``DerpServer`` (derp.py) owns the registry and routes packets; ``ClientConn`` (conn.py)
is the asyncio shell around the protocol core for one client. Nothing here knows how a
connection arrived (front door, WebSocket upgrade), so the relay can be tested and
benchmarked without HTTP. See docs/architecture.md ("The server's layers").
"""
