"""Server counters, kept as plain integers on the hot path and rendered on scrape.

A DERP server bumps several counters per packet, so the hot path only writes attributes
of ``Stats``; ``/debug/varz`` turns them into Prometheus text when scraped.

We render the text ourselves rather than through prometheus_client because derper's
counters carry no ``_total`` suffix (``derp_accepts``, ``derp_packets_dropped``...) and
prometheus_client always appends one to counters; dashboards built for derper must keep
working unchanged.
"""

from __future__ import annotations

import collections
import os
import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from derpkit.protocol.constants import DropReason

if TYPE_CHECKING:
    from derpkit.server.relay.derp import DerpServer

KINDS = ("disco", "other")


class Stats:
    """Every counter the DERP core keeps; names follow derper's expvar keys."""

    def __init__(self) -> None:
        self.accepts = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        self.packets_received = 0
        self.packets_sent = 0
        self.packets_received_disco = 0
        self.packets_received_other = 0
        self.unknown_frames = 0
        self.home_moves_in = 0
        self.home_moves_out = 0
        self.got_ping = 0
        self.sent_pong = 0
        self.peer_gone_disconnected_frames = 0
        self.peer_gone_not_here_frames = 0
        self.packets_forwarded_out = 0
        self.packets_forwarded_in = 0
        self.multiforwarder_created = 0
        self.multiforwarder_deleted = 0
        self.packet_forwarder_delete_other_value = 0
        self.sclient_write_timeouts = 0
        self.total_dup_client_conns = 0
        self.websocket_accepts = 0
        self.fast_start_accepts = 0
        self.rate_limit_waited = 0
        self.restarting_frames = 0
        self.server_pings_sent = 0
        self.dead_clients_closed = 0
        self.read_budget_pauses = 0
        # derper's watcher-update histograms: updates per drained batch, batches per drain.
        self.mesh_update_batch = Observations(MESH_UPDATE_BATCH_BUCKETS)
        self.mesh_update_loops = Observations(MESH_UPDATE_LOOP_BUCKETS)
        # Kernel TCP RTT samples by derper's label ("10ms" ... "inf", "non-tcp", "error").
        self.tcp_rtt: collections.Counter[str] = collections.Counter()
        # Requests over TLS by protocol version ("1.2", "1.3", ...); active ones as a gauge.
        self.tls_request_version: collections.Counter[str] = collections.Counter()
        self.tls_active_version: collections.Counter[str] = collections.Counter()
        self.v1_recv_packets = 0
        self.average_queue_duration_ms = 0.0
        # Frames per socket write: index n counts flushes of n frames (the last slot: more).
        self.write_batches = [0] * (WRITE_BATCH_SLOTS + 1)
        self.write_batch_frames = 0
        # (reason, kind) -> packets / bytes, every combination present from the start.
        self.dropped_packets: dict[tuple[str, str], int] = {
            (r.value, k): 0 for r in DropReason for k in KINDS
        }
        self.dropped_bytes: dict[tuple[str, str], int] = dict.fromkeys(self.dropped_packets, 0)
        # Connections closed for breaking the protocol or failing the handshake, by reason.
        self.conn_errors: collections.Counter[str] = collections.Counter()
        # Request heads the front door refused, by frontdoor/request.py's reason (rendered there).
        self.http_heads_refused: collections.Counter[str] = collections.Counter()
        self.start_time = time.time()

    def drop(self, reason: str, disco: bool, nbytes: int) -> None:
        key = (reason, "disco" if disco else "other")
        self.dropped_packets[key] += 1
        self.dropped_bytes[key] += nbytes

    def note_queue_duration(self, seconds: float) -> None:
        self.average_queue_duration_ms = (
            0.9 * self.average_queue_duration_ms + 0.1 * seconds * 1000.0
        )


