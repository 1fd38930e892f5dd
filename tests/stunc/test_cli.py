"""``derpkit stunc`` in-process against real UDP servers on loopback.

The CLI uses blocking sockets, so it runs in a worker thread while the asyncio test loop serves
the STUN endpoint; capsys captures what it prints.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from derpkit.server.stun import StunServer, start_stun_server
from derpkit.stun import build_response, parse_binding_request
from derpkit.stunc.cli import main, parse_args, parse_go_duration

STUN_LINES = re.compile(
    r"sent addr: (?P<sent>\S+)\nfrom addr: (?P<from>\S+)\nstun addr: (?P<stun>\S+)\n\Z"
)


async def stunc(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
async def server() -> AsyncIterator[StunServer]:
    srv = await start_stun_server("127.0.0.1", 0)
    yield srv
    srv.close()


def port_of(srv: StunServer) -> str:
    assert srv.sockname is not None
    return str(srv.sockname[1])


# --- against our server ------------------------------------------------------------------------


async def test_three_lines_like_go(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("127.0.0.1", port_of(server)) == 0
    cap = capsys.readouterr()
    assert cap.out == ""
    m = STUN_LINES.match(cap.err)
    assert m, cap.err
    assert m["sent"] == m["from"] == f"127.0.0.1:{port_of(server)}"
    ip, port = m["stun"].rsplit(":", 1)
    assert ip == "127.0.0.1" and 0 < int(port) < 65536 and port != port_of(server)
    assert server.counts["requests", "success"] == 1


@pytest.mark.parametrize(
    "flags", [["-timeout=2s"], ["--timeout", "2s"], ["-timeout", "1m"], ["--timeout=1.5s"]]
)
async def test_go_flag_spellings(
    server: StunServer, capsys: pytest.CaptureFixture, flags: list[str]
) -> None:
    assert await stunc(*flags, "127.0.0.1", port_of(server)) == 0
    assert STUN_LINES.match(capsys.readouterr().err)


async def test_ipv6(capsys: pytest.CaptureFixture) -> None:
    try:
        srv = await start_stun_server("::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        assert await stunc("::1", str(srv.sockname[1])) == 0
        m = STUN_LINES.match(capsys.readouterr().err)
        assert m and m["sent"] == f"[::1]:{srv.sockname[1]}"
        assert m["stun"].startswith("[::1]:")
        assert await stunc("[::1]", str(srv.sockname[1])) == 0  # brackets tolerated
    finally:
        srv.close()


async def test_json(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("-json", "127.0.0.1", port_of(server)) == 0
    cap = capsys.readouterr()
    assert cap.err == ""
    doc = json.loads(cap.out)
    assert doc["ok"] is True and doc["error"] is None
    assert doc["sent_addr"] == f"127.0.0.1:{port_of(server)}"
    assert doc["mapped_ip"] == "127.0.0.1"
    assert doc["mapped_addr"] == f"127.0.0.1:{doc['mapped_port']}"
    assert re.fullmatch(r"[0-9a-f]{24}", doc["txid"])
    assert 0 <= doc["rtt_ms"] < 1000
    assert doc["count"] == doc["received"] == 1


async def test_count(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("-count", "4", "127.0.0.1", port_of(server)) == 0
    err = capsys.readouterr().err
    assert err.count("stun addr 127.0.0.1:") == 4
    assert "4 requests, 4 replies, 0% lost" in err
    assert re.search(r"rtt min/avg/max = [\d.]+/[\d.]+/[\d.]+ ms", err)
    assert server.counts["requests", "success"] == 4

    assert await stunc("-count=3", "-json", "127.0.0.1", port_of(server)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["count"] == doc["received"] == 3 and len(doc["replies"]) == 3
    assert len({r["txid"] for r in doc["replies"]}) == 3  # a fresh id per request
    assert doc["rtt_min_ms"] <= doc["rtt_avg_ms"] <= doc["rtt_max_ms"]
    assert len(doc["mapped_addrs"]) == 1  # one socket for the whole run


# --- failures and diagnostics ------------------------------------------------------------------


@pytest.fixture
def silent_port() -> Any:
    """A bound UDP port that never answers (so no ICMP unreachable either)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        yield str(s.getsockname()[1])


