"""Every input a fuzzer found that broke the rule, kept as a test with its bytes.

Each case names the target (tests/fuzz/targets.py) and what it used to do.
"""

from __future__ import annotations

import pytest

from derpkit.protocol import handshake, upgrade
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import ConnectionFailed
from derpkit.protocol.keys import NodePublic
from derpkit.server.config.errors import ConfigError
from derpkit.server.config.parse import parse_config

from . import targets as T


@pytest.mark.parametrize("payload", [b"", b"\x01" * 31])
def test_short_client_info_payload_is_a_protocol_error(payload: bytes) -> None:
    """hypothesis, test_client_info_opener: the opener raised keys.KeyError_ for a payload
    shorter than a key (the server core checks the size first, other callers did not)."""
    with pytest.raises(ProtocolError) as e:
        handshake.open_client_info(T.SERVER, payload)
    assert e.value.args[0] == "short_client_info" or "short_client_info" in str(e.value)
    T.check_client_info(payload)


@pytest.mark.parametrize("head", [b"HTTP/ \xb2", b"HTTP/1.1 \xb2\xb3\xb9 OK", b"HTTP/1.1 \xd9\xa1"])
def test_non_ascii_digit_status_is_a_protocol_error(head: bytes) -> None:
    """hypothesis, test_response_head: a status of "²" passed str.isdigit() and int() raised
    ValueError, out of ClientConnection.receive_data: a hostile server crashed the client core."""
    with pytest.raises(ProtocolError):
        upgrade.parse_response_head(head)
    conn = ClientConnection(T.CLIENT)
    conn.start(0.0)
    events = conn.receive_data(head + b"\r\n\r\n", 0.1)
    assert isinstance(events[-1], ConnectionFailed)


def test_zero_server_key_is_a_clean_failure() -> None:
    """atheris, client_connection: a ServerKey frame carrying the all-zero (low-order) key made
    libsodium refuse to seal ClientInfo, and nacl's RuntimeError escaped
    ClientConnection.receive_data: a hostile server crashed the client core."""
    head = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n"
    server_key = b"\x01\x00\x00\x00(DERP\xf0\x9f\x94\x91" + bytes(32)
    conn = ClientConnection(T.CLIENT)
    conn.start(0.0)
    events = conn.receive_data(head + server_key, 0.1)
    assert isinstance(events[-1], ConnectionFailed) and events[-1].error.args[0].startswith("bad_key")
    with pytest.raises(ProtocolError):
        handshake.seal(T.CLIENT, NodePublic(bytes(32)), b"{}")
    T.check_client_connection(head + server_key)


@pytest.mark.parametrize("argv", [
    ["-a=:443", "-accept-connecrp.example.com\nDER\ufffd"],  # the input atheris found
    ["-x\ny"], ["-a\nb=1"], ["-verify-clients=\n"], ["-\n"], ["--a\rb"],
    ["-a", "\xcf\xcd\nDERP"],  # atheris: "address ...: missing port in address" echoed the newline
    ["-tcp-keepalive-time=.1m0>\n>>"],  # atheris: "unknown unit" in a duration echoed it too
    ["-tcp-keepalive-time=1\n"],
])
def test_control_characters_in_a_flag_stay_on_one_line(argv: list[str]) -> None:
    """atheris, settings: an unknown flag whose name held a newline was echoed raw, so the
    start-up error took two lines. Non-printable names are Go-quoted now; printable ones
    keep Go's exact text (tests/server/test_config.py)."""
    with pytest.raises(ConfigError) as e:
        parse_config(argv, {}, path_exists=lambda p: False)
    assert "\n" not in str(e.value) and "\r" not in str(e.value), str(e.value)
    T.check_settings(argv, {})


def test_non_ascii_digit_content_length_on_a_refused_upgrade() -> None:
    """atheris, client_connection: an upgrade refused with ``Content-Length: ²`` passed
    str.isdigit() and int() raised ValueError out of ClientConnection.receive_data (the
    same trap as the status line above, one header further)."""
    conn = ClientConnection(T.CLIENT)
    conn.start(0.0)
    events = conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: \xb2\r\n\r\n", 0.1)
    assert isinstance(events[-1], ConnectionFailed)
    T.check_client_connection(b"HTTP/1.1 200 OK\r\nAccess-CUpgrade: DERP\r\nContent-Length: \xb2\r\n\r\n")


@pytest.mark.parametrize("environ", [{"DERP_ADDR": ":4-a\x00143"}, {"DERP_ADDR": ":\x00"}])
def test_nul_in_a_port_name_is_a_config_error(environ: dict[str, str]) -> None:
    """atheris, settings: ``DERP_ADDR=:4-a<NUL>143`` reached socket.getservbyname, whose
    ValueError ("embedded null character") escaped parse_config instead of a ConfigError."""
    with pytest.raises(ConfigError):
        parse_config([], environ, path_exists=lambda p: False)
    T.check_settings([], environ)
    T.check_settings_bytes(b"\n\nDERP_ADDR=:4-a\x00143\nDE27.RP")


@pytest.mark.parametrize("value", [b"3E478", b"-1e400", b"NaN", b"Infinity"])
def test_non_finite_number_for_an_integer_field_is_a_map_error(value: bytes) -> None:
    """atheris, derp_map: ``"STUNPort": 3E478`` reads as float inf, and the integer check's
    int(v) raised OverflowError (ValueError for NaN) out of parse_map, not a MapError."""
    from derpkit.probe import dmap

    data = (b'{"Regions":{"1":{"RegionID":1,"RegionCode":"lo","Nodes":[{"Name":"1a","HostName":"h",'
            b'"STUNPort":' + value + b',"RegionID":1}]}}}')
    with pytest.raises(dmap.MapError, match="STUNPort must be an integer"):
        dmap.parse_map(data)
    T.check_derp_map(data)


def test_a_unicode_digit_is_not_a_number_anywhere_we_read_text() -> None:
    """The '²' trap (``str.isdigit()`` is True, ``int()`` refuses) found by atheris in the
    client core was also in three readers of text: the -stun-rfc5780 alternate port, the
    setec cache's lastAccess and the conformance suite's Content-Length. Each now gives
    its own message for it, like any other non-number."""
    import json

    from derpkit import setec
    from derpkit.server.config.settings import split_rfc5780_alt

    with pytest.raises(ValueError, match="must be a number from 0 to"):
        split_rfc5780_alt("127.0.0.2:\u00b2")
    cache = json.dumps({"n": {"secret": None, "lastAccess": "\u00b2"}}).encode()
    with pytest.raises(ValueError, match="lastAccess: want an integer inside a string"):
        setec.decode_cache(cache)
