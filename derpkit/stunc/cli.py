"""``derpkit stunc``: send a Tailscale-shaped STUN request and say what came back, and why not.

The default output and exit codes are those of Tailscale's ``stunc`` (three ``sent/from/stun
addr`` lines on stderr, exit 0; exit 1 on any failure; exit 2 on a bad flag), so scripts written
for it keep working. Extras exist only behind extra flags: ``-json`` for programs and
``-count N`` for RTT statistics. The diagnostics on failure are the real point of the tool: a
silent UDP port has many causes, and naming them saves an operator an afternoon.

Differences from Go's ``stunc``, on purpose: ``from addr`` is printed unmapped
(``127.0.0.1:3478``, where Go's dual-stack socket shows ``[::ffff:127.0.0.1]:3478``), and a
reply whose transaction id belongs to an earlier request of the same run is skipped, not fatal.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from derpkit.server.goflag import parse_duration_seconds
from derpkit.stun.codec import StunError, build_request, new_txid, parse_response

__all__ = ["DEFAULT_PORT", "DEFAULT_TIMEOUT", "Reply", "main", "parse_go_duration", "query"]

PROG = "derpkit stunc"
DEFAULT_PORT = 3478  # Tailscale's and the RFC's STUN port
DEFAULT_TIMEOUT = 3.0  # seconds; Go stunc's default, also netcheck's STUN phase budget
RECV_BUF = 65535  # any UDP datagram (Go reads 1024 bytes; a bigger reply should not be cut)


class UsageError(Exception):
    """A command-line problem; ``code`` is the exit status Go's flag package would use."""

    def __init__(self, message: str, code: int, show_defaults: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.show_defaults = show_defaults


# --- Go syntax -----------------------------------------------------------------------------

def parse_go_duration(s: str) -> float:
    """Go's ``time.ParseDuration`` in float seconds (``300ms``, ``1m30s``, ``.5s``, ``0``).

    Scripts written for Go stunc pass Go durations; the parser is the one ``derpkit serve``
    uses for its flags, so both tools accept exactly what Go accepts.
    """
    return parse_duration_seconds(s)


def format_go_duration(seconds: float) -> str:
    """Short Go-like rendering for messages (``3s``, ``500ms``, ``1m30s``)."""
    if seconds >= 60 and seconds == int(seconds):
        m, s = divmod(int(seconds), 60)
        return f"{m}m{s}s"
    if seconds >= 1 or seconds == 0:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _parse_port(s: str) -> int:
    """Go's ``strconv.ParseUint(s, 10, 16)``, with its error text."""
    if not s or not s.isascii() or not s.isdigit():
        raise UsageError(
            f'invalid port: strconv.ParseUint: parsing "{s}": invalid syntax', 1, False
        )
    port = int(s)
    if port > 0xFFFF:
        raise UsageError(
            f'invalid port: strconv.ParseUint: parsing "{s}": value out of range', 1, False
        )
    return port


@dataclass
class Options:
    """Parsed command line."""

    timeout: float = DEFAULT_TIMEOUT
    json: bool = False
    count: int = 1
    host: str = ""
    port: int = DEFAULT_PORT


_FLAG_HELP = [
    ("count", "int", "send N sequential requests, one at a time, and print RTT min/avg/max", "1"),
    ("json", "", "print one JSON object on stdout instead of the lines on stderr", ""),
    ("timeout", "duration", "response wait timeout (default 3s)", None),
]


def _defaults() -> str:
    """The flag list in Go's ``PrintDefaults`` layout (sorted, tab-indented help)."""
    out = []
    for name, typ, help_, default in _FLAG_HELP:
        out.append(f"  -{name} {typ}".rstrip())
        suffix = f" (default {default})" if default and default != "" else ""
        out.append(f"    \t{help_}{suffix}")
    return "\n".join(out) + "\n"


def parse_args(argv: list[str]) -> Options:
    """Go ``flag`` grammar: ``-f v``, ``-f=v``, ``--f v``; flags stop at the first positional."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args[0]
        if len(arg) < 2 or arg[0] != "-":
            break
        args.pop(0)
        if arg == "--":
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}", 2)
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name in ("h", "help"):
            raise UsageError("", 0)
        if name == "json":
            if value is None:
                opts.json = True
            elif value in _TRUE or value in _FALSE:
                opts.json = value in _TRUE
            else:
                raise UsageError(f'invalid boolean value "{value}" for -json: parse error', 2)
            continue
        if name not in ("timeout", "count"):
            raise UsageError(f"flag provided but not defined: -{name}", 2)
        if value is None:
            if not args:
                raise UsageError(f"flag needs an argument: -{name}", 2)
            value = args.pop(0)
        try:
            if name == "timeout":
                opts.timeout = parse_go_duration(value)
            else:
                if not re.fullmatch(r"[+-]?\d+", value):
                    raise ValueError(value)
                opts.count = int(value)
                if opts.count < 1:
                    raise UsageError(
                        f'invalid value "{value}" for flag -count: must be at least 1', 2
                    )
        except ValueError:
            raise UsageError(f'invalid value "{value}" for flag -{name}: parse error', 2) from None
    if not 1 <= len(args) <= 2:
        raise UsageError(f"usage: {PROG} <hostname> [port]", 1)
    opts.host = args[0]
    if len(args) == 2:
        opts.port = _parse_port(args[1])
    return opts


# --- the query -----------------------------------------------------------------------------


def fmt_addr(host: str, port: int) -> str:
    """``host:port`` with IPv6 bracketed and IPv4-mapped IPv6 shown as plain IPv4."""
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, port: int) -> tuple[int, tuple[Any, ...]]:
    """(family, sockaddr) for ``host``; like Go, an IPv4 answer wins when a name has both."""
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = e.strerror if isinstance(e, socket.gaierror) and e.strerror else str(e)
        raise OSError(f"lookup {host}: {reason}") from None
    infos.sort(key=lambda i: i[0] != socket.AF_INET)
    return infos[0][0], infos[0][4]


@dataclass
class Reply:
    """One answered request."""

    txid: bytes
    rtt: float  # seconds, send to receive
    from_addr: str
    mapped_ip: str
    mapped_port: int
    addr_attr: int

    @property
    def mapped(self) -> str:
        return fmt_addr(self.mapped_ip, self.mapped_port)

    def as_json(self) -> dict[str, Any]:
        return {
            "txid": self.txid.hex(),
            "rtt_ms": round(self.rtt * 1000, 3),
            "from_addr": self.from_addr,
            "mapped_addr": self.mapped,
            "mapped_ip": self.mapped_ip,
            "mapped_port": self.mapped_port,
            "addr_attr": f"0x{self.addr_attr:04x}",
        }


class QueryError(Exception):
    """A request failed; the message is for people, ``kind`` for programs (JSON)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _go_bytes(b: bytes) -> str:
    return "[" + " ".join(str(x) for x in b) + "]"


def query(
    sock: socket.socket,
    dest: tuple[Any, ...],
    timeout: float,
    *,
    txid: bytes | None = None,
    stale: frozenset[bytes] = frozenset(),
) -> Reply:
    """Send one request from ``sock`` to ``dest`` and wait at most ``timeout`` for its reply.

    Like Go stunc the first datagram decides (a non-STUN reply or a foreign transaction id is an
    error), except that replies to ``stale`` ids (our own earlier, timed-out requests) are
    skipped so ``-count`` survives a late answer.
    """
    txid = txid or new_txid()
    start = time.perf_counter()
    deadline = start + timeout
    sock.sendto(build_request(txid), dest)
    server = fmt_addr(dest[0], dest[1])
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise QueryError(
                f"no STUN reply from {server} within {format_go_duration(timeout)}", "timeout"
            )
        sock.settimeout(left)
        try:
            data, src = sock.recvfrom(RECV_BUF)
        except TimeoutError:
            raise QueryError(
                f"no STUN reply from {server} within {format_go_duration(timeout)}", "timeout"
            ) from None
        except ConnectionRefusedError:
            raise QueryError(
                f"{server} refused the request (ICMP port unreachable): nothing listens "
                f"on UDP port {dest[1]} there",
                "refused",
            ) from None
        rtt = time.perf_counter() - start
        frm = fmt_addr(src[0], src[1])
        try:
            resp = parse_response(data)
        except StunError as e:
            if e.txid is not None and e.txid in stale:
                continue
            what = {
                "ErrNotSTUN": "is not STUN at all",
                "ErrNotSuccessResponse": (
                    "is not a Binding success response (an error response, or a request "
                    "looped back to us?)"
                ),
                "ErrMalformedAttrs": "is a STUN response without a usable mapped address",
            }.get(e.name, "could not be parsed")
            raise QueryError(
                f"reply from {frm} ({len(data)} bytes) {what}: {e.name}", "bad_reply"
            ) from None
        if resp.txid != txid:
            if resp.txid in stale:
                continue
            raise QueryError(
                f"txid mismatch: got {_go_bytes(resp.txid)}, want {_go_bytes(txid)}",
                "txid_mismatch",
            )
        return Reply(txid, rtt, frm, str(resp.ip), resp.port, resp.addr_attr)


def _timeout_hint(server: str, port: int, timeout: float) -> str:
    return (
        f"no STUN reply from {server} within {format_go_duration(timeout)}: "
        f"is UDP port {port} open?\n"
        f"  - check firewalls and cloud security groups for UDP (not TCP) {port} in both "
        f"directions, and that the server runs STUN (derper -stun, default on; -stun-port "
        f"{port})\n"
        f"  - this request is Tailscale-shaped (SOFTWARE tailnode + FINGERPRINT), so Go derper "
        f"and derpkit both answer it; Go derper only answers Tailscale-shaped requests, so a "
        f"generic STUN tool timing out against it proves nothing\n"
        f"  - UDP can be lost: retry with -count 5 or a longer -timeout"
    )


def _emit_json(out: TextIO, doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc, sort_keys=False) + "\n")
    out.flush()


