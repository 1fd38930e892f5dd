"""What ``-once`` prints: derpprobe's ``good:``/``bad:`` lines, a table for people, JSON for programs.

The lines are derpprobe's (§3.7): sorted, all good ones then all bad ones, each prefixed with
Go's log timestamp, on stderr; ``good: <name>: <latency>`` with Go's duration text and
``bad: <name>: <error>``. Each bad line is followed by an indented ``why:`` line with the
diagnosis, and ``warning:`` lines follow; neither contains ``good:`` or ``bad:``, so scripts
that grep derpprobe's output read the same verdicts.

On a terminal a rich table (by region and node) replaces the plain lines, and a progress bar
runs while the probes do. ``--json`` writes one object with every result to stdout.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

from derpkit.gosyntax import format_duration

from .model import Probe
from .scheduler import Prober

__all__ = ["json_report", "once_lines", "print_table"]


def _stamp() -> str:
    return time.strftime("%Y/%m/%d %H:%M:%S ")


def go_latency(seconds: float) -> str:
    return format_duration(int(seconds * 1e9))


def verdicts(prober: Prober) -> tuple[list[Probe], list[Probe]]:
    ended = [p for p in prober.probes.values() if p.last is not None]
    good = sorted((p for p in ended if p.last and p.last.ok), key=lambda p: f"{p.name}: {go_latency(p.last.latency)}")  # type: ignore[union-attr]
    bad = sorted((p for p in ended if p.last and not p.last.ok), key=lambda p: f"{p.name}: {p.last.error}")  # type: ignore[union-attr]
    return good, bad


def once_lines(prober: Prober) -> list[str]:
    good, bad = verdicts(prober)
    out: list[str] = []
    for p in good:
        assert p.last is not None
        out.append(f"{_stamp()}good: {p.name}: {go_latency(p.last.latency)}")
    for p in bad:
        assert p.last is not None
        out.append(f"{_stamp()}bad: {p.name}: {p.last.error}")
        if p.last.diagnosis:
            out.append(f"    why: {p.last.diagnosis}")
    for w in prober.all_warnings():
        out.append(f"{_stamp()}warning: {w}")
    return out


def json_report(prober: Prober) -> dict[str, Any]:
    good, bad = verdicts(prober)
    h = prober.holder
    return {
        "ok": not bad,
        "good": len(good),
        "bad": len(bad),
        "map": {"source": h.source, "age_seconds": h.age, "last_error": h.last_error},
        "warnings": prober.all_warnings(),
        "run": {"seconds": prober.once_seconds, "concurrency": prober.opts.concurrency,
                "max_in_flight": prober.max_in_flight, "probes": len(prober.probes)},
        "results": [p.info() for p in sorted(prober.probes.values(), key=lambda p: p.name)],
    }


def print_table(prober: Prober, stream: TextIO) -> None:
    """A rich table grouped by region and node, failures with their diagnosis."""
    from rich.console import Console
    from rich.table import Table

    console = Console(file=stream)
    t = Table(title="derpkit probe", show_lines=False)
    for col in ("region", "node", "probe", "result", "latency", "diagnosis"):
        t.add_column(col, overflow="fold")
    rows = sorted(prober.probes.values(), key=lambda p: (p.region, p.node, p.name))
    for p in rows:
        last = p.last
        if last is None:
            result, lat, why = "[yellow]not run[/]", "", ""
        elif last.ok:
            result, lat, why = "[green]ok[/]", go_latency(last.latency), ""
        else:
            result, lat, why = "[red]FAIL[/]", "", last.diagnosis or last.error
        short = p.name.split("/", 2)[-1] if p.name.startswith("derp/") else p.name
        t.add_row(p.region, p.node, short, result, lat, why)
    console.print(t)
    for w in prober.all_warnings():
        console.print(f"[yellow]warning:[/] {w}")
    good, bad = verdicts(prober)
    console.print(f"{len(good)} good, {len(bad)} bad" + ("" if bad else " - all probes passed"))


def dump_json(prober: Prober, stream: TextIO) -> None:
    json.dump(json_report(prober), stream, indent=1, default=str)
    stream.write("\n")
