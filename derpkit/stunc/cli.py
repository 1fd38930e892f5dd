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

import asyncio
import json
import sys
from dataclasses import dataclass, field
from typing import Any, TextIO

from derpkit.gosyntax import (
    FlagError,
    FlagHelp,
    GoValueError,
    flag_value_error,
    format_duration,
    go_quote,
    join_host_port,
    parse_bool,
    parse_duration_seconds,
    parse_int,
    parse_uint,
    scan_flags,
)
from derpkit.stun.client import (
    DEFAULT_PORT,
    StunClientError,
    StunEndpoint,
    StunResult,
    resolve,
)
from derpkit.stun.codec import new_txid

__all__ = ["DEFAULT_PORT", "DEFAULT_TIMEOUT", "main", "parse_go_duration"]

PROG = "derpkit stunc"
DEFAULT_TIMEOUT = 3.0  # seconds; Go stunc's default, also netcheck's STUN phase budget


class UsageError(Exception):
    """A command-line problem; ``code`` is the exit status Go's flag package would use."""

    def __init__(self, message: str, code: int, show_defaults: bool = True) -> None:
        super().__init__(message)
        self.code = code
        self.show_defaults = show_defaults


# --- Go syntax -----------------------------------------------------------------------------

#: Go's ``time.ParseDuration`` in float seconds. Scripts written for Go stunc pass Go
#: durations; this is the parser ``derpkit serve`` uses too, so both accept what Go accepts.
parse_go_duration = parse_duration_seconds


def format_go_duration(seconds: float) -> str:
    """``seconds`` as Go's ``Duration.String`` prints it (``3s``, ``500ms``, ``1m30s``)."""
    return format_duration(round(seconds * 1e9))


def _parse_port(s: str) -> int:
    """The port argument as Go stunc reads it (``strconv.ParseUint(s, 10, 16)``), same error."""
    try:
        return parse_uint(s, 16)
    except GoValueError as e:
        raise UsageError(
            f"invalid port: strconv.ParseUint: parsing {go_quote(s)}: {e.reason}", 1, False
        ) from None


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


_BOOL_FLAGS = {"json": True, "timeout": False, "count": False}  # flag -> is it a bool flag


def parse_args(argv: list[str]) -> Options:
    """Go ``flag`` grammar: ``-f v``, ``-f=v``, ``--f v``; flags stop at the first positional."""
    opts = Options()
    rest: list[str] = []
    try:
        for name, text, is_bool in scan_flags(argv, _BOOL_FLAGS.get, rest):
            try:
                if name == "json":
                    opts.json = parse_bool(text)
                elif name == "timeout":
                    opts.timeout = parse_duration_seconds(text)
                else:
                    opts.count = parse_int(text)  # Go's flag.Int: strconv.ParseInt(s, 0, 64)
            except GoValueError:
                raise flag_value_error(name, text, "parse error", is_bool=is_bool) from None
            if name == "count" and opts.count < 1:
                raise UsageError(
                    f"invalid value {go_quote(text)} for flag -count: must be at least 1", 2
                )
    except FlagHelp:
        raise UsageError("", 0) from None
    except FlagError as e:
        raise UsageError(e.message, 2) from None
    if not 1 <= len(rest) <= 2:
        raise UsageError(f"usage: {PROG} <hostname> [port]", 1)
    opts.host = rest[0]
    if len(rest) == 2:
        opts.port = _parse_port(rest[1])
    return opts


# --- the query -----------------------------------------------------------------------------


def _reply_json(r: StunResult) -> dict[str, Any]:
    """One answered request as the ``-json`` output has always shown it."""
    return {
        "txid": r.txid.hex(),
        "rtt_ms": round(r.rtt * 1000, 3),
        "from_addr": join_host_port(*r.origin),
        "mapped_addr": r.mapped,
        "mapped_ip": str(r.mapped_ip),
        "mapped_port": r.mapped_port,
        "addr_attr": f"0x{r.addr_attr:04x}",
    }


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
    replies: list[StunResult] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)


def main(argv: list[str]) -> int:
    """Entry point for ``derpkit stunc``; returns the process exit status."""
    err = sys.stderr
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

    return asyncio.run(_probe(opts))


async def _probe(opts: Options) -> int:
    """Resolve, then send ``-count`` requests one after another from one socket."""
    err, out = sys.stderr, sys.stdout
    doc: dict[str, Any] = {
        "server": opts.host,
        "port": opts.port,
        "sent_addr": None,
        "ok": False,
        "error": None,
    }
    try:
        family, ip = await resolve(opts.host, opts.port)
        endpoint = await StunEndpoint.open(family)
    except StunClientError as e:
        err.write(f"{e}\n")
        if opts.json:
            _emit_json(out, {**doc, "error": str(e), "error_kind": e.kind})
        return 1
    sent = join_host_port(ip, opts.port)
    doc["sent_addr"] = sent

    run = _Run()
    async with endpoint:
        if not opts.json and opts.count > 1:
            err.write(f"sent addr: {sent}\n")
        for i in range(opts.count):
            txid = new_txid()  # ours, so a failed attempt can still be named in -json output
            try:
                # strict: like Go stunc the first datagram decides (a late reply to one of our
                # earlier requests is skipped by the endpoint, so -count survives it).
                reply = await endpoint.request(
                    (ip, opts.port), timeout=opts.timeout, strict=True, txid=txid
                )
            except StunClientError as e:
                if e.kind == "send":
                    err.write(f"{e}\n")
                    if opts.json:
                        _emit_json(out, {**doc, "error": str(e), "error_kind": "send"})
                    return 1
                short = (
                    f"no STUN reply from {sent} within {format_go_duration(opts.timeout)}"
                    if e.kind == "timeout"
                    else str(e)
                )
                msg = _timeout_hint(sent, opts.port, opts.timeout) if e.kind == "timeout" else short
                run.attempts.append({"txid": txid.hex(), "error": short, "error_kind": e.kind})
                if opts.count == 1:
                    err.write(msg + "\n")
                    if opts.json:
                        _emit_json(
                            out, {**doc, "error": msg, "error_kind": e.kind, "txid": txid.hex()}
                        )
                    return 1
                if not opts.json:
                    err.write(f"request {i + 1}/{opts.count}: {short}\n")
                continue
            run.replies.append(reply)
            run.attempts.append(_reply_json(reply))
            if opts.json:
                continue
            if opts.count == 1:
                # Go prints all three lines only once the reply is in.
                err.write(
                    f"sent addr: {sent}\nfrom addr: {join_host_port(*reply.origin)}\n"
                    f"stun addr: {reply.mapped}\n"
                )
            else:
                err.write(
                    f"request {i + 1}/{opts.count}: from {join_host_port(*reply.origin)}: "
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
            from_addr=join_host_port(*last.origin) if last else None,
            mapped_addr=last.mapped if last else None,
            mapped_ip=str(last.mapped_ip) if last else None,
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
