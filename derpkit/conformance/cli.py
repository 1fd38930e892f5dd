"""``derpkit conformance URL [flags]``: run the suite, print a table, write reports.

Exit status: 0 when no case FAILed, 1 when any did, 2 for a usage error or an unreachable
target. Every error is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from .registry import all_cases, select
from .target import TargetError, make_target

USAGE = "derpkit conformance URL [flags]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"derpkit conformance: {message} (see --help)\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="derpkit conformance", usage=USAGE,
        description="Run the DERP conformance suite against any DERP server. "
        "URL is http(s)://host[:port], with or without the /derp path.",
    )
    p.add_argument("url", nargs="?", help="the DERP server, e.g. https://derp.example.com or http://127.0.0.1:3340/derp")
    p.add_argument("--mesh-key-file", metavar="F", help="file with the server's mesh key (64 hex digits); runs the mesh cases")
    p.add_argument("--cert-name", metavar="X", help="TLS name to verify, or sha256-raw:<hex> pin (as a DERP map's CertName)")
    p.add_argument("--insecure", action="store_true", help="do not verify the TLS certificate")
    p.add_argument("--stun", metavar="HOST:PORT", help="the server's STUN address; runs the stun cases")
    p.add_argument("--cases", metavar="GLOB", action="append", default=[], help="only cases matching (repeatable, comma lists; e.g. 'relay/*,ping/1')")
    p.add_argument("--exclude", metavar="GLOB", action="append", default=[], help="skip cases matching (repeatable)")
    p.add_argument("--strict", action="store_true", help="a failed SHOULD is FAIL (default: INFO)")
    p.add_argument("--long", action="store_true", help="also run cases that wait on the server's own timers (keepalive 60-65 s, handshake 10 s)")
    p.add_argument("--json", nargs="?", const="-", metavar="FILE", help="JSON report to FILE, or to stdout instead of the table")
    p.add_argument("--junit", metavar="FILE", help="JUnit XML report")
    p.add_argument("--html", metavar="FILE", help="one-file HTML report with every wire log")
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="cases run at once (default 4; 1 = one after another)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    cases = select(args.cases, args.exclude)
    if args.list:
        try:
            for c in cases:
                needs = f" [needs {', '.join(sorted(n.value for n in c.needs))}]" if c.needs else ""
                print(f"{c.id:14} {c.level.value:13} {c.title} ({c.section}){needs}")
        except BrokenPipeError:
            sys.stderr.close()  # `| head`: the reader left; nothing to say
        return 0
    if not args.url:
        sys.stderr.write(f"derpkit conformance: a server URL is required (usage: {USAGE})\n")
        return 2
    if not cases:
        sys.stderr.write(f"derpkit conformance: no case matches --cases {args.cases} --exclude {args.exclude} "
                         f"({len(all_cases())} cases exist; see --list)\n")
        return 2
    if args.jobs < 1:
        sys.stderr.write("derpkit conformance: --jobs must be at least 1\n")
        return 2
    try:
        target = make_target(args.url, mesh_key_file=args.mesh_key_file, cert_name=args.cert_name,
                             insecure=args.insecure, stun=args.stun, long=args.long)
    except TargetError as e:
        sys.stderr.write(f"derpkit conformance: {e}\n")
        return 2
    from . import report
    from .runner import TargetUnreachable, run

    try:
        result = asyncio.run(run(cases, target, strict=args.strict, jobs=args.jobs))
    except TargetUnreachable as e:
        sys.stderr.write(f"derpkit conformance: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("derpkit conformance: interrupted\n")
        return 130
    if args.json == "-":
        print(report.write_json(result, None))
    else:
        from rich.console import Console

        report.print_table(result, Console())
        if args.json:
            report.write_json(result, args.json)
    try:
        if args.junit:
            report.write_junit(result, args.junit)
        if args.html:
            report.write_html(result, args.html)
    except OSError as e:
        sys.stderr.write(f"derpkit conformance: cannot write report: {e.strerror or e}: {e.filename}\n")
        return 2
    return 1 if result.failed else 0
