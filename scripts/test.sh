#!/usr/bin/env bash
# The README's test command: install derpkit with its test extras, then run every test.
# pytest's exit code 5 ("no tests collected") is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q -e '.[test]' || exit 1
export PATH="$(go env GOPATH 2>/dev/null)/bin:$PATH"
python3 -m ruff check derpkit tests loadtests bench || exit 1
python3 -m pytest -q -p no:cacheprovider "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
