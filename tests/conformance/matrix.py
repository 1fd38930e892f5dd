"""Print the conformance matrix (case × server) as Markdown for docs/conformance.md.

    python3 -m tests.conformance.matrix [--long] > /tmp/matrix.md

Starts every server the tests use (derpkit serve plain and TLS, the pinned Go derper plain
and TLS, Go derper v1.80.3 and v1.104.7, sing-box v1.13.19), runs the whole suite against
each (not strict: a SHOULD a server misses shows as INFO), and prints one table plus the
observations of the INFORMATIONAL cases. ``--long`` also runs the timer cases (keepalive,
handshake timeout) against all servers at once, which adds about 70 s.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from derpkit.conformance.registry import Level, Result, all_cases, select
from derpkit.conformance.runner import Run, run
from tests.conformance import servers

LONG = ["handshake/16", "keepalive/2"]


def _start(name: str, wd: Path) -> servers.Server | None:
    wd.mkdir(parents=True, exist_ok=True)
    try:
        if name == "derpkit-http":
            return servers.serve(wd)
        if name == "derpkit-http-stun-lenient":
            return servers.serve(wd, extra=("-stun-strict=false",))
        if name == "derpkit-https":
            return servers.serve(wd, tls=True)
        if name == "derper-v1.102.3-http":
            return servers.derper(wd)
        if name == "derper-v1.102.3-https":
            return servers.derper(wd, tls=True)
        if name.startswith("sing-box"):
            b = servers.peer_binary("sing-box-v1.13.19")
            return servers.singbox(wd, b) if b else None
        b = servers.peer_binary(name.removesuffix("-http"))
        return servers.derper(wd, binary=b, name=name) if b else None
    except BaseException as e:  # noqa: BLE001 - a missing peer is a column of "n/a"
        print(f"{name}: not started: {e}", file=sys.stderr)
        return None


NAMES = ["derpkit-http", "derpkit-http-stun-lenient", "derpkit-https", "derper-v1.102.3-http", "derper-v1.102.3-https",
         "derper-v1.80.3-http", "derper-v1.104.7-http", "sing-box-v1.13.19-https"]


def _cell(case_level: Level, result: Result, reason: str) -> str:
    if result is Result.INFO and case_level is Level.SHOULD:
        return "INFO (SHOULD not met)"
    return result.value


async def main(long: bool) -> None:
    root = Path(tempfile.mkdtemp(prefix="conformance-matrix-"))
    started: dict[str, servers.Server] = {}
    runs: dict[str, Run] = {}
    try:
        for name in NAMES:
            s = _start(name, root / name)
            if s is None:
                continue
            started[name] = s
            runs[name] = await run(select(), s.target(long=False), jobs=4)
        if long:
            longs = await asyncio.gather(*(run(select(LONG), s.target(long=True), jobs=2) for s in started.values()))
            for name, lr in zip(started, longs, strict=True):
                by = {x.case.id: x for x in lr.results}
                runs[name].results = [by.get(x.case.id, x) for x in runs[name].results]
    finally:
        for s in started.values():
            s.stop()
    cols = list(runs)
    print("| case | level | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for c in all_cases():
        cells = []
        for name in cols:
            x = next(r for r in runs[name].results if r.case.id == c.id)
            cells.append(_cell(c.level, x.result, x.reason))
        print(f"| `{c.id}` {c.title} | {c.level.value} | " + " | ".join(cells) + " |")
    print()
    for name in cols:
        print(f"**{name}**: " + ", ".join(f"{v} {k}" for k, v in runs[name].counts().items())
              + f" in {runs[name].duration_s:.1f} s")
        print()
        for x in runs[name].results:
            if x.result is Result.INFO:
                print(f"- `{x.case.id}`: {x.reason}")
        print()


if __name__ == "__main__":
    asyncio.run(main("--long" in sys.argv))