@dataclass
class _Run:
    replies: list[Reply] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)


def main(argv: list[str]) -> int:
    """Entry point for ``derpkit stunc``; returns the process exit status."""
    err, out = sys.stderr, sys.stdout
    try:
        opts = parse_args(argv)
    except UsageError as e:
        if e.code == 0:
            err.write(f"Usage of {PROG}:\n{_defaults()}")
        else:
            err.write(f"{e}\n")
            if e.show_defaults:
                if not str(e).startswith("usage:"):
                    err.write(f"Usage of {PROG}:\n")
                err.write(_defaults())
        return e.code

    doc: dict[str, Any] = {
        "server": opts.host,
        "port": opts.port,
        "sent_addr": None,
        "ok": False,
        "error": None,
    }
    try:
        family, dest = resolve(opts.host, opts.port)
    except OSError as e:
        err.write(f"{e}\n")
        if opts.json:
            _emit_json(out, {**doc, "error": str(e), "error_kind": "lookup"})
        return 1
    sent = fmt_addr(dest[0], dest[1])
    doc["sent_addr"] = sent

    run = _Run()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        if not opts.json and opts.count > 1:
            err.write(f"sent addr: {sent}\n")
        for i in range(opts.count):
            txid = new_txid()
            try:
                if opts.timeout <= 0:  # Go: a deadline in the past times out at once
                    sock.sendto(build_request(txid), dest)
                    raise QueryError(f"no STUN reply from {sent} within 0s", "timeout")
                reply = query(
                    sock,
                    dest,
                    opts.timeout,
                    txid=txid,
                    stale=frozenset(bytes.fromhex(a["txid"]) for a in run.attempts),
                )
            except QueryError as e:
                msg = _timeout_hint(sent, dest[1], opts.timeout) if e.kind == "timeout" else str(e)
                run.attempts.append({"txid": txid.hex(), "error": str(e), "error_kind": e.kind})
                if opts.count == 1:
                    err.write(msg + "\n")
                    if opts.json:
                        _emit_json(
                            out, {**doc, "error": msg, "error_kind": e.kind, "txid": txid.hex()}
                        )
                    return 1
                if not opts.json:
                    err.write(f"request {i + 1}/{opts.count}: {e}\n")
                continue
            except OSError as e:
                msg = f"sending to {sent}: {e}"
                err.write(msg + "\n")
                if opts.json:
                    _emit_json(out, {**doc, "error": msg, "error_kind": "send"})
                return 1
            run.replies.append(reply)
            run.attempts.append(reply.as_json())
            if opts.json:
                continue
            if opts.count == 1:
                # Go prints all three lines only once the reply is in.
                err.write(
                    f"sent addr: {sent}\nfrom addr: {reply.from_addr}\nstun addr: {reply.mapped}\n"
                )
            else:
                err.write(
                    f"request {i + 1}/{opts.count}: from {reply.from_addr}: "
                    f"stun addr {reply.mapped} rtt {reply.rtt * 1000:.3f} ms\n"
                )

    return _finish(opts, doc, run, sent)


