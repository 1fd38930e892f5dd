"""The DERP map as the prober reads it: decode, validate, fetch, and keep the last good one.

Decoding follows Go's ``encoding/json`` as far as operators can notice (keys matched exactly,
then case-insensitively; unknown keys ignored; ``null`` regions dropped), so any map derpprobe
accepts loads here too. Validation is stricter in what it *says*: each bad field is named in
one line (``region 900 node 2 ("900b"): HostName is empty``) instead of a JSON error or a
probe that fails later for a reason nobody can see. Errors refuse the map (Go refuses
duplicate node names the same way); warnings are kept with the map and shown in the report.

Sources (derp-map.md §7): ``https://`` / ``http://`` URLs, ``file:///abs`` URLs, plain file
paths (a derpkit extension), and ``local``: tailscaled's LocalAPI over its Unix socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import os
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import aiohttp

__all__ = [
    "DEFAULT_LOCAL_SOCKET",
    "DerpMap",
    "MapError",
    "MapHolder",
    "Node",
    "Region",
    "fetch_map",
    "parse_map",
]

DEFAULT_LOCAL_SOCKET = "/var/run/tailscale/tailscaled.sock"
_MAX_MAP_BYTES = 16 << 20


class MapError(Exception):
    """The map could not be fetched or is unusable; ``str()`` is one line naming why."""


def _ip(text: str, version: int) -> str | None:
    """``text`` if it is an IP literal of ``version``, else None (Go treats it as "off")."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(ip) if ip.version == version else None


@dataclass(frozen=True, slots=True)
class Node:
    """One DERPNode, with the derived facts every probe needs in one place."""

    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False

    @property
    def port(self) -> int:
        """The DERP TCP port (443 when the map leaves it 0)."""
        return self.derp_port or 443

    @property
    def url(self) -> str:
        """What a Tailscale client requests: ``https://HostName[:DERPPort]/derp``."""
        host = f"[{self.host_name}]" if ":" in self.host_name else self.host_name
        port = f":{self.derp_port}" if self.derp_port not in (0, 443) else ""
        return f"https://{host}{port}/derp"

    def family_state(self, version: int) -> str:
        """``literal`` (forced address), ``dns`` (field empty) or ``off`` (``"none"`` or junk)."""
        text = self.ipv4 if version == 4 else self.ipv6
        if not text:
            return "dns"
        return "literal" if _ip(text, version) else "off"

    def literal(self, version: int) -> str | None:
        return _ip(self.ipv4 if version == 4 else self.ipv6, version)

    def dial_host(self) -> str | None:
        """The address a DERP connection dials: a forced IPv4, else a forced IPv6, else DNS.

        (Go races both families; the prober dials one, preferring IPv4 as Go's race
        usually ends. None when both families are switched off.)
        """
        v4, v6 = self.family_state(4), self.family_state(6)
        if v4 == "literal":
            return self.literal(4)
        if v4 == "dns" and not _ip(self.host_name, 6):
            return self.host_name
        if v6 == "literal":
            return self.literal(6)
        if v6 == "dns" and not _ip(self.host_name, 4):
            return self.host_name
        return None

    @property
    def stun_enabled(self) -> bool:
        return 0 <= self.stun_port <= 65535

    @property
    def stun_dest_port(self) -> int:
        return self.stun_port or 3478


@dataclass(frozen=True, slots=True)
class Region:
    region_id: int
    code: str
    name: str
    nodes: tuple[Node, ...]
    avoid: bool = False
    no_measure_no_home: bool = False


@dataclass(slots=True)
class DerpMap:
    """A decoded, validated map; ``warnings`` are problems that do not stop probing."""

    regions: dict[int, Region]
    warnings: list[str] = field(default_factory=list)
    raw: Any = None

    def nodes(self) -> list[tuple[Region, Node]]:
        return [(r, n) for _, r in sorted(self.regions.items()) for n in r.nodes]

    def node(self, name: str) -> tuple[Region, Node] | None:
        for r, n in self.nodes():
            if n.name == name:
                return r, n
        return None


# --- decoding ----------------------------------------------------------------------------------


def _get(obj: dict[str, Any], key: str) -> Any:
    """Go's field lookup: exact key first, then the first case-insensitive match."""
    if key in obj:
        return obj[key]
    low = key.lower()
    for k, v in obj.items():
        if isinstance(k, str) and k.lower() == low:
            return v
    return None


