"""``derpkit stunc -nat``: resolve the servers, run the discovery, print the verdict.

Output: the verdict paragraph on stdout (wrapped for a terminal) with the observations that
decided it on stderr; ``-json`` prints the facts as one JSON object instead. Exit 0 when the
primary server answered (whatever the NAT does), 1 when it did not.
"""

from __future__ import annotations

import json
import sys
import textwrap
from typing import Any

from derpkit.gosyntax import join_host_port
from derpkit.stun.client import StunClientError, resolve
from derpkit.stunc.discover import DiscoveryError, discover
from derpkit.stunc.nat import report_json, summary, verdict_text
from derpkit.stunc.netprober import EndpointProber

__all__ = ["run_nat"]


async def run_nat(opts: Any) -> int:
    """``opts`` is :class:`derpkit.stunc.cli.Options` (typed loosely to avoid an import loop)."""
    err, out = sys.stderr, sys.stdout
    try:
        family, ip = await resolve(opts.host, opts.port, opts.family)
        extra = []
        for host, port in opts.nat_servers:
            _fam, eip = await resolve(host, port, family)
            extra.append((eip, port))
    except StunClientError as e:
        return _fail(opts, str(e), e.kind)
    from derpkit.stunc.cli import local_bind
    from derpkit.stunc.discover import SOCK_MAPPING

    binds = {SOCK_MAPPING: b} if (b := local_bind(opts.local, family)) else {}
    prober = EndpointProber(family, timeout=opts.timeout, binds=binds)
    try:
        report = await discover(prober, (ip, opts.port), extra, lifetime_max=opts.lifetime)
    except DiscoveryError as e:
        return _fail(opts, str(e), "timeout")
    except StunClientError as e:  # opening a socket failed (-local taken, no such address)
        where = f"-local {join_host_port(*opts.local)}: " if opts.local else ""
        return _fail(opts, f"{where}{e}", e.kind)
    finally:
        prober.close()
    if opts.json:
        out.write(json.dumps({"ok": True, **report_json(report)}) + "\n")
        return 0
    for o in report.observations:
        what = f"sock {o.sock} -> {join_host_port(*o.server)}"
        if o.change:
            what += f" (change {o.change})"
        if o.mapped:
            got = f"mapped {join_host_port(*o.mapped)}"
            if o.origin:
                got += f" from {join_host_port(*o.origin)}"
        else:
            got = f"no answer ({o.error or 'timeout'}, {o.sent} sent)"
        err.write(f"{what}: {got}\n")
    for note in report.notes:
        err.write(f"note: {note}\n")
    out.write(summary(report) + "\n\n" + textwrap.fill(verdict_text(report), width=100) + "\n")
    return 0


def _fail(opts: Any, message: str, kind: str) -> int:
    sys.stderr.write(message + "\n")
    if opts.json:
        sys.stdout.write(json.dumps({"ok": False, "error": message, "error_kind": kind}) + "\n")
    return 1
