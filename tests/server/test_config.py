"""The settings table: derper's flags and defaults, Go flag parsing, the env layer, validation.

Expectations about Go behaviour (messages, exit codes, what stops parsing) were checked
against a real ``derper`` binary built from Tailscale's sources.
"""

from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from derpkit.server.config import (
    SETTINGS,
    ConfigError,
    HelpRequested,
    Knobs,
    ServeConfig,
    cert_refusal,
    flags_markdown,
    parse_config,
    usage,
)

REPO = Path(__file__).resolve().parents[2]

# A plausible operator environment: HOME is set, so derper's certdir default is non-empty
# and the default command line (":443", letsencrypt, derp.tailscale.com) passes validation.
BASE_ENV = {"HOME": "/home/op"}


def parse(argv: list[str] | None = None, env: Mapping[str, str] | None = None, **kw: Any):
    """parse_config with a clean environment and no key files on "disk"."""
    environ = dict(BASE_ENV)
    environ.update(env or {})
    kw.setdefault("path_exists", lambda p: False)
    return parse_config(list(argv or []), environ, **kw)


def cfg_of(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> ServeConfig:
    return parse(argv, env)[0]


# --- the table ---------------------------------------------------------------------------------

# flag -> (kind, derper's default with HOME=/home/op and no key files), from the spec's §1.2.
DERPER_FLAGS: dict[str, tuple[str, Any]] = {
    "dev": ("bool", False),
    "version": ("bool", False),
    "a": ("string", ":443"),
    "http-port": ("int", 80),
    "stun-port": ("int", 3478),
    "c": ("string", ""),
    "certmode": ("string", "letsencrypt"),
    "certdir": ("string", "/home/op/.cache/tailscale/derper-certs"),
    "hostname": ("string", "derp.tailscale.com"),
    "acme-eab-kid": ("string", ""),
    "acme-eab-key": ("string", ""),
    "acme-email": ("string", ""),
    "acme-ip-certs": ("bool", False),
    "stun": ("bool", True),
    "derp": ("bool", True),
    "home": ("string", ""),
    "mesh-psk-file": ("string", ""),
    "mesh-with": ("string", ""),
    "secrets-url": ("string", ""),
    "secrets-path-prefix": ("string", "prod/derp"),
    "secrets-cache-dir": ("string", "/home/op/.cache/derper-secrets"),
    "bootstrap-dns-names": ("string", ""),
    "unpublished-bootstrap-dns-names": ("string", ""),
    "verify-clients": ("bool", False),
    "verify-client-url": ("string", ""),
    "verify-client-url-fail-open": ("bool", True),
    "socket": ("string", ""),
    "accept-connection-limit": ("float", math.inf),
    "accept-connection-burst": ("int", 9223372036854775807),
    "rate-config": ("string", ""),
    "tcp-keepalive-time": ("duration", 600.0),
    "tcp-user-timeout": ("duration", 15.0),
    "tcp-write-timeout": ("duration", 2.0),
    "ace": ("bool", False),
}
EXTENSIONS: dict[str, tuple[str, Any]] = {
    "stun-strict": ("bool", True),
    "stun-rfc5780": ("string", ""),
    "allowed-keys-file": ("string", ""),
    "restart-notice": ("duration", 5.0),
    "acme-directory-url": ("string", ""),
    "acme-renew-before": ("duration", 0.0),
    "workers": ("int", 1),
}


def attr_of(flag: str) -> str:
    return {"a": "addr", "c": "config_path"}.get(flag, flag.replace("-", "_"))


def test_table_has_derpers_34_flags_then_the_extensions() -> None:
    assert len(DERPER_FLAGS) == 34
    assert [s.flag for s in SETTINGS] == list(DERPER_FLAGS) + list(EXTENSIONS)
    assert [s.flag for s in SETTINGS if s.extension] == list(EXTENSIONS)


@pytest.mark.parametrize("flag", list(DERPER_FLAGS) + list(EXTENSIONS))
def test_kind_and_default_are_derpers(flag: str) -> None:
    kind, default = {**DERPER_FLAGS, **EXTENSIONS}[flag]
    setting = next(s for s in SETTINGS if s.flag == flag)
    assert setting.kind == kind
    assert setting.attr == attr_of(flag)
    assert getattr(cfg_of(), attr_of(flag)) == default


def test_servicconfig_fields_follow_the_table() -> None:
    names = [f.name for f in dataclasses.fields(ServeConfig)]
    assert names == [attr_of(f) for f in [*DERPER_FLAGS, *EXTENSIONS]] + ["origins", "knobs"]


def test_knobs_come_from_the_environ_given() -> None:
    """derper's TS_* knobs are read with the flags, from parse_config's environ only."""
    cfg, _ = parse(
        env={
            "TS_DEBUG_KEY_PATH": "/k",
            "TS_ALLOW_DEBUG_IP": "10.0.0.1",
            "TS_DEBUG_TRUSTED_CIDRS": "10.1.0.0/16,bad",
            "TAILSCALE_DERPER_MESH_KEY": "sekrit",
        }
    )
    assert cfg.knobs == Knobs("/k", "10.0.0.1", "10.1.0.0/16,bad", "sekrit")
    assert "sekrit" not in repr(cfg.knobs)  # a bad CIDR is only refused at the first check
    assert parse()[0].knobs == Knobs()


def test_plain_serveconfig_has_derpers_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [e for s in SETTINGS for e in s.all_envs] + ["XDG_CACHE_HOME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", "/home/op")
    assert ServeConfig() == cfg_of()


def test_env_dependent_defaults() -> None:
    assert cfg_of(env={"XDG_CACHE_HOME": "/xdg"}).certdir == "/xdg/tailscale/derper-certs"
    cfg, _ = parse_config(["-a", ":8080"], {})
    assert cfg.certdir == ""  # Go's UserCacheDir fails without HOME: empty certdir
    assert cfg.secrets_cache_dir == ".cache/derper-secrets"


def test_mesh_psk_file_default_is_the_first_existing_candidate() -> None:
    home_key = "/home/op/keys/derp-mesh.key"
    assert parse(path_exists=lambda p: p == home_key)[0].mesh_psk_file == home_key
    both = parse(path_exists=lambda p: True)[0]
    assert both.mesh_psk_file == "/home/derp/keys/derp-mesh.key"
    assert parse()[0].mesh_psk_file == ""


# --- Go flag parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-a", ":8080"],
        ["-a=:8080"],
        ["--a", ":8080"],
        ["--a=:8080"],
    ],
)
def test_one_or_two_dashes_equals_or_space(argv: list[str]) -> None:
    assert cfg_of(argv).addr == ":8080"