async def test_timeout_message(silent_port: str, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    assert await stunc("-timeout", "200ms", "127.0.0.1", silent_port) == 1
    assert time.monotonic() - t0 < 2
    err = capsys.readouterr().err
    assert f"no STUN reply from 127.0.0.1:{silent_port} within 200ms" in err
    assert f"is UDP port {silent_port} open?" in err
    assert "Go derper only answers Tailscale-shaped requests" in err
    assert "sent addr" not in err  # Go prints the lines only on success


async def test_timeout_json(silent_port: str, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("-json", "-timeout=100ms", "127.0.0.1", silent_port) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and doc["error_kind"] == "timeout"
    assert "is UDP port" in doc["error"]


async def test_count_all_lost(silent_port: str, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("-count", "2", "-timeout", "100ms", "127.0.0.1", silent_port) == 1
    err = capsys.readouterr().err
    assert "2 requests, 0 replies, 100% lost" in err and "is UDP port" in err


async def test_refused_port_fails_fast(capsys: pytest.CaptureFixture) -> None:
    """ICMP port unreachable from a closed loopback port ends the wait at once, and says why."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    t0 = time.monotonic()
    assert await stunc("-timeout", "5s", "-json", "127.0.0.1", port) == 1
    assert time.monotonic() - t0 < 2
    cap = capsys.readouterr()
    doc = json.loads(cap.out)
    assert doc["error_kind"] == "refused"
    assert f"nothing listens on UDP port {port} there" in doc["error"] == cap.err.strip()


class Responder(asyncio.DatagramProtocol):
    """A misbehaving UDP peer: ``answer(request, n)`` returns (delay, reply bytes or None)."""

    def __init__(self, answer: Callable[[bytes, int], tuple[float, bytes | None]]) -> None:
        self.answer = answer
        self.n = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        delay, reply = self.answer(data, self.n)
        self.n += 1
        if reply is not None:
            asyncio.get_running_loop().call_later(delay, self.transport.sendto, reply, addr)


async def responder(answer: Callable[[bytes, int], tuple[float, bytes | None]]) -> Any:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Responder(answer), local_addr=("127.0.0.1", 0)
    )
    return transport, str(transport.get_extra_info("sockname")[1])


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda req: b"hello", "is not STUN at all"),
        (lambda req: req, "is not a Binding success response"),
        (lambda req: req[:2] + b"\x00\x00" + req[4:20], "without a usable mapped address"),
        (lambda req: build_response(bytes(12), "127.0.0.1", 1), "txid mismatch: got [0 0 0"),
    ],
    ids=["not-stun", "echo", "no-address", "wrong-txid"],
)
async def test_bad_replies(
    reply: Callable[[bytes], bytes], message: str, capsys: pytest.CaptureFixture
) -> None:
    def answer(req: bytes, n: int) -> tuple[float, bytes]:
        r = reply(req)
        if r[:2] == b"\x00\x01" and len(r) == 20:
            r = b"\x01\x01" + r[2:]
        return 0.0, r

    transport, port = await responder(answer)
    try:
        assert await stunc("-timeout", "2s", "127.0.0.1", port) == 1
        assert message in capsys.readouterr().err
    finally:
        transport.close()


async def test_late_reply_to_earlier_request_is_skipped(capsys: pytest.CaptureFixture) -> None:
    """Request 1 is answered after its timeout, during request 2's wait: skip, don't fail."""

    def answer(req: bytes, n: int) -> tuple[float, bytes]:
        txid = parse_binding_request(req)
        return (0.6 if n == 0 else 0.3), build_response(txid, "192.0.2.1", 4242)

    transport, port = await responder(answer)
    try:
        rc = await stunc("-count", "2", "-timeout", "400ms", "-json", "127.0.0.1", port)
        doc = json.loads(capsys.readouterr().out)
        assert rc == 0, doc
        assert doc["received"] == 1 and doc["replies"][0]["error_kind"] == "timeout"
        assert doc["replies"][1]["mapped_addr"] == "192.0.2.1:4242"
        assert doc["replies"][1]["txid"] == doc["txid"]
    finally:
        transport.close()


async def test_unknown_host(capsys: pytest.CaptureFixture) -> None:
    assert await stunc("nosuch.invalid") == 1
    assert "lookup nosuch.invalid" in capsys.readouterr().err


# --- grammar ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "text"),
    [
        ([], 1, "usage: derpkit stunc <hostname> [port]"),
        (["a", "b", "c"], 1, "usage: derpkit stunc <hostname> [port]"),
        (["127.0.0.1", "3478", "-timeout", "1s"], 1, "usage:"),  # flags must come first
        (["-x", "h"], 2, "flag provided but not defined: -x"),
        (["-timeout", "abc", "h"], 2, 'invalid value "abc" for flag -timeout: parse error'),
        (["-timeout", "5", "h"], 2, 'invalid value "5" for flag -timeout: parse error'),
        (["-timeout"], 2, "flag needs an argument: -timeout"),
        (["-count", "0", "h"], 2, "-count: must be at least 1"),
        (["-json=maybe", "h"], 2, 'invalid boolean value "maybe" for -json'),
        (["---timeout=1s", "h"], 2, "bad flag syntax: ---timeout=1s"),
        (["h", "99999"], 1, 'invalid port: strconv.ParseUint: parsing "99999": value out of range'),
        (["h", "abc"], 1, 'invalid port: strconv.ParseUint: parsing "abc": invalid syntax'),
        (["h", "-1"], 1, 'parsing "-1": invalid syntax'),
        (["-h"], 0, "Usage of derpkit stunc:"),
        (["--help"], 0, "-timeout duration"),
    ],
)
def test_usage_errors(argv: list[str], code: int, text: str, capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == code
    cap = capsys.readouterr()
    assert text in cap.err and cap.out == ""


def test_parse_args() -> None:
    o = parse_args(["-timeout=250ms", "-json", "--count", "3", "--", "example.com", "0"])
    assert (o.timeout, o.json, o.count, o.host, o.port) == (0.25, True, 3, "example.com", 0)
    o = parse_args(["example.com"])
    assert (o.timeout, o.json, o.count, o.port) == (3.0, False, 1, 3478)
    assert parse_args(["-json=false", "h"]).json is False


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("3s", 3.0),
        ("300ms", 0.3),
        ("1m30s", 90.0),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("-2s", -2.0),
        ("+1ms", 0.001),
        ("10us", 1e-5),
        ("10µs", 1e-5),
        ("10μs", 1e-5),
        ("100ns", 1e-7),
        ("1h2m3s4ms", 3723.004),
    ],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", ".s", "1x", "1.2.3s", "-", "1s ", " 1s", "1e3s"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError):
        parse_go_duration(text)


def test_derpkit_entry_point_subprocess() -> None:
    """The real command line: `python -m derpkit.cli stunc` dispatches to this CLI."""
    proc = subprocess.run(
        [sys.executable, "-m", "derpkit.cli", "stunc", "-h"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0 and "-timeout duration" in proc.stderr


# --- an independent server ---------------------------------------------------------------------

TURNSERVER = shutil.which("turnserver")


@pytest.mark.skipif(TURNSERVER is None, reason="turnserver missing (apt-get install coturn)")
async def test_against_coturn(tmp_path: Any, capsys: pytest.CaptureFixture) -> None:
    from tests.stunc.peers import free_pair

    port = str(free_pair())  # UDP+TCP free, outside the ephemeral range (coturn binds both)
    proc = await asyncio.create_subprocess_exec(
        TURNSERVER, "-n", "--stun-only", "--no-cli", "--no-tls", "--no-dtls",
        "-L", "127.0.0.1", "-p", port, "--log-file", "stdout",
        "--pidfile", str(tmp_path / "turn.pid"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        rc = 1
        for _ in range(40):  # coturn needs a moment to open its listener; bounded retries
            rc = await stunc("-timeout", "250ms", "-json", "127.0.0.1", port)
            if rc == 0:
                break
            # A refusal (ICMP) comes back at once, so pace the retries: 40 x 50 ms at most.
            await asyncio.sleep(0.05)
        assert rc == 0
        docs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert docs[-1]["mapped_ip"] == "127.0.0.1"
        assert docs[-1]["from_addr"] == f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 5)
        except TimeoutError:
            proc.kill()
            await proc.wait()


# --- the extras: families, -retries, -interval, -plain, the other shape ----------------------


async def test_family_flags(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    assert await stunc("-4", "-json", "localhost", port_of(server)) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["family"] == "ipv4" and doc["sent_addr"] == f"127.0.0.1:{port_of(server)}"
    # Our server listens on IPv4 only, so -6 must not find an answer there.
    rc = await stunc("-6", "-timeout", "300ms", "127.0.0.1", port_of(server))
    assert rc == 1 and "lookup 127.0.0.1" in capsys.readouterr().err
    assert main(["-4", "-6", "h"]) == 2
    assert "-4 and -6 are mutually exclusive" in capsys.readouterr().err


async def test_retries_back_off_and_reuse_the_id(capsys: pytest.CaptureFixture) -> None:
    """The first two copies are ignored; the third is answered: 3 sends, one transaction."""
    seen: list[tuple[float, bytes]] = []

    def answer(req: bytes, n: int) -> tuple[float, bytes | None]:
        seen.append((time.monotonic(), req[8:20]))
        return 0.0, (build_response(req[8:20], "192.0.2.9", 9) if n == 2 else None)

    transport, port = await responder(answer)
    try:
        rc = await stunc("-retries", "3", "-timeout", "3s", "-json", "127.0.0.1", port)
        doc = json.loads(capsys.readouterr().out)
        assert rc == 0, doc
        assert doc["mapped_addr"] == "192.0.2.9:9" and doc["replies"][0]["sent"] == 3
        assert len({t for _, t in seen}) == 1  # retransmissions keep the transaction id
        gaps = [b[0] - a[0] for a, b in zip(seen, seen[1:], strict=False)]
        assert gaps[1] > 1.5 * gaps[0], gaps  # doubling: 0.2 s then 0.4 s for 3 s / 15
    finally:
        transport.close()


async def test_interval_spaces_requests(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    t0 = time.monotonic()
    assert await stunc("-count", "3", "-interval", "300ms", "127.0.0.1", port_of(server)) == 0
    assert time.monotonic() - t0 >= 0.6
    err = capsys.readouterr().err
    assert "3 requests, 3 replies, 0% lost (3 datagrams sent)" in err


async def test_plain_against_strict_server_falls_back(capsys: pytest.CaptureFixture) -> None:
    """Go derper's behaviour (derpkit serve's default): the plain request is ignored, the retry answered."""
    srv = await start_stun_server("127.0.0.1", 0, strict=True)
    try:
        assert await stunc("-plain", "-timeout", "300ms", "127.0.0.1", port_of(srv)) == 0
        err = capsys.readouterr().err
        assert "ignored the plain RFC 5389 request but answered a Tailscale-shaped one" in err
        assert STUN_LINES.search(err)
        assert srv.counts["dropped", "ErrWrongSoftware"] == 1
        assert srv.counts["requests", "success"] == 1
        assert await stunc("-plain", "-json", "-timeout", "300ms", "127.0.0.1", port_of(srv)) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["fallback"]["shape"] == "tailscale" and doc["ok"] is True
        assert doc["received"] == 0 and doc["shape"] == "plain"
    finally:
        srv.close()


async def test_plain_against_a_server_with_strict_off(capsys: pytest.CaptureFixture) -> None:
    """``derpkit serve -stun-strict=false`` answers the bare RFC request itself."""
    srv = await start_stun_server("127.0.0.1", 0, strict=False)
    try:
        assert await stunc("-plain", "127.0.0.1", port_of(srv)) == 0
        assert STUN_LINES.match(capsys.readouterr().err)
        assert srv.counts["requests", "rfc"] == 1 and srv.counts["requests", "success"] == 0
    finally:
        srv.close()


async def test_silence_tries_both_shapes(silent_port: str, capsys: pytest.CaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(0)
        port = str(s.getsockname()[1])
        assert await stunc("-timeout", "200ms", "-json", "127.0.0.1", port) == 1
        got = []
        while True:
            try:
                got.append(s.recv(2048))
            except BlockingIOError:
                break
    doc = json.loads(capsys.readouterr().out)
    assert doc["fallback"]["shape"] == "plain" and doc["sent"] == 2
    assert "both a Tailscale-shaped request" in doc["error"]
    assert [len(g) for g in got] == [40, 20]  # Tailscale's 40 bytes, then the bare header


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (lambda req: b"\x01\x01\x00\x0c" + req[4:20] + b"\x00\x20\x00", "without a usable"),
        (lambda req: b"\x01\x01\x00\x20" + req[4:20] + b"\x00" * 8, "without a usable"),
        (lambda req: build_response(req[8:20], "192.0.2.1", 7) + b"\xff" * 8000, None),
        (lambda req: b"\x01\x01\x23\x28" + req[4:20] + b"\x00\x01\x23\x24" + b"\x00" * 9000,
         "without a usable"),
        (lambda req: bytes(range(256)) * 30, "is not STUN at all"),
    ],
    ids=["truncated-attr", "length-past-end", "oversized-trailing-junk", "oversized-attr",
         "oversized-garbage"],
)
async def test_malformed_replies_one_line(
    reply: Callable[[bytes], bytes], message: str | None, capsys: pytest.CaptureFixture
) -> None:
    transport, port = await responder(lambda req, n: (0.0, reply(req)))
    try:
        rc = await stunc("-timeout", "2s", "127.0.0.1", port)
        err = capsys.readouterr().err
        if message is None:  # trailing bytes after the declared length are ignored, as in Go
            assert rc == 0 and "stun addr: 192.0.2.1:7" in err
        else:
            assert rc == 1 and message in err
            assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    finally:
        transport.close()


async def test_local_binds_the_socket(server: StunServer, capsys: pytest.CaptureFixture) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        taken = s.getsockname()[1]
        # The port is held: a clear bind error naming -local, no traceback.
        assert await stunc("-local", f"127.0.0.1:{taken}", "127.0.0.1", port_of(server)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"-local 127.0.0.1:{taken}: cannot open a UDP socket on ")
        assert "Address already in use" in err and err.count("\n") == 1
        assert await stunc("-nat", "-local", f"127.0.0.1:{taken}", "127.0.0.1",
                           port_of(server)) == 1
        assert capsys.readouterr().err.startswith(f"-local 127.0.0.1:{taken}: cannot open")
    assert await stunc("-local", f":{taken}", "-json", "127.0.0.1", port_of(server)) == 0
    assert json.loads(capsys.readouterr().out)["mapped_addr"] == f"127.0.0.1:{taken}"
    assert main(["-local", "nope", "h"]) == 2
    assert 'invalid value "nope" for flag -local' in capsys.readouterr().err
