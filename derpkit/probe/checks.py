"""Checks of the map against the world that are not derpprobe probes: they warn, never fail.

Each returns one line naming the node and the cause. They do not change the good/bad
verdicts (those stay derpprobe's, so a deploy gate means the same thing), but the report,
the status page and ``--json`` show them:

- a region with one node is a single point of failure;
- the map's ``IPv4``/``IPv6`` is not what ``HostName`` resolves to (the TLS name and the dial
  address point at different machines);
- ``CanPort80`` is set but ``http://<IPv4>/generate_204`` does not answer 204 (clients use it
  for captive-portal detection).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp

from .dmap import DerpMap, Node, Region
from .flags import Options

__all__ = ["map_checks"]


async def _dns_mismatch(r: Region, n: Node) -> list[str]:
    try:
        ipaddress.ip_address(n.host_name)
        return []
    except ValueError:
        pass
    out: list[str] = []
    loop = asyncio.get_running_loop()
    for version, fam in ((4, socket.AF_INET), (6, socket.AF_INET6)):
        lit = n.literal(version)
        if lit is None:
            continue
        try:
            infos = await asyncio.wait_for(loop.getaddrinfo(n.host_name, None, family=fam, type=socket.SOCK_STREAM), 5)
        except (OSError, TimeoutError):
            infos = []
        addrs = sorted({str(ipaddress.ip_address(i[4][0].split("%")[0])) for i in infos})
        if lit not in addrs:
            found = ", ".join(addrs) if addrs else "no address"
            out.append(f"node {n.name}: the map's IPv{version} {lit} is not what {n.host_name} resolves to "
                       f"({found}): clients dial {lit} but the certificate and the TLS probe follow the name")
    return out


async def _port80(n: Node) -> list[str]:
    lit = n.literal(4)
    if not n.can_port80 or lit is None:
        return []
    url = f"http://{lit}/generate_204"
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=5)) as resp:
                if resp.status == 204:
                    return []
                got = f"HTTP {resp.status}"
    except (aiohttp.ClientError, OSError, TimeoutError) as e:
        got = str(e) or type(e).__name__
    return [f"node {n.name}: CanPort80 is set but {url} did not answer 204 ({got}): clients' captive-portal "
            "check fails; serve port 80 (-http-port 80) or drop CanPort80 from the map"]


async def map_checks(m: DerpMap, opts: Options) -> list[str]:
    """Every warning for the selected regions, in map order."""
    out = list(m.warnings)
    if opts.region_code and not any(opts.region_code in (r.code, str(r.region_id)) for r in m.regions.values()):
        codes = ", ".join(f"{r.code} ({rid})" for rid, r in sorted(m.regions.items()))
        out.append(f"-region-code {opts.region_code!r} matches no region of the map, so nothing was probed "
                   f"(regions: {codes})")
    jobs = []
    for _, r in sorted(m.regions.items()):
        if opts.region_code and opts.region_code not in (r.code, str(r.region_id)):
            continue
        if len(r.nodes) == 1:
            out.append(f"region {r.region_id} ({r.code}) has one node, {r.nodes[0].name}: a single point "
                       "of failure; clients homed there lose DERP when it is down")
        for n in r.nodes:
            jobs.append(_dns_mismatch(r, n))
            jobs.append(_port80(n))
    for lines in await asyncio.gather(*jobs):
        out.extend(lines)
    return out
