"""The Go-peer helper must skip loudly, or fail when CI demands Go peers."""

from __future__ import annotations

import pytest

from tests import goderper


def test_missing_derper_skips_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(goderper, "find_derper", lambda: None)
    monkeypatch.delenv(goderper.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="NOT INSTALLED"):
        goderper.require_derper()


def test_missing_derper_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(goderper, "find_derper", lambda: None)
    monkeypatch.setenv(goderper.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="forbids skipping"):
        goderper.require_derper()


def test_find_derper_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    fake = tmp_path / "derper"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("DERPER", str(fake))
    assert goderper.find_derper() == str(fake)