class Observations:
    """Counts per histogram bucket plus the sum, for the few histograms derper exports."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: dict[float, int] = {}
        self.total = 0.0

    def observe(self, v: float) -> None:
        bound = next((b for b in self.bounds if v <= b), float("inf"))
        self.counts[bound] = self.counts.get(bound, 0) + 1
        self.total += v


#: derper's TCP RTT labels: a sample goes to the first bound it does not exceed (ms).
TCP_RTT_LABELS = ((10, "10ms"), (20, "20ms"), (50, "50ms"), (100, "100ms"),
                  (150, "150ms"), (250, "250ms"), (500, "500ms"))


def tcp_rtt_label(rtt_us: int) -> str:
    """The derp_tcp_rtt label for a kernel RTT in microseconds; not cumulative, as derper's."""
    ms = rtt_us / 1000
    return next((label for bound, label in TCP_RTT_LABELS if ms <= bound), "inf")


_TLS_LABELS = {"TLSv1": "1.0", "TLSv1.1": "1.1", "TLSv1.2": "1.2", "TLSv1.3": "1.3"}


def tls_version_label(transport: object) -> str | None:
    """derper's ``version`` label for a request's TLS connection; None when it is plain TCP."""
    get = getattr(transport, "get_extra_info", None)
    ssl_object = get("ssl_object") if get is not None else None
    if ssl_object is None:
        return None
    return _TLS_LABELS.get(ssl_object.version() or "", "unknown")


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


@dataclass(slots=True)
class Family:
    """One metric: name, Prometheus type, help text and its labelled samples."""

    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


def counter(name: str, value: float, help: str = "") -> Family:
    return Family(name, "counter", help or name.replace("_", " "), [({}, value)])


def gauge(name: str, value: float, help: str = "") -> Family:
    return Family(name, "gauge", help or name.replace("_", " "), [({}, value)])


