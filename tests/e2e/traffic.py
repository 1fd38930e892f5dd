"""Checksummed bulk transfers between tailnet nodes, through their SOCKS5 proxies.

A tiny TCP service on 127.0.0.1 is the far end: in userspace networking a node forwards a
connection to its own tailnet IP to the same port on 127.0.0.1, so a peer reaches this
service only through the tailnet (and so, with direct paths off, only through DERP).
``PUT n`` uploads n bytes and answers their SHA-256; ``GET n`` answers a SHA-256 line and
then n fresh random bytes. The client speaks SOCKS5 (RFC 1928, no auth, CONNECT to an IPv4
address) to a node's ``--socks5-server``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import socketserver
import struct
import threading
import time
from dataclasses import dataclass

CHUNK = 64 * 1024


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        got = sock.recv(min(CHUNK, n - len(buf)))
        if not got:
            raise ConnectionError(f"peer closed after {len(buf)} of {n} bytes")
        buf += got
    return bytes(buf)


def _read_line(sock: socket.socket, limit: int = 200) -> str:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        got = sock.recv(1)
        if not got:
            raise ConnectionError("peer closed mid-line")
        buf += got
        if len(buf) > limit:
            raise ValueError("line too long")
    return buf.decode().strip()


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(60)
        verb, n_text = _read_line(sock).split()
        n = int(n_text)
        if verb == "PUT":
            h = hashlib.sha256()
            left = n
            while left:
                got = sock.recv(min(CHUNK, left))
                if not got:
                    return
                h.update(got)
                left -= len(got)
            sock.sendall(h.hexdigest().encode() + b"\n")
        elif verb == "GET":
            data = os.urandom(n)
            sock.sendall(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def start_service() -> tuple[int, _Server]:
    """Start the PUT/GET service on 127.0.0.1 (an ephemeral port); (port, server)."""
    srv = _Server(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv.server_address[1], srv


def socks5_connect(socks_port: int, ip: str, port: int, timeout: float = 20.0) -> socket.socket:
    """A TCP connection to ip:port made by the SOCKS5 proxy on 127.0.0.1:socks_port."""
    s = socket.create_connection(("127.0.0.1", socks_port), timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x00")
        if _read_exact(s, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-auth method")
        s.sendall(b"\x05\x01\x00\x01" + ipaddress.IPv4Address(ip).packed + struct.pack(">H", port))
        head = _read_exact(s, 4)
        if head[1] != 0:
            raise ConnectionError(f"SOCKS5 CONNECT to {ip}:{port} failed, reply code {head[1]}")
        _read_exact(s, {1: 6, 4: 18}.get(head[3], 6))
    except BaseException:
        s.close()
        raise
    return s


@dataclass
class Transfer:
    direction: str
    nbytes: int
    seconds: float
    sha_ok: bool

    @property
    def mib_per_s(self) -> float:
        return self.nbytes / (1 << 20) / max(self.seconds, 1e-6)

    def as_dict(self) -> dict[str, object]:
        return {"direction": self.direction, "bytes": self.nbytes, "seconds": round(self.seconds, 3),
                "MiB_per_s": round(self.mib_per_s, 2), "sha256_match": self.sha_ok}


def upload(socks_port: int, ip: str, port: int, nbytes: int) -> Transfer:
    """Send nbytes of random data to the service behind ip:port; did its SHA-256 come back?"""
    data = os.urandom(nbytes)
    t0 = time.monotonic()
    with socks5_connect(socks_port, ip, port) as s:
        s.settimeout(60)
        s.sendall(f"PUT {nbytes}\n".encode())
        view = memoryview(data)
        for off in range(0, nbytes, CHUNK):
            s.sendall(view[off:off + CHUNK])
        answer = _read_line(s)
    return Transfer("upload", nbytes, time.monotonic() - t0, answer == hashlib.sha256(data).hexdigest())


def download(socks_port: int, ip: str, port: int, nbytes: int) -> Transfer:
    """Fetch nbytes from the service behind ip:port; do they match the SHA-256 it announced?"""
    t0 = time.monotonic()
    with socks5_connect(socks_port, ip, port) as s:
        s.settimeout(60)
        s.sendall(f"GET {nbytes}\n".encode())
        want = _read_line(s)
        h = hashlib.sha256()
        left = nbytes
        while left:
            got = s.recv(min(CHUNK, left))
            if not got:
                raise ConnectionError(f"download ended after {nbytes - left} of {nbytes} bytes")
            h.update(got)
            left -= len(got)
    return Transfer("download", nbytes, time.monotonic() - t0, h.hexdigest() == want)
