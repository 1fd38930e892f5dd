"""Rounds: the order servers take turns in, and the median and spread of every figure.

One run on a shared 2-core host cannot settle a ratio (issue 16 saw a p99 ratio swing from
10× to 0.5× between two runs minutes apart), so ``python -m bench --rounds N`` measures
every server N times, alternating (A B, B A, A B, ...: each server goes first as often as
the other, so drift in the host's load hits both alike), and the table shows the median
and the min–max of every figure. The JSON keeps every round's raw figures.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def round_order(names: Sequence[T], rnd: int) -> list[T]:
    """Round 0 in the given order, round 1 reversed, and so on (A B B A A B ...)."""
    return list(names) if rnd % 2 == 0 else list(reversed(names))


@dataclass
class Result:
    """One server's figures and notes from one round (or one single run)."""

    figures: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Spread:
    median: float
    lo: float
    hi: float
    n: int


def spread(values: Sequence[float | None]) -> Spread | None:
    """Median and range of the rounds that produced the figure; None if none did."""
    good = [v for v in values if v is not None]
    if not good:
        return None
    return Spread(statistics.median(good), min(good), max(good), len(good))


def cell(s: Spread | None, fmt: str, rounds: int) -> str:
    """``median`` alone for one round, else ``median (lo–hi)``; a missing round is
    shown as ``k/N`` rounds."""
    if s is None:
        return "n/a"
    text = fmt.format(s.median)
    if rounds > 1:
        text += f" ({fmt.format(s.lo)}–{fmt.format(s.hi)})"
        if s.n < rounds:
            text += f" [{s.n}/{rounds} rounds]"
    return text


def median_note(results: Sequence[Result], key: str, note_key: str) -> str | None:
    """The note of the round whose figure is closest to the median (its circumstances)."""
    s = spread([r.figures.get(key) for r in results])
    have = [r for r in results if note_key in r.notes]
    if not have:
        return None
    if s is None:
        return have[0].notes[note_key]
    best = min(have, key=lambda r: abs((r.figures.get(key) or 0.0) - s.median))
    return best.notes[note_key]


@dataclass(frozen=True)
class Row:
    key: str               # figure key in Result.figures
    label: str
    fmt: str
    note_key: str = ""     # which note to print beside it ("" = none)


@dataclass
class Group:
    """One transport's rows: every column's rounds, and the rows to print."""

    title: str
    rows: list[Row]
    runs: dict[str, list[Result]]        # column -> one Result per round
    absent: dict[str, str] = field(default_factory=dict)   # column -> why it has no figures


def render(groups: Sequence[Group], columns: Sequence[str], reference: str | None,
           rounds: int) -> str:
    """One markdown table: a bold title row per group, then its figures; servers side by
    side, then each one's ratio to ``reference`` (Go derper) by median, then notes."""
    cols = list(columns)
    ref = reference if reference in cols else (cols[0] if cols else None)
    others = [c for c in cols if c != ref]
    header = ["figure", *cols, *[f"{c} / {ref}" for c in others],
              "notes (round nearest the median: generator and server CPU, what limited it)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        lines.append("| " + " | ".join([f"**{g.title}**"] + [""] * (len(header) - 1)) + " |")
        for row in g.rows:
            spreads = {c: spread([r.figures.get(row.key) for r in g.runs.get(c, [])]) for c in cols}
            out = [row.label]
            out += [cell(spreads[c], row.fmt, rounds) if c in g.runs else "n/a" for c in cols]
            for c in others:
                a, b = spreads[c], spreads.get(ref) if ref else None
                out.append(f"{a.median / b.median:.2f}" if a and b and b.median else "n/a")
            notes = []
            for c in cols:
                if row.note_key and c in g.runs:
                    n = median_note(g.runs[c], row.key, row.note_key)
                    if n:
                        notes.append(f"{c}: {n}")
            out.append("; ".join(notes))
            lines.append("| " + " | ".join(out) + " |")
        for c, why in g.absent.items():
            lines.append("| " + " | ".join([f"({c}: {why})"] + [""] * (len(header) - 1)) + " |")
    return "\n".join(lines)


def to_json(groups: dict[str, Group], extra: dict[str, Any]) -> dict[str, Any]:
    """Every round's raw figures and notes, plus the median/min/max per figure."""
    out: dict[str, Any] = {**extra, "transports": {}}
    for name, g in groups.items():
        servers: dict[str, Any] = {}
        for col, rs in g.runs.items():
            keys = sorted({k for r in rs for k in r.figures})
            summary = {}
            for k in keys:
                s = spread([r.figures.get(k) for r in rs])
                summary[k] = None if s is None else {"median": s.median, "min": s.lo,
                                                     "max": s.hi, "rounds": s.n}
            servers[col] = {"rounds": [{"figures": r.figures, "notes": r.notes} for r in rs],
                            "summary": summary}
        out["transports"][name] = {"title": g.title, "servers": servers, "absent": g.absent}
    return out
