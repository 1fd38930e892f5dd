"""Client admission: ``-verify-clients``, ``-verify-client-url`` and ``-allowed-keys-file``.

derper's rules (spec derp-protocol §7, derper-cli §6), after the handshake and before a
client is registered; mesh peers never get here (conn.py admits them first):

1. ``-verify-clients``: ask the local tailscaled's LocalAPI ``whois`` for the node key over
   its Unix socket. 200 admits; 404 and every failure reject (fails closed).
2. ``-verify-client-url``: POST ``{"NodePublic":…,"Source":…}`` to the admission controller
   with a 5 s timeout. 200 + ``{"Allow":true}`` admits. A non-200 status or a bad body
   rejects even with fail-open; only a request that could not be completed (refused, DNS,
   timeout, TLS) honours ``-verify-client-url-fail-open``.

Both run, in that order, and both must pass.

derpkit extension, ``-allowed-keys-file``: a file of ``nodekey:<hex>`` lines (``#``
comments and blank lines ignored), re-read whenever it changes. A listed key passes step 1
without asking tailscaled, so a relay can admit its own clients without running
tailscaled. Without ``-verify-clients`` the file is the whole of step 1: an unlisted key
is refused. Step 2 still applies to everyone.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import yarl

from derpkit.protocol.handshake import ClientInfo
from derpkit.protocol.keys import KeyError_, NodePublic
from derpkit.server import metrics

log = logging.getLogger("derpkit.server")

#: tailscaled's LocalAPI socket on Linux (derper's default when -socket is empty).
DEFAULT_SOCKET = "/var/run/tailscale/tailscaled.sock"
#: Capability version sent in ``Tailscale-Cap`` (derper at the spec's snapshot sends 145).
TAILSCALE_CAP = 145
#: derper: 5 s for the whole admission-controller exchange.
ADMISSION_TIMEOUT = 5.0
#: derper reads at most this much of the controller's answer.
ADMISSION_BODY_LIMIT = 4 << 10
#: No deadline of derper's own bounds the LocalAPI call; the 10 s handshake deadline does.
LOCALAPI_TIMEOUT = 5.0

AdmitFn = Callable[[NodePublic, ClientInfo, "tuple[str, int] | None"], Awaitable["str | None"]]


def default_socket_path() -> str:
    """derper's rule on Linux: the /var/run path, or ``tailscaled.sock`` if /var/run is missing."""
    return DEFAULT_SOCKET if os.path.isdir("/var/run") else "tailscaled.sock"


def _client_ip(remote: tuple[str, int] | None) -> str:
    if not remote:
        return ""
    ip = remote[0].split("%")[0]
    if ip.startswith("::ffff:") and "." in ip:
        ip = ip[len("::ffff:") :]
    return ip


def _error_text(body: bytes) -> str:
    """tailscaled's error body: ``{"error": "..."}`` or plain text (as Go's client reads it)."""
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and isinstance(obj.get("error"), str) and obj["error"]:
            return obj["error"]
    except ValueError:
        pass
    return body.decode(errors="replace").strip()


