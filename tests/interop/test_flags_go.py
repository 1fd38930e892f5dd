"""derper's command line, Go and ``derpkit serve`` side by side.

Start-up refusals: the same arguments must make both programs exit with the same status
and name the same problem. The key file (``-c``) must be interchangeable: a key written by
one is the server key the other presents on the wire. Flags that start a server are covered
by the other interop tests (see docs/compat.md for the full table).
"""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from derpkit.client import DerpClient
from tests.goderper import require_derper, start_derper
from tests.server.serve_proc import start_serve

from .helpers import run_go

pytestmark = pytest.mark.timeout(60)
MESH_HEX = "ab" * 32
# derper writes json.MarshalIndent(cfg, "", "\t"), no trailing newline, mode 0600.
KEY_FILE_RE = re.compile(r'\{\n\t"PrivateKey": "privkey:[0-9a-f]{64}"\n\}')


def _cases(d) -> list[tuple[str, list[str], int, str]]:  # noqa: ANN001
    (d / "bad.key").write_text("bad\n")
    return [
        ("unknown flag", ["-no-such-flag"], 2, "flag provided but not defined: -no-such-flag"),
        ("bad mesh key", ["-mesh-psk-file", str(d / "bad.key")], 1, "invalid mesh key"),
        ("missing mesh key file", ["-mesh-psk-file", str(d / "nope.key")], 1, "nope.key"),
        ("mesh-with without key", ["-mesh-with", "localhost:1"], 1,
         "--mesh-with requires --mesh-psk-file"),
        ("manual cert missing", ["-certmode", "manual", "-hostname", "example.test",
                                 "-certdir", str(d)], 1,
         'can not load x509 key pair for hostname "example.test"'),
        ("bad port", ["-a", "127.0.0.1:x"], 1, "x"),
        ("bad duration", ["-tcp-write-timeout", "5 parsecs"], 2,
         'invalid value "5 parsecs" for flag -tcp-write-timeout'),
    ]


async def test_startup_refusals_match_go(tmp_path) -> None:
    derper = require_derper()
    for name, args, want_rc, want_text in _cases(tmp_path):
        common = ["-c", str(tmp_path / f"{name}.key"), "-stun=false", "-http-port", "-1"]
        if "-a" not in args:
            common += ["-a", "127.0.0.1:0"]
        go = await run_go([derper, *common, *args], timeout=15)
        ours = await run_go([sys.executable, "-m", "derpkit", "serve", *common, *args], timeout=20)
        assert go.returncode == want_rc, (name, go.output)
        assert ours.returncode == go.returncode, (name, go.output, ours.output)
        assert want_text in go.output, (name, go.output)
        assert want_text in ours.output, (name, ours.output)


async def test_key_file_written_by_go_is_read_by_derpkit(tmp_path) -> None:
    go = await asyncio.to_thread(start_derper, tmp_path)
    try:
        c = await DerpClient.connect(go.url)
        go_key = c.server_key
        await c.close()
    finally:
        go.stop()
    assert KEY_FILE_RE.fullmatch(go.key_file.read_text()), go.key_file.read_text()
    assert (go.key_file.stat().st_mode & 0o777) == 0o600
    sp = await start_serve("-c", str(go.key_file), "-a", "127.0.0.1:0", "-stun=false")
    try:
        c = await DerpClient.connect(sp.url)
        assert c.server_key == go_key
        await c.close()
    finally:
        await sp.stop()


async def test_key_file_written_by_derpkit_is_read_by_go(tmp_path) -> None:
    require_derper()
    key_file = tmp_path / "derper.key"  # the name tests/goderper.py hands to derper's -c
    sp = await start_serve("-c", str(key_file), "-a", "127.0.0.1:0", "-stun=false")
    try:
        c = await DerpClient.connect(sp.url)
        ours = c.server_key
        await c.close()
    finally:
        await sp.stop()
    text = key_file.read_text()
    assert KEY_FILE_RE.fullmatch(text), text  # byte-for-byte derper's layout
    assert (key_file.stat().st_mode & 0o777) == 0o600
    go = await asyncio.to_thread(start_derper, tmp_path)
    try:
        c = await DerpClient.connect(go.url)
        assert c.server_key == ours
        await c.close()
    finally:
        go.stop()


async def test_sighup_without_anything_to_reload_kills_go_but_not_derpkit(tmp_path) -> None:
    """A divergence on purpose (spec Q5), shown against the Go program.

    Plain mode, no -rate-config, no certificate: Go derper never asks for SIGHUP, so Go's
    default action ends it (killed by the signal). An operator's stray ``kill -HUP`` (or a
    process manager's reload) should not take a relay down, so derpkit ignores it and keeps
    relaying: a client still completes the handshake afterwards.
    """
    import signal

    go = await asyncio.to_thread(start_derper, tmp_path)
    sp = await start_serve("-a", "127.0.0.1:0", "-stun=false")
    try:
        assert go.process is not None
        go.process.send_signal(signal.SIGHUP)
        sp.proc.send_signal(signal.SIGHUP)
        assert await asyncio.to_thread(go.process.wait, 10) == -signal.SIGHUP, go.log()
        await asyncio.sleep(0.5)
        assert sp.proc.returncode is None, "".join(sp.log)
        c = await DerpClient.connect(sp.url)
        assert c.server_key is not None
        await c.close()
    finally:
        go.stop()
        await sp.stop()
