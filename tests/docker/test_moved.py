"""Ports moved by variables and a flag after the image name, and the seed image's host
directory for certificates (chowned to the image's uid 1000, and what happens without)."""

from __future__ import annotations

import http.client
import os
import sys
from pathlib import Path

import pytest

from tests.interop.helpers import derp_map, probe_lines, run_go, write_map

from .conftest import CERTNAME_RE, Built, first_healthy
from .podman import IMAGE, Localizer, container_gone, doc_command, run, run_doc, wait_log

pytestmark = pytest.mark.timeout(180)


async def test_moved_ports_and_a_host_certificate_directory(image: Built, tmp_path: Path) -> None:
    import asyncio
    import time

    loc = Localizer()
    await asyncio.to_thread(container_gone, "derp-moved")
    try:
        for c in ("mkdir -p derper-certs", "chown -R 1000 derper-certs"):
            await asyncio.to_thread(run_doc, doc_command(c), cwd=tmp_path)
        t0 = time.monotonic()
        await asyncio.to_thread(run_doc, doc_command("podman run -d --name derp-moved"), loc, cwd=tmp_path)
        log = await asyncio.to_thread(wait_log, "derp-moved", "DERP on port")
        assert "DERP on port 8443; plain HTTP (-http-port) on port 8080" in log, log
        assert "STUN server listening on [::]:3479" in log, log
        # The HEALTHCHECK (no flags) found the flag-moved STUN port through PID 1's flags.
        await asyncio.to_thread(first_healthy, "derp-moved", t0)
        out = (await asyncio.to_thread(run, ["podman", "exec", "derp-moved", "derpkit", "healthcheck"],
                                       check=True)).stdout
        assert "127.0.0.1:8443/derp" in out and "STUN ok: 127.0.0.1:3479" in out, out
        # The generated certificate is in the host directory, written by uid 1000.
        crt = tmp_path / "derper-certs" / "127.0.0.1.crt"
        assert crt.exists() and os.stat(crt).st_uid == 1000
        pins = CERTNAME_RE.findall(log)
        assert len(pins) == 1, log
        # derpkit probe -once through the moved, published ports; plain HTTP on 8080.
        m = derp_map(901, "moved", [{"Name": "901a", "HostName": "127.0.0.1", "IPv4": "127.0.0.1",
                                     "DERPPort": loc.port(8443), "STUNPort": loc.port(3479, "udp"),
                                     "CertName": pins[0]}])
        r = await run_go([sys.executable, "-m", "derpkit", "probe", "-once", "-derp-map",
                          write_map(tmp_path / "map.json", m), "-spread=false", "-interval", "5s",
                          "-tls-interval", "0", "-stun-interval", "5s", "-mesh-interval", "0",
                          "-bw-interval", "5s"], timeout=60)
        good, bad = probe_lines(r.output)
        assert r.returncode == 0 and not bad and {"derp/moved/901a/901a/bw", "derp/moved/901a/udp"} <= set(good), r.output
        def get(port: int) -> tuple[int, str]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                c.request("GET", "/")
                r = c.getresponse()
                return r.status, r.getheader("Location") or ""
            finally:
                c.close()

        # The plain-HTTP listener answers on the moved port (sending browsers to HTTPS).
        status, where = await asyncio.to_thread(get, loc.port(8080))
        assert 200 <= status < 400, (status, where)
    finally:
        await asyncio.to_thread(container_gone, "derp-moved")


def test_host_directory_not_writable_by_uid_1000_stops_the_container(image: Built, tmp_path: Path) -> None:
    (tmp_path / "derper-certs").mkdir()  # root's, as a fresh `mkdir` makes it
    container_gone("derp-nochown")
    try:
        r = run(["podman", "run", "--name", "derp-nochown", "-e", "VERIFY_CLIENTS=false",
                 "--sysctl", "net.ipv4.ip_unprivileged_port_start=0",
                 "-v", "./derper-certs:/home/derp/derper-certs", IMAGE], cwd=tmp_path, timeout=90)
        assert r.returncode == 1, (r.returncode, r.stderr)
        logs = run(["podman", "logs", "derp-nochown"], check=True)
        text = logs.stdout + logs.stderr
        assert ('derper: can not start cert provider: can not load x509 key pair for hostname "127.0.0.1": '
                "failed to write certificate to derper-certs/127.0.0.1.crt") in text, text
        assert "Permission denied" in text and "Traceback" not in text, text
    finally:
        container_gone("derp-nochown")
