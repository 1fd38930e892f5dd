"""Go's value syntax, in one place: bools, base-0 ints, floats, durations, host:port, %q, flags.

``derpkit serve`` must accept every value Go's ``derper`` accepts and refuse what it refuses,
because operators paste command lines and Docker env values straight from derper setups; the
tools next to it (stunc, healthcheck, the benchmark generator) mirror Go programs too.
Python's ``int(x, 0)``, ``float()`` and friends disagree with Go at the edges (``010`` is octal
in Go and an error in Python; Python's ``float`` takes ``" 1 "`` and ``"+nan"``, Go does not),
so each parser here follows Go's grammar, written out from the language spec and observed
behaviour rather than trusting a Python look-alike.

Every parser raises :class:`GoValueError` whose ``reason`` is a short human explanation used
after ``invalid value "v" for flag -name:``. Nothing here knows derpkit's settings: the
server's flag table lives in ``derpkit.server.config``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "FlagError",
    "FlagHelp",
    "GoValueError",
    "flag_value_error",
    "format_duration",
    "format_float",
    "go_quote",
    "join_host_port",
    "parse_bool",
    "parse_duration",
    "parse_duration_seconds",
    "parse_float",
    "parse_int",
    "parse_uint",
    "scan_flags",
    "split_host_port",
]


class GoValueError(ValueError):
    """A value does not follow Go's syntax; ``reason`` says why, in one short phrase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --- bool -------------------------------------------------------------------------------------

_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


def parse_bool(s: str) -> bool:
    """Go's ``strconv.ParseBool``: exactly twelve spellings, no whitespace, no ``yes``/``on``."""
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise GoValueError("not a boolean (use true/false, t/f or 1/0)")


# --- integers ---------------------------------------------------------------------------------


def _underscores_ok(s: str) -> bool:
    """Go's rule for ``_`` in base-0 literals: only between digits, or right after a prefix.

    Tracks the class of the previous character: start, digit (a base prefix counts as one),
    underscore, or anything else.
    """
    if s[:1] in ("+", "-"):
        s = s[1:]
    prev = "^"
    i = 0
    hexa = False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i = 2
        prev = "0"
        hexa = s[1].lower() == "x"
    for ch in s[i:]:
        if ch.isascii() and (ch.isdigit() or (hexa and ch.lower() in "abcdef")):
            prev = "0"
        elif ch == "_":
            if prev != "0":
                return False
            prev = "_"
        else:
            if prev == "_":
                return False
            prev = "!"
    return prev != "_"


_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def parse_int(s: str, bits: int = 64) -> int:
    """Go's ``strconv.ParseInt(s, 0, bits)``: the base comes from the prefix.

    ``0x``/``0X`` hex, ``0o``/``0O`` or a bare leading ``0`` octal, ``0b``/``0B`` binary,
    otherwise decimal; an optional sign; ``_`` separators between digits.
    """
    if not s:
        raise GoValueError("not an integer (empty)")
    body = s
    neg = False
    if body[0] in "+-":
        neg = body[0] == "-"
        body = body[1:]
    if not body:
        raise GoValueError("not an integer")
    base = 10
    if body[0] == "0":
        if len(body) >= 3 and body[1].lower() == "x":
            base, body = 16, body[2:]
        elif len(body) >= 3 and body[1].lower() == "o":
            base, body = 8, body[2:]
        elif len(body) >= 3 and body[1].lower() == "b":
            base, body = 2, body[2:]
        else:
            base, body = 8, body[1:]
    n = 0
    underscores = False
    for ch in body:
        if ch == "_":
            underscores = True
            continue
        d = _DIGITS.find(ch.lower()) if ch.isascii() else -1
        if d < 0 or d >= base:
            raise GoValueError("not an integer")
        n = n * base + d
    if underscores and not _underscores_ok(s):
        raise GoValueError("not an integer (misplaced '_')")
    limit = 1 << (bits - 1)
    if (neg and n > limit) or (not neg and n >= limit):
        raise GoValueError("value out of range")
    return -n if neg else n


