"""The four reports of a run: a rich table per area, JSON, JUnit XML, one HTML file.

JSON is ``{"target", "strict", "duration_s", "counts", "cases": [{"id", "title", "level",
"result", "reason", "duration_s", "wire": [...]}]}``; ``wire`` holds the frames each case
sent and received, with timestamps (see ``wire.py``). JUnit maps FAIL to <failure>, SKIP
to <skipped>, and keeps INFO as a pass with the observation in <system-out>.
"""

from __future__ import annotations

import html
import json
import time
import xml.etree.ElementTree as ET
from typing import Any

from .registry import AREAS, Result
from .runner import Run

STYLE = {Result.PASS: "green", Result.FAIL: "bold red", Result.SKIP: "dim", Result.INFO: "cyan"}


def to_json(run: Run) -> dict[str, Any]:
    return {
        "target": run.target.url,
        "strict": run.strict,
        "duration_s": round(run.duration_s, 3),
        "counts": run.counts(),
        "cases": [r.to_json() for r in run.results],
    }


def write_json(run: Run, path: str | None) -> str:
    text = json.dumps(to_json(run), indent=2, ensure_ascii=False)
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return text


def write_junit(run: Run, path: str) -> None:
    suites = ET.Element("testsuites", name="derp-conformance", time=f"{run.duration_s:.3f}")
    by_area: dict[str, list[Any]] = {}
    for r in run.results:
        by_area.setdefault(r.case.area, []).append(r)
    for area in AREAS:
        rs = by_area.get(area)
        if not rs:
            continue
        s = ET.SubElement(
            suites, "testsuite", name=area, tests=str(len(rs)),
            failures=str(sum(r.result is Result.FAIL for r in rs)),
            skipped=str(sum(r.result is Result.SKIP for r in rs)),
            time=f"{sum(r.duration_s for r in rs):.3f}",
        )
        for r in rs:
            tc = ET.SubElement(s, "testcase", classname=f"derp.{area}", name=f"{r.case.id} {r.case.title}",
                               time=f"{r.duration_s:.3f}")
            if r.result is Result.FAIL:
                ET.SubElement(tc, "failure", message=r.reason, type=r.case.level.value).text = (
                    f"{r.case.section}: {r.case.quote}\n{r.reason}")
            elif r.result is Result.SKIP:
                ET.SubElement(tc, "skipped", message=r.reason)
            elif r.result is Result.INFO:
                ET.SubElement(tc, "system-out").text = f"INFO: {r.reason}"
    ET.ElementTree(suites).write(path, encoding="utf-8", xml_declaration=True)


def write_html(run: Run, path: str) -> None:
    """One self-contained page: summary, a table per area, each case's wire log folded."""
    colours = {"PASS": "#1a7f37", "FAIL": "#cf222e", "SKIP": "#6e7781", "INFO": "#0969da"}
    e = html.escape
    counts = run.counts()
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>DERP conformance: ", e(run.target.url),
        "</title><style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse;width:100%;margin-bottom:1.5em}"
        "td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}"
        "pre{font-size:12px;white-space:pre-wrap;margin:0}details summary{cursor:pointer}.r{font-weight:bold}</style></head><body>",
        f"<h1>DERP conformance: {e(run.target.url)}</h1><p>",
        " · ".join(f"<span style='color:{colours[k]}'>{k} {v}</span>" for k, v in counts.items()),
        f" · {run.duration_s:.1f} s{' · strict' if run.strict else ''} · {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>",
    ]
    for area in AREAS:
        rs = [r for r in run.results if r.case.area == area]
        if not rs:
            continue
        parts.append(f"<h2>{e(area)}</h2><table><tr><th>case</th><th>level</th><th>result</th><th>reason</th><th>s</th></tr>")
        for r in rs:
            wire = "\n".join(_wire_line(w) for w in r.wire) or "(no wire traffic)"
            parts.append(
                f"<tr><td><details><summary>{e(r.case.id)} {e(r.case.title)}</summary>"
                f"<p><i>{e(r.case.section)}</i>: “{e(r.case.quote)}”</p><pre>{e(wire)}</pre></details></td>"
                f"<td>{r.case.level.value}</td><td class='r' style='color:{colours[r.result.value]}'>{r.result.value}</td>"
                f"<td>{e(r.reason)}</td><td>{r.duration_s:.2f}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</body></html>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))


def _wire_line(w: dict[str, Any]) -> str:
    arrow = {"send": "→", "recv": "←"}.get(w.get("dir", ""), "·")
    head = f"{w.get('t', 0):9.4f} {w.get('conn', ''):>8} {arrow} "
    kind = w.get("kind")
    if kind == "frame":
        return head + f"{w['type']} len={w['len']} {w.get('hex', '')}"
    if kind == "http":
        return head + str(w.get("line", ""))
    if kind == "event":
        return head + str(w.get("text", ""))
    return head + f"{kind} len={w.get('len')} {w.get('hex', '')}"


def print_table(run: Run, console: Any) -> None:
    """A rich table per area, then one summary line."""
    from rich.table import Table

    wide = getattr(console, "width", 80) >= 140  # the title column only when it fits
    for area in AREAS:
        rs = [r for r in run.results if r.case.area == area]
        if not rs:
            continue
        t = Table(title=area, title_justify="left", expand=False, show_lines=False)
        t.add_column("case", no_wrap=True)
        if wide:
            t.add_column("title")
        t.add_column("level", no_wrap=True)
        t.add_column("result", no_wrap=True)
        t.add_column("reason")
        for r in rs:
            cells = [r.case.id] + ([r.case.title] if wide else []) + [
                r.case.level.value, f"[{STYLE[r.result]}]{r.result.value}[/]", r.reason]
            t.add_row(*cells)
        console.print(t)
    c = run.counts()
    console.print(
        f"[bold]{run.target.url}[/]: " + ", ".join(f"[{STYLE[Result(k)]}]{v} {k}[/]" for k, v in c.items())
        + f" in {run.duration_s:.1f} s" + (" (strict)" if run.strict else "")
    )
