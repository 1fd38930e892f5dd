"""The mesh key from a setec server (``-secrets-url``), as Go derper v1.102.3 gets it.

Used by ``derpkit serve`` and ``derpkit probe`` alike (derpprobe takes the same three
flags), so it lives beside ``gosyntax`` rather than in the server.

derper hands this job to setec's client library (``github.com/tailscale/setec/client/setec``,
pinned in tailscale's go.mod): a file cache, then a ``Store`` that is opened for one secret,
read once and closed. What that amounts to, and what this module reproduces (details and
sources in docs/secrets.md):

- The secret is named ``path.Join(<-secrets-path-prefix>, "meshkey")``.
- The cache path (``-secrets-cache-dir``, a *file* despite its name) is checked first: its
  parent directory is created with mode 0700, and anything there that is not a regular file
  (a directory, even a symlink) is fatal.
- A secret found in the cache is used **without asking the server**; only a missing one is
  fetched with ``POST <url>/api/get``. Failed fetches are retried for ever with a backoff
  that doubles from 1 ms to 4.096 s; only SIGINT/SIGTERM ends the wait (exit 1).
- The cache file is then rewritten (JSON, atomically, mode 0600) in setec's own format, so a
  cache written by Go derper works for derpkit and the other way round.
- The value is never polled again while the server runs.

Nothing here knows about Tailscale identities: setec authorises callers by their tailnet
address, so the request only has to reach the server (normally over the tailnet).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import posixpath
import stat
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from derpkit.atomicfile import write_atomic
from derpkit.gosyntax import go_quote

log = logging.getLogger("derpkit.serve")

#: derper's ``setecMeshKeyName``: the last element of the secret's name.
MESH_KEY_NAME = "meshkey"
#: setec's client sets this on every call; the server answers 403 without it (no browsers).
NO_BROWSERS_HEADER = "Sec-X-Tailscale-No-Browsers"
#: setec's ``initializeActive`` backoff: starts at 1 ms, doubles, stops growing past 4 s.
FIRST_RETRY = 0.001
MAX_RETRY_GROWTH = 4.0
#: Per-attempt limit. Go's ``http.DefaultClient`` has none, so a server that accepts and never
#: answers stalls derper for ever; derpkit gives up on that attempt and retries instead.
ATTEMPT_TIMEOUT = 30.0
_MAX_VERSION = 2**32 - 1  # api.SecretVersion is a uint32


class SetecError(Exception):
    """Why a fetch or the cache failed; the text follows the Go client's wording."""


class SetecStopped(Exception):
    """The wait for the secret was ended by a signal (Go: the context was cancelled)."""


def secret_name(prefix: str) -> str:
    """Go's ``path.Join(prefix, "meshkey")``: empty parts dropped, the result cleaned."""
    joined = "/".join(p for p in (prefix, MESH_KEY_NAME) if p)
    cleaned = posixpath.normpath(joined)
    # POSIX keeps exactly two leading slashes; Go's path.Clean makes them one.
    if cleaned.startswith("//") and not cleaned.startswith("///"):
        cleaned = cleaned[1:]
    return cleaned


def check_url(url: str) -> str | None:
    """Why ``url`` cannot be a setec server URL, or None.

    Go accepts any string here and then retries "unsupported protocol scheme" for ever;
    derpkit refuses at start instead (config/settings.py uses this for -secrets-url).
    """
    if not url:
        return None
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        return f"not a URL: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL of a setec server"
    return None


@dataclass
class CachedSecret:
    """One entry of setec's cache file: the value, its version, when it was last read."""

    value: bytes
    version: int
    last_access: int

    def to_json(self) -> dict[str, Any]:
        return {
            "secret": {"Value": base64.b64encode(self.value).decode(), "Version": self.version},
            # setec tags the field `json:"lastAccess,string"`: an integer inside a string.
            "lastAccess": str(self.last_access),
        }


