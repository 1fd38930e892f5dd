"""The status page: one self-contained HTML document, no CDN, no script needed to read it.

derpprobe's page loads its sort script from a public CDN (Q19) and shows only the last ten
results. This one is rendered on the server: a summary (map source and age, readiness), the
warnings, a per-region roll-up, then one row per probe with status, latency, last error,
diagnosis and an inline-SVG latency history chart (failed runs drawn as red marks on the
baseline). It refreshes itself every 15 s.
"""

from __future__ import annotations

import html
import time

from derpkit.gosyntax import format_duration

from .model import Probe
from .scheduler import Prober

__all__ = ["latency_chart", "render_status"]

_W, _H = 240, 40


def latency_chart(p: Probe) -> str:
    """An SVG polyline of recent latencies; red ticks where a run failed."""
    pts = list(p.chart)
    if not pts:
        return '<svg class="chart" width="240" height="40" data-points="0"></svg>'
    lat = [v for _, v in pts if v is not None]
    top = max(lat) if lat else 1.0
    top = top if top > 0 else 1.0
    n = len(pts)
    step = _W / max(1, n - 1)
    line: list[str] = []
    fails: list[str] = []
    for i, (_, v) in enumerate(pts):
        x = round(i * step, 1)
        if v is None:
            fails.append(f'<line class="fail" x1="{x}" y1="{_H}" x2="{x}" y2="{_H - 12}" stroke="#c00" stroke-width="2"/>')
        else:
            line.append(f"{x},{round(_H - 2 - (v / top) * (_H - 6), 1)}")
    poly = f'<polyline class="latency" fill="none" stroke="#2a6" stroke-width="1.5" points="{" ".join(line)}"/>' if line else ""
    title = f"<title>max {format_duration(int(top * 1e9))} over {n} runs</title>"
    return (f'<svg class="chart" width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" data-points="{n}" '
            f'data-failures="{len(fails)}" xmlns="http://www.w3.org/2000/svg">{title}'
            f'<rect width="{_W}" height="{_H}" fill="#f6f6f6"/>{poly}{"".join(fails)}</svg>')


def _age(t: float | None) -> str:
    if t is None:
        return "never"
    return format_duration(int(max(0.0, time.time() - t)) * 10**9) + " ago"


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .5em;vertical-align:top;text-align:left}
th{background:#eee}.succeeded{color:#070}.failed{color:#c00;font-weight:bold}.unknown,.running{color:#a70}
.why{color:#555;max-width:40em}.warn{color:#a60}
"""


def render_status(prober: Prober, ready: bool, reasons: list[str]) -> str:
    esc = html.escape
    probes = sorted(prober.probes.values(), key=lambda p: p.name)
    failed = [p for p in probes if p.status == "failed"]
    h = prober.holder
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><meta http-equiv='refresh' content='15'>"
             f"<title>DERP Prober</title><style>{_CSS}</style></head><body>",
             "<h1>DERP Prober</h1>"]
    if failed:
        parts.append(f"<p id='summary'>Prober Status: <b>{len(failed)}</b> out of {len(probes)} probes failed.</p>")
    else:
        parts.append(f"<p id='summary'>All {len(probes)} probes are healthy.</p>")
    parts.append(f"<p id='map'>Map: {esc(h.source)} &middot; loaded {_age(h.fetched_at)}"
                 + (f" &middot; <span class='failed'>last error: {esc(h.last_error)}</span>" if h.last_error else "")
                 + f" &middot; readiness: <b id='ready'>{'ready' if ready else 'not ready'}</b>"
                 + " &middot; <a href='/debug/varz'>Prober metrics</a> &middot; <a href='/status.json'>JSON</a></p>")
    warnings = prober.all_warnings()
    if warnings:
        parts.append("<ul id='warnings'>" + "".join(f"<li class='warn'>{esc(w)}</li>" for w in warnings) + "</ul>")
    regions: dict[str, list[Probe]] = {}
    for p in probes:
        if p.region:
            regions.setdefault(p.region, []).append(p)
    if regions:
        parts.append("<table id='regions'><tr><th>Region</th><th>Probes</th><th>Failing</th></tr>")
        for code, ps in sorted(regions.items()):
            bad = sum(1 for p in ps if p.status == "failed")
            cls = "failed" if bad else "succeeded"
            parts.append(f"<tr class='region' data-region='{esc(code)}'><td>{esc(code)}</td><td>{len(ps)}</td>"
                         f"<td class='{cls}'>{bad}</td></tr>")
        parts.append("</table>")
    parts.append("<table id='probes'><tr><th>Name</th><th>Class &amp; labels</th><th>Interval</th>"
                 "<th>Last finished</th><th>Status</th><th>Latency</th><th>History</th><th>Last error / diagnosis</th></tr>")
    for p in probes:
        last = p.last
        labels = "<br>".join(esc(f"{k}={v}") for k, v in sorted(p.labels.items()))
        interval = "Continuous" if p.continuous else format_duration(int(p.interval * 1e9))
        lat = format_duration(int(last.latency * 1e9)) if last is not None and last.ok else ""
        med = format_duration(int(p.median_latency() * 1e9)) if any(o.ok for o in p.recent) else ""
        run = "" if p.continuous else f" <a class='run' href='/debug/probe-run?name={esc(p.name)}'>run</a>"
        err = ""
        if last is not None and not last.ok:
            err = f"<div class='error'>{esc(last.error)}</div><div class='why'>{esc(last.diagnosis)}</div>"
        parts.append(
            f"<tr class='probe' data-name='{esc(p.name)}' data-status='{p.status}'>"
            f"<td>{esc(p.name)}{run}</td><td>{esc(p.cls)}<br>{labels}</td><td>{interval}</td>"
            f"<td>{_age(p.end)}</td><td class='{p.status}'>{p.status}<br>Recent: "
            f"{''.join('✔' if o.ok else '✘' for o in p.recent)}<br>Success: {p.success_ratio() * 100:.0f}%</td>"
            f"<td>{lat}<br>{('Median: ' + med) if med else ''}</td><td>{latency_chart(p)}</td><td>{err}</td></tr>")
    parts.append("</table>")
    if reasons:
        parts.append("<h2>Not ready because</h2><ul id='reasons'>" + "".join(f"<li>{esc(r)}</li>" for r in reasons) + "</ul>")
    parts.append("</body></html>")
    return "".join(parts)
