"""Property fuzzing of every parser that reads bytes from the network or an operator.

Rule (issue 13): any input gives a result, the parser's own clean error, or "need more
bytes"; never another exception, never more memory than the parser's limit. Each test
runs the ``ci`` profile (conftest.py) in a few seconds; the same ``check_*`` functions run
under atheris by hand (tests/fuzz/atheris_run.py, docs/reliability.md).
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from . import strategies as S
from . import targets as T


@given(st.one_of(st.binary(max_size=300), S.frame_stream), S.cuts, st.booleans())
def test_frame_reader(data: bytes, cuts: bytes, server_side: bool) -> None:
    T.check_frame_reader(data, cuts, server_side)


@given(st.one_of(st.binary(max_size=300), S.frame_stream), S.cuts, st.booleans())
def test_server_connection(data: bytes, cuts: bytes, handshake_first: bool) -> None:
    T.check_server_connection(data, cuts, handshake_first)


_HTTP_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"


@given(st.one_of(st.binary(max_size=300), S.frame_stream, S.frame_stream.map(lambda f: _HTTP_101 + f),
                 st.binary(max_size=80).map(lambda b: b"HTTP/1.1 " + b)), S.cuts, st.booleans())
def test_client_connection(data: bytes, cuts: bytes, fast: bool) -> None:
    T.check_client_connection(data, cuts, fast)


@given(st.binary(max_size=200))
def test_client_info_opener(payload: bytes) -> None:
    T.check_client_info(payload)


@given(st.one_of(st.binary(max_size=200), S.json_value.map(lambda v: __import__("json").dumps(v).encode())))
def test_sealed_json(plaintext: bytes) -> None:
    T.check_sealed_json(plaintext)


@given(st.one_of(st.binary(max_size=200), st.binary(max_size=100).map(lambda b: b"HTTP/1.1 " + b + b"\r\n\r\n")))
def test_response_head(data: bytes) -> None:
    T.check_response_head(data)


@given(st.one_of(st.binary(max_size=120), S.stun_message()))
def test_stun_codec(data: bytes) -> None:
    T.check_stun(data)


@given(st.one_of(S.request_head(), st.binary(max_size=200)))
def test_request_head(data: bytes) -> None:
    T.check_request_head_or_aiohttp_refuses(data)


@given(st.one_of(st.binary(max_size=200), S.json_value.map(lambda v: __import__("json").dumps(v).encode())))
def test_derp_map_bytes(data: bytes) -> None:
    T.check_derp_map(data)


@given(S.derp_map())
def test_derp_map_shaped(obj: object) -> None:
    T.check_derp_map_obj(obj)


_FLAGS = ["-a", "-hostname", "-certmode", "-certdir", "-stun-port", "-http-port", "-verify-clients", "-mesh-psk-file",
          "-dev", "-stun", "-c", "-accept-connection-limit", "-accept-connection-burst", "-tcp-keepalive-time",
          "-tcp-user-timeout", "-tcp-write-timeout", "-home", "-bootstrap-dns-names", "-ace", "-x", "--", "-h"]
_VALUES = ["", "0", "-1", "1", "443", ":0", "true", "false", "1s", "5m", "-5s", "1e309", "NaN", "inf",
           "letsencrypt", "manual", "dev", "x:y:z", "[::1]:80", "\x00", "é"]


@given(st.lists(st.one_of(st.sampled_from(_FLAGS), st.sampled_from(_VALUES),
                          st.builds(lambda f, v: f"{f}={v}", st.sampled_from(_FLAGS), st.sampled_from(_VALUES)),
                          st.text(max_size=6)), max_size=8),
       st.dictionaries(st.sampled_from(["DERP_ADDR", "DERP_HOSTNAME", "HOSTNAME", "DERP_STUN_PORT", "DERP_VERIFY_CLIENTS",
                                        "TS_DEBUG_KEY_PATH", "DERP_CERT_MODE", "DERP_ACCEPT_CONNECTION_LIMIT", "X"]),
                       st.sampled_from(_VALUES), max_size=4))
def test_settings_parser(argv: list[str], environ: dict[str, str]) -> None:
    T.check_settings(argv, environ)
