"""One function per parser under fuzzing: any input -> a result, a clean error, or "need more".

Each ``check_*`` takes raw bytes, runs the parser and fails (with AssertionError or the
unexpected exception itself) only when the rule is broken: an exception other than the
parser's documented error, a result that contradicts the input, or memory held beyond the
parser's limit. The hypothesis tests (test_*.py here) and the atheris runner
(``python -m tests.fuzz.atheris_run``) call the same functions, so a crash either finds is
one regression test away: add its bytes to ``tests/fuzz/test_regressions.py``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

from derpkit.probe import dmap
from derpkit.protocol import frames as F
from derpkit.protocol import handshake, upgrade
from derpkit.protocol.connection import ClientConnection, ServerConnection, ServerPolicy
from derpkit.protocol.constants import FRAME_HEADER_LEN, MAX_CLIENT_INFO_LEN, MAX_CLIENT_RECV_FRAME
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import ConnectionFailed
from derpkit.protocol.keys import NodePrivate
from derpkit.server.config.errors import ConfigError, HelpRequested
from derpkit.server.config.parse import parse_config
from derpkit.server.frontdoor import request
from derpkit.stun import codec

#: Fixed keys, so a seed corpus (tests/fuzz/make_corpus.py) can hold boxes that open. CLIENT is
#: client_a of tests/vectors/go_derper.json: the ServerInfo Go derper sealed to it opens here.
SERVER = NodePrivate(bytes.fromhex("d0" * 31 + "50"))
CLIENT = NodePrivate.parse("privkey:" + "a0" * 31 + "60")
POLICY = ServerPolicy(SERVER, rng=random.Random(1))


def chunks(data: bytes, cuts: bytes) -> list[bytes]:
    """Split ``data`` at offsets drawn from ``cuts`` (one byte each), keeping every byte."""
    out, off = [], 0
    for c in cuts:
        n = c % 64 + 1
        out.append(data[off:off + n])
        off += n
        if off >= len(data):
            break
    if off < len(data):
        out.append(data[off:])
    return [c for c in out if c]


# ------------------------------------------------------------------ frame reader

def check_frame_reader(data: bytes, cuts: bytes = b"", server_side: bool = True) -> None:
    """Frames out, a ProtocolError, or bytes held for the rest of a frame (never more than one)."""
    check = F.server_header_check if server_side else F.client_header_check
    whole = F.FrameReader(check)
    try:
        want = whole.feed(data)
        whole_err = None
    except ProtocolError as e:
        want, whole_err = list(getattr(e, "frames", [])), e
    pieces = F.FrameReader(check)
    got: list[tuple[int, bytes]] = []
    err = None
    for piece in chunks(data, cuts) if cuts else [data]:
        try:
            got += pieces.feed(piece)
        except ProtocolError as e:
            got += getattr(e, "frames", [])
            err = e
            break
        # Never more than one frame's bytes held: the largest the side accepts.
        limit = MAX_CLIENT_INFO_LEN if server_side else MAX_CLIENT_RECV_FRAME
        assert pieces.pending() <= FRAME_HEADER_LEN + limit, pieces.pending()
    # Chunking never changes what the bytes mean.
    assert (err is None) == (whole_err is None), (err, whole_err)
    assert got == want


# ------------------------------------------------------------------ connection cores

def check_server_connection(data: bytes, cuts: bytes = b"", handshake_first: bool = True) -> None:
    """The server core: events and packets out, a fault last, never an exception."""
    packets: list[bytes] = []
    conn = ServerConnection(POLICY, on_packet=packets.append, on_forward=lambda s, d, p: None)
    now = 1000.0
    conn.start(now)
    conn.data_to_send()
    if handshake_first:
        events = conn.receive_data(handshake.client_info_frame(CLIENT, SERVER.public(), handshake.ClientInfo()), now)
        assert not any(isinstance(e, ConnectionFailed) for e in events), events
        conn.admit(now)
    events = []
    for piece in chunks(data, cuts) if cuts else [data]:
        now += 0.01
        events += conn.receive_data(piece, now)
        if (d := conn.next_deadline()) is not None and d <= now:
            events += conn.handle_timer(now)
    failed = [i for i, e in enumerate(events) if isinstance(e, ConnectionFailed)]
    assert failed in ([], [len(events) - 1]), events  # a fault is the last event, once
    assert len(conn.data_to_send()) < 1 << 20


def check_client_connection(data: bytes, cuts: bytes = b"", fast: bool = False) -> None:
    """The client core reading whatever a server might send after the upgrade request."""
    conn = ClientConnection(CLIENT, server_key=SERVER.public() if fast else None)
    now = 1000.0
    conn.start(now)
    conn.data_to_send()
    events = []
    for piece in chunks(data, cuts) if cuts else [data]:
        now += 0.01
        events += conn.receive_data(piece, now)
    failed = [i for i, e in enumerate(events) if isinstance(e, ConnectionFailed)]
    assert len(failed) <= 1 and (not failed or failed[0] == len(events) - 1), events


# ------------------------------------------------------------------ handshake and upgrade

def check_client_info(payload: bytes) -> None:
    """Raw ClientInfo frame payloads (key + sealed box), the server's opener."""
    try:
        handshake.open_client_info(SERVER, payload)
    except ProtocolError:
        pass


