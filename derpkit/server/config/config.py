"""The one settings table for ``derpkit serve``.

Every setting is declared once in :data:`SETTINGS`; that single table drives

* the command-line parser (Go ``flag`` rules, because ``derpkit serve`` is a drop-in for
  Tailscale's ``derper`` and operators reuse derper command lines verbatim),
* the environment layer (the Docker seed image's variable names, proposed names for the flags
  the seed lacks, and ``DERP_*`` aliases from popular community images),
* start-up validation, and
* the usage text and ``docs/flags.md`` (``python3 -m derpkit.server.config --markdown``).

Built-in defaults are **derper's** defaults, never the Docker seed's: the derpkit image sets
the seed's values with ``ENV`` exactly as the seed image does, so bare-metal users get derper
behaviour and container users get seed behaviour.

Nothing here touches the network or reads key files; only environment-derived defaults look at
the filesystem (derper picks a default mesh key file by checking which candidate exists).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from derpkit.gosyntax import (
    FlagError,
    FlagHelp,
    GoValueError,
    flag_value_error,
    format_duration,
    format_float,
    go_quote,
    parse_bool,
    parse_duration,
    parse_float,
    parse_int,
    scan_flags,
    split_host_port,
)

__all__ = [
    "SETTINGS",
    "ConfigError",
    "HelpRequested",
    "ServeConfig",
    "Setting",
    "cert_refusal",
    "flags_markdown",
    "parse_config",
    "usage",
    "validate_config",
]

Kind = Literal["bool", "int", "float", "string", "duration"]
PathExists = Callable[[str], bool]
DefaultFn = Callable[[Mapping[str, str], PathExists], Any]

PROG = "derpkit serve"
CERT_MODES = ("manual", "letsencrypt", "gcp")
DEV_ADDR = ":3340"
#: derper's dev mode listens on every interface; ours stays on loopback unless -a (or ADDR)
#: names a host part, because a dev server has no TLS and admits anyone.
DEV_HOST = "127.0.0.1"
MAX_PORT = 65535
# TCP_USER_TIMEOUT is an unsigned int of milliseconds in the kernel; Go passes an int.
_MAX_USER_TIMEOUT_S = ((1 << 31) - 1) / 1000


# --- errors -----------------------------------------------------------------------------------


class ConfigError(Exception):
    """Start-up must stop: ``str(err)`` is the one line to print, ``exit_code`` the status.

    * exit 2: the command line or an env var could not be parsed (Go's ``flag`` package exits
      2 for these, so scripts checking derper's status keep working);
    * exit 1: a value parsed but derper would refuse it at start-up (``invalid server
      address``, ``unknown --home value``, cert-provider refusals), which derper reports with
      ``log.Fatal``, i.e. status 1;
    * exit 0: :class:`HelpRequested`.

    ``usage`` is set for command-line mistakes, where Go prints the usage after the message.
    ``flag``/``env`` name the setting and variable at fault, for tests and structured logs.
    """

    def __init__(
        self,
        message: str,
        exit_code: int = 2,
        *,
        usage: str | None = None,
        flag: str | None = None,
        env: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.usage = usage
        self.flag = flag
        self.env = env

    def stderr_text(self) -> str:
        """Everything to write to stderr, newline-terminated (message, then usage if any)."""
        text = self.message + "\n" if self.message else ""
        if self.usage:
            text += self.usage
        return text


class HelpRequested(ConfigError):
    """``-h``/``-help``/``--help``: print :attr:`usage` to stderr and exit 0, as Go does."""

    def __init__(self, usage_text: str) -> None:
        super().__init__("", 0, usage=usage_text)


# --- the table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One ``derpkit serve`` setting.

    ``envs`` are the seed-image (or proposed derpkit) variable names, highest priority first;
    ``aliases`` are community-image ``DERP_*`` names, consulted only when no ``envs`` name is
    set. ``default`` is the value, or a function of the environment for the three derper
    defaults that depend on ``$HOME`` or on which files exist; ``default_doc`` then says in
    words what it is (the docs must not depend on the machine that generated them).
    ``check`` refuses parsed values that are well-formed but unusable (returns a reason).
    ``extension`` marks derpkit-only flags; ``secret`` keeps the value out of log lines.
    """

    flag: str
    envs: tuple[str, ...]
    kind: Kind
    default: Any
    help: str
    aliases: tuple[str, ...] = ()
    attr: str = ""
    default_doc: str | None = None
    check: Callable[[Any], str | None] | None = None
    extension: bool = False
    secret: bool = False

    def __post_init__(self) -> None:
        if not self.attr:
            object.__setattr__(self, "attr", self.flag.replace("-", "_"))

    @property
    def all_envs(self) -> tuple[str, ...]:
        """Every variable that can set this, in precedence order."""
        return self.envs + self.aliases

    def parse(self, text: str) -> Any:
        """Parse ``text`` with Go syntax for this kind, then apply ``check``.

        Raises :class:`GoValueError` with a short reason.
        """
        value: Any
        if self.kind == "bool":
            value = parse_bool(text)
        elif self.kind == "int":
            value = parse_int(text)
        elif self.kind == "float":
            value = parse_float(text)
        elif self.kind == "duration":
            value = parse_duration(text) / 1e9
        else:
            value = text
        if self.check is not None:
            reason = self.check(value)
            if reason:
                raise GoValueError(reason)
        return value

    def default_value(self, environ: Mapping[str, str], exists: PathExists) -> Any:
        """The built-in default for this environment (derper's, not the seed image's)."""
        return self.default(environ, exists) if callable(self.default) else self.default

    def format_value(self, value: Any) -> str:
        """Render a value in Go syntax (``10m0s``, ``+Inf``, ``true``), for usage and docs."""
        if self.kind == "bool":
            return "true" if value else "false"
        if self.kind == "float":
            return format_float(value)
        if self.kind == "duration":
            return format_duration(round(value * 1e9))
        return str(value)


def _default_certdir(environ: Mapping[str, str], exists: PathExists) -> str:
    """Go's ``os.UserCacheDir()`` + ``tailscale/derper-certs``; empty if it has no answer."""
    base = environ.get("XDG_CACHE_HOME", "")
    if not base:
        home = environ.get("HOME", "")
        if not home:
            return ""
        base = os.path.join(home, ".cache")
    return os.path.join(base, "tailscale", "derper-certs")


def _default_mesh_psk_file(environ: Mapping[str, str], exists: PathExists) -> str:
    """derper's look-up: the first candidate key file that exists at start, else none."""
    for path in (
        "/home/derp/keys/derp-mesh.key",
        os.path.join(environ.get("HOME", ""), "keys", "derp-mesh.key"),
    ):
        if exists(path):
            return path
    return ""


def _default_secrets_cache(environ: Mapping[str, str], exists: PathExists) -> str:
    """derper joins ``$HOME`` (even when empty) with ``.cache/derper-secrets``."""
    return os.path.join(environ.get("HOME", ""), ".cache", "derper-secrets")


def _port(value: int) -> str | None:
    return None if 0 <= value <= MAX_PORT else f"must be a port number from 0 to {MAX_PORT}"


def _http_port(value: int) -> str | None:
    return (
        None if value <= MAX_PORT else f"must be at most {MAX_PORT} (a negative value disables it)"
    )


def _setec_url(value: str) -> str | None:
    """derper accepts any string and then retries an unusable URL for ever; refuse it."""
    from derpkit.server.admission.setec import check_url

    return check_url(value)


def _not_nan(value: float) -> str | None:
    return "must be a number or +Inf, not NaN" if math.isnan(value) else None


def _non_negative(value: float) -> str | None:
    return "must not be negative" if value < 0 else None


def _user_timeout(value: float) -> str | None:
    if value < 0:
        return "must not be negative (0 keeps the system default)"
    if value > _MAX_USER_TIMEOUT_S:
        return "is too large for TCP_USER_TIMEOUT (at most 596h31m23.647s)"
    return None


_MAX_INT64 = (1 << 63) - 1

# derper's 34 flags in the order of the spec's table, then derpkit's extensions.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "dev",
        ("DEV",),
        "bool",
        False,
        "Local development mode: plain HTTP on port 3340 whatever -a says (on 127.0.0.1 "
        "unless -a names a host), a throw-away server key, and a mesh key only from "
        "$TAILSCALE_DERPER_MESH_KEY.",
    ),
    Setting("version", ("VERSION_FLAG",), "bool", False, "Print the version and exit."),
    Setting(
        "a",
        ("ADDR",),
        "string",
        ":443",
        'Listen address for HTTP(S) and DERP: ":port", "ip:port" or "[ipv6]:port" '
        "(no IP means every interface; STUN and the port-80 listener reuse the IP). "
        "TLS is used when the port is 443 or -certmode is manual, plain HTTP otherwise.",
        aliases=("DERP_ADDR",),
        attr="addr",
    ),
    Setting(
        "http-port",
        ("HTTP_PORT",),
        "int",
        80,
        "Plain-HTTP port opened next to the TLS listener, on -a's IP (TLS mode only). "
        "Negative disables it; 0 picks an ephemeral port.",
        aliases=("DERP_HTTP_PORT",),
        check=_http_port,
    ),
    Setting(
        "stun-port",
        ("STUN_PORT",),
        "int",
        3478,
        "UDP port for the STUN server, on -a's IP.",
        aliases=("DERP_STUN_PORT",),
        check=_port,
    ),
    Setting(
        "c",
        ("CONFIG_PATH",),
        "string",
        "",
        "JSON file holding the server's private key; created if missing. Empty means "
        "/var/lib/derper/derper.key when running as root (required otherwise).",
        attr="config_path",
    ),
    Setting(
        "certmode",
        ("CERT_MODE",),
        "string",
        "letsencrypt",
        "Where the TLS certificate comes from: manual, letsencrypt or gcp. Only "
        "checked in TLS mode.",
        aliases=("DERP_CERT_MODE",),
    ),
    Setting(
        "certdir",
        ("CERT_DIR",),
        "string",
        _default_certdir,
        "Directory for the ACME cache, or for <hostname>.crt/.key in manual mode.",
        aliases=("DERP_CERT_DIR",),
        default_doc="`$XDG_CACHE_HOME/tailscale/derper-certs`, else "
        "`$HOME/.cache/tailscale/derper-certs`, else empty",
    ),
    Setting(
        "hostname",
        ("HOSTNAME",),
        "string",
        "derp.tailscale.com",
        "Name the TLS certificate is for. An IP address is allowed with "
        "-certmode=manual (self-signed) or -acme-ip-certs.",
        aliases=("DERP_DOMAIN",),
    ),
    Setting(
        "acme-eab-kid",
        ("ACME_EAB_KID",),
        "string",
        "",
        "ACME External Account Binding key ID (needed for gcp).",
    ),
    Setting(
        "acme-eab-key",
        ("ACME_EAB_KEY",),
        "string",
        "",
        "ACME External Account Binding HMAC key, base64 (needed for gcp).",
        secret=True,
    ),
    Setting(
        "acme-email",
        ("ACME_EMAIL",),
        "string",
        "",
        "Contact address for the ACME account (needed for gcp).",
    ),
    Setting(
        "acme-ip-certs",
        ("ACME_IP_CERTS",),
        "bool",
        False,
        "Also get short-lived Let's Encrypt certificates for the server's own IP "
        "addresses on demand (needs -certmode=letsencrypt and port 80 reachable).",
    ),
    Setting("stun", ("RUN_STUN",), "bool", True, "Run the STUN server.", aliases=("DERP_STUN",)),
    Setting(
        "derp",
        ("RUN_DERP",),
        "bool",
        True,
        "Serve DERP at /derp. With false, /derp answers 404 while STUN, bootstrap DNS and "
        "mesh keep running.",
    ),
    Setting(
        "home",
        ("FLAGHOME",),
        "string",
        "",
        'What / serves: empty for the built-in page, "blank" for an empty page, or an '
        "http(s):// URL to redirect to.",
    ),
    Setting(
        "mesh-psk-file",
        ("MESH_PSKFILE",),
        "string",
        _default_mesh_psk_file,
        "File holding the mesh key (64 hex digits, whitespace trimmed). Empty disables the file.",
        default_doc="`/home/derp/keys/derp-mesh.key` or `$HOME/keys/derp-mesh.key`, "
        "whichever exists first, else empty",
    ),
    Setting(
        "mesh-with",
        ("MESH_WITH",),
        "string",
        "",
        'Comma-separated mesh peers, each "host" or "host/dialhost" (connect as host, '
        "dial dialhost). Listing this server itself is fine.",
    ),
    Setting(
        "secrets-url",
        ("SECRETS_URL",),
        "string",
        "",
        "setec server URL (http:// or https://) to fetch the mesh key from; it beats "
        "-mesh-psk-file. Start-up waits until the key is in the cache or the server gives "
        "it. See docs/secrets.md.",
        check=_setec_url,
    ),
    Setting(
        "secrets-path-prefix",
        ("SECRETS_PREFIX", "SECRET_PREFIX"),
        "string",
        "prod/derp",
        "setec name prefix: the mesh key is the secret <prefix>/meshkey.",
    ),
    Setting(
        "secrets-cache-dir",
        ("SECRETS_CACHEDIR",),
        "string",
        _default_secrets_cache,
        "setec cache FILE (a file path despite the name; an existing directory there is "
        "fatal). A key found in it is used without asking the server.",
        default_doc="`$HOME/.cache/derper-secrets`",
    ),
    Setting(
        "bootstrap-dns-names",
        ("BOOTSTRAP_DNS",),
        "string",
        "",
        "Comma-separated DNS names to resolve and publish at /bootstrap-dns.",
    ),
    Setting(
        "unpublished-bootstrap-dns-names",
        ("UNPUBLISHED_DNS",),
        "string",
        "",
        "Comma-separated names answered at /bootstrap-dns only when asked for with ?q=; "
        'an entry "name/txtname" takes a 0-100 rollout percentage from a TXT record.',
    ),
    Setting(
        "verify-clients",
        ("VERIFY_CLIENTS",),
        "bool",
        False,
        "Admit only nodes known to the local tailscaled.",
        aliases=("DERP_VERIFY_CLIENTS",),
    ),
    Setting(
        "verify-client-url",
        ("VERIFY_CLIENT_URL",),
        "string",
        "",
        "Admission-controller URL, POSTed for each connecting client.",
        aliases=("DERP_VERIFY_CLIENT_URL",),
    ),
    Setting(
        "verify-client-url-fail-open",
        ("VERIFY_FAIL_OPEN",),
        "bool",
        True,
        "Admit clients when -verify-client-url cannot be reached.",
        aliases=("DERP_VERIFY_CLIENT_URL_FAIL_OPEN",),
    ),
    Setting(
        "socket",
        ("SOCKET",),
        "string",
        "",
        "tailscaled LocalAPI socket for -verify-clients; empty means the OS default.",
    ),
    Setting(
        "accept-connection-limit",
        ("ACCEPT_CONNECTION_LIMIT",),
        "float",
        math.inf,
        "New TCP connections per second admitted on the TLS listener (token bucket "
        "rate); +Inf admits all.",
        check=_not_nan,
    ),
    Setting(
        "accept-connection-burst",
        ("ACCEPT_CONNECTION_BURST",),
        "int",
        _MAX_INT64,
        "Token-bucket capacity for -accept-connection-limit.",
        check=_non_negative,
    ),
    Setting(
        "rate-config",
        ("RATE_CONFIG",),
        "string",
        "",
        "JSON file of per-client receive rate limits, reloaded on SIGHUP (experimental).",
    ),
    Setting(
        "tcp-keepalive-time",
        ("TCP_KEEPALIVE_TIME",),
        "duration",
        600.0,
        "Idle time before TCP keepalive probes on accepted connections; negative "
        "disables keepalive.",
    ),
    Setting(
        "tcp-user-timeout",
        ("TCP_USER_TIMEOUT",),
        "duration",
        15.0,
        "TCP_USER_TIMEOUT for accepted connections (Linux).",
        check=_user_timeout,
    ),
    Setting(
        "tcp-write-timeout",
        ("TCP_WRITE_TIMEOUT",),
        "duration",
        2.0,
        "Deadline for each write to a non-mesh client; 0 means none.",
        check=_non_negative,
    ),
    Setting(
        "ace", ("ACE",), "bool", False,
        "Experimental embedded ACE CONNECT proxy: on the TLS listener, tunnel CONNECT requests to "
        "*.tailscale.com ports 443 and 80 (never hosts containing \"derp\"). Off, CONNECT gets 403.",
    ),
    # derpkit extensions: not derper flags.
    Setting(
        "stun-strict",
        ("STUN_STRICT",),
        "bool",
        False,
        "Answer only Tailscale-shaped STUN binding requests, as derper does (default: "
        "answer any well-formed binding request).",
        extension=True,
    ),
    Setting(
        "allowed-keys-file",
        ("ALLOWED_KEYS_FILE",),
        "string",
        "",
        "File of nodekey:<hex> lines admitted without tailscaled; reloaded when it changes.",
        extension=True,
    ),
    Setting(
        "restart-notice",
        ("RESTART_NOTICE",),
        "duration",
        5.0,
        "On graceful shutdown, tell clients to retry within this window (a Restarting "
        "frame); 0 sends none.",
        check=_non_negative,
        extension=True,
    ),
    Setting(
        "acme-directory-url",
        ("ACME_DIRECTORY_URL",),
        "string",
        "",
        "ACME directory for -certmode letsencrypt/gcp; empty means Let's Encrypt production "
        "(letsencrypt) or Google's (gcp), as derper. For a staging or private CA.",
        extension=True,
    ),
    Setting(
        "acme-renew-before",
        ("ACME_RENEW_BEFORE",),
        "duration",
        0.0,
        "Renew an ACME certificate this long before it expires; 0 means derper's rule "
        "(30 days, or a third of the lifetime if shorter, and a third for IP certificates).",
        check=_non_negative,
        extension=True,
    ),
)

