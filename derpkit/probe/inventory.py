"""From a DERP map to the set of probes derpprobe would run (derpprobe.md §2.0).

Names, classes and labels are derpprobe's, so dashboards and alerts keep working. Where the
set differs it is on purpose (docs/probe.md): no ``udp6`` probe for ``IPv6: "none"`` (Go makes
one that can only fail), a ``udp`` probe for hostname-only nodes (Go makes none), and no STUN
probe for any out-of-range STUNPort (Go only recognises -1). Each probe carries a target
signature so a node whose address changes gets a fresh probe (Go keeps the old target, Q5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .dmap import DerpMap, Node, Region
from .flags import Options

__all__ = ["ProbeSpec", "wanted"]


@dataclass(frozen=True, slots=True)
class ProbeSpec:
    name: str
    cls: str
    labels: tuple[tuple[str, str], ...]
    interval: float
    region: Region
    node: Node
    to: Node | None = None
    version: int = 0
    continuous: bool = False

    @property
    def signature(self) -> Any:
        return (self.cls, self.node, self.to, self.version, self.interval)


def _base(r: Region, n: Node) -> list[tuple[str, str]]:
    return [("region", r.code), ("region_id", str(r.region_id)), ("hostname", n.host_name)]


def _selected(r: Region, opts: Options) -> bool:
    return not opts.region_code or opts.region_code in (r.code, str(r.region_id))


def wanted(m: DerpMap, opts: Options) -> list[ProbeSpec]:
    out: list[ProbeSpec] = []
    for _, r in sorted(m.regions.items()):
        if not _selected(r, opts):
            continue
        for n in r.nodes:
            base = _base(r, n)
            if opts.tls_interval > 0:
                out.append(ProbeSpec(f"derp/{r.code}/{n.name}/tls", "tls", tuple(base), opts.tls_interval, r, n))
            if opts.stun_interval > 0 and n.stun_enabled:
                for version, suffix in ((4, "udp"), (6, "udp6")):
                    state = n.family_state(version)
                    if state == "off" or (state == "dns" and version == 6):
                        continue
                    labels = (*base, ("address_family", f"ipv{version}"))
                    out.append(ProbeSpec(f"derp/{r.code}/{n.name}/{suffix}", "derp_udp", labels,
                                         opts.stun_interval, r, n, version=version))
        for a in r.nodes:
            for b in r.nodes:
                path = "single" if a.name == b.name else "mesh"
                labels = (*_base(r, a), ("derp_path", path))
                pair = f"derp/{r.code}/{a.name}/{b.name}"
                if opts.mesh_interval > 0:
                    out.append(ProbeSpec(f"{pair}/mesh", "derp_mesh", labels, opts.mesh_interval, r, a, b))
                if opts.bw_interval > 0 and opts.bw_probe_size_bytes > 0:
                    bl = (*labels, ("tcp_in_tcp", "true" if opts.bw_tun_ipv4_addr else "false"))
                    out.append(ProbeSpec(f"{pair}/bw", "derp_bw", bl, opts.bw_interval, r, a, b))
                if opts.qd_packets_per_second > 0:
                    out.append(ProbeSpec(f"{pair}/qd", "derp_qd", labels, -10.0, r, a, b, continuous=True))
    return out
