#!/usr/bin/env bash
# Install every real peer the tests talk to: Debian's STUN tools (coturn, stun-client),
# Tailscale's Go programs at the pinned release, and the pebble ACME test server.
# Safe to re-run: each step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  need=()
  command -v turnutils_stunclient >/dev/null 2>&1 || need+=(coturn)
  command -v stun >/dev/null 2>&1 || need+=(stun-client)
  command -v nft >/dev/null 2>&1 || need+=(nftables)  # tests/stunc/test_nat_netns.py: NATs
  command -v iptables >/dev/null 2>&1 || need+=(iptables)
  if [ "${#need[@]}" -gt 0 ]; then
    echo "install-peers: apt-get install ${need[*]}" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  fi
else
  echo "install-peers: not root or no apt-get; coturn/stun-client tests will skip if missing" >&2
fi
bash scripts/install-go-peers.sh
if [ -f scripts/install-pebble.sh ]; then
  bash scripts/install-pebble.sh
fi
bash scripts/install-matrix-peers.sh
bash scripts/install-docker-peers.sh || echo "install-peers: install-docker-peers.sh failed; tests/docker will say why" >&2
