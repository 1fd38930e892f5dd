"""compose.yaml, byte for byte, brought up with Debian's podman-compose as docs/docker.md
says: healthy, and relaying between two nodes the (stand-in) tailscaled knows."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from derpkit.client import DerpClient, DerpConnectionError
from derpkit.protocol.keys import NodePrivate
from tests.server.helpers import exchange
from tests.server.test_admission import LocalAPIStandIn

from .conftest import CERTNAME_RE, Built, first_healthy
from .podman import ROOT, container_gone, doc_command, free_port, run, run_doc, wait_log

pytestmark = pytest.mark.timeout(240)


async def test_compose_file_comes_up_healthy_and_relays(image: Built, tmp_path: Path) -> None:
    if shutil.which("podman-compose") is None:
        from tests.goderper import _skip_missing
        _skip_missing("podman-compose NOT INSTALLED: run `bash scripts/install-docker-peers.sh`")
    project = tmp_path / "derpkit-compose"
    project.mkdir()
    shutil.copyfile(ROOT / "compose.yaml", project / "compose.yaml")
    ports = {"PUBLISH_HTTPS": free_port(), "PUBLISH_HTTP": free_port()}
    import socket
    ports["PUBLISH_STUN"] = free_port(socket.SOCK_DGRAM)
    await asyncio.to_thread(container_gone, "derper")
    async with LocalAPIStandIn() as ts:
        os.chmod(ts.path, 0o666)
        env = {k: str(v) for k, v in ports.items()} | {"TAILSCALED_SOCKET": ts.path}
        up = doc_command("PUBLISH_IP=127.0.0.1 podman-compose up -d")
        try:
            import time
            t0 = time.monotonic()
            r = await asyncio.to_thread(run_doc, up, None, timeout=180, env=env, cwd=project, check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            log = await asyncio.to_thread(wait_log, "derper", "DERP on port")
            await asyncio.to_thread(first_healthy, "derper", t0)
            hc = await asyncio.to_thread(run_doc, doc_command("podman healthcheck run derper"), check=False)
            assert hc.returncode == 0, hc.stdout + hc.stderr
            published = (await asyncio.to_thread(run, ["podman", "port", "derper"], check=True)).stdout
            assert published.count("127.0.0.1:") == 3, published
            pins = CERTNAME_RE.findall(log)
            assert len(pins) == 1, log
            url = f"https://127.0.0.1:{ports['PUBLISH_HTTPS']}/derp"
            k1, k2 = NodePrivate.generate(), NodePrivate.generate()
            ts.known |= {str(k1.public()), str(k2.public())}
            a = await DerpClient.connect(url, private_key=k1, cert_name=pins[0], timeout=10)
            b = await DerpClient.connect(url, private_key=k2, cert_name=pins[0], timeout=10)
            try:
                await exchange(a, b, 2)
            finally:
                await a.close()
                await b.close()
            with pytest.raises(DerpConnectionError):  # VERIFY_CLIENTS=true from the file
                await DerpClient.connect(url, cert_name=pins[0], timeout=10)
        finally:
            down = await asyncio.to_thread(run_doc, doc_command("podman-compose down"), None,
                                           timeout=120, env=env, cwd=project, check=False)
            await asyncio.to_thread(container_gone, "derper")
            vols = (await asyncio.to_thread(
                run, ["podman", "volume", "ls", "-q", "--filter", "label=io.podman.compose.project=derpkit-compose"]
            )).stdout.split()
            for v in vols:
                await asyncio.to_thread(run, ["podman", "volume", "rm", "-f", v])
        assert down.returncode == 0, down.stdout + down.stderr
    gone = (await asyncio.to_thread(run, ["podman", "ps", "-a", "-q", "--filter", "name=^derper$"])).stdout
    assert not gone.strip()
