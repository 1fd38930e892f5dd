#!/usr/bin/env bash
# Install pebble, Let's Encrypt's ACME test server, at a pinned release. The ACME tests
# (tests/server/test_acme_pebble.py) run it on loopback; without it they skip.
# Repeat runs are fast: `go install` reuses the module and build caches.
set -euo pipefail
PEBBLE_VERSION="${PEBBLE_VERSION:-v2.10.1}"
if ! command -v go >/dev/null 2>&1; then
  echo "install-pebble: no Go toolchain; ACME tests will be skipped" >&2
  exit 0
fi
GOBIN="${GOBIN:-$(go env GOPATH)/bin}"
export GOBIN
if [ -x "$GOBIN/pebble" ] && [ -f "$GOBIN/.pebble.version" ] && [ "$(cat "$GOBIN/.pebble.version")" = "$PEBBLE_VERSION" ]; then
  exit 0
fi
echo "install-pebble: go install github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION" >&2
go install "github.com/letsencrypt/pebble/v2/cmd/pebble@$PEBBLE_VERSION"
echo "$PEBBLE_VERSION" > "$GOBIN/.pebble.version"
echo "install-pebble: $PEBBLE_VERSION in $GOBIN" >&2
