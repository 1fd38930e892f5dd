"""Go value syntax: every expectation below was produced by Go 1.26's own parsers.

The vectors come from running ``strconv.ParseInt(s, 0, 64)``, ``strconv.ParseFloat(s, 64)``,
``time.ParseDuration`` (with ``Duration.String``), ``strconv.ParseBool`` and
``net.SplitHostPort`` over each input; ``None`` means Go refused it. They are pinned here so
the suite needs no Go toolchain.
"""

from __future__ import annotations

import math

import pytest

from derpkit.gosyntax import (
    FlagError,
    FlagHelp,
    GoValueError,
    flag_value_error,
    format_duration,
    format_float,
    go_quote,
    join_host_port,
    parse_bool,
    parse_duration,
    parse_duration_seconds,
    parse_float,
    parse_int,
    parse_uint,
    scan_flags,
    split_host_port,
)

INF = math.inf
NAN = math.nan

INT_CASES = [
    ("0", 0),
    ("1", 1),
    ("-1", -1),
    ("+1", 1),
    ("0x50", 80),
    ("0X50", 80),
    ("0o120", 80),
    ("0O120", 80),
    ("0b101", 5),
    ("010", 8),
    ("08", None),
    ("0_1", 1),
    ("1_000", 1000),
    ("1__0", None),
    ("_1", None),
    ("1_", None),
    ("0x_1", 1),
    ("0x", None),
    ("0o", None),
    ("0b", None),
    ("-0x10", -16),
    ("9223372036854775807", 9223372036854775807),
    ("9223372036854775808", None),
    ("-9223372036854775808", -9223372036854775808),
    ("-9223372036854775809", None),
    ("0x7fffffffffffffff", 9223372036854775807),
    (" 1", None),
    ("1 ", None),
    ("", None),
    ("+", None),
    ("-", None),
    ("abc", None),
    ("1e3", None),
    ("0xg", None),
    ("0b2", None),
    ("0o8", None),
    ("١", None),
]

FLOAT_CASES = [
    ("0", 0.0),
    ("1", 1.0),
    ("+Inf", INF),
    ("inf", INF),
    ("-inf", -INF),
    ("Infinity", INF),
    ("-Infinity", -INF),
    ("INF", INF),
    ("NaN", NAN),
    ("nan", NAN),
    ("+nan", None),
    ("-NaN", None),
    ("infin", None),
    ("1e400", None),
    ("-1e400", None),
    ("1e-400", 0.0),
    ("1.5", 1.5),
    ("1.", 1.0),
    (".5", 0.5),
    (".", None),
    ("1_000.5", 1000.5),
    ("1_.5", None),
    ("0x1p-2", 0.25),
    ("0x1.8p1", 3.0),
    ("0x1", None),
    ("0x_1p0", 1.0),
    ("1e3", 1000.0),
    ("1E+3", 1000.0),
    (" 1", None),
    ("", None),
    ("abc", None),
    ("1_000", 1000.0),
    ("0x1p2000", None),
    ("1e", None),
    ("e3", None),
    ("0x.8p1", 1.0),
    ("1__0", None),
]

DURATION_CASES = [
    ("0", 0, "0s"),
    ("-0", 0, "0s"),
    ("+0", 0, "0s"),
    ("10m0s", 600000000000, "10m0s"),
    ("1.5h", 5400000000000, "1h30m0s"),
    ("-1s", -1000000000, "-1s"),
    ("1h30m", 5400000000000, "1h30m0s"),
    ("1", None, None),
    ("1x", None, None),
    ("", None, None),
    ("s", None, None),
    (".s", None, None),
    ("1.s", 1000000000, "1s"),
    (".5s", 500000000, "500ms"),
    ("1µs", 1000, "1µs"),
    ("1μs", 1000, "1µs"),
    ("1us", 1000, "1µs"),
    ("1ns", 1, "1ns"),
    ("1ms", 1000000, "1ms"),
    ("1d", None, None),
    ("1 s", None, None),
    ("1s ", None, None),
    ("1_000s", None, None),
    ("9223372036854775807ns", 9223372036854775807, "2562047h47m16.854775807s"),
    ("9223372036854775808ns", None, None),
    ("-9223372036854775808ns", -9223372036854775808, "-2562047h47m16.854775808s"),
    ("2562047h", 9223369200000000000, "2562047h0m0s"),
    ("2562048h", None, None),
    ("0.000000001s", 1, "1ns"),
    ("1.0000000001s", 1000000000, "1s"),
    ("3m0.5s", 180500000000, "3m0.5s"),
    ("1h1h", 7200000000000, "2h0m0s"),
    ("+5m", 300000000000, "5m0s"),
    ("--1s", None, None),
    ("0s", 0, "0s"),
    ("00s", 0, "0s"),
    ("1.123456789123456789s", 1123456789, "1.123456789s"),
    ("15s", 15000000000, "15s"),
    ("2s", 2000000000, "2s"),
]

