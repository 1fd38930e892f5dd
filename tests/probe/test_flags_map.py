"""derpprobe's flags and the DERP map loader: Go syntax, mesh-key sources, one line per bad field."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from derpkit.probe.dmap import MapError, MapHolder, parse_map
from derpkit.probe.flags import DEFAULT_MAP, UsageError, parse_args, resolve_mesh_key
from derpkit.protocol.keys import MeshKey

from .helpers import dmap, node, write


def test_defaults_are_derpprobes() -> None:
    o = parse_args([])
    assert (o.derp_map, o.listen, o.once, o.spread) == (DEFAULT_MAP, ":8030", False, True)
    assert (o.interval, o.mesh_interval, o.stun_interval, o.tls_interval) == (15, 15, 15, 15)
    assert (o.bw_interval, o.bw_probe_size_bytes, o.qd_packets_per_second, o.qd_packet_timeout) == (0, 1_000_000, 0, 5)
    assert (o.secrets_path_prefix, o.region_code, o.dev) == ("prod/derp", "", False)


def test_go_syntax_and_positional_map() -> None:
    o = parse_args(["--once", "-spread=false", "-interval=1m30s", "--tls-interval", "500ms",
                    "map.json", "-region-code", "lab"])
    assert o.once and not o.spread and o.interval == 90 and o.tls_interval == 0.5
    assert o.derp_map == "map.json" and o.region_code == "lab"
    assert parse_args(["-derp-map", "local"]).derp_map == "local"


@pytest.mark.parametrize(("argv", "message"), [
    (["-interval", "15"], 'invalid value "15" for flag -interval: '),
    (["-once=maybe"], 'invalid boolean value "maybe" for -once'),
    (["-nosuch"], "flag provided but not defined: -nosuch"),
    (["-interval", "0s"], "-interval must be > 0"),
    (["-derp-map", "a.json", "b.json"], "name two maps"),
    (["a.json", "b.json"], "want at most one DERP map argument"),
    (["-bw-tun-ipv4-addr", "fe80::1"], "-bw-tun-ipv4-addr 'fe80::1' is not an IPv4 address"),
])
def test_bad_flags_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_args(argv)
    assert message in str(e.value) and e.value.code == 2


def test_tun_mode_is_refused_plainly() -> None:
    with pytest.raises(UsageError, match="TUN device are not implemented") as e:
        parse_args(["-bw-tun-ipv4-addr", "10.9.0.1"])
    assert e.value.code == 1


def test_cli_bad_flag_is_one_line_exit_2() -> None:
    p = subprocess.run([sys.executable, "-m", "derpkit", "probe", "-tls-interval", "soon"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert p.stderr.splitlines()[0] == 'derpkit probe: invalid value "soon" for flag -tls-interval: not a duration (use e.g. 10s, 1.5h or 10m0s)'
    assert "Traceback" not in p.stderr


async def test_mesh_key_sources_in_derpprobes_order(tmp_path: Path) -> None:
    k1, k2 = MeshKey.generate(), MeshKey.generate()
    psk = tmp_path / "psk"
    psk.write_text(f"  {k1.hex()}\n")
    key, src = await resolve_mesh_key(parse_args(["-mesh-psk-file", str(psk)]), {})
    assert key == k1 and "mesh-psk-file" in src
    # -dev wins over the file and reads the environment.
    key, _ = await resolve_mesh_key(parse_args(["-dev", "-mesh-psk-file", str(psk)]),
                                    {"TAILSCALE_DERPER_MESH_KEY": k2.hex()})
    assert key == k2
    assert (await resolve_mesh_key(parse_args([]), {}))[0] is None
    psk.write_text("abc\n")
    with pytest.raises(UsageError, match="must be 64 hex digits, got 3 characters") as e:
        await resolve_mesh_key(parse_args(["-mesh-psk-file", str(psk)]), {})
    assert e.value.code == 1
    with pytest.raises(UsageError, match="No such file"):
        await resolve_mesh_key(parse_args(["-mesh-psk-file", str(tmp_path / "missing")]), {})


async def test_mesh_key_from_setec(tmp_path: Path) -> None:
    """setec's wire format through derpkit's setec client (the server's own module)."""
    from tests.server.setec_standin import SetecStandIn

    k = MeshKey.generate()
    setec = await SetecStandIn({"prod/derp/meshkey": [k.hex().encode()]}).start()
    try:
        opts = parse_args(["-secrets-url", setec.url, "-secrets-cache-dir", str(tmp_path / "cache" / "c")])
        key, src = await resolve_mesh_key(opts, {})
    finally:
        await setec.stop()
    assert [r.path for r in setec.requests] == ["/api/get"]
    assert key == k and src.startswith("setec ")


def test_map_decoding_follows_go() -> None:
    m = parse_map(json.dumps({"regions": {"900": {"regionid": 900, "RegionCode": "lab", "Nodes": [
        {"Name": "900a", "HostName": "h", "RegionID": 900, "Unknown": 1}]}, "901": None}}))
    assert [n.name for _, n in m.nodes()] == ["900a"]
    assert any("region 901 is null and was dropped" in w for w in m.warnings)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda n: n.update(HostName=""), 'region 900 node 1 ("900a"): HostName is empty'),
    (lambda n: n.update(Name=""), "region 900 node 1: Name is empty"),
    (lambda n: n.update(DERPPort="443"), 'region 900 node 1: DERPPort must be an integer, not "443"'),
    (lambda n: n.update(CertName="sha256-raw:abc"), "needs 64 hex digits after sha256-raw:"),
])
def test_bad_fields_are_named(mutate, message: str) -> None:  # noqa: ANN001
    n = {"Name": "900a", "RegionID": 900, "HostName": "h"}
    mutate(n)
    with pytest.raises(MapError, match=".*") as e:
        parse_map(json.dumps(dmap((900, "lab", [n]))))
    assert message in str(e.value), str(e.value)


