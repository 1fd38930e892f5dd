"""``derpkit healthcheck`` against in-process servers: what it connects to, what it pins,
what counts as healthy."""

from __future__ import annotations

from pathlib import Path

import pytest

from derpkit import healthcheck as hc
from derpkit.protocol.keys import MeshKey, NodePrivate
from derpkit.server.config import ServeConfig, parse_config
from derpkit.server.node import DerpNode, NodeOptions
from derpkit.server.tls import certs

pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")


def cfg_of(*argv: str) -> ServeConfig:
    return parse_config(list(argv), {"HOME": "/nonexistent-home"})[0]


def test_target_host_and_port() -> None:
    assert hc.target_host(cfg_of("-a", ":443")) == "127.0.0.1"
    assert hc.target_host(cfg_of("-a", "0.0.0.0:443")) == "127.0.0.1"
    assert hc.target_host(cfg_of("-a", "[::]:443")) == "::1"
    assert hc.target_host(cfg_of("-a", "10.1.2.3:443")) == "10.1.2.3"
    assert hc.derp_port(cfg_of("-a", ":8443", "-certmode", "manual")) == 8443
    assert hc.derp_port(cfg_of("-dev")) == 3340


def test_pin_only_for_manual_ip_hostnames(tmp_path: Path) -> None:
    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1", poll_interval=0)
    cfg = cfg_of("-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path), "-a", ":8443")
    assert hc.pin_for(cfg) == provider.cert_name
    assert hc.pin_for(cfg_of("-certmode", "manual", "-hostname", "derp.example", "-certdir", str(tmp_path), "-a", ":1")) is None
    assert hc.pin_for(cfg_of("-certmode", "manual", "-hostname", "127.0.0.2", "-certdir", str(tmp_path), "-a", ":1")) is None


async def _node(tmp_path: Path, **kw) -> tuple[DerpNode, certs.ManualCertProvider]:
    provider = certs.ManualCertProvider(str(tmp_path), "127.0.0.1", poll_interval=0)
    key = NodePrivate.generate()
    node = DerpNode(NodeOptions(ssl_context=provider.ssl_context(key.public()), private_key=key, **kw))
    await node.start()
    return node, provider


async def test_tls_pinned_derp_and_stun_ok(tmp_path: Path) -> None:
    node, _ = await _node(tmp_path)
    try:
        cfg = cfg_of("-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path),
                     "-a", f"127.0.0.1:{node.port}", "-stun-port", str(node.stun_port))
        ok, lines = await hc.run_checks(cfg, 3)
        assert ok, lines
        assert lines[0].startswith(f"DERP ok: https://127.0.0.1:{node.port}/derp server key {node.public_key}, ping")
        assert lines[1].startswith(f"STUN ok: 127.0.0.1:{node.stun_port} mapped 127.0.0.1:")
        # The certificate on disk is not the one served (e.g. replaced but not yet loaded
        # by an older server): the pin fails, and so does the check.
        (tmp_path / "127.0.0.1.crt").write_bytes(certs.make_self_signed_ip_cert("127.0.0.1")[0])
        ok, lines = await hc.run_checks(cfg, 3)
        assert not ok and "does not match the CertName pin" in lines[0]
    finally:
        await node.stop()


async def test_admission_refusal_is_healthy_and_mesh_key_gets_admitted(tmp_path: Path) -> None:
    async def refuse(*_a, **_k) -> str:
        return "not in the test's tailnet"

    mesh = MeshKey.generate()
    node, _ = await _node(tmp_path, admit=refuse, stun_port=None, mesh_key=mesh)
    try:
        base = ["-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path),
                "-a", f"127.0.0.1:{node.port}", "-stun=false"]
        ok, lines = await hc.run_checks(cfg_of(*base), 3)
        assert ok, lines
        assert "refused this probe" in lines[0] and lines[1] == "STUN skipped: -stun=false"
        # With the mesh key readable, the probe is a trusted mesh peer: admitted and pinged.
        (tmp_path / "mesh.key").write_text(mesh.hex() + "\n")
        ok, lines = await hc.run_checks(cfg_of(*base, "-mesh-psk-file", str(tmp_path / "mesh.key")), 3)
        assert ok and "ping" in lines[0], lines
    finally:
        await node.stop()


async def test_plain_http_and_nothing_listening(tmp_path: Path) -> None:
    node = DerpNode(NodeOptions())
    await node.start()
    port = node.port
    try:
        ok, lines = await hc.run_checks(cfg_of("-a", f"127.0.0.1:{port}", "-stun-port", str(node.stun_port)), 3)
        assert ok and lines[0].startswith(f"DERP ok: http://127.0.0.1:{port}/derp"), lines
    finally:
        await node.stop()
    ok, lines = await hc.run_checks(cfg_of("-a", f"127.0.0.1:{port}", "-stun=false"), 2)
    assert not ok and lines[0].startswith("FAIL DERP"), lines


def test_bad_flags_exit_2(capsys) -> None:
    assert hc.main(["--timeout", "soon"]) == 2
    assert hc.main(["-stun-port", "x"]) == 2


def test_serve_flags_of_a_command_line() -> None:
    assert hc.serve_flags(["/usr/bin/python3", "/usr/local/bin/derpkit", "serve", "-stun-port", "3479"]) == [
        "-stun-port", "3479"]
    assert hc.serve_flags(["python3", "-m", "derpkit", "serve"]) == []
    assert hc.serve_flags(["/sbin/init", "splash"]) is None
    assert hc.serve_flags(["derpkit", "healthcheck", "serve"]) is None


def test_without_flags_it_checks_what_pid1_derpkit_serve_runs_with(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """In a container started as ``… derpkit derpkit serve <flags>``, the HEALTHCHECK (no
    flags) checks the ports those flags name; flags of its own still win."""
    import socket

    def closed_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    pid1, mine = closed_port(), closed_port()
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"\0".join([b"/usr/bin/python3", b"/usr/local/bin/derpkit", b"serve", b"-a",
                                    f"127.0.0.1:{pid1}".encode(), b"-stun=false"]) + b"\0")
    monkeypatch.setattr(hc, "PID1_CMDLINE", str(cmdline))
    for name in ("ADDR", "DERP_ADDR", "RUN_STUN", "STUN_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert hc.main(["--timeout", "2"]) == 1
    out = capsys.readouterr().out
    assert f"FAIL DERP http://127.0.0.1:{pid1}/derp" in out and "STUN skipped: -stun=false" in out, out
    assert hc.main(["--timeout", "2", "-a", f"127.0.0.1:{mine}", "-stun=false"]) == 1
    out = capsys.readouterr().out
    assert f"127.0.0.1:{mine}/derp" in out and str(pid1) not in out, out
    cmdline.write_bytes(b"/sbin/init\0")  # not derpkit serve: the variables alone, as before
    monkeypatch.setenv("ADDR", f"127.0.0.1:{mine}")
    monkeypatch.setenv("RUN_STUN", "false")
    assert hc.main(["--timeout", "2"]) == 1
    assert f"127.0.0.1:{mine}/derp" in capsys.readouterr().out
