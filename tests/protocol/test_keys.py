"""Key text forms and mesh-key comparison."""

from __future__ import annotations

import pytest

from derpkit.protocol.keys import KeyError_, MeshKey, NodePrivate, NodePublic


def test_text_forms_round_trip() -> None:
    priv = NodePrivate.generate()
    assert str(priv).startswith("privkey:") and len(str(priv)) == 8 + 64
    assert NodePrivate.parse(str(priv)) == priv
    pub = priv.public()
    assert str(pub) == "nodekey:" + pub.hex()
    assert NodePublic.parse(str(pub)) == pub
    assert NodePublic.parse(pub.hex()) == pub  # Derp-Public-Key header form
    assert pub.short().startswith("[") and len(pub.short()) == 7


def test_generated_keys_are_clamped() -> None:
    raw = NodePrivate.generate().raw
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40


def test_known_public_key_derivation() -> None:
    # RFC 7748 section 6.1 test vector (Alice).
    priv = NodePrivate(bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"))
    assert priv.public().hex() == "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"


@pytest.mark.parametrize("text", ["", "nodekey:12", "nodekey:" + "g" * 64, "x" * 64])
def test_bad_public_keys_say_why(text: str) -> None:
    with pytest.raises(KeyError_):
        NodePublic.parse(text)


def test_mesh_key_parsing_and_comparison() -> None:
    k = MeshKey.parse("  " + "AB" * 32 + "\n")
    assert k.hex() == "ab" * 32
    assert k.matches(MeshKey.parse("ab" * 32))
    assert not k.matches(MeshKey.parse("ac" * 32))
    assert not k.matches(None)
    assert not MeshKey(bytes(32)).matches(MeshKey(bytes(32)))
    with pytest.raises(KeyError_, match="invalid mesh key"):
        MeshKey.parse("ab" * 31)
    assert "ab" not in repr(k)
