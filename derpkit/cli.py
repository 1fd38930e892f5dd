"""The ``derpkit`` command: one entry point, one subcommand per tool."""

from __future__ import annotations

import sys

USAGE = """usage: derpkit <command> [flags]

commands:
  serve     run a DERP + STUN server (derper's flags and env vars)
  stunc     send one STUN binding request and print the mapped address
  probe     derpprobe's drop-in: probe every node of a DERP map and say what is wrong
  conformance  run the DERP conformance suite against any DERP server URL
  healthcheck  check the local serve over DERP and STUN (same flags/env as serve; exit 0 = healthy)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "-help", "--help", "help"):
        sys.stderr.write(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "serve":
        from derpkit.server.app import main as serve_main

        return serve_main(rest)
    if cmd == "healthcheck":
        from derpkit.healthcheck import main as healthcheck_main

        return healthcheck_main(rest)
    if cmd == "stunc":
        from derpkit.stunc.cli import main as stunc_main

        return stunc_main(rest)
    if cmd == "probe":
        from derpkit.probe.cli import main as probe_main

        return probe_main(rest)
    if cmd == "conformance":
        from derpkit.conformance.cli import main as conformance_main

        return conformance_main(rest)
    sys.stderr.write(f"derpkit: unknown command {cmd!r}\n{USAGE}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
