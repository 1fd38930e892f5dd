#!/usr/bin/env bash
# What tests/docker needs: Debian's podman (no Docker engine runs here) and a STAND-IN for the
# Dockerfile's base image python:3.11-slim-bookworm, which cannot be pulled on this machine.
#
# The stand-in is Debian bookworm (debootstrap --variant=minbase) with Debian's Python 3.11 and
# pip, the host's CA bundle (so pip inside `podman build` reaches PyPI through this network's
# TLS proxy), pip's "externally managed" marker removed (the real image has none),
# imported with `podman import` under the exact name the Dockerfile uses and labelled
# org.derpkit.stand-in so a test can tell it is not the real image.
#
# Safe to re-run: packages are installed only when missing, the root filesystem tarball is
# kept in $DERPKIT_DOCKER_CACHE (default /var/cache/derpkit) and imported only when the image
# is missing. Not root or no apt-get: says so and leaves the tests to fail or skip loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="docker.io/library/python:3.11-slim-bookworm"
CACHE="${DERPKIT_DOCKER_CACHE:-/var/cache/derpkit}"
TARBALL="$CACHE/python-3.11-slim-standin.tar"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
  echo "install-docker-peers: not root or no apt-get; tests/docker will skip (or fail in CI)" >&2
  exit 0
fi
need=()
for pkg in podman runc debootstrap uidmap slirp4netns fuse-overlayfs podman-compose; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
  echo "install-docker-peers: apt-get install ${need[*]}" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# crun refuses this host's hybrid cgroups and the default ulimits exceed the host's, so
# every podman call here (and in tests/docker) names runc, cgroupfs and the ulimits.
podman_() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }

if podman_ image exists "$BASE"; then
  exit 0
fi
if [ ! -s "$TARBALL" ]; then
  root="$CACHE/rootfs-py311"
  mkdir -p "$CACHE"
  if [ ! -f "$root/.debootstrap-done" ]; then
    rm -rf "$root"
    echo "install-docker-peers: debootstrap bookworm (minbase + python3, python3-pip) — a few minutes" >&2
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
      bookworm "$root" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    touch "$root/.debootstrap-done"
  fi
  # Shape it like python:3.11-slim where the Dockerfile can tell: `python`/`pip` on PATH,
  # pip allowed to install into the system, no package lists.
  rm -f "$root"/usr/lib/python3.*/EXTERNALLY-MANAGED "$root/.debootstrap-done"
  ln -sf python3 "$root/usr/bin/python"
  [ -e "$root/usr/bin/pip" ] || ln -sf pip3 "$root/usr/bin/pip"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar --numeric-owner -C "$root" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
  rm -rf "$root"
fi
echo "install-docker-peers: podman import $BASE (STAND-IN built from Debian bookworm)" >&2
podman_ import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
  --change 'LABEL org.derpkit.stand-in="python:3.11-slim-bookworm stand-in: Debian bookworm minbase, Debian python3 3.11 + pip, host CA bundle"' \
  --change 'CMD ["python3"]' \
  "$TARBALL" "$BASE" >/dev/null
