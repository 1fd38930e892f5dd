"""Everything a connection meets before the relay: request head, HTTP routes, CONNECT.

head.py reads the first request head and hands DERP upgrades to the relay; http.py and
port80.py are the aiohttp routes; ace.py answers CONNECT; limits.py throttles accepts;
bootstrap_dns.py serves /bootstrap-dns. See docs/architecture.md ("The server's layers").
"""
