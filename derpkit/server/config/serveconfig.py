"""The resolved settings (:class:`ServeConfig`) and where each value came from.

Its fields mirror the table in settings.py (one attribute per setting, same names and
order, checked at import). Errors raised from derived views name the flag and, when one
set it, the environment variable.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from derpkit.gosyntax import GoValueError, go_quote, split_host_port

from .errors import ConfigError
from .knobs import Knobs
from .settings import BY_ATTR, MAX_PORT, SETTINGS


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
    stun_rfc5780: str = _table_default("stun_rfc5780")
    allowed_keys_file: str = _table_default("allowed_keys_file")
    restart_notice: float = _table_default("restart_notice")
    acme_directory_url: str = _table_default("acme_directory_url")
    acme_renew_before: float = _table_default("acme_renew_before")
    workers: int = _table_default("workers")
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    #: derper's non-flag environment knobs, read with the flags (parse_config passes its
    #: ``environ``; a directly built config reads the process environment once, here).
    knobs: Knobs = field(
        default_factory=lambda: Knobs.from_environ(os.environ), repr=False, compare=False
    )

    # Derived views. They assume the config passed validate_config (parse_config does that).

    @property
    def listen_host(self) -> str:
        """Host part of ``-a`` (empty = every interface); STUN and port 80 bind it too."""
        return split_host_port(self.addr)[0]

    @property
    def listen_port(self) -> int:
        """Numeric port of ``-a`` (service names such as ``https`` resolved; empty = 0)."""
        return resolve_port(split_host_port(self.addr)[1])

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
                    too_many_components(entry, self.origins),
                    1,
                    flag="mesh-with",
                    env=env_of(self.origins, "mesh_with"),
                )
            out.append((parts[0], parts[1] or None) if len(parts) == 2 else (parts[0], None))
        return out

    @property
    def stun_rfc5780_alt(self) -> tuple[str, int] | None:
        """``-stun-rfc5780`` as (second IP, second port), or None when RFC 5780 mode is off.

        The port defaults to ``-stun-port + 1`` (coturn's rule), or ephemeral with an
        ephemeral ``-stun-port``.
        """
        if not self.stun_rfc5780:
            return None
        from .settings import split_rfc5780_alt

        ip, port = split_rfc5780_alt(self.stun_rfc5780)
        if port is None:
            port = self.stun_port + 1 if self.stun_port else 0
        return ip, port

    @property
    def bootstrap_dns_list(self) -> list[str]:
        """``-bootstrap-dns-names`` split on commas, empty entries dropped."""
        return [n for n in self.bootstrap_dns_names.split(",") if n]


_WELL_KNOWN_PORTS = {"http": 80, "https": 443}


def resolve_port(port: str) -> int:
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
    except (OSError, ValueError):  # ValueError: a NUL in the name (found by atheris)
        if port in _WELL_KNOWN_PORTS:
            return _WELL_KNOWN_PORTS[port]
        raise GoValueError(f"unknown port {go_quote(port)}") from None


def too_many_components(entry: str, origins: Mapping[str, str]) -> str:
    return (
        f"derpkit: too many components in host tuple {go_quote(entry)} "
        f"(use host or host/dialhost){origin_suffix(origins, 'mesh_with')}"
    )


def origin_suffix(origins: Mapping[str, str], *attrs: str) -> str:
    """`` (-a from env ADDR)``: names each setting involved and, if so, the variable that set it.

    Start-up refusals must point at what to change; in Docker that is usually a variable.
    """
    parts = []
    for attr in attrs:
        origin = origins.get(attr, "")
        flag = "-" + BY_ATTR[attr].flag
        parts.append(f"{flag} from {origin}" if origin.startswith("env ") else flag)
    return f" ({', '.join(parts)})" if parts else ""


def env_of(origins: Mapping[str, str], attr: str) -> str | None:
    """The variable that set ``attr``, if one did."""
    origin = origins.get(attr, "")
    return origin[4:] if origin.startswith("env ") else None


def _check_table() -> None:
    """The dataclass and the table must list the same settings in the same order."""
    names = [f.name for f in dataclasses.fields(ServeConfig) if f.name not in ("origins", "knobs")]
    assert names == [s.attr for s in SETTINGS], "ServeConfig fields and SETTINGS disagree"


_check_table()