def check_sealed_json(plaintext: bytes) -> None:
    """A correctly sealed box holding any bytes: the JSON decoder behind the crypto."""
    payload = CLIENT.public().raw + handshake.seal(CLIENT, SERVER.public(), plaintext)
    try:
        key, info = handshake.open_client_info(SERVER, payload)
    except ProtocolError:
        return
    assert key == CLIENT.public()
    assert isinstance(info, handshake.ClientInfo)
    try:
        handshake.open_server_info(CLIENT, SERVER.public(), handshake.seal(SERVER, CLIENT.public(), plaintext))
    except ProtocolError:
        pass


def check_response_head(data: bytes) -> None:
    try:
        parts = upgrade.split_head(data)
    except ProtocolError:
        return
    if parts is None:
        return
    try:
        upgrade.parse_response_head(parts[0])
    except ProtocolError:
        pass


# ------------------------------------------------------------------ STUN

def check_stun(data: bytes) -> None:
    for parse in (codec.parse_response, codec.parse_attrs, codec.parse_binding_request, codec.parse_rfc_request,
                  codec.parse_rfc_binding_request):
        try:
            parse(data)
        except codec.StunError:
            pass
    codec.is_stun(data)


# ------------------------------------------------------------------ request head

_AIOHTTP: Callable[[bytes], object] | None = None


def _aiohttp_parser() -> Callable[[bytes], object]:
    """aiohttp's own request parser (llhttp), the one that reads what the front door passes on."""
    global _AIOHTTP
    if _AIOHTTP is None:
        from aiohttp.base_protocol import BaseProtocol
        from aiohttp.http_parser import HttpRequestParser

        loop = asyncio.new_event_loop()
        proto = BaseProtocol(loop)

        def feed(data: bytes) -> object:
            p = HttpRequestParser(proto, loop, 1 << 16, max_line_size=8190, max_field_size=8190)
            return p.feed_data(data)

        _AIOHTTP = feed
    return _AIOHTTP


def check_request_head(data: bytes) -> None:
    """Accepted, refused, or incomplete; an accepted head is one every prefix of waits for,
    and one aiohttp reads with the same framing (no two parsers disagreeing = no smuggling)."""
    try:
        head = request.parse(data)
    except request.Refused as e:
        assert e.response.startswith(b"HTTP/1.1 ") and b"\r\nConnection: close\r\n" in e.response
        return
    if head is None:
        assert len(data) <= upgrade.MAX_HEAD + 1
        return
    assert 4 <= head.size <= len(data) and data[head.size - 4:head.size] == b"\r\n\r\n"
    for cut in range(0, head.size, max(1, head.size // 16)):
        assert request.parse(data[:cut]) is None, cut  # a head sent in pieces is read the same
    if head.method in (b"CONNECT",) or head.chunked:
        return
    msgs, _upgraded, _tail = _aiohttp_parser()(data[:head.size])  # type: ignore[misc]
    assert len(msgs) == 1  # type: ignore[arg-type]
    msg = msgs[0][0]  # type: ignore[index]
    assert int(msg.headers.get("Content-Length", "0")) == head.content_length


def check_request_head_or_aiohttp_refuses(data: bytes) -> None:
    """As ``check_request_head``, but aiohttp refusing what we accept is allowed (it is stricter
    on a few things, e.g. target syntax); only disagreeing framing is a failure."""
    from aiohttp.http_exceptions import HttpProcessingError

    try:
        check_request_head(data)
    except HttpProcessingError:
        pass


# ------------------------------------------------------------------ DERP map and settings

def check_derp_map(data: bytes) -> None:
    try:
        m = dmap.parse_map(data)
    except dmap.MapError as e:
        assert str(e), "a MapError must say what is wrong"
        return
    assert m.regions


def check_derp_map_obj(obj: object) -> None:
    check_derp_map(json.dumps(obj).encode())


def check_settings(argv: list[str], environ: dict[str, str]) -> None:
    try:
        cfg, notes = parse_config(argv, environ, path_exists=lambda p: False)
    except HelpRequested as e:
        assert e.usage, "help must print the usage"
        return
    except ConfigError as e:
        assert str(e).strip() and "\n" not in str(e).strip(), "a ConfigError says what is wrong in one line"
        return
    assert all(isinstance(n, str) for n in notes)
    assert cfg is not None


def settings_from_bytes(data: bytes) -> tuple[list[str], dict[str, str]]:
    """argv NUL-separated, then after a blank line the environment as NAME=VALUE lines.

    How a raw-bytes fuzzer (atheris) drives ``check_settings``; make_corpus.py writes seeds
    in this layout.
    """
    argv_part, _, env_part = data.partition(b"\n\n")
    argv = [a.decode("utf-8", "replace") for a in argv_part.split(b"\0")] if argv_part else []
    environ: dict[str, str] = {}
    for line in env_part.split(b"\n"):
        name, eq, value = line.partition(b"=")
        if eq:
            environ[name.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return argv, environ


def check_settings_bytes(data: bytes) -> None:
    check_settings(*settings_from_bytes(data))


TARGETS: dict[str, Callable[[bytes], None]] = {
    "frame_reader": check_frame_reader,
    "server_connection": check_server_connection,
    "client_connection": check_client_connection,
    "client_info": check_client_info,
    "sealed_json": check_sealed_json,
    "response_head": check_response_head,
    "stun": check_stun,
    "request_head": check_request_head_or_aiohttp_refuses,
    "derp_map": check_derp_map,
    "settings": check_settings_bytes,
}
