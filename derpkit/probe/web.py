"""The long-running prober's HTTP side (aiohttp): derpprobe's endpoints plus readiness and JSON.

derpprobe's paths and answers (derpprobe.md §3.3-3.5): ``/`` (and any unmatched path) the
status page, ``/healthz`` always ``ok`` (liveness), ``/debug/probe-run?name=`` (200 / 424 /
400 / 404; JSON only for ``Accept: application/json`` exactly), ``/debug/probe-all``,
``/debug/varz``. Added: ``/readyz`` (503 while the map is stale or any probe's latest run
failed, for load balancers and Kubernetes) and ``/status.json`` (every record, no runs
triggered).

``/debug/`` is reachable, as in derpprobe, from loopback, Tailscale addresses, the IP in
``TS_ALLOW_DEBUG_IP`` and the CIDRs in ``TS_DEBUG_TRUSTED_CIDRS``; a request carrying
``X-Forwarded-For`` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import signal
import time
from typing import Any

from aiohttp import web

from derpkit.gosyntax import format_duration, split_host_port

from .flags import Options
from .metrics import exposition
from .model import Probe
from .page import render_status
from .report import json_report
from .scheduler import Prober

__all__ = ["make_app", "readiness", "serve"]

log = logging.getLogger("derpkit.probe")

_TAILSCALE_NETS = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("fd7a:115c:a1e0::/48"))


def _debug_allowed(request: web.Request) -> bool:
    if "X-Forwarded-For" in request.headers:
        return False
    peer = request.remote or ""
    try:
        ip = ipaddress.ip_address(peer.split("%")[0])
    except ValueError:
        return False
    if ip.is_loopback or any(ip in n for n in _TAILSCALE_NETS):
        return True
    if os.environ.get("TS_ALLOW_DEBUG_IP") == str(ip):
        return True
    for cidr in filter(None, (c.strip() for c in os.environ.get("TS_DEBUG_TRUSTED_CIDRS", "").split(","))):
        with contextlib.suppress(ValueError):
            if ip in ipaddress.ip_network(cidr, strict=False):
                return True
    return False


@web.middleware
async def _debug_acl(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/debug/") and not _debug_allowed(request):
        return web.Response(status=403, text="debug access denied\n")
    return await handler(request)


def readiness(prober: Prober, stale_after: float) -> tuple[bool, list[str]]:
    """Ready when the map is fresh and every probe's latest run passed; else the reasons."""
    reasons: list[str] = []
    age = prober.holder.age
    if age is None:
        reasons.append("no DERP map loaded yet" + (f": {prober.holder.last_error}" if prober.holder.last_error else ""))
    elif age > stale_after:
        reasons.append(f"DERP map is {age:.0f} s old (stale after {stale_after:g} s): {prober.holder.last_error}")
    for p in sorted(prober.probes.values(), key=lambda p: p.name):
        if p.last is not None and not p.last.ok:
            reasons.append(f"{p.name}: {p.last.diagnosis or p.last.error}")
    return not reasons, reasons


def _run_response(p: Probe, prev_ratio: float, prev_median: float, accept_json: bool) -> web.Response:
    last = p.last
    assert last is not None
    status = 200 if last.ok else 424
    if accept_json:
        body = {"ProbeInfo": p.info(), "PreviousSuccessRatio": prev_ratio,
                "PreviousMedianLatency": int(prev_median * 1e9)}
        return web.json_response(body, status=status)
    summary = (f"Last {len(p.recent)} probes (including this one): success rate "
               f"{p.success_ratio() * 100:g}%, median latency {format_duration(int(p.median_latency() * 1e9))}")
    if last.ok:
        text = f"Probe succeeded in {format_duration(int(last.latency * 1e9))}\n{summary}\n"
    else:
        text = f"Probe failed: {last.error}\n{summary}\n"
        if last.diagnosis:
            text += f"Diagnosis: {last.diagnosis}\n"
    return web.Response(status=status, text=text)


def make_app(prober: Prober, opts: Options) -> web.Application:
    app = web.Application(middlewares=[_debug_acl])

    async def status_page(request: web.Request) -> web.Response:
        ready, reasons = readiness(prober, opts.stale_limit)
        return web.Response(text=render_status(prober, ready, reasons), content_type="text/html")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        ready, reasons = readiness(prober, opts.stale_limit)
        return web.json_response({"ready": ready, "reasons": reasons}, status=200 if ready else 503)

    async def status_json(request: web.Request) -> web.Response:
        body = json_report(prober)
        body["ready"], body["not_ready_because"] = readiness(prober, opts.stale_limit)
        return web.Response(text=json.dumps(body, default=str), content_type="application/json")

    async def probe_run(request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            return web.Response(status=400, text="missing name parameter\n")
        p = prober.probes.get(name)
        if p is None or p.continuous:
            return web.Response(status=404, text=f'unknown probe "{name}"\n')
        prev_ratio, prev_median = p.success_ratio(), p.median_latency()
        await prober.run(p)
        return _run_response(p, prev_ratio, prev_median, request.headers.get("Accept") == "application/json")

    async def probe_all(request: web.Request) -> web.Response:
        exclude = set(request.query.getall("exclude", []))
        chosen = [p for p in prober.probes.values() if not p.continuous and p.name not in exclude]
        prev = {p.name: (p.success_ratio(), p.median_latency()) for p in chosen}
        await asyncio.gather(*(prober.run(p) for p in chosen))
        prober.correlate()
        results = {p.name: {"ProbeInfo": p.info(), "PreviousSuccessRatio": prev[p.name][0],
                            "PreviousMedianLatency": int(prev[p.name][1] * 1e9)} for p in chosen}
        ok = all(p.last is not None and p.last.ok for p in chosen)
        return web.json_response({"Results": results}, status=200 if ok else 424)

    async def varz(request: web.Request) -> web.Response:
        return web.Response(body=exposition(prober), content_type="text/plain", charset="utf-8")

    async def debug_index(request: web.Request) -> web.Response:
        up = format_duration(int((time.time() - prober.started) * 1e9))
        html = (f"<html><body><h1>derpkit probe debug</h1><p>Uptime: {up}</p><ul>"
                '<li><a href="/debug/varz">/debug/varz</a></li>'
                '<li><a href="/debug/probe-all">/debug/probe-all</a></li></ul></body></html>')
        return web.Response(text=html, content_type="text/html")

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status.json", status_json)
    app.router.add_get("/debug/probe-run", probe_run)
    app.router.add_get("/debug/probe-all", probe_all)
    app.router.add_get("/debug/varz", varz)
    app.router.add_get("/debug/", debug_index)
    app.router.add_get("/{tail:.*}", status_page)
    return app


def _listen_addr(listen: str) -> tuple[str | None, int]:
    host, port = split_host_port(listen)
    return (host or None), int(port)


async def serve(prober: Prober, opts: Options, *, ready: asyncio.Future[int] | None = None) -> int:
    """Run the probes and the HTTP server until SIGINT/SIGTERM; ``ready`` gets the bound port."""
    try:
        host, port = _listen_addr(opts.listen)
    except ValueError as e:
        log.error("-listen %r: %s", opts.listen, e)
        return 2
    app = make_app(prober, opts)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        log.error("-listen %s: %s", opts.listen, e.strerror or e)
        return 1
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    log.info("Listening on %s", opts.listen if port else f"port {bound}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await prober.start()
        if ready is not None and not ready.done():
            ready.set_result(bound)
        await stop.wait()
    finally:
        await prober.stop()
        await runner.cleanup()
    return 0
