"""Every input a fuzzer found that broke the rule, kept as a test with its bytes.

Each case names the target (tests/fuzz/targets.py) and what it used to do.
"""

from __future__ import annotations

import pytest

from derpkit.protocol import handshake
from derpkit.protocol.errors import ProtocolError

from . import targets as T


@pytest.mark.parametrize("payload", [b"", b"\x01" * 31])
def test_short_client_info_payload_is_a_protocol_error(payload: bytes) -> None:
    """hypothesis, test_client_info_opener: the opener raised keys.KeyError_ for a payload
    shorter than a key (the server core checks the size first, other callers did not)."""
    with pytest.raises(ProtocolError) as e:
        handshake.open_client_info(T.SERVER, payload)
    assert e.value.args[0] == "short_client_info" or "short_client_info" in str(e.value)
    T.check_client_info(payload)