def test_duplicates_null_and_warnings() -> None:
    dup = dmap((900, "a", [node("x", 1)]), (901, "b", [node("x", 2)]))
    with pytest.raises(MapError, match="derpmap has duplicate nodes: 'x' in region 900 and region 901"):
        parse_map(json.dumps(dup))
    with pytest.raises(MapError, match="JSON null"):
        parse_map("null")
    with pytest.raises(MapError, match="decoding the map JSON"):
        parse_map("{")
    m = parse_map(json.dumps(dmap((900, "a", [node("x", 1, IPv4="nope", IPv6="none", RegionID=7)]))))
    text = "\n".join(m.warnings)
    assert 'IPv4 "nope" is not an IPv4 address' in text and "RegionID is 7" in text
    assert "both IPv4 and IPv6 are switched off" in text


async def test_last_good_map_is_kept_when_the_source_breaks(tmp_path: Path) -> None:
    path = write(tmp_path, dmap((900, "lab", [node("900a", 1)])))
    h = MapHolder("file://" + path)
    await h.refresh(5)
    await asyncio.to_thread(Path(path).write_text, "{broken")
    with pytest.raises(MapError):
        await h.refresh(5)
    assert h.current is not None and h.last_error.startswith("decoding ")
    assert h.age is not None and h.age < 5
    with pytest.raises(MapError, match="fetching http://127.0.0.1:1/map"):
        await MapHolder("http://127.0.0.1:1/map").refresh(2)
    with pytest.raises(MapError, match="no tailscaled socket at /nonexistent.sock"):
        await MapHolder("local", "/nonexistent.sock").refresh(2)


async def test_local_map_from_a_real_logged_out_tailscaled(tailscaled_sock: str) -> None:
    """tailscaled answers ``null`` before it has a netmap: a clear failure, not an empty map."""
    with pytest.raises(MapError, match="tailscaled's LocalAPI is JSON null"):
        await MapHolder("local", tailscaled_sock).refresh(5)


def test_once_without_a_loadable_map_is_one_bad_line(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "derpkit", "probe", "-once", str(tmp_path / "missing.json")],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 1
    bad = [ln for ln in p.stderr.splitlines() if " bad: " in ln]
    assert len(bad) == 1 and bad[0].endswith(f"bad: derpmap-probe: reading {tmp_path / 'missing.json'}: "
                                             "No such file or directory"), p.stderr
    assert "Traceback" not in p.stderr


async def test_local_map_from_a_localapi_stand_in(tmp_path: Path) -> None:
    """A STAND-IN for a logged-in tailscaled (none can log in here): its LocalAPI's
    ``GET /localapi/v0/derpmap`` over a Unix socket, answering the map as tailscaled would."""
    from aiohttp import web

    seen: list[tuple[str, str, str]] = []
    body = json.dumps(dmap((900, "lab", [node("900a", 443)])))

    async def derpmap(request: web.Request) -> web.Response:
        seen.append((request.method, request.host, request.headers.get("Tailscale-Cap", "")))
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/localapi/v0/derpmap", derpmap)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = str(tmp_path / "ts.sock")
    await web.UnixSite(runner, sock).start()
    try:
        m = await MapHolder("local", sock).refresh(5)
    finally:
        await runner.cleanup()
    assert [n.name for _, n in m.nodes()] == ["900a"]
    assert seen == [("GET", "local-tailscaled.sock", seen[0][2])] and seen[0][2].isdigit()


async def test_hostname_only_node_gets_a_stun_probe_by_dns(tmp_path: Path) -> None:
    """derpprobe makes no STUN probe for a node without IPv4; derpkit resolves the HostName."""
    from derpkit.server.node import DerpNode, NodeOptions

    from .helpers import probe_once, result

    n = DerpNode(NodeOptions(host="127.0.0.1"))
    await n.start()
    try:
        stun = n.stun_port
        entry = {"Name": "900a", "HostName": "localhost", "DERPPort": n.port, "STUNPort": stun}
        p = await probe_once(tmp_path, dmap((900, "lab", [entry])), "-tls-interval", "0", "-mesh-interval", "0")
    finally:
        await n.stop()
    r = result(p, "derp/lab/900a/udp")
    assert r.ok and r.details["server"] == f"127.0.0.1:{stun}", r
    assert "derp/lab/900a/udp6" not in p.probes