BY_FLAG: dict[str, Setting] = {s.flag: s for s in SETTINGS}
BY_ATTR: dict[str, Setting] = {s.attr: s for s in SETTINGS}


# --- the result -------------------------------------------------------------------------------


def _table_default(attr: str) -> Any:
    """A dataclass default from the table, evaluated against the live environment."""
    setting = BY_ATTR[attr]
    if callable(setting.default):
        return field(default_factory=lambda: setting.default_value(os.environ, os.path.exists))
    return setting.default


@dataclass
class ServeConfig:
    """Resolved settings for ``derpkit serve``: one attribute per flag.

    Attribute names are flag names with ``-`` → ``_``, except ``-a`` → ``addr`` and
    ``-c`` → ``config_path``. Durations are float seconds. Constructing one directly gives
    derper's defaults, which is what tests of other modules want.

    ``origins`` maps an attribute to where its value came from (``"flag"``, ``"env NAME"``;
    absent means default), so later start-up errors can name the variable to fix.
    """

    dev: bool = _table_default("dev")
    version: bool = _table_default("version")
    addr: str = _table_default("addr")
    http_port: int = _table_default("http_port")
    stun_port: int = _table_default("stun_port")
    config_path: str = _table_default("config_path")
    certmode: str = _table_default("certmode")
    certdir: str = _table_default("certdir")
    hostname: str = _table_default("hostname")
    acme_eab_kid: str = _table_default("acme_eab_kid")
    acme_eab_key: str = field(default=_table_default("acme_eab_key"), repr=False)
    acme_email: str = _table_default("acme_email")
    acme_ip_certs: bool = _table_default("acme_ip_certs")
    stun: bool = _table_default("stun")
    derp: bool = _table_default("derp")
    home: str = _table_default("home")
    mesh_psk_file: str = _table_default("mesh_psk_file")
    mesh_with: str = _table_default("mesh_with")
    secrets_url: str = _table_default("secrets_url")
    secrets_path_prefix: str = _table_default("secrets_path_prefix")
    secrets_cache_dir: str = _table_default("secrets_cache_dir")
    bootstrap_dns_names: str = _table_default("bootstrap_dns_names")
    unpublished_bootstrap_dns_names: str = _table_default("unpublished_bootstrap_dns_names")
    verify_clients: bool = _table_default("verify_clients")
    verify_client_url: str = _table_default("verify_client_url")
    verify_client_url_fail_open: bool = _table_default("verify_client_url_fail_open")
    socket: str = _table_default("socket")
    accept_connection_limit: float = _table_default("accept_connection_limit")
    accept_connection_burst: int = _table_default("accept_connection_burst")
    rate_config: str = _table_default("rate_config")
    tcp_keepalive_time: float = _table_default("tcp_keepalive_time")
    tcp_user_timeout: float = _table_default("tcp_user_timeout")
    tcp_write_timeout: float = _table_default("tcp_write_timeout")
    ace: bool = _table_default("ace")
    stun_strict: bool = _table_default("stun_strict")
    allowed_keys_file: str = _table_default("allowed_keys_file")
    restart_notice: float = _table_default("restart_notice")
    acme_directory_url: str = _table_default("acme_directory_url")
    acme_renew_before: float = _table_default("acme_renew_before")
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    # Derived views. They assume the config passed validate_config (parse_config does that).

    @property
    def listen_host(self) -> str:
        """Host part of ``-a`` (empty = every interface); STUN and port 80 bind it too."""
        return split_host_port(self.addr)[0]

    @property
    def listen_port(self) -> int:
        """Numeric port of ``-a`` (service names such as ``https`` resolved; empty = 0)."""
        return _resolve_port(split_host_port(self.addr)[1])

    @property
    def tls_enabled(self) -> bool:
        """derper's rule: TLS exactly when ``-a``'s port is ``443``/``https`` or certmode is
        manual. Compared as text, like derper, so ``:0443`` is plain HTTP."""
        try:
            port = split_host_port(self.addr)[1]
        except GoValueError:
            port = ""
        return port in ("443", "https") or self.certmode == "manual"

    @property
    def http_port_enabled(self) -> bool:
        """Whether the port-80 side listener runs: TLS mode and ``-http-port`` >= 0."""
        return self.tls_enabled and self.http_port >= 0

    @property
    def mesh_with_list(self) -> list[tuple[str, str | None]]:
        """``-mesh-with`` as ``(host, dialhost or None)``; empty entries are skipped."""
        out: list[tuple[str, str | None]] = []
        if not self.mesh_with:
            return out
        for entry in self.mesh_with.split(","):
            if not entry:
                continue
            parts = entry.split("/")
            if len(parts) > 2:
                raise ConfigError(
                    _too_many_components(entry, self.origins),
                    1,
                    flag="mesh-with",
                    env=_env_of(self.origins, "mesh_with"),
                )
            out.append((parts[0], parts[1] or None) if len(parts) == 2 else (parts[0], None))
        return out

    @property
    def bootstrap_dns_list(self) -> list[str]:
        """``-bootstrap-dns-names`` split on commas, empty entries dropped."""
        return [n for n in self.bootstrap_dns_names.split(",") if n]


_WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def _resolve_port(port: str) -> int:
    """Go's listen-time port rule: decimal 0-65535, empty = 0, else a service name."""
    if port == "":
        return 0
    if port.isascii() and port.isdigit():
        n = int(port)
        if n > MAX_PORT:
            raise GoValueError("invalid port")
        return n
    try:
        return socket.getservbyname(port, "tcp")
    except OSError:
        if port in _WELL_KNOWN_PORTS:
            return _WELL_KNOWN_PORTS[port]
        raise GoValueError(f"unknown port {go_quote(port)}") from None


def _too_many_components(entry: str, origins: Mapping[str, str]) -> str:
    return (
        f"derpkit: too many components in host tuple {go_quote(entry)} "
        f"(use host or host/dialhost){_origin_suffix(origins, 'mesh_with')}"
    )


# --- command line -----------------------------------------------------------------------------


def _parse_argv(
    argv: Sequence[str], environ: Mapping[str, str]
) -> tuple[dict[str, Any], list[str]]:
    """Go ``flag`` rules: returns {attr: value} for flags given, and the ignored leftovers."""

    def is_bool(name: str) -> bool | None:
        setting = BY_FLAG.get(name)
        return None if setting is None else setting.kind == "bool"

    given: dict[str, Any] = {}
    rest: list[str] = []
    try:
        for name, text, bool_flag in scan_flags(argv, is_bool, rest):
            setting = BY_FLAG[name]
            try:
                given[setting.attr] = setting.parse(text)
            except GoValueError as e:
                raise flag_value_error(name, text, e.reason, is_bool=bool_flag) from None
    except FlagHelp:
        raise HelpRequested(usage(environ)) from None
    except FlagError as e:
        raise ConfigError(e.message, usage=usage(environ), flag=e.flag) from None
    return given, rest