class LocalTailscaled:
    """``-verify-clients``: tailscaled LocalAPI whois over a Unix socket."""

    def __init__(self, socket_path: str = "", timeout: float = LOCALAPI_TIMEOUT) -> None:
        self.socket_path = socket_path or default_socket_path()
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path),
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            )
        return self._session

    async def check(self, key: NodePublic) -> str | None:
        """None if tailscaled knows the key, else derper's refusal text."""
        url = "http://local-tailscaled.sock/localapi/v0/whois?addr=" + urllib.parse.quote(str(key), safe="")
        try:
            # encoded=True keeps Go's url.QueryEscape form (nodekey%3A...) on the wire.
            async with self._get_session().get(
                yarl.URL(url, encoded=True), headers={"Tailscale-Cap": str(TAILSCALE_CAP)}
            ) as r:
                body = await r.read()
                if r.status == 404:
                    return f"peer {key} not authorized (not found in local tailscaled)"
                if r.status != 200:
                    err = f"{r.status} {r.reason or ''}: {_error_text(body)}".replace("  ", " ")
                else:
                    try:
                        json.loads(body)
                        return None
                    except ValueError as e:
                        err = f"failed to unmarshal JSON into *apitype.WhoIsResponse: {e}"
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            err = str(e) or type(e).__name__
        if "invalid 'addr' parameter" in err:
            return "tailscaled version is too old (out of sync with derper binary)"
        return f"failed to query local tailscaled status for {key}: {err}"

    async def self_key(self) -> NodePublic:
        """tailscaled's own node key (``status?peers=false`` → ``Self.PublicKey``)."""
        url = "http://local-tailscaled.sock/localapi/v0/status?peers=false"
        async with self._get_session().get(url, headers={"Tailscale-Cap": str(TAILSCALE_CAP)}) as r:
            body = await r.read()
            if r.status != 200:
                raise OSError(f"{r.status} {r.reason}: {_error_text(body)}")
        return NodePublic.parse(json.loads(body)["Self"]["PublicKey"])

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class AdmissionController:
    """``-verify-client-url``: POST the key and source IP, expect ``{"Allow": true}``."""

    def __init__(self, url: str, fail_open: bool = True, timeout: float = ADMISSION_TIMEOUT) -> None:
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # trust_env: Go's default client honours HTTP(S)_PROXY / NO_PROXY.
            self._session = aiohttp.ClientSession(trust_env=True)
        return self._session

    async def check(self, key: NodePublic, remote: tuple[str, int] | None) -> str | None:
        ip = _client_ip(remote)
        body = json.dumps({"NodePublic": str(key), "Source": ip}).encode()
        try:
            async with asyncio.timeout(self.timeout):
                async with self._get_session().post(self.url, data=body) as r:
                    if r.status != 200:
                        return f"admission controller: {r.status} {r.reason or ''}".rstrip()
                    raw = await r.content.read(ADMISSION_BODY_LIMIT)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            err = str(e) or type(e).__name__
            if isinstance(e, TimeoutError):
                err = f"timeout after {self.timeout:g}s"
            if self.fail_open:
                log.info("admission controller unreachable; allowing client %s", key)
                return None
            return f"admission controller {self.url}: {err}"
        try:
            allow = _decode_allow(raw)
        except ValueError as e:
            return f"admission controller: bad response: {e}"
        if not allow:
            return f"admission controller: {key}/{ip} not allowed"
        return None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _decode_allow(raw: bytes) -> bool:
    """Go's json.Decoder into ``struct{Allow bool}``: first JSON value, keys case-insensitive."""
    text = raw.decode("utf-8", errors="replace").lstrip()
    if not text:
        raise ValueError("EOF")
    obj, _ = json.JSONDecoder().raw_decode(text)
    if obj is None:
        return False
    if not isinstance(obj, dict):
        raise ValueError(f"cannot unmarshal {type(obj).__name__} into DERPAdmitClientResponse")
    allow = False
    for k, v in obj.items():
        if k.lower() == "allow":
            if v is None:
                continue
            if not isinstance(v, bool):
                raise ValueError(f"cannot unmarshal {type(v).__name__} into field Allow of type bool")
            allow = v
    return allow


class AllowedKeys:
    """derpkit's ``-allowed-keys-file``: node keys admitted without tailscaled.

    The file is stat'ed at most every ``check_interval`` seconds when a client arrives and
    re-read when its mtime, size or inode changed. A file that cannot be read or parsed on
    reload keeps the previous list (and says so in the log); at start-up it is fatal.
    """

    def __init__(self, path: str, check_interval: float = 1.0) -> None:
        self.path = path
        self.check_interval = check_interval
        self.keys: frozenset[bytes] = frozenset()
        self._sig: tuple[int, int, int] | None = None
        self._checked = -1e9
        self.reloads = 0
        self.reload_errors = 0
        self._load(strict=True)

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self, strict: bool) -> None:
        try:
            sig = self._stat()
            with open(self.path, encoding="utf-8") as f:
                keys = parse_allowed_keys(f.read(), self.path)
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(f"-allowed-keys-file {self.path}: {e}") from None
            self.reload_errors += 1
            log.warning("allowed keys: reload of %s failed, keeping %d keys: %s", self.path, len(self.keys), e)
            try:
                self._sig = self._stat()  # do not retry until it changes again
            except OSError:
                pass
            return
        self.keys = keys
        self._sig = sig
        if not strict:
            self.reloads += 1
        log.info("allowed keys: %d node keys from %s", len(keys), self.path)

    def maybe_reload(self, now: float | None = None) -> None:
        loop_now = now if now is not None else _monotonic()
        if loop_now - self._checked < self.check_interval:
            return
        self._checked = loop_now
        try:
            sig = self._stat()
        except OSError:
            sig = None
        if sig != self._sig:
            self._load(strict=False)

    def __contains__(self, key: NodePublic) -> bool:
        self.maybe_reload()
        return key.raw in self.keys


