"""Go derper and ``derpkit serve`` count the same session the same way in /debug/varz.

Both servers get the same script over TLS (a CA-signed ``localhost`` certificate): clients
over TLS 1.3 and 1.2, a mesh watcher, a client that joins and leaves, then a pause past
derper's 10 s RTT sampling interval. Then each server's own counters are compared:
watcher-update batches (``derp_mesh_update_batch_size`` / ``_loop_count``), requests by
TLS version (``derper_tls_request_version`` / ``derper_tls_active_version``) and the
kernel RTT samples (``derp_tcp_rtt``). Last, the two sets of sample names are diffed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.request

import pytest

from derpkit.client import DerpClient
from derpkit.protocol import frames as F
from derpkit.protocol.keys import MeshKey
from tests.goderper import start_derper
from tests.server.serve_proc import start_serve

from .helpers import recv_kind
from .pki import Leaf, TestCA

pytestmark = pytest.mark.timeout(90)

NAMES = ("derp_mesh_update_batch_size", "derp_mesh_update_loop_count", "derper_tls_request_version",
         "derper_tls_active_version", "derp_tcp_rtt")


#: Go runtime internals that have no Python counterpart.
GO_RUNTIME = re.compile(r"^(go_|memstats_)")
#: derpkit's own additions (docs/operations.md).
OURS_ONLY = re.compile(r"^(derpkit_|python_version$)")


def varz_text(base_url: str, ca: TestCA) -> str:
    ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    with urllib.request.urlopen(base_url + "/debug/varz", timeout=5, context=ctx) as r:
        return r.read().decode()


def sample_names(text: str) -> set[str]:
    return set(re.findall(r"^([a-zA-Z_:][\w:]*)", text, re.M))


def scrape(base_url: str, ca: TestCA) -> dict[str, float]:
    """The samples of NAMES from one server, keyed by the sample's text (name and labels)."""
    text = varz_text(base_url, ca)
    out: dict[str, float] = {}
    for m in re.finditer(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", text, re.M):
        name, labels, value = m.groups()
        if re.sub(r"_(bucket|sum|count)$", "", name) in NAMES or name in NAMES:
            out[name + (labels or "")] = float(value)
    return out


def _tls12(ca: TestCA) -> ssl.SSLContext:
    ctx = ca.client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def _script(url: str, ca: TestCA, mesh: MeshKey) -> list[DerpClient]:
    """The same session for either server; returns the clients still connected."""
    ctx = ca.client_context()
    stay = [await DerpClient.connect(url, ssl_context=ctx) for _ in range(2)]
    stay.append(await DerpClient.connect(url, ssl_context=_tls12(ca)))
    watcher = await DerpClient.connect(url, ssl_context=ctx, mesh_key=mesh, watch_conns=True)
    for _ in range(4):  # the initial dump: the three clients and the watcher itself
        await recv_kind(watcher, F.PeerPresent)
    await asyncio.sleep(0.2)
    late = await DerpClient.connect(url, ssl_context=ctx)
    await recv_kind(watcher, F.PeerPresent)
    await asyncio.sleep(0.2)
    await late.close()
    await recv_kind(watcher, F.PeerGone)
    return [*stay, watcher]


async def test_go_and_derpkit_count_one_script_alike(tmp_path, test_ca: TestCA, localhost_leaf: Leaf) -> None:  # noqa: ANN001
    mesh = MeshKey.generate()
    psk = tmp_path / "mesh.key"
    psk.write_text(mesh.hex() + "\n")
    go = await asyncio.to_thread(start_derper, tmp_path / "go", tls=True, hostname="localhost",
                                 certdir=test_ca.dir, mesh_key_hex=mesh.hex())
    ours = await start_serve("-a", "localhost:0", "-certmode", "manual", "-hostname", "localhost",
                             "-certdir", str(test_ca.dir), "-http-port", "-1", "-stun=false",
                             "-mesh-psk-file", str(psk))
    ours_base = f"https://localhost:{ours.port}"
    clients: list[DerpClient] = []
    try:
        # Baselines: Go's start-up wait already made a TLS request; each scrape is one too.
        base_go = await asyncio.to_thread(scrape, go.base_url, test_ca)
        base_ours = await asyncio.to_thread(scrape, ours_base, test_ca)
        clients += await _script(go.url, test_ca, mesh)
        clients += await _script(f"{ours_base}/derp", test_ca, mesh)
        # Every live client gets exactly one RTT sample: 10 s after it joined (ours: within the
        # sampler's 1 s tick), the next only at 20 s.
        await asyncio.sleep(13)
        got_go = await asyncio.to_thread(scrape, go.base_url, test_ca)
        got_ours = await asyncio.to_thread(scrape, ours_base, test_ca)
        names_go = sample_names(await asyncio.to_thread(varz_text, go.base_url, test_ca))
        names_ours = sample_names(await asyncio.to_thread(varz_text, ours_base, test_ca))
    finally:
        for c in clients:
            await c.close()
        await ours.stop()
        await asyncio.to_thread(go.stop)

    # Watcher updates: one batch of 4, then one of 1 for the arrival and one for the departure.
    for got in (got_go, got_ours):
        assert got["derp_mesh_update_batch_size_count"] == 3, got
        assert got["derp_mesh_update_batch_size_sum"] == 6, got
        assert got["derp_mesh_update_loop_count_sum"] == 3, got
    hist = {k: v for k, v in got_go.items() if k.startswith("derp_mesh_update")}
    assert hist == {k: v for k, v in got_ours.items() if k.startswith("derp_mesh_update")}

    # TLS requests since the baseline: 4 + 1 sessions and the second scrape; live now: the
    # 1.2 client, three 1.3 sessions and the scrape itself.
    def tls(got: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        return {k: v - base.get(k, 0) if "request" in k else v for k, v in got.items() if k.startswith("derper_tls")}

    assert tls(got_go, base_go) == {
        'derper_tls_request_version{version="1.2"}': 1, 'derper_tls_request_version{version="1.3"}': 5,
        'derper_tls_active_version{version="1.2"}': 1, 'derper_tls_active_version{version="1.3"}': 4,
    }, (got_go, base_go)
    assert tls(got_ours, base_ours) == tls(got_go, base_go), (got_ours, base_ours)

    # RTT: one loopback sample per live TCP client, in the lowest bucket, on both servers.
    rtt_go = {k: v for k, v in got_go.items() if k.startswith("derp_tcp_rtt")}
    assert rtt_go == {'derp_tcp_rtt{le="10ms"}': 4}, rtt_go
    assert rtt_go == {k: v for k, v in got_ours.items() if k.startswith("derp_tcp_rtt")}

    # Every sample name Go exports, bar its runtime internals, is in ours; ours adds only derpkit_*.
    assert not {n for n in names_go - names_ours if not GO_RUNTIME.match(n)}
    assert not {n for n in names_ours - names_go if not OURS_ONLY.match(n)}
