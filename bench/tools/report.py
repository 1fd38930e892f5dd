"""The tool figures as a rich table (people), Markdown (docs/benchmarks.md) or JSON (programs)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from .measure import Figure


@dataclass
class Report:
    header: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    #: conformance: server -> its slowest cases (id, title, median_s, share)
    slowest: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: counts behind the figures, for programs: conformance results, probes per cycle
    facts: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"header": self.header, "figures": {f.key: f.as_json() for f in self.figures},
                "conformance_slowest": self.slowest, "facts": self.facts, "notes": self.notes,
                "errors": self.errors}


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit.startswith("pkt"):
        return f"{value:,.0f}"
    if unit == "MiB":
        return f"{value:.1f}"
    if unit == "cores":
        return f"{value:.2f}"
    return f"{value:.2f}"


def _row(f: Figure) -> list[str]:
    spread = f"{fmt(f.low, f.unit)}–{fmt(f.high, f.unit)}" if len(f.values) > 1 else "(1 round)"
    pct = "" if f.spread_pct is None or len(f.values) < 2 else f"{f.spread_pct:.0f} %"
    return [f.label, fmt(f.median, f.unit), f.unit, spread, pct, str(len(f.values)), f.note]


COLUMNS = ["figure", "median", "unit", "min–max", "spread", "rounds", "what it is"]


def markdown(rep: Report) -> str:
    out = [f"# {h}" for h in rep.header]
    out += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_row(f)) + " |" for f in rep.figures]
    for server, cases in rep.slowest.items():
        out += ["", f"Slowest conformance cases vs {server} (median s over the rounds, share of "
                "all case time):", ""]
        out += [f"- `{c['id']}` {c['title']}: {c['median_s']:.2f} s ({c['share_of_case_time_pct']} %)"
                for c in cases]
    out += [""] + [f"note: {n}" for n in rep.notes] + [f"ERROR: {e}" for e in rep.errors]
    return "\n".join(out).rstrip() + "\n"


def print_rich(rep: Report, console: Console | None = None) -> None:
    c = console or Console(width=None if sys.stdout.isatty() else 160)
    for h in rep.header:
        c.print(f"[bold]{h}[/bold]")
    t = Table(*COLUMNS, show_lines=False)
    for f in rep.figures:
        t.add_row(*_row(f))
    c.print(t)
    for server, cases in rep.slowest.items():
        st = Table("case", "title", "median s", "share", title=f"slowest conformance cases vs {server}")
        for x in cases:
            st.add_row(x["id"], x["title"], f"{x['median_s']:.2f}", f"{x['share_of_case_time_pct']} %")
        c.print(st)
    for n in rep.notes:
        c.print(f"note: {n}")
    for e in rep.errors:
        c.print(f"[red]ERROR:[/red] {e}")


def write_json(rep: Report, path: str) -> None:
    text = json.dumps(rep.as_json(), indent=1)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text + "\n")
