"""``derpkit healthcheck``: is the LOCAL ``derpkit serve`` (or derper) relaying and answering STUN?

It reads the same flags and environment variables as ``derpkit serve`` (so in the Docker
image it needs no arguments), works out where the server listens, and checks:

* **DERP**: connect to ``-a``'s port on loopback (TLS when serve would use TLS), upgrade,
  read the server key, send ClientInfo. If the server admits the probe (no admission
  control, or the mesh key from ``-mesh-psk-file`` is readable), it also pings the server.
  A server that reads our ClientInfo and then refuses us (``-verify-clients``: the probe's
  random key is not in the tailnet) is still a working DERP server, so that counts as
  healthy.
* **STUN**: one binding request to ``-stun-port`` on loopback; the answer must carry our
  address. Skipped when ``-stun=false``.

TLS: with an IP ``-hostname`` in manual mode the certificate is pinned to the ``CertName``
of ``<certdir>/<ip>.crt`` (the file serve generated); otherwise the server name is sent as
SNI and the chain is not verified (this checks liveness, not your PKI).

Exit status 0 when every check passed, 1 otherwise, 2 for a bad flag. One line per check
on stdout.

Own options (before the serve flags): ``--timeout SECONDS`` (default 5), ``--quiet``.

Given no serve flags, it also takes those of the server when the server is PID 1 (the
container's command was ``derpkit serve <flags>``, e.g. ``docker run derpkit derpkit serve
-stun-port 3479``): the image's HEALTHCHECK cannot see flags given after the image name, and
would otherwise check the ports the variables name rather than the ones the server uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import math
import os
import ssl
import sys
from collections.abc import Sequence

from derpkit.gosyntax import join_host_port
from derpkit.server.config import ConfigError, ServeConfig, parse_config
from derpkit.server.tls.certs import manual_paths, parse_ip


class CheckFailed(Exception):
    pass


def target_host(cfg: ServeConfig) -> str:
    """Where to reach the server from inside its own host/container."""
    host = cfg.listen_host
    if not host:
        return "127.0.0.1"
    ip = parse_ip(host)
    if ip is not None and ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return host


def derp_port(cfg: ServeConfig) -> int:
    return 3340 if cfg.dev else cfg.listen_port


def pin_for(cfg: ServeConfig) -> str | None:
    """The CertName of the self-signed certificate serve uses, when there is one to pin."""
    if cfg.certmode != "manual" or parse_ip(cfg.hostname) is None or not cfg.certdir:
        return None
    crt, _ = manual_paths(cfg.certdir, cfg.hostname)
    try:
        with open(crt) as f:
            der = ssl.PEM_cert_to_DER_cert(f.read())
    except (OSError, ValueError):
        return None
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def _mesh_key(cfg: ServeConfig):  # noqa: ANN202
    from derpkit.protocol.keys import KeyError_, MeshKey

    text = os.environ.get("TAILSCALE_DERPER_MESH_KEY", "") if cfg.dev else ""
    if not text and cfg.mesh_psk_file:
        try:
            with open(cfg.mesh_psk_file) as f:
                text = f.read()
        except OSError:
            return None
    try:
        return MeshKey.parse(text) if text.strip() else None
    except KeyError_:
        return None


async def check_derp(cfg: ServeConfig, timeout: float) -> str:
    from derpkit.client import DerpClient, DerpConnectionError

    host, port = target_host(cfg), derp_port(cfg)
    tls = cfg.tls_enabled
    kwargs: dict = {}
    if tls:
        pin = pin_for(cfg)
        if pin is not None:
            url = f"https://{join_host_port(host, port)}/derp"
            kwargs["cert_name"] = pin
        else:
            name = cfg.hostname if parse_ip(cfg.hostname) is None else host
            url = f"https://{join_host_port(name, port)}/derp"
            kwargs["insecure_tls"] = True
            kwargs["dial_host"] = host
    else:
        url = f"http://{join_host_port(host, port)}/derp"
    mesh_key = _mesh_key(cfg)
    try:
        client = await DerpClient.connect(
            url, mesh_key=mesh_key, is_prober=True, timeout=timeout, wait_for_server_info=False,
            **kwargs,
        )
    except DerpConnectionError as e:
        raise CheckFailed(f"DERP {url}: {e}") from None
    try:
        try:
            await client.wait_server_info(timeout)
        except (DerpConnectionError, TimeoutError) as e:
            if client.server_key_received and not isinstance(e, TimeoutError):
                return (
                    f"DERP ok: {url} upgraded, server key {client.server_key}; the server then "
                    "refused this probe's random key (admission control such as -verify-clients)"
                )
            raise CheckFailed(f"DERP {url}: no ServerInfo: {e or 'timeout'}") from None
        try:
            rtt = await client.ping(timeout)
        except (DerpConnectionError, TimeoutError) as e:
            raise CheckFailed(f"DERP {url}: admitted but ping failed: {e or 'timeout'}") from None
        return f"DERP ok: {url} server key {client.server_key}, ping {rtt * 1000:.1f} ms"
    finally:
        await client.close()


async def check_stun(cfg: ServeConfig, timeout: float) -> str:
    """One Tailscale-shaped Binding transaction to ``-stun-port``, resent every second.

    The socket is bound to the target's own (local) address, so the mapped address in the
    answer must be exactly our socket: anything else means something rewrites the traffic.
    """
    from derpkit.stun.client import StunClientError, StunEndpoint, StunSendError, resolve

    host, port = target_host(cfg), cfg.stun_port
    where = join_host_port(host, port)
    try:
        family, ip = await resolve(host, port)
        try:
            endpoint = await StunEndpoint.open(family, local=(ip, 0))
        except StunSendError:  # not an address of this host after all: any local address
            endpoint = await StunEndpoint.open(family)
        async with endpoint:
            resp = await endpoint.request(
                (ip, port),
                timeout=timeout,
                retries=max(0, math.ceil(timeout) - 1),
                retry_interval=1.0,
            )
    except StunClientError as e:
        raise CheckFailed(f"STUN {where}: {e}") from None
    local_ip, local_port = resp.local
    unspecified = ipaddress.ip_address(local_ip).is_unspecified
    if resp.mapped_port != local_port or (
        not unspecified and resp.mapped_ip != ipaddress.ip_address(local_ip)
    ):
        raise CheckFailed(
            f"STUN {where}: answer names {resp.mapped}, we are {join_host_port(*resp.local)}"
        )
    return f"STUN ok: {where} mapped {resp.mapped} in {resp.rtt * 1000:.1f} ms"


async def run_checks(cfg: ServeConfig, timeout: float) -> tuple[bool, list[str]]:
    lines: list[str] = []
    ok = True
    checks = [("DERP", check_derp(cfg, timeout))]
    if cfg.stun:
        checks.append(("STUN", check_stun(cfg, timeout)))
    results = await asyncio.gather(*(c for _, c in checks), return_exceptions=True)
    for (name, _), r in zip(checks, results, strict=True):
        if isinstance(r, BaseException):
            ok = False
            lines.append(f"FAIL {r}" if isinstance(r, CheckFailed) else f"FAIL {name}: {type(r).__name__}: {r}")
        else:
            lines.append(r)
    if not cfg.stun:
        lines.append("STUN skipped: -stun=false")
    return ok, lines


PID1_CMDLINE = "/proc/1/cmdline"


def serve_flags(cmdline: Sequence[str]) -> list[str] | None:
    """The flags of a ``derpkit serve`` command line (``derpkit serve …`` or ``python -m
    derpkit serve …``), or None when it is some other program."""
    for i, word in enumerate(cmdline[:-1]):
        name = word.rsplit("/", 1)[-1]
        if name == "derpkit" and cmdline[i + 1] == "serve":
            return list(cmdline[i + 2:])
    return None


def pid1_serve_flags(path: str | None = None) -> list[str]:
    """The serve flags PID 1 runs with, if PID 1 is ``derpkit serve`` (in a container)."""
    try:
        with open(path or PID1_CMDLINE, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    words = [w.decode(errors="replace") for w in raw.split(b"\0") if w]
    return serve_flags(words) or []


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    timeout = 5.0
    quiet = False
    while args and args[0] in ("--timeout", "-timeout", "--quiet", "-q") or (args and args[0].startswith("--timeout=")):
        a = args.pop(0)
        if a in ("--quiet", "-q"):
            quiet = True
            continue
        value = a.split("=", 1)[1] if "=" in a else (args.pop(0) if args else "")
        try:
            timeout = float(value)
        except ValueError:
            sys.stderr.write(f"derpkit healthcheck: --timeout: not a number: {value!r}\n")
            return 2
    if not args:
        args = pid1_serve_flags()
    try:
        cfg, _notes = parse_config(args, os.environ)
    except ConfigError as e:
        sys.stderr.write(e.stderr_text())
        return e.exit_code
    try:
        ok, lines = asyncio.run(asyncio.wait_for(run_checks(cfg, timeout), timeout * 3 + 5))
    except TimeoutError:
        ok, lines = False, ["FAIL health check timed out"]
    if not quiet or not ok:
        for line in lines:
            print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
