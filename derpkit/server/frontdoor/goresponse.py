"""Whole HTTP responses as bytes, laid out as Go's net/http server writes them.

The front door answers a few requests (CONNECT on either listener) before aiohttp sees
them, so those answers are written here byte for byte: tests compare them with Go derper's
(tests/interop/test_ace_go.py, test_port80_go.py). aiohttp-made answers use
``http.go_error`` instead.
"""

from __future__ import annotations

from email.utils import formatdate
from http import HTTPStatus


def go_response(status: int, headers: dict[str, str], body: bytes, *, http10: bool = False,
                close: bool = False) -> bytes:
    """Handler headers sorted (Go writes its header map in key order), then Date, then
    Content-Length (none for 204) and ``Connection: close`` when the server will hang up
    (HTTP/1.1 only: a 1.0 client expects the close anyway)."""
    head = [f"HTTP/1.{0 if http10 else 1} {status} {HTTPStatus(status).phrase}"]
    head += [f"{k}: {v}" for k, v in sorted(headers.items())]
    head.append(f"Date: {formatdate(usegmt=True)}")
    if status != 204:
        head.append(f"Content-Length: {len(body)}")
    if close and not http10:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def go_error(status: int, message: str, *, http10: bool = False, close: bool = False) -> bytes:
    """Go's ``http.Error``: text/plain, nosniff, the message and a newline."""
    headers = {"Content-Type": "text/plain; charset=utf-8", "X-Content-Type-Options": "nosniff"}
    return go_response(status, headers, (message + "\n").encode(), http10=http10, close=close)
