"""``derpkit probe``: derpprobe's drop-in. ``-once`` for deploy gates, else the monitor.

Exit codes as derpprobe: 0 all good, 1 any bad probe (or a start-up failure such as an
unreadable mesh key), 2 a bad flag. Every failure is one line; no traceback reaches a user.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from .derpconn import ProbeEnv
from .dmap import MapHolder
from .flags import Options, UsageError, parse_args, resolve_mesh_key, usage
from .report import dump_json, once_lines, print_table
from .scheduler import Prober

__all__ = ["main"]

PROG = "derpkit probe"


async def _once(opts: Options, env: ProbeEnv) -> int:
    holder = MapHolder(opts.derp_map, opts.socket_path)
    prober = Prober(opts, env, holder)
    tty = sys.stderr.isatty() and not opts.json
    if tty:
        from rich.progress import Progress

        with Progress(transient=True, console=None) as bar:
            task = bar.add_task("probing", total=None)

            def progress(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            await prober.run_once(progress)
        print_table(prober, sys.stderr)
    else:
        sys.stderr.write(f"{PROG}: Waiting for all probes\n")
        await prober.run_once()
        for line in once_lines(prober):
            sys.stderr.write(line + "\n")
    if opts.json:
        dump_json(prober, sys.stdout)
    bad = any(p.last is not None and not p.last.ok for p in prober.probes.values())
    return 1 if bad else 0


async def _serve(opts: Options, env: ProbeEnv) -> int:
    from .web import serve

    holder = MapHolder(opts.derp_map, opts.socket_path)
    prober = Prober(opts, env, holder)
    return await serve(prober, opts)


async def _amain(opts: Options) -> int:
    key, source = await resolve_mesh_key(opts)
    logging.getLogger("derpkit.probe").info("mesh key: %s", source)
    env = ProbeEnv(mesh_key=key, websocket=opts.websocket)
    if opts.once:
        return await _once(opts, env)
    return await _serve(opts, env)


def main(argv: list[str]) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as e:
        if e.code == 0:
            sys.stderr.write(usage())
            return 0
        sys.stderr.write(f"{PROG}: {e}\n")
        if "not defined" in str(e) or "bad flag syntax" in str(e):
            sys.stderr.write(usage())
        return e.code
    if opts.version:
        from derpkit import __version__

        sys.stdout.write(f"derpkit probe {__version__}\n")
        return 0
    logging.basicConfig(level=logging.INFO if not opts.once else logging.WARNING,
                        format="%(asctime)s %(message)s", datefmt="%Y/%m/%d %H:%M:%S")
    try:
        return asyncio.run(_amain(opts))
    except UsageError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return e.code
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: interrupted\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"{PROG}: {e.strerror or e}\n")
        return 1
