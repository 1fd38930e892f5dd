"""The client's TLS contexts are built once per trust setting, not once per connection.

A default context loads every system root; a probe cycle over a large map opens hundreds
of connections, and rebuilding it for each one cost a whole CPU-bound cycle (bench.tools).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from derpkit.client.tls import default_context, plan_tls, unverified_context
from tests.interop.pki import TestCA


def test_one_default_context_per_trust_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    a = plan_tls("relay.example").context
    assert a is plan_tls("relay.example").context is default_context()
    assert a.verify_mode == ssl.CERT_REQUIRED and a.check_hostname

    ca = TestCA.create(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert_path))
    b = default_context()
    assert b is not a, "a changed SSL_CERT_FILE must give a context that trusts the new file"
    subjects = [c["subject"] for c in b.get_ca_certs()]
    assert any(("commonName", "derpkit interop test CA") in rdn for s in subjects for rdn in s)
    assert default_context() is b


def test_pins_share_one_unverified_context() -> None:
    pin = "sha256-raw:" + "ab" * 32
    p1, p2 = plan_tls("127.0.0.1", cert_name=pin), plan_tls("10.0.0.1", cert_name=pin)
    assert p1.context is p2.context is unverified_context()
    assert p1.context.verify_mode == ssl.CERT_NONE and not p1.context.check_hostname
    assert p1.pin_sha256 == bytes.fromhex("ab" * 32)


def test_a_callers_context_is_used_as_given() -> None:
    mine = ssl.create_default_context()
    assert plan_tls("relay.example", context=mine).context is mine
    # Domain fronting copies the caller's CAs into a new context rather than changing it.
    fronted = plan_tls("203.0.113.7", cert_name="relay.example", context=mine)
    assert fronted.context is not mine and fronted.verify_name == "relay.example"
    assert mine.check_hostname