def parse_uint(s: str, bits: int = 64) -> int:
    """Go's ``strconv.ParseUint(s, 10, bits)``: ASCII decimal digits only (no sign, prefix, ``_``).

    Here ``reason`` is strconv's own error text (``invalid syntax``, ``value out of range``),
    not a human phrase, because Go tools print strconv's error verbatim (stunc:
    ``invalid port: strconv.ParseUint: parsing "x": invalid syntax``) and so must derpkit's.
    """
    if not s or not s.isascii() or not s.isdigit():
        raise GoValueError("invalid syntax")
    n = int(s)
    if n >= 1 << bits:
        raise GoValueError("value out of range")
    return n


# --- floats -----------------------------------------------------------------------------------

_DEC = r"[0-9](?:_?[0-9])*"
_HEX = r"[0-9a-fA-F](?:_?[0-9a-fA-F])*"
_DEC_FLOAT = re.compile(rf"[+-]?(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?")
_HEX_FLOAT = re.compile(rf"([+-]?)0[xX]_?((?:{_HEX}(?:\.(?:{_HEX})?)?|\.{_HEX}))[pP]([+-]?{_DEC})")
_SPECIAL = re.compile(r"([+-]?)(inf|infinity)|nan", re.IGNORECASE)


def parse_float(s: str) -> float:
    """Go's ``strconv.ParseFloat(s, 64)``.

    Accepts decimal and hex (``0x1p-2``, the ``p`` exponent is required) literals with ``_``
    separators, and, in any case, ``inf``, ``infinity`` (optionally signed) and ``nan``
    (unsigned). A finite literal too large for a float64 is a range error, as in Go.
    """
    m = _SPECIAL.fullmatch(s)
    if m:
        if m.group(0).lower() == "nan":
            return math.nan
        return -math.inf if m.group(1) == "-" else math.inf
    if _DEC_FLOAT.fullmatch(s):
        value = float(s.replace("_", ""))
    else:
        h = _HEX_FLOAT.fullmatch(s)
        if not h:
            raise GoValueError("not a number (use e.g. 10, 2.5, 1e3 or +Inf)")
        sign, mant, exp = h.groups()
        try:
            value = float.fromhex(f"{sign}0x{mant.replace('_', '')}p{exp.replace('_', '')}")
        except OverflowError:
            raise GoValueError("value out of range") from None
    if math.isinf(value):
        raise GoValueError("value out of range")
    return value