def _typed(obj: dict[str, Any], key: str, kind: type, where: str, default: Any) -> Any:
    v = _get(obj, key)
    if v is None:
        return default
    if kind is int:
        # A float must be finite first: JSON's 3e478 reads as inf, and int(inf) raises (atheris).
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)) \
                or v != int(v):
            raise MapError(f"{where}: {key} must be an integer, not {json.dumps(v)}")
        return int(v)
    if kind is bool and not isinstance(v, bool):
        raise MapError(f"{where}: {key} must be true or false, not {json.dumps(v)}")
    if kind is str and not isinstance(v, str):
        raise MapError(f"{where}: {key} must be a string, not {json.dumps(v)}")
    return v


def _node(obj: Any, where: str) -> Node:
    if not isinstance(obj, dict):
        raise MapError(f"{where}: must be a JSON object, not {json.dumps(obj)[:40]}")
    return Node(
        name=_typed(obj, "Name", str, where, ""),
        region_id=_typed(obj, "RegionID", int, where, 0),
        host_name=_typed(obj, "HostName", str, where, ""),
        cert_name=_typed(obj, "CertName", str, where, ""),
        ipv4=_typed(obj, "IPv4", str, where, ""),
        ipv6=_typed(obj, "IPv6", str, where, ""),
        stun_port=_typed(obj, "STUNPort", int, where, 0),
        stun_only=_typed(obj, "STUNOnly", bool, where, False),
        derp_port=_typed(obj, "DERPPort", int, where, 0),
        insecure_for_tests=_typed(obj, "InsecureForTests", bool, where, False),
        stun_test_ip=_typed(obj, "STUNTestIP", str, where, ""),
        can_port80=_typed(obj, "CanPort80", bool, where, False),
    )


def parse_map(data: bytes | str | Any, source: str = "the map") -> DerpMap:
    """Decode and validate a DERP map; MapError names the first field that is wrong."""
    if isinstance(data, (bytes, str)):
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise MapError(f"decoding {source} JSON: {e}") from None
    else:
        obj = data
    if obj is None:
        raise MapError(f"{source} is JSON null (tailscaled not connected to a tailnet yet?)")
    if not isinstance(obj, dict):
        raise MapError(f"{source}: top level must be a JSON object with Regions")
    regions_obj = _get(obj, "Regions")
    if not isinstance(regions_obj, dict) or not regions_obj:
        raise MapError(f"{source} has no Regions: nothing to probe")
    warnings: list[str] = []
    regions: dict[int, Region] = {}
    seen: dict[str, str] = {}
    for key, robj in regions_obj.items():
        where = f"region {key}"
        if robj is None:
            warnings.append(f"{where} is null and was dropped (as Tailscale clients do)")
            continue
        try:
            key_id = int(key)
        except ValueError:
            raise MapError(f"{where}: region keys must be decimal region IDs") from None
        if not isinstance(robj, dict):
            raise MapError(f"{where}: must be a JSON object")
        rid = _typed(robj, "RegionID", int, where, 0)
        if rid != key_id:
            warnings.append(f"{where}: RegionID is {rid}, not the key {key_id}; using the key")
        if key_id <= 0:
            warnings.append(f"{where}: region IDs start at 1 (user regions are 900-999)")
        nodes_obj = _get(robj, "Nodes") or []
        if not isinstance(nodes_obj, list):
            raise MapError(f"{where}: Nodes must be a JSON array")
        code = _typed(robj, "RegionCode", str, where, "")
        nodes: list[Node] = []
        for i, nobj in enumerate(nodes_obj):
            n = _node(nobj, f"{where} node {i + 1}")
            nw = f"{where} node {i + 1} ({json.dumps(n.name)})"
            if not n.name:
                raise MapError(f"{where} node {i + 1}: Name is empty (probe names need it)")
            if n.name in seen:
                raise MapError(f"derpmap has duplicate nodes: {n.name!r} in {seen[n.name]} and {where}")
            seen[n.name] = where
            if not n.host_name:
                raise MapError(f"{nw}: HostName is empty")
            if n.region_id != key_id:
                warnings.append(f"{nw}: RegionID is {n.region_id}, enclosing region is {key_id}")
            for version, text in ((4, n.ipv4), (6, n.ipv6)):
                if text and text != "none" and not _ip(text, version):
                    warnings.append(
                        f"{nw}: IPv{version} {json.dumps(text)} is not an IPv{version} address; "
                        "that family is treated as switched off"
                    )
            if n.family_state(4) == "off" and n.family_state(6) == "off":
                warnings.append(f"{nw}: both IPv4 and IPv6 are switched off; no client can dial it")
            if n.stun_port < -1 or n.stun_port > 65535:
                warnings.append(f"{nw}: STUNPort {n.stun_port} is out of range; STUN treated as off")
            if n.cert_name.startswith("sha256-raw:"):
                hexpart = n.cert_name[len("sha256-raw:"):]
                try:
                    ok = len(bytes.fromhex(hexpart)) == 32
                except ValueError:
                    ok = False
                if not ok:
                    raise MapError(f"{nw}: CertName {n.cert_name!r} needs 64 hex digits after sha256-raw:")
            nodes.append(n)
        regions[key_id] = Region(
            key_id, code, _typed(robj, "RegionName", str, where, ""), tuple(nodes),
            avoid=_typed(robj, "Avoid", bool, where, False),
            no_measure_no_home=_typed(robj, "NoMeasureNoHome", bool, where, False),
        )
        if nodes and all(n.stun_only for n in nodes):
            warnings.append(f"{where} ({code}): every node is STUNOnly, so the region has no DERP")
    return DerpMap(regions, warnings, obj)


