"""Coverage-guided fuzzing of one target by hand, with atheris (libFuzzer for Python).

    python -m tests.fuzz.atheris_run frame_reader -max_total_time=600
    python -m tests.fuzz.atheris_run request_head -atheris_runs=1000000 corpus_dir/

The target names are ``tests.fuzz.targets.TARGETS``; everything after the name goes to
libFuzzer. derpkit's modules are instrumented for coverage. A crash is written by
libFuzzer as ``crash-<sha1>``: turn its bytes into a case in test_regressions.py. Seeds
for each target are in ``tests/fuzz/corpus/<target>/`` (make_corpus.py writes them); give
a scratch directory first so new inputs do not land in the committed corpus:
``python -m tests.fuzz.atheris_run stun -max_total_time=120 /tmp/new tests/fuzz/corpus/stun``.
CI runs every target for 30 s from its corpus (test_atheris.py); docs/reliability.md has
the longer runs. atheris is in the test extra (a Python 3.11 wheel here).
"""

from __future__ import annotations

import sys


def main() -> None:
    import atheris

    with atheris.instrument_imports(include=["derpkit"]):
        from tests.fuzz import targets

    if len(sys.argv) < 2 or sys.argv[1] not in targets.TARGETS:
        print(f"usage: python -m tests.fuzz.atheris_run TARGET [libFuzzer flags]; targets: "
              f"{', '.join(targets.TARGETS)}", file=sys.stderr)
        raise SystemExit(2)
    check = targets.TARGETS[sys.argv[1]]

    def one(data: bytes) -> None:
        check(data)

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
