"""Fixtures for the prober's tests: a test CA the prober trusts, and short probe intervals."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.interop.pki import Leaf, TestCA


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCA]:
    """A throw-away CA; Python's default contexts (the prober's TLS) trust it via SSL_CERT_FILE,
    as Go programs do."""
    c = TestCA.create(tmp_path_factory.mktemp("probe-ca"))
    old = {k: os.environ.get(k) for k in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    os.environ["SSL_CERT_FILE"] = str(c.cert_path)
    os.environ.pop("SSL_CERT_DIR", None)
    try:
        yield c
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def localhost_leaf(ca: TestCA) -> Leaf:
    return ca.issue("localhost", ["localhost"], ["127.0.0.1", "::1"])
