"""The request head the front door reads, parsed strictly and without any I/O.

Every accepted connection's first request passes through here before the front door
chooses its path (DERP upgrade, CONNECT, or aiohttp), and so does every request that
follows a refused CONNECT. The front door frames the connection from what this module
says (how many body bytes to skip, whether to hang up), so any head two parsers could read
differently is refused here, the connection closed, and nothing after it read.

The rules are Go's net/http server's (what derper runs behind), with the answers written
as Go writes them, plus the refusals RFC 9112 allows where Go is lenient. Go accepts, and
this module refuses (docs/reliability.md lists them, tests/interop/test_http_strict_go.py
shows them live):

- obs-fold (a header line starting with SP or HTAB), which Go joins to the line before;
- a bare LF as a line end, which Go takes for CRLF;
- Transfer-Encoding together with Content-Length (Go drops Content-Length and keeps the
  connection; RFC 9112 section 6.1 says to close it after answering);
- Transfer-Encoding on an HTTP/1.0 request (RFC 9112 section 6.1: faulty framing);
- Content-Length given twice, even with the same value (Go collapses equal ones);
- more than ``MAX_HEADERS`` fields, a line over ``MAX_LINE`` bytes or a head over
  ``MAX_HEAD`` bytes (431; Go's only limit is 1 MiB + 4 KiB for the whole head). These are
  aiohttp's limits too, so a head this module passes on is one aiohttp also reads.

Refusals raise ``Refused`` carrying the whole response; the caller writes it and closes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from derpkit.protocol.upgrade import MAX_HEAD
from derpkit.server import metrics

#: aiohttp's max_line_size and max_field_size (it answers 400 past them).
MAX_LINE = 8190
#: aiohttp's max_headers.
MAX_HEADERS = 128

_TCHARS = rb"!#$%&'*+.^_`|~0-9A-Za-z-"
_TCHAR = frozenset(re.sub(rb"[^" + _TCHARS + rb"]", b"", bytes(range(128))))
_TOKEN = re.compile(rb"[" + _TCHARS + rb"]+")
#: A well-formed field line, the common case, in one match: token, colon, value.
_FIELD = re.compile(rb"([" + _TCHARS + rb"]+):[ \t]*(.*?)[ \t]*")
#: httpguts.ValidHostHeader's bytes (RFC 3986 reg-name, IP literal and port, plus '%').
_HOST = re.compile(rb"[0-9A-Za-z!$%&'()*+,\-.:;=\[\]_~]*")
#: Control bytes refused anywhere in a head (HTAB aside; CR and LF only as CRLF, checked
#: apart). Go refuses them in the method and target as in field values.
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ERROR_HEADERS = "\r\nContent-Type: text/plain; charset=utf-8\r\nConnection: close\r\n\r\n"


def go_refusal(public: str, *, detail: str = "") -> bytes:
    """The bytes Go's server writes for a request it cannot read, before hanging up.

    Go puts a bad-request reason in the status line and the body alike
    (``400 Bad Request: missing required Host header``); others carry the bare status.
    """
    text = f"{public}: {detail}" if detail else public
    return f"HTTP/1.1 {text}{_ERROR_HEADERS}{text}".encode("latin-1")


BAD_REQUEST = go_refusal("400 Bad Request")
TOO_LARGE = go_refusal("431 Request Header Fields Too Large")
UNSUPPORTED_TE = b"HTTP/1.1 501 Not Implemented" + _ERROR_HEADERS.encode() + b"Unsupported transfer encoding"


#: Every ``Refused.reason``, each a label of ``derpkit_http_heads_refused`` from start-up
#: (docs/operations.md lists them with their status). ``bad_request_target`` is the front
#: door's own (head.py: a CONNECT target Go's server refuses before any handler).
REASONS = (
    "nul_byte", "bare_lf", "bare_cr", "control_byte", "head_too_large", "line_too_long", "too_many_fields",
    "bad_request_line", "bad_method", "bad_version", "unsupported_version", "bad_request_target",
    "obs_fold", "bad_field_line", "bad_field_name", "duplicate_host", "missing_host", "bad_host",
    "unsupported_transfer_encoding", "transfer_encoding_with_content_length", "transfer_encoding_on_http10",
    "duplicate_content_length", "bad_content_length",
)


class Refused(Exception):
    """The head cannot be read safely: write ``response``, close, read nothing more."""

    def __init__(self, response: bytes, why: str, reason: str) -> None:
        super().__init__(why)
        self.response = response
        #: A short reason for logs and tests (never sent).
        self.why = why
        #: The metric label (one of ``REASONS``): stable, no input in it.
        self.reason = reason


def families(counts: Mapping[str, int]) -> Iterator[metrics.Family]:
    """``derpkit_http_heads_refused{reason}``: every reason, zero until it happens, so a
    dashboard's rate() sees the first refusal."""
    fam = metrics.Family("derpkit_http_heads_refused", "counter",
                         "request heads the front door refused (answered 400/431/501/505 and closed), by reason")
    for reason in REASONS:
        fam.add(counts.get(reason, 0), reason=reason)
    yield fam


