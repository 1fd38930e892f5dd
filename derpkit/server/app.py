"""``derpkit serve``: derper's start-up sequence around a ``DerpNode``.

The order follows derper (spec derper-cli §1.4): parse, ``-version``, signals, dev mode,
address, STUN, server key, TLS or plain, rate config, mesh key, mesh links, routes, serve.
Each refusal is one line naming the setting; exit codes match derper (2 for flag errors,
1 for fatal start-up problems).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from derpkit import __version__, setec
from derpkit.protocol.keys import KeyError_, MeshKey, NodePrivate
from derpkit.server.admission import verify
from derpkit.server.frontdoor import limits
from derpkit.server.frontdoor.bootstrap_dns import BootstrapDNS
from derpkit.server.frontdoor.http import HttpOptions

from . import keyfile
from .config import ConfigError, ServeConfig, parse_config
from .node import DerpNode, NodeOptions

log = logging.getLogger("derpkit.serve")


class StartupError(Exception):
    """Fatal start-up problem: one line for the operator, exit status 1."""


def load_mesh_key(cfg: ServeConfig, setec_value: bytes | None = None) -> MeshKey | None:
    """Where derper finds the mesh key: dev env var, setec, or the PSK file (first wins).

    The setec fetch is asynchronous and may wait a long time, so ``serve`` does it first
    (``fetch_setec_mesh_key``) and passes the secret's value in ``setec_value``.
    """
    if cfg.dev:
        text = cfg.knobs.dev_mesh_key
        if not text:
            log.info("No mesh key specified for dev via TAILSCALE_DERPER_MESH_KEY")
            return None
        log.info("Set mesh key from TAILSCALE_DERPER_MESH_KEY")
        source = "TAILSCALE_DERPER_MESH_KEY"
    elif cfg.secrets_url:
        if setec_value is None:
            raise StartupError("derpkit: -secrets-url (env SECRETS_URL): the setec secret was not fetched")
        # derper converts the bytes to a string as they are; an empty value means no key.
        text = setec_value.decode("utf-8", errors="replace")
        if not text:
            return None
        source = f"setec secret {setec.secret_name(cfg.secrets_path_prefix)} at {cfg.secrets_url}"
    elif cfg.mesh_psk_file:
        try:
            with open(cfg.mesh_psk_file) as f:
                text = f.read()
        except OSError as e:
            raise StartupError(f"derpkit: -mesh-psk-file {cfg.mesh_psk_file}: {e}") from None
        source = cfg.mesh_psk_file
    else:
        return None
    try:
        return MeshKey.parse(text)
    except KeyError_ as e:
        raise StartupError(f"derpkit: {e} (from {source}): want 64 hexadecimal digits") from None


async def fetch_setec_mesh_key(cfg: ServeConfig, stop: asyncio.Event) -> bytes | None:
    """The raw mesh-key secret when -secrets-url applies (not in -dev), else None.

    Waits, as derper does, until the secret is in the cache or the server gives it; ``stop``
    (set by SIGINT/SIGTERM) ends the wait with a fatal error, like derper's cancelled context.
    """
    if cfg.dev or not cfg.secrets_url:
        return None
    settings = (
        f"-secrets-url {cfg.secrets_url} (env SECRETS_URL), -secrets-path-prefix "
        f"{cfg.secrets_path_prefix} (env SECRETS_PREFIX), -secrets-cache-dir "
        f"{cfg.secrets_cache_dir} (env SECRETS_CACHEDIR)"
    )
    try:
        return await setec.fetch_mesh_secret(
            cfg.secrets_url, cfg.secrets_path_prefix, cfg.secrets_cache_dir, stop
        )
    except setec.SetecStopped as e:
        raise StartupError(f"NewStore: {e} [{settings}]") from None
    except setec.SetecError as e:
        # Only the cache path can fail this way (setec's NewFileCache).
        raise StartupError(
            f"NewFileCache: {e} [-secrets-cache-dir {cfg.secrets_cache_dir} (env SECRETS_CACHEDIR) "
            "is used as a file path]"
        ) from None


def load_server_key(cfg: ServeConfig) -> NodePrivate:
    if cfg.dev:
        return NodePrivate.generate()
    path = cfg.config_path
    if not path:
        path = keyfile.default_path() or ""
        if not path:
            raise StartupError("derper: -c <config path> not specified (env CONFIG_PATH)")
        log.info("no config path specified; using %s", path)
    try:
        key, created = keyfile.load_or_create(path)
    except keyfile.KeyFileError as e:
        raise StartupError(str(e)) from None
    except OSError as e:
        raise StartupError(f"derper: config: cannot create {path}: {e}") from None
    if created:
        log.info("derper: wrote new server key to %s", path)
    return key


def load_rate_config(path: str) -> tuple[int, int]:
    """-rate-config JSON: PerClientRateLimitBytesPerSec / PerClientRateBurstBytes."""
    with open(path) as f:
        obj = json.load(f)
    if not isinstance(obj, dict):
        raise ValueError("want a JSON object")
    lower = {k.lower(): v for k, v in obj.items()}
    rate = lower.get("perclientratelimitbytespersec", 0) or 0
    burst = lower.get("perclientrateburstbytes", 0) or 0
    for name, v in (("PerClientRateLimitBytesPerSec", rate), ("PerClientRateBurstBytes", burst)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}: want a non-negative integer, got {v!r}")
    return rate, burst


def build_node(
    cfg: ServeConfig, *, key: NodePrivate | None = None, setec_value: bytes | None = None,
    tweak: Callable[[NodeOptions], None] | None = None,
) -> DerpNode:
    """Everything derper decides before listening, as a ``DerpNode``.

    ``key`` is the server key if already loaded; ``setec_value`` the mesh-key secret
    fetched by ``fetch_setec_mesh_key`` (both come from ``serve``). ``tweak`` may change
    the options before the node is built (a -workers worker does).
    """
    if key is None:
        key = load_server_key(cfg)
    mesh_key = load_mesh_key(cfg, setec_value)
    mesh_with = cfg.mesh_with_list
    if mesh_with and mesh_key is None:
        raise StartupError("startMesh: --mesh-with requires --mesh-psk-file (env MESH_WITH, MESH_PSKFILE)")
    log.info("DERP mesh key configured" if mesh_key else "No mesh key configured")
    ssl_context = None
    extra_metrics = []
    provider = None
    if cfg.tls_enabled:
        from derpkit.server.tls.certs import CertProviderError, build_cert_provider

        # derper logs this line before it builds the provider, so a refusal follows it.
        log.info("derper: serving on %s with TLS", cfg.addr)
        try:
            provider = build_cert_provider(cfg)
        except CertProviderError as e:
            raise StartupError(f"derper: can not start cert provider: {e}") from None
        ssl_context = provider.ssl_context(key.public())
        extra_metrics.append(provider.metrics)
    controls = limits.controls_for(cfg)
    if controls.limiter is not None:
        extra_metrics.append(controls.limiter.families)
    try:
        admission = verify.build_admission(cfg)
    except ValueError as e:
        raise StartupError(f"derpkit: {e} (env ALLOWED_KEYS_FILE)") from None
    dns = BootstrapDNS(cfg.bootstrap_dns_names, cfg.unpublished_bootstrap_dns_names)
    extra_metrics += [dns.families, admission.families]
    http = HttpOptions(
        hostname=cfg.hostname, derp_enabled=cfg.derp, home=cfg.home, dev=cfg.dev,
        bootstrap_dns=dns.handle, consistency_check=admission.self_check_list, ace=cfg.ace,
        knobs=cfg.knobs,
    )
    opts = NodeOptions(
        host=cfg.listen_host,
        port=cfg.listen_port,
        ssl_context=ssl_context,
        stun_port=cfg.stun_port if cfg.stun else None,
        stun_strict=cfg.stun_strict,
        stun_rfc5780=cfg.stun_rfc5780_alt,
        private_key=key,
        mesh_key=mesh_key,
        mesh_with=mesh_with,
        mesh_scheme="https" if cfg.tls_enabled else "http",
        write_timeout=cfg.tcp_write_timeout,
        restart_notice=cfg.restart_notice,
        http=http,
        extra_metrics=extra_metrics,
        on_connect=controls.on_connect,
        tune_listener=controls.tune,
        admit=admission if admission.active else None,
        services=[dns, admission] + ([provider] if provider is not None else []),
        http_port=cfg.http_port if provider is not None and cfg.http_port_enabled else None,
        acme_http01=provider.acme_http01 if provider is not None else None,
    )
    if tweak is not None:
        tweak(opts)
    node = DerpNode(opts)
    node.cert_provider = provider
    if cfg.rate_config:
        try:
            apply_rate_config(node, cfg.rate_config)
        except (OSError, ValueError) as e:
            raise StartupError(f"derper: loading rate config: {e}") from None
    return node


def apply_rate_config(node: DerpNode, path: str) -> None:
    """Load -rate-config and apply it to every connection; logs what is in force."""
    rate, burst = load_rate_config(path)
    node.server.set_rate_limit(rate, burst)
    applied = node.server.rate_limit or (0, 0)
    log.info("rate config applied: client-rate=%d bytes/sec, client-burst=%d bytes", *applied)


async def serve(cfg: ServeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # derper's order: server key (step 7) before the mesh key (step 10), whose setec fetch
    # may wait until a signal; the signal handlers above are already in place for that.
    key = load_server_key(cfg)
    setec_value = await fetch_setec_mesh_key(cfg, stop)
    node = build_node(cfg, key=key, setec_value=setec_value)
    install_sighup(cfg, node)
    if not cfg.tls_enabled:
        log.info("derper: serving on %s", cfg.addr)
    try:
        await node.start()
    except OSError as e:
        raise StartupError(f"derper: {e}") from None
    extra = f"; plain HTTP (-http-port) on port {node.http_port}" if node.http_port is not None else ""
    log.info("derpkit: server public key %s; DERP on port %d%s", node.public_key, node.port, extra)
    await stop.wait()
    log.info("derpkit: shutting down; telling %d clients to reconnect", len(node.server.conns))
    await node.stop(graceful=True)
    return 0


def install_sighup(cfg: ServeConfig, node: DerpNode) -> None:
    """SIGHUP reloads -rate-config and the certificate (a -workers worker installs it too)."""
    loop = asyncio.get_running_loop()
    if cfg.rate_config:
        def reload_rate() -> None:
            log.info("derper: received SIGHUP, reloading rate config from %s", cfg.rate_config)
            try:
                apply_rate_config(node, cfg.rate_config)
            except (OSError, ValueError) as e:
                log.warning("derper: rate config reload failed: %s", e)
                return
            log.info("derper: rate config reloaded successfully")

    provider = node.cert_provider

    def on_sighup() -> None:
        # One handler for everything SIGHUP reloads: -rate-config and the certificate.
        # Installed even when there is nothing to reload: without -rate-config Go derper
        # dies of a SIGHUP (its default action); derpkit keeps relaying instead
        # (tests/interop/test_flags_go.py shows both, docs/compat.md records it).
        if cfg.rate_config:
            reload_rate()
        if provider is not None:
            log.info("derpkit: received SIGHUP, checking the certificate files")
            provider.reload()

    loop.add_signal_handler(signal.SIGHUP, on_sighup)


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%Y/%m/%d %H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str]) -> int:
    try:
        cfg, notes = parse_config(list(argv), os.environ)
    except ConfigError as e:
        sys.stderr.write(e.stderr_text())
        return e.exit_code
    if cfg.version:
        print(__version__)
        return 0
    setup_logging()
    for note in notes:
        log.info("%s", note)
    if cfg.dev:
        log.info("Running in dev mode.")
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        runner = asyncio.run
    try:
        if cfg.workers != 1:
            from derpkit.server.workers.supervisor import supervise

            return runner(supervise(cfg, list(argv)))
        return runner(serve(cfg))
    except StartupError as e:
        log.error("%s", e)
        return 1
    except ConfigError as e:
        sys.stderr.write(e.stderr_text())
        return e.exit_code