# --- environment ------------------------------------------------------------------------------


def _apply_env(
    values: dict[str, Any],
    given: Mapping[str, Any],
    environ: Mapping[str, str],
    origins: dict[str, str],
) -> list[str]:
    """Fill settings not given on the command line from the environment; return log notes."""
    notes: list[str] = []
    for setting in SETTINGS:
        present = [name for name in setting.all_envs if name in environ]
        if not present:
            continue
        if setting.attr in given:
            for name in present:
                notes.append(
                    f"env {name}={_shown(setting, environ[name])} ignored: "
                    f"-{setting.flag} given on the command line"
                )
            continue
        name = present[0]
        text = environ[name]
        try:
            values[setting.attr] = setting.parse(text)
        except GoValueError as e:
            raise ConfigError(
                f"derpkit: invalid value {go_quote(_shown(setting, text))} for "
                f"-{setting.flag} (from env {name}): {e.reason}",
                flag=setting.flag,
                env=name,
            ) from None
        origins[setting.attr] = f"env {name}"
        notes.append(f"env {name}={_shown(setting, text)} -> -{setting.flag}")
        for other in present[1:]:
            notes.append(f"env {other}={_shown(setting, environ[other])} ignored: {name} is set")
    return notes


def _shown(setting: Setting, text: str) -> str:
    """A value as it may appear in logs: secrets are masked."""
    return "<redacted>" if setting.secret and text else text


