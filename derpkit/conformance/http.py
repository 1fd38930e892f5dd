"""One raw HTTP/1.1 request per connection, logged like every other byte of a case.

The HTTP cases check status codes and header values exactly, so the request is written by
hand (no client library adding or normalising headers) and the response read as sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from .conn import RawConn
from .registry import Fail
from .target import Target
from .wire import WireLog


@dataclass(frozen=True)
class HttpResponse:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        low = name.lower()
        for k, v in self.headers.items():
            if k.lower() == low:
                return v
        return None


def build(target: Target, method: str, path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {target.derp.host_header}", "User-Agent: derpkit-conformance"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def request(
    log: WireLog, target: Target, method: str, path: str, headers: dict[str, str] | None = None,
    *, label: str = "http", timeout: float | None = None,  # noqa: ASYNC109
) -> HttpResponse:
    """Send one request and read the whole response (Content-Length, or until close)."""
    timeout = target.io_timeout if timeout is None else timeout
    raw = await RawConn.open(log, label, target, request=build(target, method, path, headers), timeout=timeout)
    try:
        head = await raw.read_head(timeout)
        body = b""
        if method != "HEAD" and head.status not in (101, 204, 304):
            cl = head.header("Content-Length")
            if cl.isascii() and cl.isdigit():  # str.isdigit() also takes '²'
                body = await raw.read_body(int(cl), timeout)
            elif "chunked" in head.header("Transfer-Encoding").lower():
                body = _unchunk(await raw.read_body(1 << 20, timeout))
            else:
                body = await raw.read_body(1 << 20, timeout)
        return HttpResponse(head.status, head.reason, head.headers, body)
    finally:
        raw.close()


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        line, sep, rest = data.partition(b"\r\n")
        if not sep:
            break
        try:
            n = int(line.split(b";")[0], 16)
        except ValueError:
            raise Fail(f"bad chunked body: {line[:20]!r}") from None
        if n == 0:
            break
        out += rest[:n]
        data = rest[n + 2 :]
    return bytes(out)
