"""/debug/varz carries every metric name of spec derp-protocol §9 (plus derpkit's own).

The server is built by the same wiring as ``derpkit serve`` (parse_config → build_node),
in TLS mode so the accept-limiter and TLS-version metrics exist, with -rate-config so the
rate metrics do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import ssl
import tempfile

import aiohttp

from derpkit.client import DerpClient
from derpkit.server.app import build_node
from derpkit.server.config import parse_config

from .helpers import recv_packet

SPEC_9 = """
derp_accepts derp_current_connections derp_current_home_connections derp_current_notideal_connections
derp_clients_total derp_clients_local derp_clients_remote derp_current_dup_client_keys
derp_current_dup_client_conns derp_total_dup_client_conns derp_watchers derp_memstats_sys0
derp_current_file_descriptors derp_bytes_received derp_bytes_sent derp_packets_received derp_packets_sent
derp_packets_received_kind derp_unknown_frames derp_home_moves_in derp_home_moves_out derp_got_ping
derp_sent_pong derp_peer_gone_disconnected_frames derp_peer_gone_not_here_frames derp_packets_forwarded_out
derp_packets_forwarded_in derp_multiforwarder_created derp_multiforwarder_deleted
derp_packet_forwarder_delete_other_value derp_sclient_write_timeouts derp_average_queue_duration_ms
derp_tcp_rtt derp_mesh_update_batch_size derp_mesh_update_loop_count derp_buffered_write_frames
derp_rate_limit_per_client_bytes_per_second derp_rate_limit_per_client_burst_bytes
derp_rate_limit_per_client_waited derp_packets_dropped derp_bytes_dropped derp_websocket_accepts
tls_listener_accepted_connections tls_listener_rejected_connections stun_requests stun_addrfamily
bootstrap_dns_requests bootstrap_dns_published_hits bootstrap_dns_published_misses
bootstrap_dns_unpublished_hits bootstrap_dns_unpublished_misses bootstrap_dns_unpublished_percent_misses
bootstrap_dns_queried_domains process_start_unix_time version uptime_sec goroutines node_boot_time_seconds
derper_tls_request_version derper_tls_active_version
""".split()

DROP_REASONS = ("unknown_dest", "unknown_dest_on_fwd", "gone_disconnected", "queue_head", "queue_tail",
                "write_error", "dup_client")


async def test_every_spec_name_present_with_types_and_live_values(tmp_path) -> None:  # noqa: ANN001
    rate = tmp_path / "rate.json"
    rate.write_text(json.dumps({"PerClientRateLimitBytesPerSec": 1000000, "PerClientRateBurstBytes": 0}))
    cfg, _ = parse_config([
        "-a", "127.0.0.1:0", "-c", os.path.join(tempfile.mkdtemp(), "k"), "-stun-port", "0",
        "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path), "-http-port", "-1",
        "-rate-config", str(rate),
    ], {})
    node = build_node(cfg)
    await node.start()
    try:
        a = await DerpClient.connect(node.url, insecure_tls=True)
        b = await DerpClient.connect(node.url, insecure_tls=True)
        await a.send(b.public_key, b"hello")
        await recv_packet(b)
        await a.close()
        await b.close()
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{node.port}/debug/varz", ssl=ctx) as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
    finally:
        await node.stop()
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    missing = [n for n in SPEC_9 if n not in types]
    assert not missing, missing
    assert types["derp_current_connections"] == "gauge"
    assert types["derp_accepts"] == "counter"
    assert types["derp_mesh_update_batch_size"] == "histogram"
    assert 'derp_mesh_update_batch_size_bucket{le="+Inf"} 0' in text
    assert "derp_mesh_update_batch_size_count 0" in text
    for reason in DROP_REASONS:
        for kind in ("disco", "other"):
            assert f'derp_packets_dropped{{reason="{reason}",kind="{kind}"}} ' in text
    assert re.search(r"^derp_accepts 2$", text, re.M)
    assert re.search(r"^derp_packets_sent 1$", text, re.M)
    assert re.search(r"^tls_listener_accepted_connections 3$", text, re.M)  # 2 DERP + this scrape
    assert re.search(r"^derp_rate_limit_per_client_bytes_per_second 1000000$", text, re.M)
    # Both DERP sessions and this scrape were TLS 1.3 requests; only the scrape is in flight.
    assert re.search(r'^derper_tls_request_version\{version="1.3"\} 3$', text, re.M)
    assert re.search(r'^derper_tls_active_version\{version="1.3"\} 1$', text, re.M)
    assert types["derper_tls_active_version"] == "gauge"
    assert re.search(r'^version\{version="[^"]+",binary="derpkit"\} 1$', text, re.M)
    # No derper counter gets prometheus_client's _total; only the standard process_* set
    # (which has it in Go too) and derp_clients_total (a gauge named so by derper) carry it.
    totals = set(re.findall(r"^(\w+_total)[ {]", text, re.M))
    assert totals == {"derp_clients_total", "process_cpu_seconds_total",
                      "process_network_receive_bytes_total", "process_network_transmit_bytes_total"}


async def test_plain_mode_has_no_tls_listener_metrics() -> None:
    cfg, _ = parse_config(["-a", "127.0.0.1:0", "-c", os.path.join(tempfile.mkdtemp(), "k"), "-stun=false"], {})
    node = build_node(cfg)
    await node.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{node.port}/debug/varz") as r:
            text = await r.text()
    finally:
        await node.stop()
    assert "tls_listener_" not in text  # derper: TLS mode only
    assert "derp_rate_limit_per_client" not in text  # only with -rate-config
    assert "# TYPE stun_requests counter" in text  # present even with -stun=false, as in derper


def _insecure(max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


async def test_tls_versions_counted_per_request_and_sessions_stay_active(tmp_path) -> None:  # noqa: ANN001
    """derper_tls_{request,active}_version: a DERP session (plain upgrade or WebSocket) is one
    request that stays active until it ends; a TLS 1.2 client is labelled 1.2."""
    cfg, _ = parse_config([
        "-a", "127.0.0.1:0", "-c", str(tmp_path / "k"), "-stun=false",
        "-certmode", "manual", "-hostname", "127.0.0.1", "-certdir", str(tmp_path), "-http-port", "-1",
    ], {})
    node = build_node(cfg)
    await node.start()
    try:
        stats = node.server.stats
        old = await DerpClient.connect(node.url, ssl_context=_insecure(ssl.TLSVersion.TLSv1_2))
        new = await DerpClient.connect(node.url, ssl_context=_insecure())
        ws = await DerpClient.connect(node.url, ssl_context=_insecure(), websocket=True)
        assert dict(stats.tls_request_version) == {"1.2": 1, "1.3": 2}
        assert dict(stats.tls_active_version) == {"1.2": 1, "1.3": 2}
        # Sessions over TLS are sampled for RTT through the TLS layer; WebSocket is not TCP.
        assert dict(stats.tcp_rtt) == {"non-tcp": 1}
        assert sum(c.tcp_sock is not None for c in node.server.conns) == 2
        for c in (old, new, ws):
            await c.close()
        for _ in range(50):
            if not any(stats.tls_active_version.values()):
                break
            await asyncio.sleep(0.02)
        assert dict(stats.tls_active_version) == {"1.2": 0, "1.3": 0}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"https://127.0.0.1:{node.port}/derp/probe", ssl=_insecure(ssl.TLSVersion.TLSv1_2)) as r:
                assert r.status == 200
        assert dict(stats.tls_request_version) == {"1.2": 2, "1.3": 2}
    finally:
        await node.stop()