@dataclass(frozen=True, slots=True)
class RequestHead:
    """One request head as the front door needs it."""

    method: bytes
    target: bytes
    #: HTTP/1.0 (Go answers in 1.0 and closes by default).
    http10: bool
    #: Field names as sent, values with SP/HTAB trimmed, in order (latin-1 text).
    fields: tuple[tuple[str, str], ...]
    #: Body bytes that follow the head (Content-Length, 0 when absent).
    content_length: int
    #: ``Transfer-Encoding: chunked`` was given (then ``content_length`` is 0).
    chunked: bool
    #: Bytes of the buffer the head took, blank line included.
    size: int

    def header(self, name: str) -> str:
        """The first value of a field (case-insensitive), or ""."""
        name = name.lower()
        for k, v in self.fields:
            if k.lower() == name:
                return v
        return ""

    def lower_dict(self) -> dict[str, str]:
        """Fields keyed in lower case, first value kept."""
        out: dict[str, str] = {}
        for k, v in self.fields:
            out.setdefault(k.lower(), v)
        return out

    def as_dict(self) -> dict[str, str]:
        """Fields keyed as sent, first value kept (what ``upgrade.decide`` reads)."""
        out: dict[str, str] = {}
        for k, v in self.fields:
            out.setdefault(k, v)
        return out

    @property
    def wants_close(self) -> bool:
        """HTTP/1.0, or a ``Connection: close`` token."""
        tokens = {t.strip().lower() for t in self.header("connection").split(",")}
        return self.http10 or "close" in tokens


def _check_partial(region: bytes) -> None:
    """Refuse as soon as the bytes seen so far cannot start a valid head."""
    if b"\x00" in region:
        raise Refused(BAD_REQUEST, "NUL byte in the head", "nul_byte")
    if region.count(b"\n") != region.count(b"\r\n"):
        raise Refused(BAD_REQUEST, "bare LF in the head", "bare_lf")
    if region.count(b"\r") != region.count(b"\r\n"):
        raise Refused(BAD_REQUEST, "bare CR in the head", "bare_cr")