# --- fetching ----------------------------------------------------------------------------------


def describe_source(source: str) -> str:
    return "tailscaled's LocalAPI" if source == "local" else source


async def _fetch_local(socket_path: str, timeout: float) -> bytes:
    if not await asyncio.to_thread(os.path.exists, socket_path):
        raise MapError(
            f"-derp-map local: no tailscaled socket at {socket_path} (is tailscaled running? "
            "set TS_SOCKET or -socket to its path)"
        )
    conn = aiohttp.UnixConnector(path=socket_path)
    try:
        async with aiohttp.ClientSession(connector=conn) as s:
            async with s.get(
                "http://local-tailscaled.sock/localapi/v0/derpmap",
                headers={"Tailscale-Cap": "130"},
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as r:
                body = await r.content.read(_MAX_MAP_BYTES)
                if r.status != 200:
                    text = body.decode(errors="replace").strip()[:200]
                    raise MapError(f"tailscaled LocalAPI /localapi/v0/derpmap: HTTP {r.status}: {text}")
                return body
    except (aiohttp.ClientError, OSError) as e:
        raise MapError(f"tailscaled LocalAPI at {socket_path}: {e}") from None


async def fetch_bytes(source: str, *, timeout: float, socket_path: str = DEFAULT_LOCAL_SOCKET) -> bytes:
    """The map's bytes from ``source``; MapError with one line on any failure."""
    if source == "local":
        return await _fetch_local(socket_path, timeout)
    u = urllib.parse.urlsplit(source)
    if u.scheme in ("http", "https"):
        try:
            async with aiohttp.ClientSession(trust_env=True) as s:
                async with s.get(source, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                    if r.status != 200:
                        raise MapError(f"fetching {source}: {r.status} {r.reason or ''}".rstrip())
                    return await r.content.read(_MAX_MAP_BYTES)
        except TimeoutError:
            raise MapError(f"fetching {source}: no answer within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise MapError(f"fetching {source}: {e}") from None
    if u.scheme == "file":
        path = urllib.parse.unquote(u.path)
        if u.netloc not in ("", "localhost"):
            raise MapError(f"{source}: file URLs need three slashes (file:///abs/path)")
    elif u.scheme == "" or (len(u.scheme) == 1 and os.name == "nt"):
        path = source
    else:
        raise MapError(f"-derp-map {source!r}: want an https:// or file:// URL, a path, or 'local'")
    try:
        return await asyncio.to_thread(_read_file, path)
    except OSError as e:
        raise MapError(f"reading {path}: {e.strerror or e}") from None


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(_MAX_MAP_BYTES)


async def fetch_map(source: str, *, timeout: float, socket_path: str = DEFAULT_LOCAL_SOCKET) -> DerpMap:
    data = await fetch_bytes(source, timeout=timeout, socket_path=socket_path)
    return parse_map(data, describe_source(source))


@dataclass
class MapHolder:
    """The current map and how fresh it is; a failed fetch never replaces a good map.

    Go keeps the last good map only after transport errors and only for 10 minutes (Q11);
    here any failure keeps it, the map probe still fails, and ``age`` says how old it is so
    readiness and the status page can tell "stale" from "fresh".
    """

    source: str
    socket_path: str = DEFAULT_LOCAL_SOCKET
    current: DerpMap | None = None
    fetched_at: float | None = None  # time.time() of the last successful fetch
    last_error: str = ""

    @property
    def age(self) -> float | None:
        return None if self.fetched_at is None else time.time() - self.fetched_at

    async def refresh(self, timeout: float) -> DerpMap:
        try:
            m = await fetch_map(self.source, timeout=timeout, socket_path=self.socket_path)
        except MapError as e:
            self.last_error = str(e)
            raise
        self.current = m
        self.fetched_at = time.time()
        self.last_error = ""
        return m
