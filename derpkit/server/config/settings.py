"""The one settings table for ``derpkit serve`` (flags, env names, defaults, checks).

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

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from derpkit.gosyntax import (
    GoValueError,
    format_duration,
    format_float,
    parse_bool,
    parse_duration,
    parse_float,
    parse_int,
)

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
    from derpkit.setec import check_url

    return check_url(value)


def split_rfc5780_alt(value: str) -> tuple[str, int | None]:
    """``-stun-rfc5780``'s value as (IP, port or None); raises ValueError with the reason."""
    import ipaddress

    from derpkit.gosyntax import split_host_port

    text = value.strip()
    port: int | None = None
    try:
        ipaddress.ip_address(text.strip("[]"))
        host = text.strip("[]")
    except ValueError:
        try:
            host, ptext = split_host_port(text)
        except GoValueError as e:
            raise ValueError(f"want IP or IP:port ({e.reason})") from None
        if not (ptext.isascii() and ptext.isdigit()) or not 0 <= int(ptext) <= MAX_PORT:
            raise ValueError(f"port {ptext!r} must be a number from 0 to {MAX_PORT}") from None
        port = int(ptext)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    return host, port


def _rfc5780_alt(value: str) -> str | None:
    if not value:
        return None
    try:
        split_rfc5780_alt(value)
    except ValueError as e:
        return str(e)
    return None


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
#: -workers: the claim stamps between workers keep the worker's index in 8 bits.
MAX_WORKERS = 64


def _workers(value: int) -> str | None:
    if value < 0:
        return "must not be negative (0 means one worker per usable CPU)"
    if value > MAX_WORKERS:
        return f"must be at most {MAX_WORKERS}"
    return None

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
        True,
        "Answer only Tailscale-shaped STUN binding requests, as derper does. With "
        "-stun-strict=false any well-formed RFC 5389 binding request is answered too, so "
        "ordinary STUN tools (turnutils_stunclient, stunc -plain) get a reply; -stun-rfc5780 "
        "implies that.",
        extension=True,
    ),
    Setting(
        "stun-rfc5780",
        ("STUN_RFC5780",),
        "string",
        "",
        "RFC 5780 NAT-behaviour server: the second IP (IP or IP:port; the port defaults to "
        "-stun-port + 1) for OTHER-ADDRESS and CHANGE-REQUEST, so `derpkit stunc -nat` and "
        "coturn's natdiscovery can classify a client's NAT. STUN then also listens on -a's IP "
        "at the second port and on the second IP at both ports; -a must name an IP. Empty: "
        "off, derper's behaviour.",
        check=_rfc5780_alt,
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
    Setting(
        "workers",
        ("WORKERS",),
        "int",
        1,
        "Server processes sharing the ports (SO_REUSEPORT) and reaching each other's clients "
        "over a private loopback mesh; 0 means one per usable CPU. 1 is one process, as "
        "derper. See docs/workers.md.",
        check=_workers,
        extension=True,
    ),
)

BY_FLAG: dict[str, Setting] = {s.flag: s for s in SETTINGS}
BY_ATTR: dict[str, Setting] = {s.attr: s for s in SETTINGS}


SEEDLESS_ENVS = (
    "ACME_EAB_KID",
    "ACME_EAB_KEY",
    "ACME_EMAIL",
    "ACME_IP_CERTS",
    "RATE_CONFIG",
    "ACE",
    "STUN_STRICT",
    "STUN_RFC5780",
    "ALLOWED_KEYS_FILE",
    "RESTART_NOTICE",
    "WORKERS",
)
