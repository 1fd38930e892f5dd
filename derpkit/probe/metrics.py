"""derpprobe's Prometheus series, names and labels unchanged (derpprobe.md §3.6), so dashboards
and alerts written for Go's prober keep working.

A prometheus_client collector reads the probes' records at scrape time; nothing is counted
twice. Every sample carries ``name``, ``class`` and the class labels. Two series follow Go's
exposition exactly where prometheus_client would rename them: the qd drop counter has no
``_total`` suffix in derpprobe, so that family is written by hand. derpkit adds
``derpkit_derpmap_age_seconds`` (how old the map in use is), ``derpkit_probe_warnings`` and
``derpkit_region_up`` (a region roll-up, so alerts need not watch N² pair probes).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client.core import CollectorRegistry, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from .qd import BUCKETS
from .scheduler import Prober

__all__ = ["ProberCollector", "exposition"]


def _m(name: str, doc: str, kind: str) -> Metric:
    return Metric(name, doc, kind)


class ProberCollector:
    """Collects the prober's state as derpprobe's metric families."""

    def __init__(self, prober: Prober, namespace: str = "derpprobe") -> None:
        self.prober = prober
        self.ns = namespace

    def collect(self) -> Iterator[Metric]:
        ns = self.ns
        interval = _m(f"{ns}_interval_secs", "Probe interval in seconds", "gauge")
        in_flight = _m(f"{ns}_in_flight", "Number of probes currently running", "gauge")
        start = _m(f"{ns}_start_secs", "Latest probe start time (seconds since epoch)", "gauge")
        end = _m(f"{ns}_end_secs", "Latest probe end time (seconds since epoch)", "gauge")
        result = _m(f"{ns}_result", "Latest probe result (1 = success, 0 = failure)", "gauge")
        latency = _m(f"{ns}_latency_millis", "Latest probe latency (ms)", "gauge")
        attempts = _m(f"{ns}_attempts", "Total number of probing attempts", "counter")
        seconds = _m(f"{ns}_seconds", "Total amount of time spent executing the probe", "counter")
        bw_size = _m(f"{ns}_derp_bw_probe_size_bytes", "Payload size of the bandwidth prober", "gauge")
        bw_time = _m(f"{ns}_derp_bw_transfer_time_seconds", "Time it took to transfer data", "counter")
        qd_hist = _m(f"{ns}_derp_qd_probe_delays_seconds", "Histogram of queuing delays", "histogram")
        for p in sorted(self.prober.probes.values(), key=lambda p: p.name):
            labels = p.all_labels
            interval.add_sample(interval.name, labels, p.interval)
            in_flight.add_sample(in_flight.name, labels, p.in_flight)
            if p.start is not None:
                start.add_sample(start.name, labels, int(p.start))
            if p.end is not None and p.last is not None:
                end.add_sample(end.name, labels, int(p.end))
                result.add_sample(result.name, labels, 1 if p.last.ok else 0)
                if p.last.ok:
                    latency.add_sample(latency.name, labels, int(p.last.latency * 1000))
                for status in ("ok", "fail"):
                    sl = {**labels, "status": status}
                    attempts.add_sample(f"{attempts.name}_total", sl, p.attempts[status])
                    seconds.add_sample(f"{seconds.name}_total", sl, p.seconds[status])
            if p.cls == "derp_bw" and p.end is not None:
                bw_size.add_sample(bw_size.name, labels, p.extra.get("bw_size", 0))
                bw_time.add_sample(f"{bw_time.name}_total", labels, p.extra.get("bw_transfer_seconds", 0.0))
            if p.cls == "derp_qd":
                h = p.extra.get("qd") or {"buckets": [0] * len(BUCKETS), "count": 0, "sum": 0.0}
                for le, n in zip(BUCKETS, h["buckets"], strict=True):
                    qd_hist.add_sample(f"{qd_hist.name}_bucket", {**labels, "le": floatToGoString(le)}, n)
                qd_hist.add_sample(f"{qd_hist.name}_bucket", {**labels, "le": "+Inf"}, h["count"])
                qd_hist.add_sample(f"{qd_hist.name}_count", labels, h["count"])
                qd_hist.add_sample(f"{qd_hist.name}_sum", labels, h["sum"])
        yield from (interval, in_flight, start, end, result, latency, attempts, seconds)
        for fam in (bw_size, bw_time, qd_hist):
            if fam.samples:
                yield fam
        age = _m("derpkit_derpmap_age_seconds", "Age of the DERP map in use (derpkit)", "gauge")
        if self.prober.holder.fetched_at is not None:
            age.add_sample(age.name, {}, time.time() - self.prober.holder.fetched_at)
            yield age
        up = _m("derpkit_region_up", "1 if at least one node of the region relays (its single-node mesh probe passed)", "gauge")
        regions: dict[tuple[str, str], int] = {}
        for p in self.prober.probes.values():
            if p.cls == "derp_mesh" and p.labels.get("derp_path") == "single":
                key = (p.labels.get("region", ""), p.labels.get("region_id", ""))
                ok = 1 if p.last is not None and p.last.ok else 0
                regions[key] = max(regions.get(key, 0), ok)
        for (code, rid), ok in sorted(regions.items()):
            up.add_sample(up.name, {"region": code, "region_id": rid}, ok)
        if regions:
            yield up
        warn = _m("derpkit_probe_warnings", "Map and node warnings in the latest check (derpkit)", "gauge")
        warn.add_sample(warn.name, {}, len(self.prober.all_warnings()))
        yield warn


def _qd_dropped(prober: Prober, ns: str) -> str:
    """derpprobe's qd drop counter, which has no ``_total`` suffix, in Prometheus text format."""
    probes = [p for p in sorted(prober.probes.values(), key=lambda p: p.name) if p.cls == "derp_qd"]
    if not probes:
        return ""
    name = f"{ns}_derp_qd_probe_dropped_packets"
    lines = [f"# HELP {name} Total packets dropped", f"# TYPE {name} counter"]
    for p in probes:
        labels = ",".join(f'{k}="{_esc(v)}"' for k, v in sorted(p.all_labels.items()))
        lines.append(f"{name}{{{labels}}} {(p.extra.get('qd') or {}).get('dropped', 0)}")
    return "\n".join(lines) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def exposition(prober: Prober, namespace: str = "derpprobe") -> bytes:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ProberCollector(prober, namespace))  # type: ignore[arg-type]
    return generate_latest(reg) + _qd_dropped(prober, namespace).encode()