def _fmt(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(v)


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(families: Iterable[Family]) -> str:
    """Prometheus text exposition format 0.0.4."""
    out: list[str] = []
    for f in families:
        out.append(f"# HELP {f.name} {f.help}")
        out.append(f"# TYPE {f.name} {f.type}")
        for labels, value in f.samples:
            if "__suffix__" in labels:
                out.append(f"{f.name}{labels['__suffix__']} {_fmt(value)}")
            elif f.type == "histogram":
                out.append(f'{f.name}_bucket{{le="{labels["le"]}"}} {_fmt(value)}')
            elif labels:
                lab = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                out.append(f"{f.name}{{{lab}}} {_fmt(value)}")
            else:
                out.append(f"{f.name} {_fmt(value)}")
    return "\n".join(out) + "\n"


_PLAIN_COUNTERS = (
    "accepts", "bytes_received", "bytes_sent", "packets_received", "packets_sent",
    "unknown_frames", "home_moves_in", "home_moves_out", "got_ping", "sent_pong",
    "peer_gone_disconnected_frames", "peer_gone_not_here_frames",
    "packets_forwarded_out", "packets_forwarded_in", "multiforwarder_created",
    "multiforwarder_deleted", "packet_forwarder_delete_other_value",
    "sclient_write_timeouts", "total_dup_client_conns", "websocket_accepts",
)


def derp_families(server: DerpServer, rss0: int) -> Iterator[Family]:
    """The derp_* set with derper's names, then derpkit's own additions."""
    s = server.stats
    for name in _PLAIN_COUNTERS:
        yield counter("derp_" + name, getattr(s, name))
    yield (
        Family("derp_packets_received_kind", "counter", "received SendPackets by kind")
        .add(s.packets_received_disco, kind="disco")
        .add(s.packets_received_other, kind="other")
    )
    for name, value in server.gauges().items():
        yield gauge("derp_" + name, value)
    yield gauge("derp_memstats_sys0", rss0, "resident memory at start-up (bytes)")
    yield gauge("derp_current_file_descriptors", open_fds())
    yield Family("derp_average_queue_duration_ms", "untyped", "moving average of queue time").add(
        s.average_queue_duration_ms
    )
    dp = Family("derp_packets_dropped", "counter", "DERP packets dropped by reason and by kind")
    db = Family("derp_bytes_dropped", "counter", "DERP bytes dropped by reason and by kind")
    for (reason, kind), v in s.dropped_packets.items():
        dp.add(v, reason=reason, kind=kind)
        db.add(s.dropped_bytes[(reason, kind)], reason=reason, kind=kind)
    yield dp
    yield db
    for name, obs in (("derp_mesh_update_batch_size", s.mesh_update_batch),
                      ("derp_mesh_update_loop_count", s.mesh_update_loops)):
        yield histogram(name, obs.bounds, obs.counts, obs.total)
    yield histogram(
        "derp_buffered_write_frames", BUFFERED_WRITE_BUCKETS, write_batch_counts(s),
        s.write_batch_frames, "frames written per socket write",
    )
    rtt = Family("derp_tcp_rtt", "counter", "kernel TCP RTT of each client, sampled every 10 s, by bucket")
    for label, v in sorted(s.tcp_rtt.items()):
        rtt.add(v, le=label)
    yield rtt
    req = Family("derper_tls_request_version", "untyped", "HTTP requests over TLS, by TLS version")
    for label, v in sorted(s.tls_request_version.items()):
        req.add(v, version=label)
    yield req
    act = Family("derper_tls_active_version", "gauge", "requests over TLS in flight (DERP sessions included), by TLS version")
    for label, v in sorted(s.tls_active_version.items()):
        act.add(v, version=label)
    yield act
    if server.rate_limit is not None:
        rate, burst = server.rate_limit
        yield Family("derp_rate_limit_per_client_bytes_per_second", "untyped", "per-client rate").add(rate)
        yield Family("derp_rate_limit_per_client_burst_bytes", "untyped", "per-client burst").add(burst)
        yield counter("derp_rate_limit_per_client_waited", s.rate_limit_waited)
    ce = Family("derpkit_conn_errors", "counter", "connections closed for a protocol or handshake error, by reason")
    for reason, v in sorted(s.conn_errors.items()):
        ce.add(v, reason=reason)
    yield ce
    yield counter("derpkit_fast_start_accepts", s.fast_start_accepts, "DERP upgrades that asked for fast start (no HTTP response)")
    yield counter("derpkit_restarting_frames", s.restarting_frames, "Restarting frames sent on graceful shutdown")
    yield counter("derpkit_server_pings_sent", s.server_pings_sent, "liveness pings sent to silent clients")
    yield counter("derpkit_dead_clients_closed", s.dead_clients_closed, "clients closed for not answering liveness pings")
    yield counter("derpkit_read_budget_pauses", s.read_budget_pauses,
                  "times a client's reader waited a loop turn after reading READ_BUDGET bytes in one")
    yield counter("derpkit_v1_recv_packets", s.v1_recv_packets, "packets relayed in the v1 layout (zero source key)")
    yield gauge("derpkit_resident_memory_bytes", rss_bytes())


def histogram(name: str, buckets: Iterable[float], counts: dict[float, int] | None = None,
              total: float = 0, help: str = "") -> Family:
    """A Prometheus histogram in Go's layout: cumulative ``_bucket{le}``, ``+Inf``, ``_sum``, ``_count``.

    ``counts`` maps each bucket's upper bound to the observations that fell in it (not
    cumulative); absent means nothing observed yet.
    """
    counts = counts or {}
    fam = Family(name, "histogram", help or name.replace("_", " "))
    running = 0
    for b in buckets:
        running += counts.get(b, 0)
        fam.samples.append(({"le": _fmt(b)}, running))
    running += counts.get(float("inf"), 0)
    fam.samples.append(({"le": "+Inf"}, running))
    fam.samples.append(({"__suffix__": "_sum"}, total))
    fam.samples.append(({"__suffix__": "_count"}, running))
    return fam


def write_batch_counts(s: Stats) -> dict[float, int]:
    """Fold the per-size flush counts into derper's buffered-write buckets."""
    out: dict[float, int] = {}
    for n, c in enumerate(s.write_batches):
        if c:
            bound = next((b for b in BUFFERED_WRITE_BUCKETS if n <= b), float("inf"))
            if n == WRITE_BATCH_SLOTS:
                bound = float("inf")
            out[bound] = out.get(bound, 0) + c
    return out


#: Flush sizes tracked one by one; larger ones share the last slot (+Inf bucket).
WRITE_BATCH_SLOTS = 101

#: Bucket bounds of derper's three histograms (spec derp-protocol §9.1).
MESH_UPDATE_BATCH_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
MESH_UPDATE_LOOP_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100)
BUFFERED_WRITE_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 15, 20, 25, 50, 100)