def test_bool_forms() -> None:
    assert cfg_of(["-verify-clients"]).verify_clients is True
    assert cfg_of(["--verify-clients=true"]).verify_clients is True
    assert cfg_of(["-stun=false"]).stun is False
    assert cfg_of(["-stun=0"]).stun is False
    assert cfg_of(["-stun=F"]).stun is False
    assert cfg_of(["-derp=FALSE", "-stun=True"]).derp is False


def test_bool_space_false_does_not_set_false_and_stops_parsing() -> None:
    cfg, notes = parse(["-stun", "false", "-a", ":8080"])
    assert cfg.stun is True  # "-stun" alone set it; "false" is the first positional
    assert cfg.addr == ":443"  # everything after "false" is ignored, as in Go
    assert any('ignoring arguments from "false"' in n for n in notes)


def test_double_dash_ends_flags() -> None:
    cfg, notes = parse(["-a", ":8080", "--", "-bogus-flag"])
    assert cfg.addr == ":8080"
    assert any("-bogus-flag" in n for n in notes)


def test_single_dash_is_a_positional() -> None:
    cfg, _ = parse(["-", "-a", ":8080"])
    assert cfg.addr == ":443"


def test_last_repeat_wins() -> None:
    assert cfg_of(["-a", ":1", "-a=:2", "--a", ":3"]).addr == ":3"
    assert cfg_of(["-stun=false", "-stun"]).stun is True


def test_value_may_start_with_a_dash() -> None:
    assert cfg_of(["-http-port", "-1"]).http_port == -1


def test_go_value_syntax_through_flags() -> None:
    cfg = cfg_of(
        [
            "-stun-port=0x50",
            "-http-port",
            "1_000",
            "-accept-connection-limit",
            "inf",
            "-tcp-keepalive-time=1.5h",
            "-tcp-user-timeout",
            "0",
            "-tcp-write-timeout=250ms",
        ]
    )
    assert (cfg.stun_port, cfg.http_port) == (80, 1000)
    assert cfg.accept_connection_limit == math.inf
    assert cfg.tcp_keepalive_time == 5400.0
    assert cfg.tcp_user_timeout == 0.0
    assert cfg.tcp_write_timeout == 0.25
    assert cfg_of(["-tcp-keepalive-time=-1s"]).tcp_keepalive_time == -1.0