def _origin_suffix(origins: Mapping[str, str], *attrs: str) -> str:
    """`` (-a from env ADDR)``: names each setting involved and, if so, the variable that set it.

    Start-up refusals must point at what to change; in Docker that is usually a variable.
    """
    parts = []
    for attr in attrs:
        origin = origins.get(attr, "")
        flag = "-" + BY_ATTR[attr].flag
        parts.append(f"{flag} from {origin}" if origin.startswith("env ") else flag)
    return f" ({', '.join(parts)})" if parts else ""


def _env_of(origins: Mapping[str, str], attr: str) -> str | None:
    """The variable that set ``attr``, if one did."""
    origin = origins.get(attr, "")
    return origin[4:] if origin.startswith("env ") else None


# --- validation -------------------------------------------------------------------------------


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def cert_refusal(cfg: ServeConfig) -> str | None:
    """derper's cert-provider refusals that need no I/O (spec §2.1), in derper's order.

    Only meaningful in TLS mode; returns the reason text (without derper's
    ``can not start cert provider:`` prefix) or None. The EAB key's base64 form is left to
    the cert module, which decodes it anyway.
    """
    found = _cert_refusal(cfg)
    return found[0] if found else None


def _cert_refusal(cfg: ServeConfig) -> tuple[str, tuple[str, ...]] | None:
    """:func:`cert_refusal` plus the attributes at fault, for the error's origin suffix."""
    if not cfg.certdir:
        return "missing required --certdir flag", ("certdir",)
    mode = cfg.certmode
    if mode not in CERT_MODES:
        return f"unsupport cert mode: {go_quote(mode)}", ("certmode",)
    if cfg.acme_ip_certs and mode != "letsencrypt":
        return "--acme-ip-certs requires --certmode=letsencrypt", ("acme_ip_certs", "certmode")
    ip_host = _is_ip(cfg.hostname)
    if mode == "gcp":
        if ip_host:
            return (
                "--certmode=gcp requires --hostname to be a DNS name, not an IP address",
                ("certmode", "hostname"),
            )
        if not cfg.acme_eab_kid or not cfg.acme_eab_key:
            return (
                "--certmode=gcp requires --acme-eab-kid and --acme-eab-key flags",
                ("certmode", "acme_eab_kid", "acme_eab_key"),
            )
        if not cfg.acme_email:
            return "--certmode=gcp requires --acme-email flag", ("certmode", "acme_email")
    if mode == "letsencrypt" and ip_host and not cfg.acme_ip_certs:
        return (
            "--hostname is an IP address; use --certmode=manual for a self-signed cert, or "
            "set --acme-ip-certs to get LetsEncrypt IP address certs",
            ("hostname", "certmode"),
        )
    return None


