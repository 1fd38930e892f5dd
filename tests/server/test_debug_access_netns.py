"""/debug/ from a source that is not loopback, and the variables that let it in.

On loopback only the ``X-Forwarded-For`` refusal can be shown (test_routes.py). Here
tests/server/debug_netns.py runs under ``unshare -rn``: a private network namespace whose
``lo`` also carries 10.99.0.1/32, so a client bound to that address is neither loopback
nor a Tailscale IP. Both ``derpkit serve`` and, when installed, Go ``derper`` are asked the
same requests under the same environment, and the answers must agree:

- no variable: 403 ``debug access denied`` (and no debug link on the home page);
- ``TS_ALLOW_DEBUG_IP`` equal to the source, or ``TS_DEBUG_TRUSTED_CIDRS`` containing it:
  200; a different IP or CIDR: 403;
- an invalid ``TS_DEBUG_TRUSTED_CIDRS`` entry: loopback still gets in (the list is not
  needed), the first request from outside ends the process with exit status 1 and the
  line ``invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: "<entry>": netip.ParsePrefix(...)...``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.goderper import REQUIRE_ENV, find_derper, require_netns

ROOT = Path(__file__).resolve().parents[2]
BAD_LINE = 'invalid CIDR in TS_DEBUG_TRUSTED_CIDRS: "10.99.0.1": netip.ParsePrefix("10.99.0.1"): no \'/\''


def _netns_or_skip() -> None:
    require_netns("a non-loopback source address needs a private network")


@pytest.fixture(scope="module")
def run() -> dict:
    _netns_or_skip()
    argv = ["unshare", "-rn", sys.executable, "-m", "tests.server.debug_netns"]
    go = find_derper()
    if go:
        argv.append(go)
    elif os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"Go derper not found and {REQUIRE_ENV}=1", pytrace=False)
    p = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout)


def _shape(case: dict) -> dict[str, object]:
    """What must match Go: status and body of each answer, or that the connection failed."""
    out: dict[str, object] = {}
    for k, v in case.items():
        if k in ("exit", "log"):
            continue
        if "error" in v:
            out[k] = "no answer"
        elif k.endswith(" /"):
            out[k] = (v["status"], v["debug_link"])  # the home page text is ours
        elif v["status"] == 200:
            out[k] = 200  # debug page text differs by design (docs/compat.md)
        else:
            out[k] = (v["status"], v["type"], v["body"])
    return out


OUT = "10.99.0.1"
WANT_OUTSIDE = {
    "none": 403, "allow_ip": 200, "allow_other_ip": 403, "cidrs_in": 200, "cidrs_out": 403,
}


@pytest.mark.parametrize("name", sorted(WANT_OUTSIDE))
def test_outside_source_refused_unless_allowed(run: dict, name: str) -> None:
    d = run["derpkit"][name]
    for path in ("/debug/", "/debug/varz"):
        assert d[f"127.0.0.1 {path}"]["status"] == 200
        got = d[f"{OUT} {path}"]
        assert got["status"] == WANT_OUTSIDE[name], (path, got)
        if WANT_OUTSIDE[name] == 403:
            assert got["body"] == "debug access denied\n"
            assert got["type"] == "text/plain; charset=utf-8"
    assert d[f"{OUT} /"]["debug_link"] is (WANT_OUTSIDE[name] == 200)
    assert d["exit"] is None  # still running


def test_invalid_trusted_cidr_is_fatal_at_first_outside_check(run: dict) -> None:
    d = run["derpkit"]["cidrs_bad"]
    assert d["127.0.0.1 /debug/"]["status"] == 200  # loopback never needs the list
    assert "error" in d[f"{OUT} /debug/"]
    assert d["exit"] == 1
    assert BAD_LINE in d["log"]
    # derpkit also warns at start-up, before any request (derper does not).
    assert d["log"].index("; derper and derpkit exit at the first") < d["log"].index("DERP on port")


@pytest.mark.parametrize("name", [*sorted(WANT_OUTSIDE), "cidrs_bad"])
def test_same_answers_as_go_derper(run: dict, name: str) -> None:
    if not run["go"]:
        pytest.skip("Go derper not installed")
    d, g = run["derpkit"][name], run["go"][name]
    assert _shape(d) == _shape(g)
    assert d["exit"] == g["exit"]
    if name == "cidrs_bad":
        assert BAD_LINE in g["log"]