def _field(obj: dict[str, Any], name: str) -> Any:
    """Go's encoding/json field lookup: the exact name, else a case-insensitive match."""
    if name in obj:
        return obj[name]
    for k, v in obj.items():
        if k.lower() == name.lower():
            return v
    return None


def _decode_bytes(v: Any) -> bytes:
    """A Go ``[]byte`` in JSON: standard base64 with padding, or null."""
    if v is None:
        return b""
    if not isinstance(v, str):
        raise ValueError("Value: want a base64 string")
    try:
        return base64.b64decode(v.replace("\r", "").replace("\n", ""), validate=True)
    except binascii.Error as e:
        raise ValueError(f"Value: {e}") from None


def _decode_version(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_VERSION:
        raise ValueError(f"Version: want an unsigned 32-bit integer, got {v!r}")
    return v


def decode_secret_value(obj: Any) -> tuple[bytes, int]:
    """An ``api.SecretValue`` object: ``{"Value": <base64>, "Version": <uint32>}``."""
    if not isinstance(obj, dict):
        raise ValueError("want a JSON object")
    return _decode_bytes(_field(obj, "Value")), _decode_version(_field(obj, "Version"))


def decode_cache(data: bytes) -> dict[str, CachedSecret | None]:
    """setec's cache file. Raises ValueError where Go's json.Unmarshal would fail.

    An entry may decode to None (JSON null, or a null "secret"); the caller then discards
    the whole cache, as setec's ``isActiveSetValid`` does.
    """
    obj = json.loads(data)
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise ValueError("want a JSON object")
    out: dict[str, CachedSecret | None] = {}
    for name, entry in obj.items():
        if entry is None:
            out[name] = None
            continue
        if not isinstance(entry, dict):
            raise ValueError(f"{name!r}: want a JSON object")
        secret = _field(entry, "secret")
        last = _field(entry, "lastAccess")
        if last is None:
            last_access = 0
        elif isinstance(last, str) and last.isascii() and last.lstrip("-").isdigit():
            last_access = int(last)
        else:
            raise ValueError(f"{name!r}: lastAccess: want an integer inside a string")
        if secret is None:
            out[name] = None
            continue
        value, version = decode_secret_value(secret)
        out[name] = CachedSecret(value, version, last_access)
    return out


class FileCache:
    """setec's ``FileCache``: one file, rewritten whole and atomically with mode 0600."""

    def __init__(self, path: str) -> None:
        """setec's ``NewFileCache``: make the parent directory (0700), refuse a non-file."""
        self.path = path
        parent = os.path.dirname(path) or "."
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SetecError(f"cache directory: {e}") from None
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            raise SetecError("cache path exists and is not a regular file")

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def write(self, data: bytes) -> None:
        """Write beside the target and rename over it, as Go's atomicfile does."""
        write_atomic(self.path, data, 0o600)


class SetecClient:
    """The one call derper makes: ``POST <server>/api/get`` for the active version."""

    def __init__(self, server: str, *, timeout: float = ATTEMPT_TIMEOUT) -> None:
        self.server = server
        self.timeout = timeout

    @property
    def get_url(self) -> str:
        # The Go client: "%s/%s" of the URL without a trailing slash and the path without a
        # leading one, so a path prefix in -secrets-url is kept.
        return self.server.removesuffix("/") + "/api/get"

    async def get(self, session: aiohttp.ClientSession, name: str) -> tuple[bytes, int]:
        """Value and version of the active version of ``name``; SetecError on any failure."""
        body = json.dumps(
            {"Name": name, "Version": 0, "UpdateIfChanged": False}, separators=(",", ":")
        ).encode()  # byte for byte what Go's encoding/json sends
        headers = {"Content-Type": "application/json", NO_BROWSERS_HEADER: "setec"}
        try:
            async with session.post(
                self.get_url, data=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as r:
                raw = await r.read()
                status = r.status
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            detail = str(e) or type(e).__name__
            raise SetecError(f'making HTTP request: Post "{self.get_url}": {detail}') from None
        if status != 200:
            # The Go client's mapping of status codes to its sentinel errors.
            if status == 404:
                raise SetecError("not found")
            if status == 403:
                raise SetecError("access denied")
            if status == 304:
                raise SetecError("value not changed")
            text = raw.strip().decode(errors="replace")
            raise SetecError(f"request returned status {status}: {go_quote(text)}")
        try:
            return decode_secret_value(json.loads(raw))
        except ValueError as e:
            raise SetecError(f"unmarshaling response: {e}") from None


def _load_cache(cache: FileCache) -> dict[str, CachedSecret]:
    """The cache as setec's NewStore reads it: every problem is a warning, never fatal."""
    try:
        data = cache.read()
    except OSError as e:
        log.warning("WARNING: error loading cache: %s (continuing)", e)
        return {}
    if not data:
        return {}
    try:
        entries = decode_cache(data)
    except ValueError as e:
        log.warning("WARNING: error decoding cache: %s (continuing)", e)
        return {}
    if any(not name or entry is None for name, entry in entries.items()):
        log.warning("WARNING: cache is not valid; discarding it")
        return {}
    return {name: entry for name, entry in entries.items() if entry is not None}


async def fetch_mesh_secret(
    url: str,
    prefix: str,
    cache_path: str,
    stop: asyncio.Event,
    *,
    client: SetecClient | None = None,
    now: Callable[[], float] = time.time,
) -> bytes:
    """The mesh-key secret's raw value, from the cache or the setec server.

    Blocks until it is available, as derper does. Raises SetecError for a cache path that
    cannot be used (derper: ``NewFileCache: ...``) and SetecStopped when ``stop`` is set
    during the wait (derper: ``NewStore: ...`` after SIGINT/SIGTERM).
    """
    name = secret_name(prefix)
    cache = FileCache(cache_path)
    log.info("Setting up setec store from %s", go_quote(url))
    entries = _load_cache(cache)
    entry = entries.get(name)
    if entry is None:
        client = client or SetecClient(url)
        value, version = await _fetch_until_available(client, name, stop)
        entry = CachedSecret(value, version, 0)
        entries[name] = entry
    # derper reads the secret once (which stamps lastAccess) and closes the store, which
    # flushes the whole cache, other names included.
    entry.last_access = int(now())
    data = json.dumps({k: v.to_json() for k, v in sorted(entries.items())}, separators=(",", ":"))
    try:
        cache.write(data.encode())
    except OSError as e:
        log.warning("WARNING: error flushing cache: updating cache: %s", e)
    log.info("Got mesh key from setec store")
    return entry.value


async def _fetch_until_available(client: SetecClient, name: str, stop: asyncio.Event) -> tuple[bytes, int]:
    """setec's ``initializeActive`` for one secret: retry every failure until ``stop``."""
    wait = FIRST_RETRY
    explained = ""
    async with aiohttp.ClientSession() as session:
        while True:
            if stop.is_set():
                raise SetecStopped(f"stopped by a signal while waiting for secret {go_quote(name)}")
            get = asyncio.ensure_future(client.get(session, name))
            stopped = asyncio.ensure_future(stop.wait())
            try:
                await asyncio.wait({get, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopped.cancel()
            if not get.done():
                get.cancel()
                raise SetecStopped(f"stopped by a signal while waiting for secret {go_quote(name)}")
            try:
                return get.result()
            except SetecError as e:
                log.warning("[store] error fetching %s: %s (retrying)", go_quote(name), e)
                if str(e) != explained:
                    # Go's line alone does not say which setting is involved; say it once
                    # per distinct error, not on every retry.
                    explained = str(e)
                    log.warning(
                        "derpkit: -secrets-url (env SECRETS_URL) %s: no mesh key from setec yet "
                        "(secret %s: %s); start-up waits for it, as derper does; "
                        "SIGINT/SIGTERM gives up with exit 1",
                        client.server, go_quote(name), e,
                    )
            try:
                await asyncio.wait_for(stop.wait(), wait)
            except TimeoutError:
                pass
            if wait < MAX_RETRY_GROWTH:
                wait += wait