def validate_config(cfg: ServeConfig) -> list[str]:
    """derper's start-up refusals that are about shapes, not files; returns warning notes.

    Applies ``-dev`` (forces port 3340, on loopback unless ``-a`` names a host) first. Raises :class:`ConfigError`
    with exit status 1, derper's status for these. Per-value range checks already ran while
    parsing (exit 2). Checks that need the filesystem (key files, cert files, mesh key) belong
    to the modules that read them.
    """
    notes: list[str] = []
    if cfg.dev:
        host = DEV_HOST
        if "addr" in cfg.origins:
            try:
                host = split_host_port(cfg.addr)[0]
            except GoValueError:
                pass  # derper overwrites -a before splitting it: a broken -a does not matter
        cfg.addr = (f"[{host}]" if ":" in host else host) + DEV_ADDR
    try:
        _resolve_port(split_host_port(cfg.addr)[1])
    except GoValueError as e:
        raise ConfigError(
            f"derpkit: invalid server address: {e.reason}{_origin_suffix(cfg.origins, 'addr')}",
            1,
            flag="a",
            env=_env_of(cfg.origins, "addr"),
        ) from None
    mesh = cfg.mesh_with_list  # raises on host tuples with more than one "/"
    if cfg.mesh_with and len(mesh) != len(cfg.mesh_with.split(",")):
        notes.append("warning: -mesh-with has empty entries; they are skipped")
    home = cfg.home
    if home not in ("", "blank") and not home.lower().startswith(("http://", "https://")):
        raise ConfigError(
            f'derpkit: unknown --home value {go_quote(home)} (use "", blank or an '
            f"http(s):// URL){_origin_suffix(cfg.origins, 'home')}",
            1,
            flag="home",
            env=_env_of(cfg.origins, "home"),
        )
    if cfg.tls_enabled:
        found = _cert_refusal(cfg)
        if found:
            reason, attrs = found
            raise ConfigError(
                f"derpkit: can not start cert provider: {reason}"
                f"{_origin_suffix(cfg.origins, *attrs)}",
                1,
                flag=BY_ATTR[attrs[0]].flag,
                env=_env_of(cfg.origins, attrs[0]),
            )
    else:
        # derper never builds a cert provider in plain mode, so these go unchecked there
        # (spec §11 Q2: match it, but say so).
        if cfg.certmode not in CERT_MODES:
            notes.append(
                f"warning: -certmode {go_quote(cfg.certmode)} is not manual, letsencrypt or "
                f"gcp; ignored because {cfg.addr} serves plain HTTP"
            )
    return notes


