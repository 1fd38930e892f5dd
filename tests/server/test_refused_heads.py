"""``derpkit_http_heads_refused{reason}``: the strict front door counts every head it refuses.

Over real sockets against a ``derpkit serve`` subprocess: every malformed head of
tests/server/test_frontdoor_strict.py's table (400/431/501/505) and a CONNECT target Go's
server refuses, each on its own connection, while a healthy pair of DERP clients keeps
exchanging packets on the same server. ``/debug/varz`` (Prometheus text) and
``/debug/vars`` (JSON) must show each refusal under its reason, once, and nothing for the
requests that were accepted; the pair must lose nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import re
import urllib.request
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from derpkit.client import DerpClient
from derpkit.server.frontdoor import request as R
from tests.server.helpers import converse, recv_packet
from tests.server.serve_proc import ServeProc, start_serve
from tests.server.test_frontdoor_strict import GOOD_DERP, REFUSED, ROBOTS

pytestmark = pytest.mark.timeout(90)

#: A CONNECT target Go's URL parser refuses before any handler (a colon in an unbracketed host).
BAD_CONNECT_TARGET = b"CONNECT x:y:443 HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def serve() -> AsyncIterator[ServeProc]:
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false")
    try:
        yield sp
    finally:
        await sp.stop()


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return r.read().decode()


async def refused_counts(port: int) -> dict[str, int]:
    text = await asyncio.to_thread(_get, port, "/debug/varz")
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r'^derpkit_http_heads_refused\{reason="([a-z0-9_]+)"\} (\d+)$', text, re.M)}


def reason_of(head: bytes) -> str:
    """The reason the parser gives a head (in-process; the server must count that label)."""
    with pytest.raises(R.Refused) as e:
        R.parse(head + ROBOTS)
    return e.value.reason


def test_every_table_case_has_a_listed_reason() -> None:
    reasons = {name: reason_of(head) for name, head, _ in REFUSED}
    assert set(reasons.values()) <= set(R.REASONS), set(reasons.values()) - set(R.REASONS)
    # The classes land where an operator would look for them.
    assert reasons["two_cl"] == "duplicate_content_length"
    assert reasons["te_cl"] == "transfer_encoding_with_content_length"
    assert reasons["obs_fold"] == "obs_fold"
    assert reasons["bare_lf"] == reasons["bare_lf_one_line"] == "bare_lf"
    assert reasons["bare_cr"] == "bare_cr"
    assert reasons["nul_value"] == reasons["nul_target"] == "nul_byte"
    assert reasons["long_line"] == reasons["long_field"] == "line_too_long"
    assert reasons["many_fields"] == "too_many_fields"
    assert reasons["big_head"] == "head_too_large"
    assert reasons["te_gzip"] == "unsupported_transfer_encoding"
    assert reasons["http2"] == "unsupported_version"
    # Most reasons are reachable from the table alone (the rest: control_byte by TAB in a
    # target, bad_request_target by the CONNECT below).
    assert len(set(reasons.values())) >= 19, sorted(set(reasons.values()))


@pytest.mark.asyncio(loop_scope="module")
async def test_refused_heads_are_counted_by_reason_and_a_healthy_pair_is_unaffected(serve: ServeProc) -> None:
    port = serve.port
    before = await refused_counts(port)
    assert sorted(before) == sorted(R.REASONS), "every reason is exported from start-up, at zero"
    assert not any(before.values()), before

    a = await DerpClient.connect(serve.url)
    b = await DerpClient.connect(serve.url)
    sent, got = 0, set()
    stop = asyncio.Event()

    async def pair() -> None:
        nonlocal sent
        while not stop.is_set():
            await a.send(b.public_key, b"seq %d" % sent)
            sent += 1
            await asyncio.sleep(0.01)

    async def reader() -> None:
        while True:
            p = await recv_packet(b, timeout=30)
            assert p.src == a.public_key.raw
            got.add(int(p.data.split()[1]))

    tasks = [asyncio.create_task(pair()), asyncio.create_task(reader())]
    try:
        want: collections.Counter[str] = collections.Counter()
        for name, head, answer in REFUSED:
            out, closed = await converse(port, head + ROBOTS, quiet=2.0)
            assert out == answer and closed, (name, out[:80])
            want[reason_of(head)] += 1
        out, closed = await converse(port, BAD_CONNECT_TARGET + ROBOTS, quiet=2.0)
        assert out.startswith(b"HTTP/1.1 400 Bad Request\r\n") and closed, out
        want["bad_request_target"] += 1
        # Accepted requests are not counted: a plain GET, a DERP upgrade, a well-formed CONNECT.
        out, _ = await converse(port, ROBOTS, quiet=0.5)
        assert out.startswith(b"HTTP/1.1 200 OK"), out[:80]
        out, _ = await converse(port, GOOD_DERP, quiet=0.5)
        assert out.startswith(b"HTTP/1.1 101 "), out[:80]
        out, closed = await converse(port, b"CONNECT x:443 HTTP/1.1\r\n\r\n" + ROBOTS, quiet=0.5)
        assert out.startswith(b"HTTP/1.1 404 "), out[:80]

        after = await refused_counts(port)
        got_delta = {r: after[r] - before[r] for r in R.REASONS if after[r] != before[r]}
        assert got_delta == dict(want), (got_delta, dict(want))
        assert sum(got_delta.values()) == len(REFUSED) + 1

        # The same figures in /debug/vars, keyed by reason.
        vars_json = json.loads(await asyncio.to_thread(_get, port, "/debug/vars"))
        assert vars_json["derpkit_http_heads_refused"] == after

        # The pair: everything sent while the refusals went on arrived, from the right key.
        stop.set()
        await tasks[0]
        async with asyncio.timeout(10):
            while len(got) < sent:
                await asyncio.sleep(0.05)
        assert sent > 100 and got == set(range(sent)), (sent, len(got))
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
            with contextlib.suppress(BaseException):
                await t
        await a.close()
        await b.close()