def format_float(x: float) -> str:
    """Render a float the way Go's ``%v`` does for flag defaults (``+Inf``, ``NaN``, ``0.5``)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if x == int(x) and abs(x) < 1e21:
        return str(int(x))
    return repr(x)


# --- durations --------------------------------------------------------------------------------

_NS = 1
_US = 1000 * _NS
_MS = 1000 * _US
_S = 1000 * _MS
_M = 60 * _S
_H = 60 * _M
_UNITS = {
    "ns": _NS,
    "us": _US,
    "\u00b5s": _US,  # micro sign
    "\u03bcs": _US,  # Greek small letter mu
    "ms": _MS,
    "s": _S,
    "m": _M,
    "h": _H,
}
_MAX_I64 = (1 << 63) - 1


def parse_duration(s: str) -> int:
    """Go's ``time.ParseDuration``: returns integer nanoseconds.

    A signed sequence of ``<decimal><unit>`` pieces (``1h30m``, ``1.5h``, ``-1s``, ``10m0s``).
    ``0`` is the only number allowed without a unit; no spaces, no ``_``, no ``d`` unit.
    Fractions are truncated to whole nanoseconds the way Go does it.
    """
    orig = s
    neg = False
    if s[:1] in ("+", "-"):
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise GoValueError("not a duration (use e.g. 10s, 1.5h or 10m0s)")
    total = 0
    while s:
        if not (s[0] == "." or s[0].isascii() and s[0].isdigit()):
            raise GoValueError("not a duration (use e.g. 10s, 1.5h or 10m0s)")
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole_digits = s[:i]
        s = s[i:]
        frac_digits = ""
        if s[:1] == ".":
            s = s[1:]
            i = 0
            while i < len(s) and s[i].isascii() and s[i].isdigit():
                i += 1
            frac_digits = s[:i]
            s = s[i:]
        if not whole_digits and not frac_digits:
            raise GoValueError("not a duration (a number is missing before the unit)")
        i = 0
        while i < len(s) and s[i] != "." and not (s[i].isascii() and s[i].isdigit()):
            i += 1
        unit_name = s[:i]
        s = s[i:]
        if not unit_name:
            raise GoValueError(
                f"missing unit in duration {go_quote(orig)} (use ns, us, ms, s, m or h; only 0 may omit it)"
            )
        unit = _UNITS.get(unit_name)
        if unit is None:
            raise GoValueError(
                f"unknown unit {go_quote(unit_name)} in duration (use ns, us, ms, s, m or h)"
            )
        whole = int(whole_digits) if whole_digits else 0
        if whole > (1 << 63) // unit:
            raise GoValueError("duration out of range")
        v = whole * unit
        if frac_digits:
            # Go accumulates fraction digits until the next one would overflow int64, then
            # scales with float64 arithmetic and truncates; mirror that for identical results.
            f, scale = 0, 1
            for ch in frac_digits:
                if f > _MAX_I64 // 10:
                    break
                f2 = f * 10 + int(ch)
                if f2 > _MAX_I64:
                    break
                f, scale = f2, scale * 10
            v += int(float(f) * (float(unit) / scale))
        if v > 1 << 63:
            raise GoValueError("duration out of range")
        total += v
        if total > 1 << 63:
            raise GoValueError("duration out of range")
    if neg:
        return -total
    if total > _MAX_I64:
        raise GoValueError("duration out of range")
    return total


def parse_duration_seconds(s: str) -> float:
    """:func:`parse_duration`, in float seconds (what asyncio and socket options want)."""
    return parse_duration(s) / _S


def _fmt_frac(v: int, prec: int) -> tuple[str, int]:
    """Digits after the point for ``v`` with ``prec`` implied decimals, trailing zeros dropped."""
    frac = ""
    printed = False
    for _ in range(prec):
        digit = v % 10
        printed = printed or digit != 0
        if printed:
            frac = str(digit) + frac
        v //= 10
    return ("." + frac if printed else ""), v


def format_duration(ns: int) -> str:
    """Go's ``time.Duration.String`` (``10m0s``, ``1h30m0s``, ``1.5s``, ``250ms``, ``0s``).

    Used to print defaults in usage text and docs exactly as derper prints them.
    """
    if ns == 0:
        return "0s"
    neg = ns < 0
    u = -ns if neg else ns
    if u < _S:
        if u < _US:
            out = f"{u}ns"
        elif u < _MS:
            frac, whole = _fmt_frac(u, 3)
            out = f"{whole}{frac}\u00b5s"
        else:
            frac, whole = _fmt_frac(u, 6)
            out = f"{whole}{frac}ms"
    else:
        frac, secs = _fmt_frac(u, 9)
        out = f"{secs % 60}{frac}s"
        mins = secs // 60
        if mins > 0:
            out = f"{mins % 60}m{out}"
            hours = mins // 60
            if hours > 0:
                out = f"{hours}h{out}"
    return "-" + out if neg else out


# --- host:port --------------------------------------------------------------------------------


def split_host_port(hostport: str) -> tuple[str, str]:
    """Go's ``net.SplitHostPort``: ``host:port``, ``[v6]:port`` or ``:port``.

    The error text matches Go's (``address 443: missing port in address``) because derper
    prints it after ``invalid server address:`` and operators search for it.
    """

    def fail(why: str) -> GoValueError:
        # Go's text; a non-printable address Go-quoted, so the error stays one line (atheris).
        return GoValueError(f"address {_shown(hostport)}: {why}" if hostport else why)

    i = hostport.rfind(":")
    if i < 0:
        raise fail("missing port in address")
    j = k = 0
    if hostport[0] == "[":
        end = hostport.find("]")
        if end < 0:
            raise fail("missing ']' in address")
        if end + 1 == len(hostport):
            raise fail("missing port in address")
        if end + 1 != i:
            if hostport[end + 1] == ":":
                raise fail("too many colons in address")
            raise fail("missing port in address")
        host = hostport[1:end]
        j, k = 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            raise fail("too many colons in address")
    if "[" in hostport[j:]:
        raise fail("unexpected '[' in address")
    if "]" in hostport[k:]:
        raise fail("unexpected ']' in address")
    return host, hostport[i + 1 :]


def join_host_port(host: str, port: int | str) -> str:
    """Go's ``net.JoinHostPort``: brackets around a host containing ``:`` (IPv6), else none.

    Used wherever derpkit prints or dials ``host:port`` so IPv6 addresses come out as Go
    prints them (``[::1]:3478``, ``[fe80::1%eth0]:3478``) and URLs stay parseable.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- %q ---------------------------------------------------------------------------------------