def test_unknown_flag_exits_2_with_gos_message_and_usage() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(["-x"])
    err = exc.value
    assert err.exit_code == 2
    assert str(err) == "flag provided but not defined: -x"
    assert err.usage and err.usage.startswith("Usage of derpkit serve:")
    assert err.stderr_text().startswith("flag provided but not defined: -x\nUsage of")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-stun-port", "abc"], 'invalid value "abc" for flag -stun-port: not an integer'),
        (["-stun-port=99999"], 'invalid value "99999" for flag -stun-port: must be a port'),
        (
            ["-tcp-write-timeout", "10"],
            'invalid value "10" for flag -tcp-write-timeout: missing unit',
        ),
        (["-accept-connection-limit=x"], 'invalid value "x" for flag -accept-connection-limit: '),
        (["-stun=x"], 'invalid boolean value "x" for -stun: not a boolean'),
        (["-dev="], 'invalid boolean value "" for -dev: '),
        (["-a"], "flag needs an argument: -a"),
        (["-=x"], "bad flag syntax: -=x"),
        (["---a"], "bad flag syntax: ---a"),
        (["-hostname=ok", '-http-port=a"b'], 'invalid value "a\\"b" for flag -http-port: '),
    ],
)
def test_bad_values_exit_2_with_gos_wording(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(argv)
    assert exc.value.exit_code == 2
    assert str(exc.value).startswith(message)
    assert exc.value.usage


@pytest.mark.parametrize(
    "argv", [["-h"], ["-help"], ["--help"], ["--h"], ["-help=1"], ["-a", ":1", "-h"]]
)
def test_help_exits_0_with_usage(argv: list[str]) -> None:
    with pytest.raises(HelpRequested) as exc:
        parse(argv)
    assert exc.value.exit_code == 0
    assert isinstance(exc.value, ConfigError)
    assert exc.value.usage == usage(dict(BASE_ENV))
    assert exc.value.stderr_text() == exc.value.usage


def test_usage_lists_every_flag_go_style() -> None:
    text = usage({"HOME": "/home/op"})
    lines = text.splitlines()
    assert lines[0] == "Usage of derpkit serve:"
    flags = [ln.split()[0] for ln in lines[1:] if ln.startswith("  -")]
    assert flags == sorted("-" + s.flag for s in SETTINGS)
    assert "  -a string\n    \t" in text
    assert "  -stun\n    \t" in text  # bools have no type word
    assert '(default ":443")' in text
    assert "(default 10m0s)" in text
    assert "(default +Inf)" in text
    assert "(default true)" in text
    assert "[env HOSTNAME, DERP_DOMAIN]" in text
    assert "[env SECRETS_PREFIX, SECRET_PREFIX]" in text


def test_version_skips_validation_like_derper() -> None:
    cfg, _ = parse(["-version", "-a", "443"])
    assert cfg.version is True


# --- environment variables ---------------------------------------------------------------------

# (variable, flag, value, expected attribute value). Every variable is its own case.
ENV_CASES: list[tuple[str, str, str, Any]] = [
    ("DEV", "dev", "true", True),
    ("VERSION_FLAG", "version", "true", True),
    ("ADDR", "a", ":8443", ":8443"),
    ("HTTP_PORT", "http-port", "8080", 8080),
    ("STUN_PORT", "stun-port", "3479", 3479),
    ("CONFIG_PATH", "c", "/var/lib/derper/alt.key", "/var/lib/derper/alt.key"),
    ("CERT_MODE", "certmode", "manual", "manual"),
    ("CERT_DIR", "certdir", "derper-certs", "derper-certs"),
    ("HOSTNAME", "hostname", "derp.example.com", "derp.example.com"),
    ("ACME_EAB_KID", "acme-eab-kid", "kid-1", "kid-1"),
    ("ACME_EAB_KEY", "acme-eab-key", "c2VjcmV0", "c2VjcmV0"),
    ("ACME_EMAIL", "acme-email", "ops@example.com", "ops@example.com"),
    ("ACME_IP_CERTS", "acme-ip-certs", "true", True),
    ("RUN_STUN", "stun", "false", False),
    ("RUN_DERP", "derp", "false", False),
    ("FLAGHOME", "home", "blank", "blank"),
    ("MESH_PSKFILE", "mesh-psk-file", "/keys/mesh.key", "/keys/mesh.key"),
    (
        "MESH_WITH",
        "mesh-with",
        "a.example.com,b.example.com/10.0.0.2",
        "a.example.com,b.example.com/10.0.0.2",
    ),
    ("SECRETS_URL", "secrets-url", "https://setec.example.com", "https://setec.example.com"),
    ("SECRETS_PREFIX", "secrets-path-prefix", "stage/derp", "stage/derp"),
    ("SECRET_PREFIX", "secrets-path-prefix", "test/derp", "test/derp"),
    ("SECRETS_CACHEDIR", "secrets-cache-dir", "derper-secrets", "derper-secrets"),
    (
        "BOOTSTRAP_DNS",
        "bootstrap-dns-names",
        "a.example.com,b.example.com",
        "a.example.com,b.example.com",
    ),
    (
        "UNPUBLISHED_DNS",
        "unpublished-bootstrap-dns-names",
        "c.example.com/t.example.com",
        "c.example.com/t.example.com",
    ),
    ("VERIFY_CLIENTS", "verify-clients", "true", True),
    (
        "VERIFY_CLIENT_URL",
        "verify-client-url",
        "https://admit.example.com/",
        "https://admit.example.com/",
    ),
    ("VERIFY_FAIL_OPEN", "verify-client-url-fail-open", "false", False),
    ("SOCKET", "socket", "/run/ts/tailscaled.sock", "/run/ts/tailscaled.sock"),
    ("ACCEPT_CONNECTION_LIMIT", "accept-connection-limit", "100.5", 100.5),
    ("ACCEPT_CONNECTION_BURST", "accept-connection-burst", "50", 50),
    ("TCP_KEEPALIVE_TIME", "tcp-keepalive-time", "5m", 300.0),
    ("TCP_USER_TIMEOUT", "tcp-user-timeout", "30s", 30.0),
    ("TCP_WRITE_TIMEOUT", "tcp-write-timeout", "0", 0.0),
    ("RATE_CONFIG", "rate-config", "/etc/derper/rate.json", "/etc/derper/rate.json"),
    ("ACE", "ace", "true", True),
    ("STUN_STRICT", "stun-strict", "false", False),
    ("STUN_RFC5780", "stun-rfc5780", "192.0.2.2", "192.0.2.2"),
    ("ALLOWED_KEYS_FILE", "allowed-keys-file", "/etc/derper/keys", "/etc/derper/keys"),
    ("RESTART_NOTICE", "restart-notice", "10s", 10.0),
    ("ACME_DIRECTORY_URL", "acme-directory-url", "https://localhost:14000/dir", "https://localhost:14000/dir"),
    ("ACME_RENEW_BEFORE", "acme-renew-before", "720h", 2592000.0),
    ("WORKERS", "workers", "0x2", 2),
    # community-image aliases
    ("DERP_DOMAIN", "hostname", "derp.example.org", "derp.example.org"),
    ("DERP_CERT_MODE", "certmode", "manual", "manual"),
    ("DERP_CERT_DIR", "certdir", "/certs", "/certs"),
    ("DERP_ADDR", "a", ":8443", ":8443"),
    ("DERP_STUN", "stun", "false", False),
    ("DERP_STUN_PORT", "stun-port", "3480", 3480),
    ("DERP_HTTP_PORT", "http-port", "-1", -1),
    ("DERP_VERIFY_CLIENTS", "verify-clients", "true", True),
    (
        "DERP_VERIFY_CLIENT_URL",
        "verify-client-url",
        "https://admit.example.org/",
        "https://admit.example.org/",
    ),
    ("DERP_VERIFY_CLIENT_URL_FAIL_OPEN", "verify-client-url-fail-open", "false", False),
]


def test_env_cases_cover_every_variable_in_the_table() -> None:
    table = {(e, s.flag) for s in SETTINGS for e in s.all_envs}
    assert {(e, f) for e, f, _, _ in ENV_CASES} == table
    assert len(ENV_CASES) == len(table)


@pytest.mark.parametrize(("env", "flag", "text", "want"), ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_each_env_var_takes_effect(env: str, flag: str, text: str, want: Any) -> None:
    attr = attr_of(flag)
    default = getattr(cfg_of(), attr)
    assert default != want, "the case must change the setting to prove anything"
    # RFC 5780 mode needs -a to name an IP (its replies name the address they leave from).
    extra = {"ADDR": "192.0.2.1:443"} if env == "STUN_RFC5780" else {}
    # -workers refuses ACME certificates (each worker would run its own ACME client), and
    # the default -certmode is letsencrypt.
    if env == "WORKERS":
        extra = {"DERP_CERT_MODE": "manual"}
    cfg, notes = parse(env={env: text, **extra})
    got = getattr(cfg, attr)
    if flag == "a" and cfg.dev:
        pytest.fail("unexpected dev mode")
    assert got == want
    assert cfg.origins[attr] == f"env {env}"
    shown = "<redacted>" if env == "ACME_EAB_KEY" else text
    assert f"env {env}={shown} -> -{flag}" in notes


def test_dev_env_forces_dev_port_keeping_the_env_host() -> None:
    cfg = cfg_of(env={"DEV": "true", "ADDR": ":9999"})
    assert cfg.dev and cfg.addr == ":3340"  # Docker's ADDR=:443 + DEV=true: every interface
    assert cfg_of(env={"DEV": "true"}).addr == "127.0.0.1:3340"


def test_secrets_prefix_beats_secret_prefix() -> None:
    cfg, notes = parse(env={"SECRET_PREFIX": "readme/derp", "SECRETS_PREFIX": "image/derp"})
    assert cfg.secrets_path_prefix == "image/derp"
    assert "env SECRETS_PREFIX=image/derp -> -secrets-path-prefix" in notes
    assert "env SECRET_PREFIX=readme/derp ignored: SECRETS_PREFIX is set" in notes


@pytest.mark.parametrize(
    ("seed", "alias", "flag", "seed_value", "alias_value"),
    [
        ("HOSTNAME", "DERP_DOMAIN", "hostname", "seed.example.com", "alias.example.com"),
        ("CERT_MODE", "DERP_CERT_MODE", "certmode", "manual", "gcp"),
        ("CERT_DIR", "DERP_CERT_DIR", "certdir", "/seed", "/alias"),
        ("ADDR", "DERP_ADDR", "a", ":1443", ":2443"),
        ("RUN_STUN", "DERP_STUN", "stun", "false", "true"),
        ("STUN_PORT", "DERP_STUN_PORT", "stun-port", "1", "2"),
        ("HTTP_PORT", "DERP_HTTP_PORT", "http-port", "1", "2"),
        ("VERIFY_CLIENTS", "DERP_VERIFY_CLIENTS", "verify-clients", "true", "false"),
        (
            "VERIFY_CLIENT_URL",
            "DERP_VERIFY_CLIENT_URL",
            "verify-client-url",
            "https://s/",
            "https://a/",
        ),
        (
            "VERIFY_FAIL_OPEN",
            "DERP_VERIFY_CLIENT_URL_FAIL_OPEN",
            "verify-client-url-fail-open",
            "false",
            "true",
        ),
    ],
)
def test_seed_name_beats_derp_alias(
    seed: str, alias: str, flag: str, seed_value: str, alias_value: str
) -> None:
    cfg, notes = parse(env={seed: seed_value, alias: alias_value})
    setting = next(s for s in SETTINGS if s.flag == flag)
    assert getattr(cfg, setting.attr) == setting.parse(seed_value)
    assert f"env {alias}={alias_value} ignored: {seed} is set" in notes


def test_alias_is_ignored_even_when_bad_if_seed_name_is_set() -> None:
    assert cfg_of(env={"STUN_PORT": "3479", "DERP_STUN_PORT": "junk"}).stun_port == 3479


def test_flag_beats_env() -> None:
    cfg, notes = parse(
        ["-a", ":8080", "-stun=false"], {"ADDR": ":9090", "RUN_STUN": "true", "DERP_ADDR": ":7070"}
    )
    assert cfg.addr == ":8080" and cfg.stun is False
    assert cfg.origins["addr"] == "flag"
    assert "env ADDR=:9090 ignored: -a given on the command line" in notes
    assert "env DERP_ADDR=:7070 ignored: -a given on the command line" in notes


def test_bad_env_is_ignored_when_the_flag_is_given() -> None:
    assert cfg_of(["-stun-port", "3000"], {"STUN_PORT": "abc"}).stun_port == 3000


def test_env_beats_default_and_unset_env_keeps_default() -> None:
    assert cfg_of(env={"STUN_PORT": "1234"}).stun_port == 1234
    assert cfg_of().stun_port == 3478


def test_empty_env_strings_are_values() -> None:
    # Parsed like -flag= : an empty string setting becomes "", not "unset".
    cfg = cfg_of(["-a", ":8080"], {"CERT_DIR": "", "CONFIG_PATH": "", "HOSTNAME": ""})
    assert (cfg.certdir, cfg.config_path, cfg.hostname) == ("", "", "")
    # MESH_PSKFILE="" turns off derper's automatic key-file lookup.
    found, _ = parse(path_exists=lambda p: True)
    off, _ = parse(env={"MESH_PSKFILE": ""}, path_exists=lambda p: True)
    assert found.mesh_psk_file and off.mesh_psk_file == ""
    # An empty bool/number/duration is an error, exactly like -flag=.
    for env, flag in [
        ("RUN_STUN", "stun"),
        ("STUN_PORT", "stun-port"),
        ("TCP_USER_TIMEOUT", "tcp-user-timeout"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse(env={env: ""})
        assert f'invalid value "" for -{flag} (from env {env})' in str(exc.value)


def test_empty_cert_dir_env_breaks_tls_mode_naming_the_variable() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(env={"CERT_DIR": ""})
    assert exc.value.exit_code == 1
    assert "missing required --certdir flag (-certdir from env CERT_DIR)" in str(exc.value)


def test_env_error_is_one_line_with_the_issue_wording() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(env={"STUN_PORT": "abc"})
    err = exc.value
    assert (
        str(err)
        == 'derpkit: invalid value "abc" for -stun-port (from env STUN_PORT): not an integer'
    )
    assert err.exit_code == 2 and err.usage is None
    assert (err.flag, err.env) == ("stun-port", "STUN_PORT")
    assert "\n" not in err.stderr_text().rstrip("\n")


def test_secret_values_stay_out_of_logs_and_repr() -> None:
    cfg, notes = parse(env={"ACME_EAB_KEY": "c2VjcmV0"})
    assert "env ACME_EAB_KEY=<redacted> -> -acme-eab-key" in notes
    assert "c2VjcmV0" not in repr(cfg) and "c2VjcmV0" not in "".join(notes)


# (variable, bad value, flag it must name, exit status). Each invalid value is its own case.
# String settings whose every value is well-formed (paths, URLs, names) have no entry.
BAD_ENV_CASES: list[tuple[str, str, str, int]] = [
    ("DEV", "yes", "dev", 2),
    ("VERSION_FLAG", "maybe", "version", 2),
    ("ADDR", "443", "a", 1),
    ("ADDR", ":99999", "a", 1),
    ("HTTP_PORT", "eighty", "http-port", 2),
    ("HTTP_PORT", "65536", "http-port", 2),
    ("STUN_PORT", "abc", "stun-port", 2),
    ("STUN_PORT", "-1", "stun-port", 2),
    ("CERT_MODE", "nonsense", "certmode", 1),
    ("CERT_DIR", "", "certdir", 1),
    ("HOSTNAME", "192.0.2.1", "hostname", 1),
    ("ACME_IP_CERTS", "2", "acme-ip-certs", 2),
    ("RUN_STUN", "no", "stun", 2),
    ("RUN_DERP", "off", "derp", 2),
    ("FLAGHOME", "ftp://example.com/", "home", 1),
    ("MESH_WITH", "a/b/c", "mesh-with", 1),
    ("VERIFY_CLIENTS", "", "verify-clients", 2),
    ("VERIFY_FAIL_OPEN", "nope", "verify-client-url-fail-open", 2),
    ("ACCEPT_CONNECTION_LIMIT", "fast", "accept-connection-limit", 2),
    ("ACCEPT_CONNECTION_LIMIT", "NaN", "accept-connection-limit", 2),
    ("ACCEPT_CONNECTION_BURST", "-1", "accept-connection-burst", 2),
    ("ACCEPT_CONNECTION_BURST", "1e3", "accept-connection-burst", 2),
    ("TCP_KEEPALIVE_TIME", "10", "tcp-keepalive-time", 2),
    ("TCP_USER_TIMEOUT", "-1s", "tcp-user-timeout", 2),
    ("TCP_WRITE_TIMEOUT", "2 s", "tcp-write-timeout", 2),
    ("ACE", "y", "ace", 2),
    ("STUN_STRICT", "strict", "stun-strict", 2),
    ("RESTART_NOTICE", "-5s", "restart-notice", 2),
    ("RESTART_NOTICE", "5d", "restart-notice", 2),
    ("ACME_RENEW_BEFORE", "-1h", "acme-renew-before", 2),
    ("WORKERS", "-1", "workers", 2),
    ("DERP_DOMAIN", "192.0.2.1", "hostname", 1),
    ("DERP_CERT_MODE", "selfsigned", "certmode", 1),
    ("DERP_CERT_DIR", "", "certdir", 1),
    ("DERP_ADDR", "localhost", "a", 1),
    ("DERP_STUN", "x", "stun", 2),
    ("DERP_STUN_PORT", "x", "stun-port", 2),
    ("DERP_HTTP_PORT", "x", "http-port", 2),
    ("DERP_VERIFY_CLIENTS", "x", "verify-clients", 2),
    ("DERP_VERIFY_CLIENT_URL_FAIL_OPEN", "x", "verify-client-url-fail-open", 2),
]


@pytest.mark.parametrize(
    ("env", "text", "flag", "status"), BAD_ENV_CASES, ids=[f"{c[0]}={c[1]}" for c in BAD_ENV_CASES]
)
def test_bad_env_value_error_names_flag_and_env(
    env: str, text: str, flag: str, status: int
) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(env={env: text})
    err = exc.value
    assert err.exit_code == status
    message = str(err)
    assert message.startswith("derpkit: ")
    assert re.search(rf"(?<![\w-])-{re.escape(flag)}(?![\w-])", message), message
    assert f"env {env}" in message
    assert "\n" not in message
    assert err.usage is None


def test_every_non_string_env_var_has_a_bad_value_case() -> None:
    covered = {c[0] for c in BAD_ENV_CASES}
    for s in SETTINGS:
        if s.kind != "string":
            assert set(s.all_envs) <= covered, s.flag


# --- validation --------------------------------------------------------------------------------


def test_dev_forces_3340_on_loopback_unless_a_names_a_host() -> None:
    cfg = cfg_of(["-dev"])
    assert cfg.addr == "127.0.0.1:3340"
    assert (cfg.listen_host, cfg.listen_port) == ("127.0.0.1", 3340)
    assert cfg_of(["-dev", "-a", "192.0.2.1:443"]).addr == "192.0.2.1:3340"
    assert cfg_of(["-dev", "-a", ":443"]).addr == ":3340"
    assert cfg_of(["-dev", "-a", "[::1]:443"]).addr == "[::1]:3340"
    assert cfg.tls_enabled is False  # 3340 is not 443 and certmode is letsencrypt
    assert cfg_of(["-dev", "-certmode=manual"]).tls_enabled is True


def test_dev_rescues_a_bad_address_like_derper() -> None:
    # derper overwrites -a before splitting it, so a broken -a does not matter in dev mode.
    assert cfg_of(["-dev", "-a", "443"]).addr == "127.0.0.1:3340"


@pytest.mark.parametrize(
    ("addr", "certmode", "tls"),
    [
        (":443", "letsencrypt", True),
        (":443", "gcp", True),
        (":443", "manual", True),
        (":https", "letsencrypt", True),
        ("192.0.2.1:443", "letsencrypt", True),
        ("[2001:db8::1]:443", "letsencrypt", True),
        (":8443", "letsencrypt", False),
        (":8443", "gcp", False),
        (":8443", "manual", True),
        (":80", "manual", True),
        (":0443", "letsencrypt", False),  # derper compares the port as text
        (":3340", "letsencrypt", False),
        (":8080", "nonsense", False),
    ],
)
def test_tls_enabled_matrix(addr: str, certmode: str, tls: bool) -> None:
    assert ServeConfig(addr=addr, certmode=certmode).tls_enabled is tls


def test_http_port_enabled() -> None:
    assert ServeConfig(addr=":443", http_port=80).http_port_enabled
    assert ServeConfig(addr=":443", http_port=0).http_port_enabled  # 0 = ephemeral, not off
    assert not ServeConfig(addr=":443", http_port=-1).http_port_enabled
    assert not ServeConfig(addr=":8080", http_port=80).http_port_enabled


@pytest.mark.parametrize(
    ("addr", "host", "port"),
    [
        (":443", "", 443),
        ("192.0.2.1:8443", "192.0.2.1", 8443),
        ("[::1]:3340", "::1", 3340),
        (":https", "", 443),
        ("localhost:", "localhost", 0),
    ],
)
def test_listen_host_and_port(addr: str, host: str, port: int) -> None:
    cfg = ServeConfig(addr=addr)
    assert (cfg.listen_host, cfg.listen_port) == (host, port)


@pytest.mark.parametrize(
    ("addr", "detail"),
    [
        ("443", "address 443: missing port in address"),
        ("::1:443", "address ::1:443: too many colons in address"),
        ("[::1", "missing ']' in address"),
        (":70000", "invalid port"),
        (":no-such-service", 'unknown port "no-such-service"'),
    ],
)
def test_invalid_server_address(addr: str, detail: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(["-a", addr, "-certmode", "manual"])
    assert exc.value.exit_code == 1
    assert str(exc.value).startswith("derpkit: invalid server address: ")
    assert detail in str(exc.value)
    assert str(exc.value).endswith("(-a)")


@pytest.mark.parametrize("port", ["-1", "0", "80", "65535", "-100"])
def test_http_port_values_accepted(port: str) -> None:
    assert cfg_of(["-http-port", port]).http_port == int(port)


@pytest.mark.parametrize("port", ["0", "3478", "65535"])
def test_stun_port_values_accepted(port: str) -> None:
    assert cfg_of(["-stun-port", port]).stun_port == int(port)


@pytest.mark.parametrize("home", ["", "blank", "https://example.com/", "http://example.com"])
def test_home_values_accepted(home: str) -> None:
    assert cfg_of(["-home", home]).home == home


@pytest.mark.parametrize("home", ["Blank", "example.com", "ftp://x", "/index.html"])
def test_home_values_refused(home: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(["-home", home])
    assert exc.value.exit_code == 1
    assert "unknown --home value" in str(exc.value)
    assert "(-home)" in str(exc.value)


def test_mesh_with_list() -> None:
    cfg = cfg_of(["-mesh-with", "a.example.com,b.example.com/10.0.0.2,c.example.com:8443"])
    assert cfg.mesh_with_list == [
        ("a.example.com", None),
        ("b.example.com", "10.0.0.2"),
        ("c.example.com:8443", None),
    ]
    assert ServeConfig().mesh_with_list == []


def test_mesh_with_more_than_one_slash_is_fatal() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(["-mesh-with", "a.example.com,b/c/d"])
    assert exc.value.exit_code == 1
    assert 'too many components in host tuple "b/c/d"' in str(exc.value)
    assert "-mesh-with" in str(exc.value)


def test_mesh_with_empty_entries_are_skipped_with_a_warning() -> None:
    cfg, notes = parse(["-mesh-with", "a.example.com,,b.example.com,"])
    assert cfg.mesh_with_list == [("a.example.com", None), ("b.example.com", None)]
    assert any("empty entries" in n for n in notes)


def test_certmode_checked_only_in_tls_mode() -> None:
    cfg, notes = parse(["-a", ":8080", "-certmode", "nonsense"])
    assert cfg.certmode == "nonsense"
    assert any(n.startswith("warning: -certmode") for n in notes)
    with pytest.raises(ConfigError) as exc:
        parse(["-certmode", "nonsense"])
    assert exc.value.exit_code == 1
    assert (
        str(exc.value)
        == 'derpkit: can not start cert provider: unsupport cert mode: "nonsense" (-certmode)'
    )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"certdir": ""}, "missing required --certdir flag"),
        (
            {"certmode": "manual", "acme_ip_certs": True},
            "--acme-ip-certs requires --certmode=letsencrypt",
        ),
        (
            {"certmode": "gcp", "hostname": "192.0.2.1"},
            "--certmode=gcp requires --hostname to be a DNS name",
        ),
        ({"certmode": "gcp"}, "--certmode=gcp requires --acme-eab-kid and --acme-eab-key flags"),
        (
            {"certmode": "gcp", "acme_eab_kid": "k", "acme_eab_key": "a2V5"},
            "--certmode=gcp requires --acme-email",
        ),
        ({"hostname": "192.0.2.1"}, "--hostname is an IP address; use --certmode=manual"),
        ({"hostname": "2001:db8::1"}, "--hostname is an IP address"),
        ({"hostname": "192.0.2.1", "acme_ip_certs": True}, None),
        ({"hostname": "192.0.2.1", "certmode": "manual"}, None),
        (
            {"certmode": "gcp", "acme_eab_kid": "k", "acme_eab_key": "a2V5", "acme_email": "e@x"},
            None,
        ),
        ({}, None),
    ],
)
def test_cert_refusals(overrides: dict[str, Any], reason: str | None) -> None:
    cfg = ServeConfig(**{"certdir": "/certs", "certmode": "letsencrypt", **overrides})
    got = cert_refusal(cfg)
    if reason is None:
        assert got is None
    else:
        assert got is not None and got.startswith(reason)


@pytest.mark.parametrize(
    "argv",
    [
        ["-tcp-user-timeout", "-1s"],
        ["-tcp-user-timeout", "600h"],
        ["-tcp-write-timeout", "-2s"],
        ["-restart-notice", "-1ns"],
        ["-accept-connection-burst", "-1"],
        ["-accept-connection-limit", "nan"],
        ["-stun-port", "65536"],
        ["-http-port", "65536"],
    ],
)
def test_range_checks_run_at_parse_time(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(argv)
    assert exc.value.exit_code == 2
    assert str(exc.value).startswith(f'invalid value "{argv[1]}" for flag {argv[0]}: ')


def test_accept_connection_values() -> None:
    cfg = cfg_of(["-accept-connection-limit", "-5", "-accept-connection-burst", "0"])
    assert (cfg.accept_connection_limit, cfg.accept_connection_burst) == (-5.0, 0)


def test_seed_image_environment_starts() -> None:
    """The Docker seed's full ENV list, as the derpkit image sets it, must parse."""
    seed = {
        "DEV": "false", "VERSION_FLAG": "false", "ADDR": ":443", "HTTP_PORT": "80",
        "STUN_PORT": "3478", "CONFIG_PATH": "", "CERT_MODE": "manual",
        "CERT_DIR": "derper-certs", "HOSTNAME": "127.0.0.1", "RUN_STUN": "true",
        "RUN_DERP": "true", "FLAGHOME": "", "MESH_PSKFILE": "", "MESH_WITH": "",
        "SECRETS_URL": "", "SECRETS_PREFIX": "prod/derp", "SECRETS_CACHEDIR": "derper-secrets",
        "BOOTSTRAP_DNS": "", "UNPUBLISHED_DNS": "", "VERIFY_CLIENTS": "true",
        "VERIFY_CLIENT_URL": "", "VERIFY_FAIL_OPEN": "true", "SOCKET": "",
        "ACCEPT_CONNECTION_LIMIT": "+Inf", "ACCEPT_CONNECTION_BURST": "9223372036854775807",
        "TCP_KEEPALIVE_TIME": "10m0s", "TCP_USER_TIMEOUT": "15s", "TCP_WRITE_TIMEOUT": "2s",
    }  # fmt: skip
    cfg, notes = parse(env=seed)
    assert cfg.tls_enabled and cfg.certmode == "manual" and cfg.hostname == "127.0.0.1"
    assert cfg.verify_clients is True and cfg.accept_connection_limit == math.inf
    assert len([n for n in notes if " -> -" in n]) == len(seed)


# --- docs --------------------------------------------------------------------------------------


def test_markdown_mentions_every_flag_and_variable() -> None:
    md = flags_markdown()
    for s in SETTINGS:
        assert f"`-{s.flag}`" in md
        for e in s.all_envs:
            assert f"`{e}`" in md
    for flag in EXTENSIONS:
        row = next(ln for ln in md.splitlines() if ln.startswith(f"| `-{flag}`"))
        assert "derpkit extension" in row
    assert "`SECRETS_PREFIX` (what the wrapper image really uses) beats `SECRET_PREFIX`" in md
    assert "`DERP_*` alias" in md


def test_docs_flags_md_is_up_to_date() -> None:
    path = REPO / "docs" / "flags.md"
    assert path.read_text(encoding="utf-8") == flags_markdown(), (
        "docs/flags.md is stale: run python3 -m derpkit.server.config --markdown > docs/flags.md"
    )


def test_module_prints_markdown() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "derpkit.server.config", "--markdown"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert out == flags_markdown()
