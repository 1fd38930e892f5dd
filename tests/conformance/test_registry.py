"""Selection globs, the level rules and the needs that make a case SKIP (no network)."""

from __future__ import annotations

import re

from derpkit.conformance.registry import AREAS, Level, Need, Result, all_cases, select
from derpkit.conformance.runner import judge, missing_need
from derpkit.conformance.target import make_target
from derpkit.protocol.keys import MeshKey


def test_ids_areas_and_count() -> None:
    cases = all_cases()
    assert len(cases) >= 60
    assert {c.area for c in cases} == set(AREAS)
    assert len({c.id for c in cases}) == len(cases)
    for c in cases:
        assert re.fullmatch(r"[a-z-]+/\d+", c.id) and c.title and c.quote and c.section.split(" ")[0] in (
            "derp-protocol", "derper-cli", "stun"), c.id


def test_select_globs() -> None:
    assert [c.id for c in select(["relay"])] == [c.id for c in select(["relay/*"])]
    assert {c.id for c in select(["ping/1", "tls/*"], ["tls/2"])} == {"ping/1"} | {c.id for c in select(["tls"])} - {"tls/2"}
    assert select(["nosuch/*"]) == []


def test_levels() -> None:
    must, should, info = (next(c for c in all_cases() if c.level is lv) for lv in Level)
    assert judge(must, Result.FAIL, "x", False) == (Result.FAIL, "x")
    assert judge(should, Result.FAIL, "x", False) == (Result.INFO, "SHOULD not met: x")
    assert judge(should, Result.FAIL, "x", True) == (Result.FAIL, "x")
    assert judge(info, Result.FAIL, "x", True) == (Result.INFO, "x")
    assert judge(info, Result.PASS, "x", False) == (Result.INFO, "x")
    assert judge(must, Result.SKIP, "x", True) == (Result.SKIP, "x")


def test_needs_make_cases_skip() -> None:
    plain = make_target("http://127.0.0.1:3340")
    full = make_target("https://127.0.0.1:3340", mesh_key=MeshKey.generate(), stun="127.0.0.1:3478",
                       insecure=True, long=True)
    for c in all_cases():
        assert missing_need(c, full) is None, c.id
        if Need.MESH_KEY in c.needs:
            assert "mesh key" in (missing_need(c, plain) or "")
        if Need.TLS in c.needs:
            assert "https" in (missing_need(c, plain) or "")
        if Need.LONG in c.needs:
            assert "--long" in (missing_need(c, plain) or "")