def _monotonic() -> float:
    import time

    return time.monotonic()


def parse_allowed_keys(text: str, path: str = "") -> frozenset[bytes]:
    keys: set[bytes] = set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            keys.add(NodePublic.parse(line).raw)
        except (KeyError_, ValueError) as e:
            raise ValueError(f"line {n}: {e}") from None
    return frozenset(keys)


class Admission:
    """The ``admit`` hook for ``DerpServer``: allowlist / tailscaled, then the URL."""

    def __init__(
        self,
        *,
        tailscaled: LocalTailscaled | None = None,
        controller: AdmissionController | None = None,
        allowed: AllowedKeys | None = None,
    ) -> None:
        self.tailscaled = tailscaled
        self.controller = controller
        self.allowed = allowed
        self.rejected = 0
        self.admitted = 0

    @property
    def active(self) -> bool:
        return any((self.tailscaled, self.controller, self.allowed))

    async def __call__(self, key: NodePublic, info: ClientInfo, remote: tuple[str, int] | None) -> str | None:
        refusal = await self.check(key, remote)
        if refusal:
            self.rejected += 1
        else:
            self.admitted += 1
        return refusal

    async def check(self, key: NodePublic, remote: tuple[str, int] | None) -> str | None:
        listed = self.allowed is not None and key in self.allowed
        if not listed:
            if self.tailscaled is not None:
                refusal = await self.tailscaled.check(key)
                if refusal:
                    return refusal
            elif self.allowed is not None:
                return f"peer {key} not authorized (not in {self.allowed.path})"
        if self.controller is not None:
            return await self.controller.check(key, remote)
        return None

    async def self_check(self) -> str | None:
        """/debug/check with -verify-clients: would tailscaled admit its own node key?"""
        if self.tailscaled is None:
            return None
        try:
            key = await self.tailscaled.self_key()
        except Exception as e:  # noqa: BLE001
            return f"localClient.Status: {e}"
        refusal = await self.check(key, ("::1", 0))
        return f"verifyClient for self nodekey: {refusal}" if refusal else None

    async def self_check_list(self) -> list[str]:
        problem = await self.self_check()
        return [problem] if problem else []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        for part in (self.tailscaled, self.controller):
            if part is not None:
                await part.close()

    def families(self) -> Iterator[metrics.Family]:
        yield metrics.counter("derpkit_admission_admitted", self.admitted, "clients admitted by the admission checks")
        yield metrics.counter("derpkit_admission_rejected", self.rejected, "clients refused by the admission checks")
        if self.allowed is not None:
            yield metrics.gauge("derpkit_allowed_keys", len(self.allowed.keys), "node keys in -allowed-keys-file")
            yield metrics.counter("derpkit_allowed_keys_reloads", self.allowed.reloads, "reloads of -allowed-keys-file")
            yield metrics.counter(
                "derpkit_allowed_keys_reload_errors", self.allowed.reload_errors,
                "reloads of -allowed-keys-file that failed (previous list kept)",
            )


def build_admission(cfg: Any) -> Admission:
    """The admission checks a ``ServeConfig`` asks for (ValueError for a bad keys file)."""
    return Admission(
        tailscaled=LocalTailscaled(cfg.socket) if cfg.verify_clients else None,
        controller=AdmissionController(cfg.verify_client_url, cfg.verify_client_url_fail_open)
        if cfg.verify_client_url else None,
        allowed=AllowedKeys(cfg.allowed_keys_file) if cfg.allowed_keys_file else None,
    )
