"""Certificates for the TLS listener: manual files, ACME (letsencrypt, gcp), self-signed.

Named for the listener it serves; it never shadows the standard ``ssl`` module because
every import of it is absolute (``derpkit.server.tls.certs``).
"""