# --- entry point ------------------------------------------------------------------------------


def parse_config(
    argv: Sequence[str],
    environ: Mapping[str, str],
    *,
    path_exists: PathExists = os.path.exists,
) -> tuple[ServeConfig, list[str]]:
    """Command line, then environment, then derper's defaults → a validated :class:`ServeConfig`.

    Returns the config and log notes (one per env var applied or shadowed, plus warnings) for
    the caller to log at start-up: a stray ``HOSTNAME`` outside Docker silently changes
    ``-hostname``, and the log line is how an operator finds out.

    With ``-version`` the shape checks are skipped, as derper prints its version before any
    other work. ``path_exists`` is for tests of the mesh-key-file default.
    """
    given, leftovers = _parse_argv(argv, environ)
    values = {s.attr: s.default_value(environ, path_exists) for s in SETTINGS}
    values.update(given)
    origins = {attr: "flag" for attr in given}
    notes = _apply_env(values, given, environ, origins)
    if leftovers:
        notes.append(
            f"warning: ignoring arguments from {go_quote(leftovers[0])} on: flags stop at the "
            f"first non-flag (a bool is switched off with -name=false, not -name false)"
        )
    cfg = ServeConfig(**values, origins=origins)
    if not cfg.version:
        notes.extend(validate_config(cfg))
    return cfg, notes


# --- usage and docs ---------------------------------------------------------------------------


def _is_zero(value: Any) -> bool:
    """Go prints ``(default …)`` only for non-zero defaults."""
    return value in (False, 0, "")


def usage(environ: Mapping[str, str] | None = None) -> str:
    """Usage text in Go ``flag`` layout (sorted, ``(default …)``), plus env var names."""
    env = os.environ if environ is None else environ
    lines = [f"Usage of {PROG}:"]
    for s in sorted(SETTINGS, key=lambda s: s.flag):
        head = f"  -{s.flag}"
        if s.kind != "bool":
            head += " " + s.kind
        lines.append(
            head + ("\t" if len(head) <= 4 else "\n    \t") + s.help.replace("\n", "\n    \t")
        )
        default = s.default_value(env, os.path.exists)
        extra = []
        if not _is_zero(default):
            shown = s.format_value(default)
            extra.append(f"(default {go_quote(shown) if s.kind == 'string' else shown})")
        if s.extension:
            extra.append("[derpkit extension]")
        extra.append("[env " + ", ".join(s.all_envs) + "]")
        lines[-1] += " " + " ".join(extra)
    return "\n".join(lines) + "\n"


def _md_default(s: Setting) -> str:
    if s.default_doc:
        return s.default_doc
    shown = s.format_value(s.default)
    return f"`{shown}`" if shown else '`""`'


