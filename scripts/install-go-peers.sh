#!/usr/bin/env bash
# Install Tailscale's own Go programs (derper, derpprobe, stunc, tailscaled) at one pinned
# release, as peers for the interop tests.
# Repeat runs are fast: `go install` reuses the module and build caches.
set -euo pipefail
TAILSCALE_VERSION="${TAILSCALE_VERSION:-v1.102.3}"
if ! command -v go >/dev/null 2>&1; then
  echo "install-go-peers: no Go toolchain; interop tests will be skipped" >&2
  exit 0
fi
GOBIN="${GOBIN:-$(go env GOPATH)/bin}"
export GOBIN
for cmd in derper derpprobe stunc tailscaled tailscale; do
  if [ -x "$GOBIN/$cmd" ] && [ -f "$GOBIN/.$cmd.version" ] && [ "$(cat "$GOBIN/.$cmd.version")" = "$TAILSCALE_VERSION" ]; then
    continue
  fi
  echo "install-go-peers: go install tailscale.com/cmd/$cmd@$TAILSCALE_VERSION" >&2
  go install "tailscale.com/cmd/$cmd@$TAILSCALE_VERSION"
  echo "$TAILSCALE_VERSION" > "$GOBIN/.$cmd.version"
done
echo "install-go-peers: $TAILSCALE_VERSION in $GOBIN" >&2
# Warm the build cache for the small Go programs the tests build themselves (Tailscale's
# DERP client shell, setec's server code, the bench generator), so the first test that
# builds one is not charged a cold compile inside its timeout.
here="$(cd "$(dirname "$0")/.." && pwd)"
for dir in tests/interop/goclient tests/server/setecserver bench/derpgen tests/e2e/control; do
  if [ -f "$here/$dir/go.mod" ]; then
    (cd "$here/$dir" && GOFLAGS=-mod=mod go build -o /dev/null .) || { echo "install-go-peers: building $dir failed" >&2; exit 1; }
  fi
done
# derper -dev and dual-stack STUN interop tests run inside `unshare -rn` (a private network
# namespace, so derper's fixed ports 3340/3478 collide with nothing); say early if that fails.
if ! unshare -rn true >/dev/null 2>&1; then
  echo "install-go-peers: WARNING: 'unshare -rn' is not permitted here; tests/interop/test_dev_mode_netns.py cannot run" >&2
fi
