"""One ``/debug/varz`` for all workers: whichever worker answers sums every worker's figures.

The answering worker reads each sibling's own figures from its private loopback listener
(``/debug/varz?worker=local``, which any worker also answers for itself) and merges them
sample by sample: counters, gauges and histogram buckets add up; a few values that describe
the process or a setting rather than traffic are combined otherwise (``COMBINE``). Then it
adds ``derpkit_workers``, ``derpkit_worker_up{worker}`` and a per-worker copy of the main
traffic figures (``<name>_by_worker``), so an operator sees both the server and its parts.

Only a scrape pays for this (one loopback request per sibling), never the packet path.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from derpkit.server.config import Knobs
from derpkit.server.frontdoor.http import debug_allowed

#: How a sample is combined across workers when it is not a plain sum.
COMBINE: dict[str, str] = {
    "process_start_unix_time": "min",
    "process_start_time_seconds": "min",
    "uptime_sec": "max",
    "node_boot_time_seconds": "first",
    "version": "first",
    "python_version": "first",
    "process_max_fds": "first",
    "process_virtual_memory_max_bytes": "first",
    "derp_rate_limit_per_client_bytes_per_second": "first",
    "derp_rate_limit_per_client_burst_bytes": "first",
    "derpkit_tls_cert_not_after_seconds": "min",
    "derpkit_allowed_keys": "first",
    "derp_average_queue_duration_ms": "mean",
}

#: Figures also shown per worker, as ``<name>_by_worker{worker="i"}``.
BY_WORKER = (
    "derp_current_connections",
    "derp_clients_local",
    "derp_packets_received",
    "derp_packets_sent",
    "derp_packets_forwarded_in",
    "derp_packets_forwarded_out",
    "process_cpu_seconds_total",
    "derpkit_resident_memory_bytes",
)

SIBLING_TIMEOUT = 2.0
_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{.*\})? (\S+)$")


class Family:
    __slots__ = ("name", "help", "type", "samples")

    def __init__(self, name: str) -> None:
        self.name = name
        self.help = ""
        self.type = "untyped"
        #: (sample name, label text) -> value per worker, in first-seen order
        self.samples: dict[tuple[str, str], list[float]] = {}


def _number(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    try:
        return int(text)
    except ValueError:
        return float(text)


def parse(text: str, families: dict[str, Family]) -> None:
    """Add one worker's Prometheus text to ``families`` (samples appended per key)."""
    current: Family | None = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            name = parts[2]
            current = families.get(name)
            if current is None:
                current = families[name] = Family(name)
            rest = parts[3] if len(parts) > 3 else ""
            if line.startswith("# HELP "):
                current.help = rest
            else:
                current.type = rest
            continue
        m = _SAMPLE.match(line)
        if m is None or current is None:
            continue
        current.samples.setdefault((m.group(1), m.group(2) or ""), []).append(_number(m.group(3)))


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _combine(name: str, values: list[float]) -> float:
    how = COMBINE.get(name, "sum")
    if how == "first":
        return values[0]
    if how == "min":
        return min(values)
    if how == "max":
        return max(values)
    if how == "mean":
        return sum(values) / len(values)
    return sum(values)


def merge(texts: Mapping[int, str | None], count: int) -> str:
    """The summed exposition for ``texts`` (worker index -> its varz, None if unreachable)."""
    families: dict[str, Family] = {}
    per_worker: dict[str, dict[int, float]] = {name: {} for name in BY_WORKER}
    for index in sorted(texts):
        text = texts[index]
        if text is None:
            continue
        mine: dict[str, Family] = {}
        parse(text, mine)
        for name in BY_WORKER:
            fam = mine.get(name)
            if fam is not None and (name, "") in fam.samples:
                per_worker[name][index] = fam.samples[(name, "")][0]
        for name, fam in mine.items():
            into = families.get(name)
            if into is None:
                into = families[name] = Family(name)
                into.help, into.type = fam.help, fam.type
            for key, vals in fam.samples.items():
                into.samples.setdefault(key, []).extend(vals)
    out: list[str] = []
    for fam in families.values():
        out.append(f"# HELP {fam.name} {fam.help}")
        out.append(f"# TYPE {fam.name} {fam.type}")
        for (sample, labels), vals in fam.samples.items():
            out.append(f"{sample}{labels} {_fmt(_combine(fam.name, vals))}")
    out.append("# HELP derpkit_workers server processes configured with -workers")
    out.append("# TYPE derpkit_workers gauge")
    out.append(f"derpkit_workers {count}")
    out.append("# HELP derpkit_worker_up whether this scrape reached the worker")
    out.append("# TYPE derpkit_worker_up gauge")
    for index in range(count):
        out.append(f'derpkit_worker_up{{worker="{index}"}} {int(texts.get(index) is not None)}')
    for name, values in per_worker.items():
        if not values:
            continue
        src = families.get(name)
        kind = src.type if src is not None else "untyped"
        out.append(f"# HELP {name}_by_worker {name}, per worker")
        out.append(f"# TYPE {name}_by_worker {kind}")
        for index in sorted(values):
            out.append(f'{name}_by_worker{{worker="{index}"}} {_fmt(values[index])}')
    return "\n".join(out) + "\n"


async def fetch_local(port: int, session: aiohttp.ClientSession) -> str | None:
    """A sibling's own figures, or None when it does not answer in time."""
    try:
        async with session.get(
            f"http://127.0.0.1:{port}/debug/varz?worker=local",
            timeout=aiohttp.ClientTimeout(total=SIBLING_TIMEOUT),
        ) as r:
            if r.status != 200:
                return None
            return await r.text()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def varz_middleware(index: int, count: int, siblings: Callable[[], Mapping[int, int]], knobs: Knobs) -> object:
    """aiohttp middleware: ``/debug/varz`` sums the workers; ``?worker=local`` is this one."""

    @web.middleware
    async def summed_varz(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.path != "/debug/varz"
            or request.query.get("worker") == "local"
            or not debug_allowed(request, knobs)
        ):
            return await handler(request)
        local = await handler(request)
        if not isinstance(local, web.Response) or local.status != 200 or local.text is None:
            return local
        ports = dict(siblings())
        texts: dict[int, str | None] = {i: None for i in range(count)}
        texts[index] = local.text
        async with aiohttp.ClientSession() as session:
            got = await asyncio.gather(*(fetch_local(p, session) for p in ports.values()))
        for i, text in zip(ports, got, strict=True):
            texts[i] = text
        headers = {k: v for k, v in local.headers.items() if k.lower() not in ("content-type", "content-length")}
        return web.Response(text=merge(texts, count), content_type="text/plain", charset="utf-8", headers=headers)

    return summed_varz
