"""``python -m bench`` flag handling and the server-kind registry, without measuring."""

from __future__ import annotations

import pytest

from bench.__main__ import parse_args
from bench.servers import KINDS, OPTIONAL_KIND_MODULES, Kind, ServerEnv, load_kinds, register
from bench.transports import parse_transports


@pytest.mark.parametrize(("argv", "flag"), [
    (["--transport", "http,quic"], "--transport"),
    (["--figures", "sweep,nonsense"], "--figures"),
    (["--rates", "100,abc"], "--rates"),
    (["--rate-shares", "0.5,-1"], "--rate-shares"),
    (["--p99-bound", "0"], "--p99-bound"),
    (["--rounds", "0"], "--rounds"),
])
def test_bad_flags_stop_with_a_line_naming_the_flag(argv: list[str], flag: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_defaults_and_quick() -> None:
    full = parse_args([])
    assert [t.name for t in full.transports] == ["http"] and full.rounds == 3
    assert full.share_list == [0.25, 0.5, 0.75] and full.p99_bound == 5.0
    assert full.size_list == [1200, 100] and full.lat_size == 1200
    quick = parse_args(["--quick", "--transport", "http,tls,ws", "--sizes", "100"])
    assert quick.rounds == 1 and [t.name for t in quick.transports] == ["http", "tls", "ws"]
    assert quick.lat_size == 100 and quick.share_list == [0.5]


def test_transport_generator_flags() -> None:
    from bench.tlscert import BenchTLS

    tls = BenchTLS("/certs", "/ca.pem")
    http, tls_t, ws, wss = parse_transports("http,tls,ws,wss,http")
    assert http.generator_args(None) == []
    assert tls_t.generator_args(tls) == ["-tls-ca", "/ca.pem", "-tls-name", "localhost"]
    assert ws.generator_args(None) == ["-websocket"]
    assert wss.generator_args(tls) == ["-tls-ca", "/ca.pem", "-tls-name", "localhost", "-websocket"]
    assert tls.server_flags() == ["-certmode", "manual", "-certdir", "/certs", "-hostname", "localhost"]


def test_registry_has_the_builtin_kinds_and_takes_new_ones() -> None:
    kinds = load_kinds()
    assert {"derpkit", "go", "go2", "derpkit-w2"} <= set(kinds)
    assert "bench.hyperderp" in OPTIONAL_KIND_MODULES
    env = ServerEnv("0", 2, None)
    assert kinds["go2"].column(env) == "Go derper, 2 CPUs"
    k = register(Kind("plain-only", "plain only", lambda env: None,  # type: ignore[arg-type,return-value]
                      transports=frozenset({"http"}), needs_netns=True))
    try:
        assert KINDS["plain-only"] is k and "tls" not in k.transports
    finally:
        del KINDS["plain-only"]
