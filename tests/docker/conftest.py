"""Session fixtures for tests/docker: the image is built once per session (podman's layer
cache makes a rebuild after a source change cost seconds), and the documented container
(docs/docker.md's first `podman run`) is started once and shared by test_image.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .podman import (
    IMAGE,
    ROOT,
    Localizer,
    container_gone,
    doc_command,
    health,
    require_podman,
    run,
    run_doc,
    volumes_gone,
    wait_log,
)

CERTNAME_RE = re.compile(r'"CertName":"(sha256-raw:[0-9a-f]{64})"')

#: Hash of a derpkit package tree (paths and contents of its .py files), run here and in the image.
TREE_HASH = """
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
h = hashlib.sha256()
for f in sorted(root.rglob("*.py")):
    h.update(str(f.relative_to(root)).encode() + b"\\0" + f.read_bytes())
print(h.hexdigest())
"""


def tree_hash() -> str:
    return subprocess.run([sys.executable, "-c", TREE_HASH, str(ROOT / "derpkit")],
                          capture_output=True, text=True, check=True).stdout.strip()


@dataclass
class Built:
    seconds: float
    size: int
    stand_in: str  # the base stand-in's label, inherited by the image
    tree_hash: str  # of derpkit/ as the build read it


@pytest.fixture(scope="session")
def image() -> Built:
    require_podman()
    run_doc(doc_command("bash scripts/install-docker-peers.sh"), timeout=900)
    # The working tree is shared with other engineers: build until derpkit/ held still
    # during a whole build (bounded), so the image's content is known.
    for _ in range(3):
        before = tree_hash()
        t0 = time.monotonic()
        run_doc(doc_command("podman build"), timeout=1200)
        seconds = time.monotonic() - t0
        if tree_hash() == before:
            break
    size = int(run_doc(doc_command("podman image inspect"), timeout=60).stdout.strip())
    label = run(["podman", "image", "inspect", "--format",
                 '{{index .Labels "org.derpkit.stand-in"}}', IMAGE], check=True).stdout.strip()
    print(f"\ntests/docker: image {IMAGE} built in {seconds:.1f} s, {size / 1e6:.0f} MB, base: {label}")
    return Built(seconds, size, label, before)


@dataclass
class Running:
    name: str
    loc: Localizer
    pin: str
    log: str
    seconds_to_healthy: float

    @property
    def derp_port(self) -> int:
        return self.loc.port(443)

    @property
    def stun_port(self) -> int:
        return self.loc.port(3478, "udp")

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.derp_port}/derp"


def first_healthy(name: str, t0: float, limit: float = 45) -> float:
    """Seconds from ``t0`` (just before `podman run`) to the first passing health check."""
    while True:
        rc, out = health(name)
        if rc == 0:
            return time.monotonic() - t0
        if time.monotonic() - t0 > limit:
            why = run(["podman", "exec", name, "derpkit", "healthcheck"], timeout=60)
            raise AssertionError(f"{name} not healthy after {limit} s: {out}: {why.stdout}{why.stderr}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def derp(image: Built) -> Iterator[Running]:
    """docs/docker.md's `podman run -d --name derp …`, on fresh volumes."""
    container_gone("derp")
    volumes_gone("derp-certs", "derp-key")
    loc = Localizer()
    t0 = time.monotonic()
    run_doc(doc_command("podman run -d --name derp"), loc)
    try:
        log = wait_log("derp", "DERP on port")
        seconds = first_healthy("derp", t0)
        print(f"\ntests/docker: `podman run` to first healthy check: {seconds:.2f} s")
        pins = CERTNAME_RE.findall(log)
        assert len(pins) == 1, log
        yield Running("derp", loc, pins[0], log, seconds)
    finally:
        container_gone("derp")
        volumes_gone("derp-certs", "derp-key")