def parse(buf: bytes) -> RequestHead | None:
    """The request head at the start of ``buf``, or None while it is incomplete.

    Raises ``Refused`` as soon as the bytes show the head is invalid or too large, even
    before the blank line arrives, so a hostile client cannot hold buffer space with it.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        # Everything so far belongs to the head; a trailing CR may be the start of CRLF.
        region = buf[:-1] if buf.endswith(b"\r") else buf
        _check_partial(region)
        if len(buf) > MAX_HEAD:
            raise Refused(TOO_LARGE, f"{len(buf)} bytes without a blank line", "head_too_large")
        first_end = buf.find(b"\r\n")
        if (first_end < 0 and len(region) > MAX_LINE) or first_end > MAX_LINE:
            raise Refused(TOO_LARGE, "request line too long", "line_too_long")
        return None
    head = buf[:end]
    _check_partial(head)
    if _CTL.search(head):
        raise Refused(BAD_REQUEST, "control byte in the head", "control_byte")
    if end + 4 > MAX_HEAD:
        raise Refused(TOO_LARGE, f"head of {end + 4} bytes", "head_too_large")
    lines = head.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise Refused(TOO_LARGE, f"{len(lines) - 1} header fields", "too_many_fields")
    if any(len(line) > MAX_LINE for line in lines):
        raise Refused(TOO_LARGE, "line too long", "line_too_long")
    method, target, http10 = _request_line(lines[0])
    fields: list[tuple[str, str]] = []
    lengths: list[bytes] = []
    encodings: list[bytes] = []
    hosts: list[bytes] = []
    for line in lines[1:]:
        name, value = _field(line)
        lname = name.lower()
        if lname == b"content-length":
            lengths.append(value)
        elif lname == b"transfer-encoding":
            encodings.append(value)
        elif lname == b"host":
            hosts.append(value)
        fields.append((name.decode("latin-1"), value.decode("latin-1")))
    if len(hosts) > 1:
        raise Refused(BAD_REQUEST, "more than one Host", "duplicate_host")
    if not hosts and not http10 and method != b"CONNECT":
        raise Refused(go_refusal("400 Bad Request", detail="missing required Host header"), "no Host", "missing_host")
    if hosts and not _HOST.fullmatch(hosts[0]):
        raise Refused(go_refusal("400 Bad Request", detail="malformed Host header"), "bad Host", "bad_host")
    length, chunked = _framing(lengths, encodings, http10)
    return RequestHead(method, target, http10, tuple(fields), length, chunked, end + 4)


def _request_line(line: bytes) -> tuple[bytes, bytes, bool]:
    # Go cuts at the first two spaces; anything else lands in the version and fails there.
    method, sp1, rest = line.partition(b" ")
    target, sp2, version = rest.partition(b" ")
    if not sp1 or not sp2 or not method or not target:
        raise Refused(BAD_REQUEST, "malformed request line", "bad_request_line")
    if not _TOKEN.fullmatch(method):
        raise Refused(BAD_REQUEST, "invalid method", "bad_method")
    if b"\t" in target:
        raise Refused(BAD_REQUEST, "control byte in the request target", "control_byte")
    if len(version) != 8 or not version.startswith(b"HTTP/") or version[6:7] != b"." \
            or not version[5:6].isdigit() or not version[7:8].isdigit():
        raise Refused(BAD_REQUEST, "malformed HTTP version", "bad_version")
    if version[5:6] != b"1":
        raise Refused(go_refusal("505 HTTP Version Not Supported", detail="unsupported protocol version"),
                      "not HTTP/1", "unsupported_version")
    return method, target, version[7:8] == b"0"


def _field(line: bytes) -> tuple[bytes, bytes]:
    m = _FIELD.fullmatch(line)
    if m is not None:
        return m.group(1), m.group(2)
    # The slow path only finds which refusal it is (the head's control bytes are refused already).
    if line[:1] in (b" ", b"\t"):
        raise Refused(BAD_REQUEST, "obs-fold (a line starting with whitespace)", "obs_fold")
    name, colon, value = line.partition(b":")
    if not colon or not name:
        raise Refused(BAD_REQUEST, "malformed header line", "bad_field_line")
    if not all(c in _TCHAR for c in name):
        if all(c in _TCHAR or c in b" \t" for c in name):
            # Go's textproto lets spaces in a name through; its server then refuses it.
            raise Refused(go_refusal("400 Bad Request", detail="invalid header name"), "space in a header name", "bad_field_name")
        raise Refused(BAD_REQUEST, "invalid header name", "bad_field_name")
    raise Refused(BAD_REQUEST, "malformed header line", "bad_field_line")


def _framing(lengths: list[bytes], encodings: list[bytes], http10: bool) -> tuple[int, bool]:
    """(Content-Length, chunked) from the framing fields, refusing every ambiguity."""
    if encodings:
        if len(encodings) > 1 or encodings[0].lower() != b"chunked":
            raise Refused(UNSUPPORTED_TE, "unsupported Transfer-Encoding", "unsupported_transfer_encoding")
        if lengths:
            raise Refused(BAD_REQUEST, "Transfer-Encoding with Content-Length", "transfer_encoding_with_content_length")
        if http10:
            raise Refused(BAD_REQUEST, "Transfer-Encoding on HTTP/1.0", "transfer_encoding_on_http10")
        return 0, True
    if not lengths:
        return 0, False
    if len(lengths) > 1:
        raise Refused(BAD_REQUEST, "Content-Length given more than once", "duplicate_content_length")
    value = lengths[0]
    # Go's parseContentLength: ASCII digits only, no sign, fits an int64.
    if not value or not value.isdigit() or int(value) >= 1 << 63:
        raise Refused(BAD_REQUEST, "bad Content-Length", "bad_content_length")
    return int(value), False