_NAMED_ESCAPES = {"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\v": "\\v"}


def go_quote(s: str) -> str:
    """Go's ``%q`` (``strconv.Quote``) for text: printable runes kept, the rest escaped.

    derper quotes operator input in its errors and logs with ``%q``; quoting it the same way
    keeps derpkit's lines greppable next to derper's. Escapes follow Go: ``\\a\\b\\f\\n\\r\\t\\v``
    by name, other ASCII controls as ``\\xNN``, other non-printables as ``\\uNNNN``/``\\UNNNNNNNN``.
    """
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif ord(ch) < 0x80:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


# --- the flag loop ----------------------------------------------------------------------------


class FlagError(Exception):
    """A command line Go's ``flag`` package refuses; ``str()`` is Go's exact line.

    ``flag`` names the offending flag when there is one (``None`` for bad syntax).
    """

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.flag = flag


class FlagHelp(FlagError):
    """``-h`` or ``-help`` was given and no flag of that name is defined (Go's ``ErrHelp``)."""


def _shown(text: str) -> str:
    """An argument as it goes into a one-line error: as given (Go's text) when printable,
    else Go-quoted, so a newline in argv cannot split the line (found by atheris)."""
    return text if text.isprintable() else go_quote(text)


def scan_flags(
    argv: Sequence[str], is_bool: Callable[[str], bool | None], rest: list[str]
) -> Iterator[tuple[str, str, bool]]:
    """Go's ``FlagSet.Parse`` loop, value-agnostic: yields ``(name, text, is_bool)`` in order.

    ``is_bool(name)`` says whether a flag is defined (``None`` when not) and whether it is a
    bool flag (which takes ``-b`` alone or ``-b=v``, never the next argument). A bool flag
    given alone yields the text ``"true"``. The caller parses each text as it is yielded, so
    a bad value is reported before a later syntax error, as Go does; use
    :func:`flag_value_error` for Go's wording. Scanning stops at the first non-flag or after
    ``--``; what is left is put in ``rest``.
    """
    args = list(argv)
    try:
        while args:
            s = args[0]
            if len(s) < 2 or s[0] != "-":
                break
            minuses = 2 if s[1] == "-" else 1
            if minuses == 2 and len(s) == 2:
                args.pop(0)
                break
            name = s[minuses:]
            if not name or name[0] in "-=":
                raise FlagError(f"bad flag syntax: {_shown(s)}")
            args.pop(0)
            name, has_value, value = name.partition("=")
            kind = is_bool(name)
            if kind is None:
                if name in ("h", "help"):
                    raise FlagHelp("flag: help requested", name)
                raise FlagError(f"flag provided but not defined: {_shown('-' + name)}", name)
            if kind:
                yield name, (value if has_value else "true"), True
                continue
            if not has_value:
                if not args:
                    raise FlagError(f"flag needs an argument: {_shown('-' + name)}", name)
                value = args.pop(0)
            yield name, value, False
    finally:
        rest[:] = args


def flag_value_error(name: str, text: str, reason: str, *, is_bool: bool) -> FlagError:
    """Go's line for a flag value its parser refused (bool flags have their own wording)."""
    if is_bool:
        return FlagError(f"invalid boolean value {go_quote(text)} for {_shown('-' + name)}: {reason}", name)
    return FlagError(f"invalid value {go_quote(text)} for flag {_shown('-' + name)}: {reason}", name)
