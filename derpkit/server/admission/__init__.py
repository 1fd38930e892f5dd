"""Who may connect: verify-clients, verify-client-url, the allowed-keys file.

Admission decides after the DERP handshake (verify.py); the relay calls it through a plain
callable, so it never imports this. The mesh key's setec client is ``derpkit/setec.py``,
outside the server, because derpkit probe fetches the same secret the same way.
"""
