"""Every input a fuzzer found that broke the rule, kept as a test with its bytes.

Each case names the target (tests/fuzz/targets.py) and what it used to do.
"""

from __future__ import annotations

import pytest

from derpkit.protocol import handshake, upgrade
from derpkit.protocol.connection import ClientConnection
from derpkit.protocol.errors import ProtocolError
from derpkit.protocol.events import ConnectionFailed

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