BOOL_CASES = [
    ("1", True),
    ("t", True),
    ("T", True),
    ("TRUE", True),
    ("true", True),
    ("True", True),
    ("0", False),
    ("f", False),
    ("F", False),
    ("FALSE", False),
    ("false", False),
    ("False", False),
    ("yes", None),
    ("tRUE", None),
    ("", None),
    (" true", None),
    ("on", None),
]

HOSTPORT_CASES = [
    (":443", ("", "443")),
    ("443", "address 443: missing port in address"),
    ("1.2.3.4:80", ("1.2.3.4", "80")),
    ("[::1]:443", ("::1", "443")),
    ("::1:443", "address ::1:443: too many colons in address"),
    ("[::1]", "address [::1]: missing port in address"),
    ("[::1", "address [::1: missing ']' in address"),
    ("[::1]x:443", "address [::1]x:443: missing port in address"),
    ("[::1]:443:1", "address [::1]:443:1: too many colons in address"),
    ("a[b:1", "address a[b:1: unexpected '[' in address"),
    ("a]b:1", "address a]b:1: unexpected ']' in address"),
    ("", "missing port in address"),
    (":", ("", "")),
    (":https", ("", "https")),
    ("host:", ("host", "")),
    ("[]:80", ("", "80")),
    ("[a]b]:80", "address [a]b]:80: missing port in address"),
]


@pytest.mark.parametrize(("text", "want"), INT_CASES)
def test_parse_int_matches_go(text: str, want: int | None) -> None:
    if want is None:
        with pytest.raises(GoValueError):
            parse_int(text)
    else:
        assert parse_int(text) == want


@pytest.mark.parametrize(("text", "want"), FLOAT_CASES)
def test_parse_float_matches_go(text: str, want: float | None) -> None:
    if want is None:
        with pytest.raises(GoValueError):
            parse_float(text)
    elif math.isnan(want):
        assert math.isnan(parse_float(text))
    else:
        assert parse_float(text) == want


@pytest.mark.parametrize(("text", "want_ns", "go_string"), DURATION_CASES)
def test_parse_duration_matches_go(text: str, want_ns: int | None, go_string: str | None) -> None:
    if want_ns is None:
        with pytest.raises(GoValueError):
            parse_duration(text)
        return
    got = parse_duration(text)
    assert got == want_ns
    assert format_duration(got) == go_string


@pytest.mark.parametrize(("text", "want"), BOOL_CASES)
def test_parse_bool_matches_go(text: str, want: bool | None) -> None:
    if want is None:
        with pytest.raises(GoValueError):
            parse_bool(text)
    else:
        assert parse_bool(text) is want


@pytest.mark.parametrize(("text", "want"), HOSTPORT_CASES)
def test_split_host_port_matches_go(text: str, want: tuple[str, str] | str) -> None:
    if isinstance(want, str):
        with pytest.raises(GoValueError) as exc:
            split_host_port(text)
        assert exc.value.reason == want  # Go's exact error text
    else:
        assert split_host_port(text) == want


# The cases the issue names explicitly, spelled out so a reader sees them at a glance.


def test_named_edge_cases() -> None:
    assert parse_int("0x50") == 80
    assert parse_int("1_000") == 1000
    assert parse_float("+Inf") == math.inf
    assert parse_float("inf") == math.inf
    assert parse_duration_seconds("10m0s") == 600.0
    assert parse_duration_seconds("1.5h") == 5400.0
    assert parse_duration_seconds("-1s") == -1.0
    assert parse_duration("0") == 0


@pytest.mark.parametrize("text", ["1", "10", "1d", "1w", "5 s", "1.5", "10M", "1H"])
def test_bad_duration_units_refused(text: str) -> None:
    with pytest.raises(GoValueError) as exc:
        parse_duration(text)
    assert "unit" in exc.value.reason or "duration" in exc.value.reason


def test_reasons_are_human() -> None:
    with pytest.raises(GoValueError, match="not an integer"):
        parse_int("abc")
    with pytest.raises(GoValueError, match="out of range"):
        parse_int("9223372036854775808")
    with pytest.raises(GoValueError, match="not a boolean"):
        parse_bool("yes")
    with pytest.raises(GoValueError, match='missing unit in duration "1"'):
        parse_duration("1")
    with pytest.raises(GoValueError, match='unknown unit "d"'):
        parse_duration("1d")
    with pytest.raises(GoValueError, match="out of range"):
        parse_float("1e400")


def test_int_bits() -> None:
    assert parse_int("2147483647", bits=32) == 2**31 - 1
    with pytest.raises(GoValueError, match="out of range"):
        parse_int("2147483648", bits=32)
    assert parse_int("-2147483648", bits=32) == -(2**31)