def boot_time() -> int:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_families(started: float) -> Iterator[Family]:
    """tsweb's process-level variables, with Python stand-ins for the Go ones."""
    import asyncio
    import platform

    from derpkit import __version__

    yield Family("process_start_unix_time", "untyped", "process start time").add(int(started))
    yield counter("uptime_sec", int(time.time() - started), "seconds since the process started")
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:
        tasks = 0
    yield gauge("goroutines", tasks, "asyncio tasks (derper: goroutines)")
    yield Family("version", "untyped", "version").add(1, version=__version__, binary="derpkit")
    yield Family("python_version", "untyped", "Python version").add(1, version=platform.python_version())
    bt = boot_time()
    if bt:
        yield Family("node_boot_time_seconds", "untyped", "machine boot time").add(bt)
    yield from standard_process_families(bt)


def _proc_stat() -> list[str]:
    """Fields of /proc/self/stat after the command name (which may contain spaces)."""
    with open("/proc/self/stat") as f:
        return f.read().rpartition(")")[2].split()


def _net_dev_totals() -> tuple[int, int]:
    """Bytes received and sent on every interface of this process's network namespace."""
    rx = tx = 0
    with open("/proc/self/net/dev") as f:
        for line in f.readlines()[2:]:
            cols = line.partition(":")[2].split()
            if len(cols) >= 9:
                rx += int(cols[0])
                tx += int(cols[8])
    return rx, tx


def standard_process_families(boot: int) -> Iterator[Family]:
    """The Prometheus client libraries' ``process_*`` set, which derper exports too.

    Dashboards for any Prometheus-instrumented service use these names (CPU, memory, file
    descriptors), so an operator's generic panels work on derpkit unchanged. Linux only,
    like the collector derper uses; on other systems the set is left out.
    """
    try:
        stat = _proc_stat()
        rx, tx = _net_dev_totals()
    except (OSError, ValueError):
        return
    ticks = os.sysconf("SC_CLK_TCK")
    t = os.times()
    yield counter("process_cpu_seconds_total", t.user + t.system, "user and system CPU time (seconds)")
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    yield gauge("process_max_fds", nofile if nofile >= 0 else 2**64 - 1, "file descriptor limit")
    yield counter("process_network_receive_bytes_total", rx, "bytes received by the network namespace")
    yield counter("process_network_transmit_bytes_total", tx, "bytes sent by the network namespace")
    yield gauge("process_open_fds", open_fds(), "open file descriptors")
    yield gauge("process_resident_memory_bytes", rss_bytes(), "resident memory (bytes)")
    # starttime is the 22nd field of stat; after the ")" split it is index 19.
    yield gauge("process_start_time_seconds", boot + int(stat[19]) / ticks, "start time since the epoch (seconds)")
    yield gauge("process_virtual_memory_bytes", int(stat[20]), "virtual memory size (bytes)")
    vmax = resource.getrlimit(resource.RLIMIT_AS)[0]
    yield gauge("process_virtual_memory_max_bytes", vmax if vmax >= 0 else 2**64 - 1, "address space limit (bytes)")


MetricsSource = Callable[[], Iterable[Family]]