def _md_cell(text: str) -> str:
    """Escape what would break a table cell or be read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def flags_markdown() -> str:
    """``docs/flags.md``: generated from :data:`SETTINGS`; a test keeps the file in sync."""
    out = [
        "# `derpkit serve` flags and environment variables",
        "",
        "<!-- Generated by `python3 -m derpkit.server.config --markdown > docs/flags.md`."
        " Do not edit by hand; edit the table in derpkit/server/config.py. -->",
        "",
        "`derpkit serve` takes the same flags as Tailscale's `derper`, parsed with the same",
        "rules as Go's `flag` package, and the environment variables of the popular Docker",
        "wrapper image, so an existing command line or `docker run -e ...` works unchanged.",
        "",
        "## Command-line rules",
        "",
        "- `-name` and `--name` are the same; `-name=value` or `-name value`.",
        "- Booleans: `-name` means true; use `-name=false` to turn one off. `-name false` does",
        "  **not** work: parsing stops at the first argument that is not a flag, and the rest is",
        "  ignored (derpkit logs a warning; derper stays silent).",
        "- `--` ends the flags. When a flag is repeated, the last one wins.",
        "- Integers accept Go forms (`0x50`, `0o120`, `1_000`; a leading `0` means octal),",
        "  floats accept `+Inf`/`inf`, durations use Go syntax (`10m0s`, `1.5h`, `250ms`;",
        "  a bare `0` is the only number allowed without a unit).",
        "- An unknown flag or a bad value prints the error and the usage and exits 2;",
        "  `-h`, `-help` and `--help` print the usage and exit 0.",
        "",
        "## Environment variables",
        "",
        "- A flag on the command line beats its environment variable; the variable beats the",
        "  built-in default. Built-in defaults are derper's; the derpkit Docker image sets the",
        "  wrapper image's values (`CERT_MODE=manual`, `HOSTNAME=127.0.0.1`,",
        "  `VERIFY_CLIENTS=true`, ...) with `ENV`.",
        "- A variable that is set, **even to the empty string**, is parsed exactly like",
        "  `-flag=<value>`: `CERT_DIR=` empties the certificate directory, `MESH_PSKFILE=` turns",
        "  off the automatic key-file lookup, and an empty boolean or number is an error.",
        "- A bad value stops start-up with exit status 2 and one line naming the flag and the",
        '  variable, e.g. `derpkit: invalid value "abc" for -stun-port (from env STUN_PORT):',
        "  not an integer`.",
        "- When several variables map to one flag, the first listed wins: the wrapper image's",
        "  name, then derpkit's name, then the `DERP_*` alias from community images.",
        "  `SECRETS_PREFIX` (what the wrapper image really uses) beats `SECRET_PREFIX`",
        "  (what its README says).",
        "- Every variable that changed a setting is logged at start-up, e.g.",
        "  `env HOSTNAME=127.0.0.1 -> -hostname`. Watch out for `HOSTNAME`: Docker and some",
        "  shells set it to the machine name, and `DEV`/`SOCKET` are generic names too.",
        "",
        "## Settings",
        "",
        "| Flag | Type | Default | Environment | Description |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        envs = ", ".join(f"`{e}`" for e in s.envs)
        if s.envs[0] in _SEEDLESS_ENVS:
            envs += " (derpkit name)"
        if s.aliases:
            envs += " (alias " + ", ".join(f"`{a}`" for a in s.aliases) + ")"
        desc = s.help
        if s.extension:
            desc = "**derpkit extension.** " + desc
        out.append(
            f"| `-{s.flag}` | {s.kind} | {_md_cell(_md_default(s))} | {envs} | {_md_cell(desc)} |"
        )
    seedless = ", ".join(f"`{e}`" for e in _SEEDLESS_ENVS)
    extensions = ", ".join(f"`-{s.flag}`" for s in SETTINGS if s.extension)
    out += [
        "",
        "## Where derpkit differs",
        "",
        f"- Extensions (not derper flags): {extensions}.",
        f"- Variables the wrapper image does not have, proposed by derpkit: {seedless}.",
        "- Out-of-range values are refused at start-up (exit 2) even where derper would take",
        "  them and misbehave later: ports outside 0-65535 for `-stun-port` (and above 65535",
        "  for `-http-port`), a negative `-accept-connection-burst`, `NaN` for",
        "  `-accept-connection-limit`, negative `-tcp-user-timeout`, `-tcp-write-timeout` or",
        "  `-restart-notice`.",
        "- Shape errors derper reports with `log.Fatal` (invalid `-a`, unknown `-home`, a",
        "  `-mesh-with` entry with more than one `/`, and in TLS mode the certificate-mode",
        "  refusals) exit 1 as in derper, but before anything is started. Empty `-mesh-with`",
        "  entries are skipped with a warning.",
        "- In plain-HTTP mode a bad `-certmode` is accepted, as in derper, but logged as a",
        "  warning.",
        "",
    ]
    return "\n".join(out)


_SEEDLESS_ENVS = (
    "ACME_EAB_KID",
    "ACME_EAB_KEY",
    "ACME_EMAIL",
    "ACME_IP_CERTS",
    "RATE_CONFIG",
    "ACE",
    "STUN_STRICT",
    "ALLOWED_KEYS_FILE",
    "RESTART_NOTICE",
)


def _check_table() -> None:
    """The dataclass and the table must list the same settings in the same order."""
    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name != "origins"]
    assert names == [s.attr for s in SETTINGS], "ServeConfig fields and SETTINGS disagree"


_check_table()


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m derpkit.server.config --markdown``: print docs/flags.md."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["--markdown"]:
        sys.stdout.write(flags_markdown())
        return 0
    sys.stdout.write(usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