@pytest.mark.parametrize(
    ("ns", "text"),
    [
        (0, "0s"),
        (1, "1ns"),
        (1500, "1.5\u00b5s"),
        (250_000_000, "250ms"),
        (2_000_000_000, "2s"),
        (15_000_000_000, "15s"),
        (600_000_000_000, "10m0s"),
        (5_400_000_000_000, "1h30m0s"),
        (-1_000_000_000, "-1s"),
        (1_500_000_000, "1.5s"),
    ],
)
def test_format_duration_like_go(ns: int, text: str) -> None:
    assert format_duration(ns) == text


@pytest.mark.parametrize(
    ("x", "text"),
    [(math.inf, "+Inf"), (-math.inf, "-Inf"), (math.nan, "NaN"), (10.0, "10"), (0.5, "0.5")],
)
def test_format_float_like_go(x: float, text: str) -> None:
    assert format_float(x) == text


@pytest.mark.parametrize(
    ("text", "quoted"),
    [
        # fmt.Sprintf("%q", text) in Go 1.26
        ('a"b\\c', '"a\\"b\\\\c"'),
        ("\u00e9\x01", '"\u00e9\\x01"'),
        ("\a\b\f\n\r\t\v", '"\\a\\b\\f\\n\\r\\t\\v"'),
        ("\x7f\u00a0\u2028", '"\\x7f\\u00a0\\u2028"'),
        ("\U0001f600", '"\U0001f600"'),
        ("", '""'),
    ],
)
def test_go_quote_like_go(text: str, quoted: str) -> None:
    assert go_quote(text) == quoted


FLAGS = {"v": True, "n": False}


def scan(argv: list[str]) -> tuple[list[tuple[str, str, bool]], list[str]]:
    rest: list[str] = []
    got = list(scan_flags(argv, FLAGS.get, rest))
    return got, rest


def test_scan_flags_follows_go_flag() -> None:
    assert scan(["-v", "--n", "3", "-n=4", "-v=false", "x", "-n", "5"]) == (
        [("v", "true", True), ("n", "3", False), ("n", "4", False), ("v", "false", True)],
        ["x", "-n", "5"],
    )
    assert scan(["-n", "-v", "--", "-v"]) == ([("n", "-v", False)], ["-v"])
    assert scan(["-", "-v"]) == ([], ["-", "-v"])


@pytest.mark.parametrize(
    ("argv", "message", "flag"),
    [
        (["-=x"], "bad flag syntax: -=x", None),
        (["---v"], "bad flag syntax: ---v", None),
        (["-q"], "flag provided but not defined: -q", "q"),
        (["-n"], "flag needs an argument: -n", "n"),
    ],
)
def test_scan_flags_errors_are_gos(argv: list[str], message: str, flag: str | None) -> None:
    with pytest.raises(FlagError) as e:
        scan(argv)
    assert (str(e.value), e.value.flag) == (message, flag)
    assert not isinstance(e.value, FlagHelp)


def test_scan_flags_help_only_when_undefined() -> None:
    with pytest.raises(FlagHelp):
        scan(["-help"])
    rest: list[str] = []
    assert list(scan_flags(["-h"], {"h": True}.get, rest)) == [("h", "true", True)]


def test_flag_value_error_wording() -> None:
    assert str(flag_value_error("v", "x", "bad", is_bool=True)) == 'invalid boolean value "x" for -v: bad'
    assert str(flag_value_error("n", "x", "bad", is_bool=False)) == 'invalid value "x" for flag -n: bad'


# Go 1.26: strconv.ParseUint(s, 10, 16) and net.JoinHostPort(h, "3478") over each input.
UINT16_CASES = [
    ("0", 0), ("3478", 3478), ("65535", 65535), ("00080", 80),
    ("65536", "value out of range"), ("99999999999999999999", "value out of range"),
    ("", "invalid syntax"), ("+1", "invalid syntax"), ("-1", "invalid syntax"),
    ("0x10", "invalid syntax"), ("1_0", "invalid syntax"), (" 1", "invalid syntax"),
    ("1 ", "invalid syntax"), ("\u0663", "invalid syntax"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "want"), UINT16_CASES)
def test_parse_uint_matches_go(text: str, want: int | str) -> None:
    if isinstance(want, str):
        with pytest.raises(GoValueError) as exc:
            parse_uint(text, 16)
        assert exc.value.reason == want  # strconv's exact error text
    else:
        assert parse_uint(text, 16) == want


@pytest.mark.parametrize(
    ("host", "joined"),
    [("127.0.0.1", "127.0.0.1:3478"), ("::1", "[::1]:3478"), ("fe80::1%eth0", "[fe80::1%eth0]:3478"),
     ("example.com", "example.com:3478"), ("", ":3478"), ("[::1]", "[[::1]]:3478")],
)  # fmt: skip
def test_join_host_port_matches_go(host: str, joined: str) -> None:
    assert join_host_port(host, "3478") == join_host_port(host, 3478) == joined
