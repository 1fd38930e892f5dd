"""``derpkit stunc``: send a Tailscale-shaped STUN request and say what came back, and why not.

The default output and exit codes are those of Tailscale's ``stunc`` (three ``sent/from/stun
addr`` lines on stderr, exit 0; exit 1 on any failure; exit 2 on a bad flag), so scripts written
for it keep working. Extras exist only behind extra flags: ``-json`` for programs, ``-count``/
``-interval`` for RTT and loss statistics, ``-retries`` (retransmissions with doubling gaps),
``-4``/``-6``, ``-plain`` (a bare RFC 5389 request) and ``-nat`` (NAT behaviour discovery, see
:mod:`derpkit.stunc.discover`). The diagnostics on failure are the real point of the tool: a
silent UDP port has many causes, and naming them saves an operator an afternoon; before giving
up on a silent server the other request shape is tried once.

Differences from Go's ``stunc``, on purpose: ``from addr`` is printed unmapped
(``127.0.0.1:3478``, where Go's dual-stack socket shows ``[::ffff:127.0.0.1]:3478``), and a
reply whose transaction id belongs to an earlier request of the same run is skipped, not fatal.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import Callable
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
    split_host_port,
)
from derpkit.stun.client import (
    DEFAULT_PORT,
    RequestShape,
    StunClientError,
    StunEndpoint,
    StunResult,
    StunSendError,
    resolve,
)
from derpkit.stun.codec import new_txid
from derpkit.stunc.hints import fallback_note, silence_hint

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
    interval: float = 0.0
    retries: int = 0
    plain: bool = False
    family: int = socket.AF_UNSPEC
    nat: bool = False
    nat_servers: list[tuple[str, int]] = field(default_factory=list)
    lifetime: float = 0.0
    local: tuple[str, int] | None = None
    host: str = ""
    port: int = DEFAULT_PORT

    @property
    def shape(self) -> RequestShape:
        return "plain" if self.plain else "tailscale"


# (name, type shown, help, default shown); Go's PrintDefaults sorts by name.
_FLAG_HELP = [
    ("4", "", "use IPv4 only (resolve the name to an A record)", ""),
    ("6", "", "use IPv6 only (resolve the name to an AAAA record)", ""),
    ("count", "int", "send N sequential requests from one socket and print RTT min/avg/max "
     "and loss", "1"),
    ("interval", "duration", "pause between -count requests", "0s"),
    ("json", "", "print one JSON object on stdout instead of the lines on stderr", ""),
    ("lifetime", "duration", "with -nat: probe how long an idle mapping lives, up to this long "
     "(needs an RFC 5780 server; 0 skips)", "0s"),
    ("local", "string", "bind the socket to this address ([host]:port), e.g. :41641 to test "
     "the mapping of tailscaled's port (with -nat: the mapping and hairpinning socket)", ""),
    ("nat", "", "discover the NAT's behaviour (RFC 4787 mapping and filtering, hairpinning) and "
     "explain what it means for Tailscale", ""),
    ("nat-servers", "string", "with -nat: more STUN servers (host[:port],...) to compare "
     "mappings against", ""),
    ("plain", "", "send a bare RFC 5389 binding request instead of Tailscale's (Go derper "
     "ignores it)", ""),
    ("retries", "int", "retransmit an unanswered request up to N times (same id, doubling gaps, "
     "all within -timeout)", "0"),
    ("timeout", "duration", "response wait timeout (default 3s)", None),
]


def _defaults() -> str:
    """The flag list in Go's ``PrintDefaults`` layout (sorted, tab-indented help)."""
    out = []
    for name, typ, help_, default in _FLAG_HELP:
        out.append(f"  -{name} {typ}".rstrip())
        suffix = f" (default {default})" if default and default not in ("0", "0s") else ""
        out.append(f"    \t{help_}{suffix}")
    return "\n".join(out) + "\n"