def _finish(opts: Options, doc: dict[str, Any], run: _Run, sent: str) -> int:
    err, out = sys.stderr, sys.stdout
    n, got = opts.count, len(run.replies)
    rtts = [r.rtt * 1000 for r in run.replies]
    stats = (min(rtts), sum(rtts) / len(rtts), max(rtts)) if rtts else None
    mapped = sorted({r.mapped for r in run.replies})
    if opts.json:
        last = run.replies[-1] if run.replies else None
        doc.update(
            ok=got > 0,
            error=None if got else f"no STUN reply from {sent} to {n} requests",
            from_addr=last.from_addr if last else None,
            mapped_addr=last.mapped if last else None,
            mapped_ip=last.mapped_ip if last else None,
            mapped_port=last.mapped_port if last else None,
            txid=last.txid.hex() if last else None,
            rtt_ms=round(last.rtt * 1000, 3) if last else None,
            count=n,
            received=got,
            rtt_min_ms=round(stats[0], 3) if stats else None,
            rtt_avg_ms=round(stats[1], 3) if stats else None,
            rtt_max_ms=round(stats[2], 3) if stats else None,
            mapped_addrs=mapped,
            replies=run.attempts,
        )
        _emit_json(out, doc)
    elif n > 1:
        lost = 100.0 * (n - got) / n
        err.write(f"{n} requests, {got} replies, {lost:.0f}% lost\n")
        if stats:
            err.write(f"rtt min/avg/max = {stats[0]:.3f}/{stats[1]:.3f}/{stats[2]:.3f} ms\n")
        if len(mapped) > 1:
            err.write(
                f"note: the mapped address changed between requests ({', '.join(mapped)}): "
                "a NAT is re-mapping this socket\n"
            )
        if not got:
            err.write(_timeout_hint(sent, opts.port, opts.timeout) + "\n")
    return 0 if got else 1
