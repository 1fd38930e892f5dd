#!/usr/bin/env bash
# Peers for the probe and conformance tests beyond the pinned release: Go derper of an older
# (v1.80.3) and the newest served (v1.104.7) release, sing-box's embedded DERP service (a
# DERP server nobody here wrote), headless Chromium for the probe's status page, and tcpdump
# for the conformance pcap. Each lands in its own directory so the pinned derper on PATH is
# never shadowed:  $(go env GOPATH)/peers/<name>/<binary>.
# Safe to re-run: each step skips what is already there.
set -euo pipefail
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  command -v chromium >/dev/null 2>&1 || need+=(chromium)
  command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "install-matrix-peers: apt-get install ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-matrix-peers: no Go toolchain; the conformance matrix tests will fail under DERPKIT_REQUIRE_GO_PEERS=1" >&2
  exit 0
fi
PEERS="$(go env GOPATH)/peers"
install_one() {  # dir module@version [go install flags...]
  local dir="$1" mod="$2"; shift 2
  local bin="${mod%@*}"; bin="${bin##*/}"
  if [ -x "$PEERS/$dir/$bin" ] && [ "$(cat "$PEERS/$dir/.version" 2>/dev/null)" = "$mod" ]; then
    return 0
  fi
  echo "install-matrix-peers: go install $* $mod -> $PEERS/$dir" >&2
  mkdir -p "$PEERS/$dir"
  # v1.104.x needs Go >= 1.27.4; GOTOOLCHAIN=auto fetches that toolchain from the proxy.
  GOBIN="$PEERS/$dir" GOTOOLCHAIN="${GOTOOLCHAIN_FOR_PEERS:-auto}" go install "$@" "$mod"
  echo "$mod" > "$PEERS/$dir/.version"
}
install_one derper-v1.80.3 tailscale.com/cmd/derper@v1.80.3
# v1.104.7 cannot be `go install`ed here (the proxy refuses the setec version it needs):
# scripts/peers/derper-v1.104.7 builds the same package with setec pinned (see its go.mod).
here="$(cd "$(dirname "$0")" && pwd)"
if [ ! -x "$PEERS/derper-v1.104.7/derper" ]; then
  echo "install-matrix-peers: go build tailscale.com/cmd/derper@v1.104.7 -> $PEERS/derper-v1.104.7" >&2
  mkdir -p "$PEERS/derper-v1.104.7"
  (cd "$here/peers/derper-v1.104.7" && GOTOOLCHAIN="${GOTOOLCHAIN_FOR_PEERS:-auto}" GOFLAGS=-mod=mod \
    go build -o "$PEERS/derper-v1.104.7/derper" tailscale.com/cmd/derper)
fi
# About 3 minutes cold; newer sing-box releases need modules the proxy here refuses.
install_one sing-box-v1.13.19 github.com/sagernet/sing-box/cmd/sing-box@v1.13.19 -tags with_gvisor,with_tailscale
echo "install-matrix-peers: done in $PEERS" >&2
