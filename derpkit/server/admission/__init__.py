"""Who may connect and with which secrets: verify-clients, verify-client-url, setec.

Admission decides after the DERP handshake (verify.py) or before start-up (setec.py fetches
the mesh key); the relay calls it through a plain callable, so it never imports this.
"""
