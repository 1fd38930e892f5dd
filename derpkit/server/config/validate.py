"""derper's start-up refusals about shapes (address, -home, cert mode), before any I/O.

Per-value range checks run while parsing (settings.py ``check``); what needs the filesystem
(key files, certificate files, the mesh key) is checked by the modules that read them.
"""

from __future__ import annotations

import ipaddress

from derpkit.gosyntax import GoValueError, go_quote, split_host_port

from .errors import ConfigError
from .serveconfig import ServeConfig, env_of, origin_suffix, resolve_port
from .settings import BY_ATTR, CERT_MODES, DEV_ADDR, DEV_HOST


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


def _check_rfc5780(cfg: ServeConfig) -> None:
    """``-stun-rfc5780`` needs concrete addresses: the replies name the IP they leave from."""
    alt = cfg.stun_rfc5780_alt
    if alt is None:
        return

    def refuse(reason: str, *attrs: str) -> ConfigError:
        return ConfigError(
            f"derpkit: -stun-rfc5780: {reason}{origin_suffix(cfg.origins, 'stun_rfc5780', *attrs)}",
            1,
            flag="stun-rfc5780",
            env=env_of(cfg.origins, "stun_rfc5780"),
        )

    if cfg.stun_strict and "stun_strict" in cfg.origins:
        raise refuse("cannot be combined with -stun-strict (RFC 5780 tests use plain "
                     "RFC 5389 requests, which -stun-strict ignores)", "stun_strict")
    if not cfg.stun:
        raise refuse("needs the STUN server (-stun=false turns it off)", "stun")
    host = split_host_port(cfg.addr)[0]
    try:
        primary = ipaddress.ip_address(host)
    except ValueError:
        raise refuse(f"-a must name the server's IP address (not {go_quote(host)}), because "
                     "RFC 5780 replies say which address they leave from", "addr") from None
    second = ipaddress.ip_address(alt[0])
    if primary.version != second.version:
        raise refuse(f"{alt[0]} and -a's {host} are of different IP versions", "addr")
    if primary == second:
        raise refuse(f"the second IP {alt[0]} must differ from -a's", "addr")
    if cfg.stun_port and alt[1] == cfg.stun_port:
        raise refuse(f"the second port {alt[1]} must differ from -stun-port", "stun_port")
    if cfg.stun_port and alt[1] == 0:
        raise refuse("the second port must not be 0 when -stun-port is fixed", "stun_port")


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
        resolve_port(split_host_port(cfg.addr)[1])
    except GoValueError as e:
        raise ConfigError(
            f"derpkit: invalid server address: {e.reason}{origin_suffix(cfg.origins, 'addr')}",
            1,
            flag="a",
            env=env_of(cfg.origins, "addr"),
        ) from None
    mesh = cfg.mesh_with_list  # raises on host tuples with more than one "/"
    if cfg.mesh_with and len(mesh) != len(cfg.mesh_with.split(",")):
        notes.append("warning: -mesh-with has empty entries; they are skipped")
    home = cfg.home
    if home not in ("", "blank") and not home.lower().startswith(("http://", "https://")):
        raise ConfigError(
            f'derpkit: unknown --home value {go_quote(home)} (use "", blank or an '
            f"http(s):// URL){origin_suffix(cfg.origins, 'home')}",
            1,
            flag="home",
            env=env_of(cfg.origins, "home"),
        )
    _check_rfc5780(cfg)
    if cfg.workers != 1 and cfg.tls_enabled and cfg.certmode != "manual":
        # Each worker would run its own ACME client on one cache, and a challenge request
        # lands on whichever worker the kernel picks (docs/workers.md).
        raise ConfigError(
            f"derpkit: -workers {cfg.workers} needs -certmode manual when serving TLS (ACME "
            f"certificates are not shared between workers){origin_suffix(cfg.origins, 'workers', 'certmode')}",
            1,
            flag="workers",
            env=env_of(cfg.origins, "workers"),
        )
    if cfg.tls_enabled:
        found = _cert_refusal(cfg)
        if found:
            reason, attrs = found
            raise ConfigError(
                f"derpkit: can not start cert provider: {reason}"
                f"{origin_suffix(cfg.origins, *attrs)}",
                1,
                flag=BY_ATTR[attrs[0]].flag,
                env=env_of(cfg.origins, attrs[0]),
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