def _server_list(text: str) -> list[tuple[str, int]]:
    """``host[:port],...`` (IPv6 bracketed when a port is given); port defaults to 3478."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        host, port = item, DEFAULT_PORT
        if item.startswith("["):
            end = item.find("]")
            if end < 0:
                raise ValueError(item)
            host, rest = item[1:end], item[end + 1 :]
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(item)
                port = parse_uint(rest[1:], 16)
        elif item.count(":") == 1:
            host, p = item.split(":")
            port = parse_uint(p, 16)
        if not host:
            raise ValueError(item)
        out.append((host, port))
    return out


def _local_addr(text: str) -> tuple[str, int]:
    """``-local``: ``host:port`` or ``:port`` (Go syntax, IPv6 bracketed); host "" = any."""
    host, port = split_host_port(text)
    return host.strip("[]"), parse_uint(port, 16)


#: flag -> (Options attribute, Go parser); -4/-6 land on v4/v6 and become ``family``.
_PARSERS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "json": ("json", parse_bool),
    "plain": ("plain", parse_bool),
    "nat": ("nat", parse_bool),
    "4": ("v4", parse_bool),
    "6": ("v6", parse_bool),
    "timeout": ("timeout", parse_duration_seconds),
    "interval": ("interval", parse_duration_seconds),
    "lifetime": ("lifetime", parse_duration_seconds),
    "nat-servers": ("nat_servers", _server_list),
    "retries": ("retries", parse_int),
    "count": ("count", parse_int),  # Go's flag.Int: strconv.ParseInt(s, 0, 64)
    "local": ("local", _local_addr),
}
_BOOL_FLAGS = {name: parse is parse_bool for name, (_attr, parse) in _PARSERS.items()}
_MINIMUM = {"count": 1, "retries": 0, "interval": 0, "lifetime": 0}


def parse_args(argv: list[str]) -> Options:
    """Go ``flag`` grammar: ``-f v``, ``-f=v``, ``--f v``; flags stop at the first positional."""
    opts = Options()
    rest: list[str] = []
    v4 = v6 = False
    try:
        for name, text, is_bool in scan_flags(argv, _BOOL_FLAGS.get, rest):
            attr, parse = _PARSERS[name]
            try:
                value = parse(text)
            except (GoValueError, ValueError):
                raise flag_value_error(name, text, "parse error", is_bool=is_bool) from None
            low = _MINIMUM.get(name)
            if low is not None and value < low:
                raise UsageError(
                    f"invalid value {go_quote(text)} for flag -{name}: must be at least {low}", 2
                )
            if attr == "v4":
                v4 = value
            elif attr == "v6":
                v6 = value
            else:
                setattr(opts, attr, value)
    except FlagHelp:
        raise UsageError("", 0) from None
    except FlagError as e:
        raise UsageError(e.message, 2) from None
    if v4 and v6:
        raise UsageError("-4 and -6 are mutually exclusive", 2)
    opts.family = socket.AF_INET if v4 else socket.AF_INET6 if v6 else socket.AF_UNSPEC
    if not 1 <= len(rest) <= 2:
        raise UsageError(f"usage: {PROG} <hostname> [port]", 1)
    opts.host = rest[0]
    if len(rest) == 2:
        opts.port = _parse_port(rest[1])
    return opts


# --- the query -----------------------------------------------------------------------------


def local_bind(local: tuple[str, int] | None, family: int) -> tuple[str, int] | None:
    """``-local`` as a bind address for ``family`` (an empty host is the wildcard)."""
    if local is None:
        return None
    host = local[0] or ("::" if family == socket.AF_INET6 else "0.0.0.0")
    return host, local[1]



def _reply_json(r: StunResult, shape: str) -> dict[str, Any]:
    """One answered request as the ``-json`` output shows it."""
    return {
        "txid": r.txid.hex(),
        "rtt_ms": round(r.rtt * 1000, 3),
        "from_addr": join_host_port(*r.origin),
        "mapped_addr": r.mapped,
        "mapped_ip": str(r.mapped_ip),
        "mapped_port": r.mapped_port,
        "addr_attr": f"0x{r.addr_attr:04x}",
        "sent": r.attempts,
        "shape": shape,
    }


def _emit_json(out: TextIO, doc: dict[str, Any]) -> None:
    out.write(json.dumps(doc, sort_keys=False) + "\n")
    out.flush()


@dataclass
class _Run:
    replies: list[StunResult] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    fallback: dict[str, Any] | None = None


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
    try:
        if opts.nat:
            from derpkit.stunc.natcli import run_nat

            return asyncio.run(run_nat(opts))
        return asyncio.run(_probe(opts))
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - a tool prints one line, never a traceback
        err.write(f"{PROG}: internal error: {type(e).__name__}: {e}\n")
        return 1


async def _ask(
    endpoint: StunEndpoint, opts: Options, server: tuple[str, int], shape: RequestShape,
    run: _Run, timeout: float | None = None,
) -> StunResult:
    """One transaction with -retries; the sends are counted whatever the outcome."""
    txid = new_txid()
    before = endpoint.stats.sent
    try:
        # strict: like Go stunc the first datagram decides (a late reply to one of our earlier
        # requests is skipped by the endpoint, so -count survives it).
        return await endpoint.request(
            server, timeout=opts.timeout if timeout is None else timeout, strict=True,
            txid=txid, shape=shape, retries=opts.retries, backoff=2.0,
        )
    except StunClientError as e:
        e.txid = txid  # type: ignore[attr-defined]
        raise
    finally:
        run.sent += endpoint.stats.sent - before


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
        family, ip = await resolve(opts.host, opts.port, opts.family)
        endpoint = await StunEndpoint.open(family, local=local_bind(opts.local, family))
    except StunClientError as e:
        if opts.local is not None and e.kind == "send":  # the bind failed: name the flag
            e = StunSendError(f"-local {join_host_port(*opts.local)}: {e}")
        err.write(f"{e}\n")
        if opts.json:
            _emit_json(out, {**doc, "error": str(e), "error_kind": e.kind})
        return 1
    sent = join_host_port(ip, opts.port)
    doc["sent_addr"] = sent
    doc["family"] = "ipv6" if family == socket.AF_INET6 else "ipv4"
    server = (ip, opts.port)

    run = _Run()
    last_error: StunClientError | None = None
    async with endpoint:
        if not opts.json and opts.count > 1:
            err.write(f"sent addr: {sent}\n")
        for i in range(opts.count):
            if i and opts.interval:
                await asyncio.sleep(opts.interval)
            try:
                reply = await _ask(endpoint, opts, server, opts.shape, run)
            except StunClientError as e:
                last_error = e
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
                txid = getattr(e, "txid", b"")
                run.attempts.append({"txid": txid.hex(), "error": short, "error_kind": e.kind})
                if opts.count > 1 and not opts.json:
                    err.write(f"request {i + 1}/{opts.count}: {short}\n")
                continue
            run.replies.append(reply)
            run.attempts.append(_reply_json(reply, opts.shape))
            if opts.json or opts.count == 1:
                continue
            err.write(
                f"request {i + 1}/{opts.count}: from {join_host_port(*reply.origin)}: "
                f"stun addr {reply.mapped} rtt {reply.rtt * 1000:.3f} ms"
                + (f" ({reply.attempts} sends)" if reply.attempts > 1 else "")
                + "\n"
            )
        if not run.replies and last_error is not None and last_error.kind == "timeout":
            # Silence: before giving up, try the other request shape once.
            other: RequestShape = "tailscale" if opts.plain else "plain"
            try:
                reply = await _ask(endpoint, opts, server, other, run)
            except StunClientError as e:
                run.fallback = {"shape": other, "error": str(e), "error_kind": e.kind}
            else:
                run.fallback = {"shape": other, **_reply_json(reply, other)}
                run.replies.append(reply)
                note = fallback_note(opts.shape, sent)
                run.fallback["note"] = note
                if not opts.json:
                    err.write(note + "\n")
        stats = endpoint.stats

    if opts.count == 1 and not run.replies:
        assert last_error is not None
        return _fail_one(opts, doc, run, sent, last_error, stats.icmp_errors)
    if opts.count == 1 and not opts.json:
        reply = run.replies[-1]
        # Go prints all three lines only once the reply is in.
        err.write(
            f"sent addr: {sent}\nfrom addr: {join_host_port(*reply.origin)}\n"
            f"stun addr: {reply.mapped}\n"
        )
    return _finish(opts, doc, run, sent, stats.icmp_errors)


def _shapes_tried(opts: Options, run: _Run) -> tuple[str, ...]:
    return (opts.shape,) + ((run.fallback["shape"],) if run.fallback else ())


def _fail_one(
    opts: Options, doc: dict[str, Any], run: _Run, sent: str, e: StunClientError, icmp: int
) -> int:
    err, out = sys.stderr, sys.stdout
    if e.kind == "timeout":
        msg = silence_hint(sent, opts.port, opts.timeout, shapes=_shapes_tried(opts, run),
                           sent=run.sent, icmp_errors=icmp)
    else:
        msg = str(e)
    err.write(msg + "\n")
    if opts.json:
        txid = getattr(e, "txid", b"")
        _emit_json(out, {**doc, "error": msg, "error_kind": e.kind, "txid": txid.hex(),
                         "sent": run.sent, "fallback": run.fallback})
    return 1


def _finish(opts: Options, doc: dict[str, Any], run: _Run, sent: str, icmp: int) -> int:
    err, out = sys.stderr, sys.stdout
    n, got = opts.count, len(run.replies)
    if run.fallback is not None and "mapped_addr" in run.fallback:
        got -= 1  # the fallback answer is reported apart from the -count statistics
    counted = run.replies[:got]
    rtts = [r.rtt * 1000 for r in counted]
    stats = (min(rtts), sum(rtts) / len(rtts), max(rtts)) if rtts else None
    mapped = sorted({r.mapped for r in run.replies})
    lost = 100.0 * (n - got) / n
    if opts.json:
        last = run.replies[-1] if run.replies else None
        doc.update(
            ok=last is not None,
            error=None if last else f"no STUN reply from {sent} to {n} requests",
            from_addr=join_host_port(*last.origin) if last else None,
            mapped_addr=last.mapped if last else None,
            mapped_ip=str(last.mapped_ip) if last else None,
            mapped_port=last.mapped_port if last else None,
            txid=last.txid.hex() if last else None,
            rtt_ms=round(last.rtt * 1000, 3) if last else None,
            shape=opts.shape,
            count=n,
            received=got,
            sent=run.sent,
            loss_pct=round(lost, 1),
            rtt_min_ms=round(stats[0], 3) if stats else None,
            rtt_avg_ms=round(stats[1], 3) if stats else None,
            rtt_max_ms=round(stats[2], 3) if stats else None,
            mapped_addrs=mapped,
            replies=run.attempts,
            fallback=run.fallback,
        )
        if not last:
            doc["error_kind"] = "timeout"
            doc["error"] = silence_hint(sent, opts.port, opts.timeout,
                                        shapes=_shapes_tried(opts, run), sent=run.sent,
                                        icmp_errors=icmp)
        _emit_json(out, doc)
    elif n > 1:
        err.write(f"{n} requests, {got} replies, {lost:.0f}% lost ({run.sent} datagrams sent)\n")
        if stats:
            err.write(f"rtt min/avg/max = {stats[0]:.3f}/{stats[1]:.3f}/{stats[2]:.3f} ms\n")
        if len(mapped) > 1:
            err.write(
                f"note: the mapped address changed between requests ({', '.join(mapped)}): "
                "a NAT is re-mapping this socket\n"
            )
        if not run.replies:
            err.write(silence_hint(sent, opts.port, opts.timeout, shapes=_shapes_tried(opts, run),
                                   sent=run.sent, icmp_errors=icmp) + "\n")
    return 0 if run.replies else 1
