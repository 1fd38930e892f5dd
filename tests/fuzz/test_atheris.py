"""Every fuzz target under atheris (coverage-guided libFuzzer) for a bounded time, from its seed corpus.

One libFuzzer process per target (``python -m tests.fuzz.atheris_run``), two at a time on
the two cores, ``ATHERIS_SECONDS`` each (30 s; ``DERPKIT_ATHERIS_SECONDS`` overrides). A
target fails on any crash (an exception the rule forbids), a leak past the RSS limit, or
one input running longer than the per-input timeout; the failure prints the input's bytes
to paste into test_regressions.py. It also fails when the corpus was not loaded or the
fuzzer hardly ran, so a broken harness cannot pass by doing nothing.

New inputs libFuzzer finds go to a scratch directory (the first corpus directory it is
given), never into the committed corpus, which tests/fuzz/make_corpus.py alone writes.
Without atheris the tests skip loudly, and fail under DERPKIT_REQUIRE_GO_PEERS=1 (CI).
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.goderper import REQUIRE_ENV

from . import make_corpus
from . import targets as T

ROOT = Path(__file__).resolve().parents[2]
ATHERIS_SECONDS = int(os.environ.get("DERPKIT_ATHERIS_SECONDS", "30"))
PARALLEL = 2
#: libFuzzer's -rss_limit_mb: the interpreter plus derpkit is ~100 MiB; a parser that holds
#: memory without bound crosses this within seconds of fuzzing.
RSS_LIMIT_MB = 1024
#: One input slower than this is a hang (libFuzzer's -timeout; generous for a shared host).
INPUT_TIMEOUT = 20
#: Fewer executions than this in the whole run means the harness did not really fuzz.
MIN_EXECS = 500

# DERPKIT_HIDE_ATHERIS=1 shows what a machine without atheris sees (as DERPKIT_HIDE_GO_PEERS).
_missing = os.environ.get("DERPKIT_HIDE_ATHERIS") == "1" or importlib.util.find_spec("atheris") is None
MISSING_WHY = ("ATHERIS MISSING: coverage-guided fuzzing of the parsers is not running "
               "(`pip install atheris`; it is in the test extra)")

pytestmark = pytest.mark.timeout(ATHERIS_SECONDS * len(T.TARGETS) + 180)


@dataclass
class Run:
    target: str
    returncode: int
    output: str
    artifacts: dict[str, bytes]
    seeds: int

    @property
    def execs(self) -> int:
        m = re.search(r"stat::number_of_executed_units: (\d+)", self.output)
        return int(m.group(1)) if m else 0

    def status(self, tag: str) -> tuple[int, int, int] | None:
        """(cov, ft, corp) of libFuzzer's last ``#N <tag> cov: X ft: Y corp: Z`` line."""
        found = re.findall(rf"#\d+\s+{tag}\s+cov: (\d+) ft: (\d+) corp: (\d+)", self.output)
        return tuple(map(int, found[-1])) if found else None  # type: ignore[return-value]


def run_target(target: str, seconds: int) -> Run:
    """One bounded libFuzzer run of ``target`` from its committed seed corpus."""
    seeds = make_corpus.CORPUS / target
    with tempfile.TemporaryDirectory(prefix=f"atheris-{target}-") as tmp:
        scratch = Path(tmp) / "new"
        scratch.mkdir()
        art = Path(tmp) / "art"
        art.mkdir()
        cmd = [sys.executable, "-m", "tests.fuzz.atheris_run", target, f"-max_total_time={seconds}",
               f"-rss_limit_mb={RSS_LIMIT_MB}", f"-timeout={INPUT_TIMEOUT}", f"-artifact_prefix={art}/",
               "-print_final_stats=1", "-seed=1", str(scratch), str(seeds)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, errors="replace",
                               timeout=seconds + 120)
            rc, out = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as e:
            rc, out = -1, f"libFuzzer did not stop {seconds + 120} s after its -max_total_time\n{e.stderr!r}"
        artifacts = {f.name: f.read_bytes() for f in art.iterdir()}
        # libFuzzer skips empty files (the empty STUN vector); the empty input runs anyway.
        return Run(target, rc, out, artifacts, sum(1 for f in seeds.iterdir() if f.stat().st_size))


@pytest.fixture(scope="module")
def runs() -> dict[str, concurrent.futures.Future[Run]]:
    """All targets started at once, PARALLEL at a time; each test waits for its own."""
    if _missing:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{MISSING_WHY}; {REQUIRE_ENV}=1 forbids skipping", pytrace=False)
        pytest.skip(MISSING_WHY)
    pool = concurrent.futures.ThreadPoolExecutor(PARALLEL)
    futures = {t: pool.submit(run_target, t, ATHERIS_SECONDS) for t in T.TARGETS}
    pool.shutdown(wait=False)
    return futures


def test_every_target_has_seeds_and_the_corpus_is_current() -> None:
    """The committed corpus is what make_corpus.py writes (so it is reproducible), one
    non-empty directory per target."""
    assert make_corpus.read_committed() == make_corpus.build(), "run python -m tests.fuzz.make_corpus"
    assert sorted(make_corpus.read_committed()) == sorted(T.TARGETS)


@pytest.mark.parametrize("target", list(T.TARGETS))
def test_atheris(target: str, runs: dict[str, concurrent.futures.Future[Run]]) -> None:
    r = runs[target].result()
    inited, done = r.status("INITED"), r.status("DONE")
    print(f"{target}: {r.execs} executions in {ATHERIS_SECONDS} s, from {r.seeds} seeds; "
          f"INITED cov/ft/corp {inited}, DONE {done}")
    if r.returncode != 0 or r.artifacts:
        found = "\n".join(f"  {name}: {data!r}" for name, data in r.artifacts.items()) or "  (no artifact written)"
        pytest.fail(f"atheris found a failing input for {target} (exit {r.returncode}); add it to "
                    f"tests/fuzz/test_regressions.py:\n{found}\n--- libFuzzer output (tail) ---\n"
                    f"{r.output[-4000:]}", pytrace=False)
    assert inited is not None and done is not None, r.output[-3000:]
    # libFuzzer read every seed file, and started from more than the empty input.
    assert re.search(rf"INFO:\s+{r.seeds} files found in \S*corpus/{target}\b", r.output), r.output[:3000]
    assert inited[2] >= 1, r.output[:3000]
    assert r.execs >= MIN_EXECS, (r.execs, r.output[-3000:])
