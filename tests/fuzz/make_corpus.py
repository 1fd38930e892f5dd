"""Write the atheris seed corpus: ``tests/fuzz/corpus/<target>/<name>``, one small file per seed.

    python -m tests.fuzz.make_corpus          # rewrites tests/fuzz/corpus/ (committed)
    python -m tests.fuzz.make_corpus --check  # exit 1 if the committed corpus differs

Seeds are real inputs, so the fuzzer starts past the first length or JSON check:

- frames and whole sessions from the bytes Go derper sent (tests/vectors/go_derper.json),
  and the frames a client sends, encoded by our codec (whose bytes tests/protocol checks);
- a ClientInfo box sealed by ``targets.CLIENT`` to ``targets.SERVER`` (real NaCl, a fixed
  nonce so the file does not change from run to run);
- the STUN vectors shared with the codec tests (``../shared/vectors/stun``, read through
  tests/stun/vectors.py like every STUN suite);
- request heads a Tailscale client sends, and the smuggling cases of
  tests/server/test_frontdoor_strict.py (under 1 KiB);
- DERP maps in the shape control and derpprobe use, and ``derpkit serve`` argv/environments
  as operators and the tests write them.

Everything is derived from fixed inputs: running it twice writes the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from nacl.public import Box, PrivateKey, PublicKey

from derpkit.protocol import frames as F
from derpkit.protocol import handshake, upgrade
from derpkit.protocol.constants import NONCE_LEN
from derpkit.protocol.keys import MeshKey
from tests.interop.helpers import derp_map
from tests.server.test_frontdoor_strict import GOOD_DERP, REFUSED, ROBOTS
from tests.stun.vectors import VECTORS

from . import targets as T

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
GO = json.loads((HERE.parent / "vectors" / "go_derper.json").read_text())
V = {k: bytes.fromhex(v["hex"]) for k, v in GO["vectors"].items()}
PEER = bytes(range(1, 33))  # some other client's key, as frames name them
MESH = MeshKey(bytes(range(32)))
#: Only small seeds: libFuzzer grows them itself, and a big seed slows every mutation.
MAX_SEED = 1024


def _sealed_client_info(info: handshake.ClientInfo, nonce_byte: int) -> bytes:
    """A ClientInfo payload (client key + box) exactly as handshake.client_info_frame seals it,
    with a fixed nonce instead of a random one."""
    box = Box(PrivateKey(T.CLIENT.raw), PublicKey(T.SERVER.public().raw))
    return T.CLIENT.public().raw + bytes(box.encrypt(info.to_json(), bytes([nonce_byte]) * NONCE_LEN))


def _client_frames() -> dict[str, bytes]:
    """Frames a client (or mesh peer) sends after its ClientInfo."""
    return {
        "send_packet": F.SendPacket(PEER, b"hello").encode(),
        "send_disco": F.SendPacket(PEER, b"TS\xf0\x9f\x92\xac" + bytes(32) + bytes(24) + b"x").encode(),
        "ping": F.Ping(b"\x01\x02\x03\x04\x05\x06\x07\x08").encode(),
        "pong": F.Pong(b"\x08\x07\x06\x05\x04\x03\x02\x01").encode(),
        "note_preferred": F.NotePreferred(True).encode(),
        "note_not_preferred": F.NotePreferred(False).encode(),
        "watch_conns": F.WatchConns().encode(),
        "close_peer": F.ClosePeer(PEER).encode(),
        "forward_packet": F.ForwardPacket(PEER, T.CLIENT.public().raw, b"fwd").encode(),
        "keep_alive": F.KeepAlive().encode(),
    }


def seeds() -> Iterator[tuple[str, str, bytes]]:
    """(target, name, bytes) for every seed."""
    server_stream = ["server_key", "server_info", "present_regular", "present_prober", "recv_packet", "pong",
                     "peer_gone_not_here", "peer_gone_disconnected", "keep_alive"]
    go_frames = {k: V[k] for k in server_stream + ["present_self_mesh", "peer_gone_to_watcher"]}
    client = _client_frames()

    for name, raw in {**go_frames, **{f"client_{k}": v for k, v in client.items()}}.items():
        yield "frame_reader", name, raw
    yield "frame_reader", "client_session", b"".join(client.values())

    for name, raw in client.items():
        yield "server_connection", name, raw
    yield "server_connection", "all_client_frames", b"".join(client.values())
    yield "server_connection", "ping_then_send", client["ping"] + client["send_packet"] + client["note_preferred"]

    # Go derper's own session, as the client core reads it after its upgrade request.
    session = V["head_101"] + b"".join(V[k] for k in server_stream)
    yield "client_connection", "go_session", session
    yield "client_connection", "go_handshake", V["head_101"] + V["server_key"] + V["server_info"]
    yield "client_connection", "go_426", V["http_426"]
    yield "client_connection", "go_probe_200", V["http_probe"]

    for i, info in enumerate([
        handshake.ClientInfo(can_ack_pings=True),
        handshake.ClientInfo(can_ack_pings=True, is_prober=True, app_name="derpprobe"),
        handshake.ClientInfo(mesh_key=MESH, app_name="derpkit-mesh"),
        handshake.ClientInfo(version=1),
    ]):
        yield "client_info", f"client_info_{i}", _sealed_client_info(info, 0x11 * (i + 1))

    yield "sealed_json", "client_info_go", handshake.ClientInfo(can_ack_pings=True).to_json()
    yield "sealed_json", "client_info_mesh", handshake.ClientInfo(mesh_key=MESH, is_prober=True,
                                                                   app_name="x").to_json()
    yield "sealed_json", "server_info", handshake.ServerInfo().to_json()
    yield "sealed_json", "server_info_rate", handshake.ServerInfo(token_bucket_bytes_per_second=1 << 20,
                                                                   token_bucket_bytes_burst=1 << 21).to_json()

    yield "response_head", "go_101", V["head_101"]
    yield "response_head", "go_426", V["http_426"]
    yield "response_head", "go_probe_200", V["http_probe"]
    yield "response_head", "ours_101", upgrade.switching_protocols(T.SERVER.public())

    for v in VECTORS:
        yield "stun", f"{v['file'].removesuffix('.json')}_{v['name']}", bytes.fromhex(v["hex"])
    for k in ("stun_ipv4", "stun_v4_on_dual_stack", "stun_ipv6"):
        yield "stun", f"go_derper_{k}", V[k]

    heads = {
        "upgrade": upgrade.build_request("derp.example.com"),
        "upgrade_fast_start": upgrade.build_request("derp.example.com", fast_start=True),
        "upgrade_ideal_node": upgrade.build_request("127.0.0.1:3340", ideal_node="1b"),
        "websocket": (b"GET /derp HTTP/1.1\r\nHost: derp.example.com\r\nUpgrade: websocket\r\n"
                      b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: derp\r\n\r\n"),
        "probe": b"GET /derp/probe HTTP/1.1\r\nHost: derp.example.com\r\nUser-Agent: Go-http-client/1.1\r\n\r\n",
        "generate_204": (b"GET /generate_204 HTTP/1.1\r\nHost: derp.example.com\r\n"
                         b"X-Tailscale-Challenge: ts_challenge\r\n\r\n"),
        "varz": b"GET /debug/varz HTTP/1.1\r\nHost: 127.0.0.1:3340\r\nAccept-Encoding: gzip\r\n\r\n",
        "post_body": b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
        "chunked": b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "connect": b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        "http10": b"GET / HTTP/1.0\r\n\r\n",
        "good_derp_then_robots": GOOD_DERP + ROBOTS,
    }
    for name, head in heads.items():
        yield "request_head", name, head
    for name, head, _answer in REFUSED:
        if len(head) <= MAX_SEED:
            yield "request_head", f"refused_{name}", head

    node = {"Name": "1a", "HostName": "derp.example.com", "IPv4": "127.0.0.1", "IPv6": "::1", "DERPPort": 443,
            "STUNPort": 3478}
    maps = {
        "one_node": derp_map(1, "lo", [dict(node)]),
        "pinned": derp_map(900, "pin", [dict(node, Name="900a", HostName="127.0.0.1", DERPPort=8443,
                                             CertName="sha256-raw:" + "ab" * 32, CanPort80=False)]),
        "stun_only": derp_map(2, "st", [dict(node, Name="2a", STUNOnly=True, STUNPort=-1, IPv6="none")]),
        "insecure_tests": derp_map(3, "dev", [dict(node, Name="3a", InsecureForTests=True, DERPPort=3340)]),
        "two_regions": {"Regions": {**derp_map(1, "lo", [dict(node)])["Regions"],
                                    **derp_map(5, "ny", [dict(node, Name="5a"), dict(node, Name="5b")])["Regions"]},
                        "OmitDefaultRegions": True,
                        "HomeParams": {"RegionScore": {"1": 1.5}}},
    }
    for name, m in maps.items():
        yield "derp_map", name, json.dumps(m, indent=1).encode()

    argvs: dict[str, tuple[list[str], dict[str, str]]] = {
        "dev": (["-dev"], {}),
        "letsencrypt": (["-a", ":443", "-hostname", "derp.example.com", "-certmode", "letsencrypt",
                         "-certdir", "/var/lib/derper", "-stun-port", "3478", "-http-port", "80"], {}),
        "manual_ip": (["-a", "127.0.0.1:8443", "-certmode", "manual", "-hostname", "127.0.0.1",
                       "-certdir", "/tmp/certs", "-http-port", "-1", "-stun=false"], {}),
        "mesh": (["-a", "127.0.0.1:3340", "-stun=false", "-c", "/tmp/0.key", "-mesh-psk-file", "/tmp/mesh.key",
                  "-mesh-with", "127.0.0.1:3340,127.0.0.1:3341"], {}),
        "limits": (["-a=:443", "-accept-connection-limit=20", "-accept-connection-burst=10",
                    "-tcp-keepalive-time=10m", "-tcp-user-timeout=15s", "-tcp-write-timeout=2s"], {}),
        "verify": (["-verify-clients", "-home", "blank", "-bootstrap-dns-names", "a.example,b.example"], {}),
        "docker_env": ([], {"DERP_ADDR": ":443", "DERP_HOSTNAME": "derp.example.com", "DERP_CERT_MODE": "manual",
                            "DERP_STUN_PORT": "3478", "DERP_VERIFY_CLIENTS": "false"}),
        "help": (["-h"], {}),
    }
    for name, (argv, env) in argvs.items():
        data = b"\0".join(a.encode() for a in argv)
        if env:
            data += b"\n\n" + b"\n".join(f"{k}={v}".encode() for k, v in env.items())
        assert T.settings_from_bytes(data) == (argv, env), name
        yield "settings", name, data


def build() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {t: {} for t in T.TARGETS}
    for target, name, data in seeds():
        assert target in T.TARGETS, target
        assert len(data) <= MAX_SEED, (target, name, len(data))
        assert name not in out[target], (target, name)
        T.TARGETS[target](data)  # every seed passes its own target: a seed is a valid starting point
        out[target][name] = data
    assert all(out.values()), [t for t, s in out.items() if not s]
    return out


def digest(corpus: dict[str, dict[str, bytes]]) -> str:
    h = hashlib.sha256()
    for t in sorted(corpus):
        for n in sorted(corpus[t]):
            h.update(f"{t}/{n}\0".encode() + corpus[t][n] + b"\0")
    return h.hexdigest()


def read_committed() -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for d in sorted(CORPUS.iterdir()) if CORPUS.is_dir() else []:
        out[d.name] = {f.name: f.read_bytes() for f in sorted(d.iterdir())}
    return out


def main(argv: list[str]) -> int:
    corpus = build()
    if "--check" in argv:
        same = read_committed() == corpus
        print("corpus up to date" if same else "tests/fuzz/corpus differs: run python -m tests.fuzz.make_corpus")
        return 0 if same else 1
    if CORPUS.exists():
        shutil.rmtree(CORPUS)
    for target, files in corpus.items():
        (CORPUS / target).mkdir(parents=True)
        for name, data in files.items():
            (CORPUS / target / name).write_bytes(data)
    print(f"{sum(map(len, corpus.values()))} seeds in {len(corpus)} targets, sha256 {digest(corpus)[:16]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
