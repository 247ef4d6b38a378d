"""Prometheus metrics: what the agent knows (lease, peers, etcd) and what the data path counted.

Conventions (docs/metrics.md lists every series): prefix ``flannel_``, base units, ``_total``
counters, ``_info`` gauges, bounded labels, every known label set present from the start (so
``rate()`` and ratios never lose a series), no ``_created`` series.

Most values are read at scrape time from the objects that own them (the lease manager's counters,
the network, the pinned BPF maps), Cilium's pattern: nothing here has to be kept in step by hand.
The BPF counters live in per-CPU maps pinned on bpffs, so they are as old as the pins and stay
monotonic across agent restarts. Scrapes run in a worker thread (bpf() and netlink calls), so the
collectors only read scalars and copies of the agent's state.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client import disable_created_metrics as _disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from flannel_bpf import __version__
from flannel_bpf.datapath.bpf_maps import (
    ENDPOINTS,
    FLOWS,
    REMOTES,
    REMOTES6,
    LayoutMismatch,
    PinnedMaps,
)
from flannel_bpf.subnet.etcd.store import OPERATIONS, OUTCOMES

if TYPE_CHECKING:
    from flannel_bpf.backends.base import Network
    from flannel_bpf.subnet.manager import Manager

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# etcd answers in about a millisecond on a LAN; the tail up to the request timeout (5 s) matters.
ETCD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A lease event is programmed in well under a millisecond (one map write) up to seconds (5,000
# peers of kernel entries at start).
PROGRAMMING_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)

# The userspace planes' counters (udp.UDPCounters, vxlan_userspace.VXLANCounters): these names are
# traffic and errors; every other field is a reason a packet was dropped.
_PLANE_TRAFFIC = {"tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_errors", "rx_errors"}
_PLANE_ICMP = "icmp_sent"
# Reported by whichever collector knows: the BPF one reads fb_remotes, the agent one asks the
# network (kernel routes, userspace tables).
PEERS_PROGRAMMED = "flannel_peers_programmed"
PEERS_PROGRAMMED_HELP = (
    "Peers the data path holds entries for (BPF: fb_remotes entries; in an IPv6-only network, "
    "fb_remotes6 entries)."
)


@dataclass
class AgentState:
    """What the agent tells the metrics as it goes; read by the scrape thread."""

    ready: bool = False
    backend: str = ""
    iface: str = ""
    public_ip: str = ""
    peers: int = 0
    network: Network | None = None
    manager: Manager | None = None
    etcd_up: bool | None = None


class AgentMetrics:
    """The agent's registry: event metrics it records, and collectors that read at scrape."""

    def __init__(self) -> None:
        _disable_created_metrics()  # type: ignore[no-untyped-call]
        self.state = AgentState()
        self.registry = CollectorRegistry(auto_describe=False)
        self.etcd_requests = Counter(
            "flannel_etcd_requests",
            "etcd requests by operation and outcome (success, unavailable, auth_error, error).",
            ["operation", "outcome"],
            registry=self.registry,
        )
        self.etcd_duration = Histogram(
            "flannel_etcd_request_duration_seconds",
            "Time an etcd request took, failures included.",
            ["operation"],
            buckets=ETCD_BUCKETS,
            registry=self.registry,
        )
        for operation in OPERATIONS:
            self.etcd_duration.labels(operation)
            for outcome in OUTCOMES:
                self.etcd_requests.labels(operation, outcome)
        self.programming = Histogram(
            "flannel_peer_programming_duration_seconds",
            "From a batch of lease events arriving from etcd to the data path being programmed "
            "for all of them.",
            buckets=PROGRAMMING_BUCKETS,
            registry=self.registry,
        )
        self.subnet_file_writes = Counter(
            "flannel_subnet_file_writes",
            "Writes of subnet.env by outcome.",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("success", "error"):
            self.subnet_file_writes.labels(outcome)
        self.registry.register(_AgentCollector(self.state))
        self.registry.register(_BPFCollector(self.state))
        ProcessCollector(registry=self.registry)

    # -- store.StoreObserver ---------------------------------------------------------------

    def etcd_request(self, operation: str, outcome: str, seconds: float) -> None:
        self.etcd_requests.labels(operation, outcome).inc()
        self.etcd_duration.labels(operation).observe(seconds)

    def etcd_reachable(self, reachable: bool) -> None:
        self.state.etcd_up = reachable

    # -- exposition ------------------------------------------------------------------------

    def exposition(self) -> bytes:
        """The text format; blocking (bpf and netlink calls), so run it off the event loop."""
        return generate_latest(self.registry)


def _gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


class _AgentCollector(Collector):
    """Build, readiness, lease, peers, watch and userspace-plane series, from AgentState."""

    def __init__(self, state: AgentState) -> None:
        self.state = state

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        s = self.state
        yield _gauge(
            "flannel_build_info",
            "flannel-bpf version and Python version, always 1.",
            1,
            version=__version__,
            python_version=platform.python_version(),
        )
        yield _gauge("flannel_ready", "1 once subnet.env is written (what /readyz says).", s.ready)
        if s.etcd_up is not None:
            yield _gauge("flannel_etcd_up", "1 if the last etcd request reached etcd.", s.etcd_up)
        if s.manager is not None:
            yield from _watch_metrics(s.manager)
        network = s.network
        if network is None:
            return
        details = network.datapath_status()
        yield _gauge(
            "flannel_backend_info",
            "The backend and the uplink autodetection chose, always 1.",
            1,
            backend=s.backend,
            iface=s.iface,
            public_ip=s.public_ip,
        )
        fallback = network.fallbacks[0] if network.fallbacks else ""
        yield _gauge(
            "flannel_datapath_info",
            "What carries the packets (bpf, kernel, userspace, none), the decapsulation hook "
            "and, after a fallback, why; always 1.",
            1,
            backend=s.backend,
            datapath=network.datapath,
            decap=str(details.get("decap", "")),
            host_routing=str(details.get("host_routing", "kernel")),
            fallback_reason=fallback,
        )
        yield _gauge(
            "flannel_datapath_fallback",
            "1 if the data path is not the backend's first choice (see flannel_datapath_info).",
            bool(network.fallbacks),
        )
        yield _gauge("flannel_overlay_mtu_bytes", "MTU written to subnet.env.", network.mtu)
        lease = network.lease
        yield _gauge(
            "flannel_lease_info",
            "This node's subnet lease, always 1.",
            1,
            subnet=str(lease.subnet),  # 0.0.0.0/0 in an IPv6-only network, as flanneld's
            public_ip=str(lease.attrs.public_ip),
            ipv6_subnet=str(lease.ipv6_subnet or ""),
            public_ipv6=str(lease.attrs.public_ipv6 or ""),
        )
        if lease.expiration is not None:  # a reservation never expires: no series
            yield _gauge(
                "flannel_lease_expiry_timestamp_seconds",
                "When this node's lease runs out unless renewed (Unix time).",
                lease.expiration,
            )
        yield _gauge("flannel_peers", "Peer leases this data path serves.", s.peers)
        if network.datapath != "bpf":  # the BPF collector reports fb_remotes instead
            programmed = network.programmed_peers()
            if programmed is not None:
                yield _gauge(PEERS_PROGRAMMED, PEERS_PROGRAMMED_HELP, programmed)
        counters = network.plane_counters()
        if counters is not None:
            yield from _plane_metrics(counters)


def _watch_metrics(manager: Manager) -> Iterator[Metric]:
    st = manager.stats
    events = CounterMetricFamily(
        "flannel_lease_events", "Peer lease events applied, by type.", labels=["type"]
    )
    events.add_metric(["added"], st.events_added)
    events.add_metric(["removed"], st.events_removed)
    yield events
    renewals = CounterMetricFamily(
        "flannel_lease_renewals", "Renewals of this node's lease, by outcome.", labels=["outcome"]
    )
    renewals.add_metric(["success"], st.renewals)
    renewals.add_metric(["error"], st.renewal_errors)
    yield renewals
    restarts = CounterMetricFamily(
        "flannel_etcd_watch_restarts",
        "Lease watches started again: after an error (resumed from the last revision) or after "
        "etcd compacted that revision away (re-listed).",
        labels=["reason"],
    )
    restarts.add_metric(["error"], st.watch_restarts)
    restarts.add_metric(["compacted"], st.compactions)
    yield restarts
    yield CounterMetricFamily(
        "flannel_lease_snapshots", "Full listings of the leases (start, compaction).", st.snapshots
    )
    yield CounterMetricFamily(
        "flannel_lease_invalid_entries",
        "Entries under the subnets prefix ignored because key or value is not a valid lease.",
        st.skipped_entries,
    )
    yield _gauge(
        "flannel_etcd_watch_revision",
        "The last etcd revision the lease watch applied.",
        st.revision,
    )


def _plane_metrics(counters: dict[str, int]) -> Iterator[Metric]:
    packets = CounterMetricFamily(
        "flannel_userspace_packets",
        "Inner packets the userspace plane carried (tx: to peers, rx: from peers).",
        labels=["direction"],
    )
    bytes_ = CounterMetricFamily(
        "flannel_userspace_bytes", "Inner bytes the userspace plane carried.", labels=["direction"]
    )
    errors = CounterMetricFamily(
        "flannel_userspace_errors",
        "Failed reads, sends and TUN writes of the userspace plane.",
        labels=["direction"],
    )
    for direction in ("tx", "rx"):
        packets.add_metric([direction], counters.get(f"{direction}_packets", 0))
        bytes_.add_metric([direction], counters.get(f"{direction}_bytes", 0))
        errors.add_metric([direction], counters.get(f"{direction}_errors", 0))
    dropped = CounterMetricFamily(
        "flannel_userspace_dropped_packets",
        "Packets the userspace plane dropped, by reason.",
        labels=["reason"],
    )
    for name, value in counters.items():
        if name not in _PLANE_TRAFFIC and name != _PLANE_ICMP:
            dropped.add_metric([name], value)
    yield from (packets, bytes_, errors, dropped)
    yield CounterMetricFamily(
        "flannel_userspace_icmp_sent",
        "ICMP net unreachable messages written back into the TUN.",
        counters.get(_PLANE_ICMP, 0),
    )


@dataclass(eq=False)  # the registry keys collectors by identity
class _BPFCollector(Collector):
    """The pinned maps of the running BPF data path: counters, fill and attach state."""

    state: AgentState
    errors: int = 0
    last_duration: float = 0.0

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        network = self.state.network
        if network is None or network.datapath != "bpf":
            return
        details = network.datapath_status()
        if not details.get("pin_dir"):
            return
        started = time.monotonic()
        try:
            families = list(_bpf_families(Path(details["pin_dir"]), details))
        except (OSError, LayoutMismatch) as exc:
            # Cilium's rule: no partial numbers. The gap shows in flannel_collector_errors_total.
            self.errors += 1
            log.warning("metrics: reading the BPF maps in %s failed: %s", details["pin_dir"], exc)
            families = []
        self.last_duration = time.monotonic() - started
        yield from families
        errors = CounterMetricFamily(
            "flannel_collector_errors",
            "Scrapes that could not read a data-path source (its series are left out).",
            labels=["collector"],
        )
        errors.add_metric(["bpf"], self.errors)
        yield errors
        yield _gauge(
            "flannel_collector_duration_seconds",
            "Time the last scrape spent reading a data-path source.",
            self.last_duration,
            collector="bpf",
        )


def _bpf_families(pin_dir: Path, details: dict[str, Any]) -> Iterator[Metric]:
    from flannel_bpf.datapath.loader import attached

    host_routing = details.get("host_routing") == "bpf"
    with PinnedMaps(pin_dir) as maps:
        counters = maps.counters()
        remotes = maps.count(REMOTES)
        remotes6 = maps.count(REMOTES6)
        cfg = maps.read_config()
        filled = {spec: maps.count(spec) for spec in (FLOWS, ENDPOINTS)} if host_routing else {}
    packets = CounterMetricFamily(
        "flannel_datapath_packets",
        "Packets the BPF programs saw, by hook and reason; outcome says what became of them "
        "(handled: encapsulated or decapsulated, passed: left to the kernel, dropped).",
        labels=["hook", "reason", "outcome"],
    )
    bytes_ = CounterMetricFamily(
        "flannel_datapath_bytes",
        "Bytes of those packets as the hook saw them.",
        labels=["hook", "reason", "outcome"],
    )
    for key, (p, b) in counters.items():
        labels = [key.hook.label, key.reason.label, key.reason.outcome]
        packets.add_metric(labels, p)
        bytes_.add_metric(labels, b)
    yield packets
    yield bytes_
    # An IPv6-only network has no flannel.<VNI> (fb_config names none) and no fb_remotes
    # entries: each peer's only subnet is in fb_remotes6, and flannel-v6.<VNI> alone encapsulates.
    ipv6_only = cfg is not None and cfg.vtep_ifindex == 0
    yield _gauge(PEERS_PROGRAMMED, PEERS_PROGRAMMED_HELP, remotes6 if ipv6_only else remotes)
    # Only the maps that fill up: arrays (fb_config, fb_stats) are full by construction. Host
    # routing's maps are LRU: full is fine there, old entries make room.
    entries = GaugeMetricFamily("flannel_bpf_map_entries", "Entries in a pinned map.",
                                labels=["map"])  # fmt: skip
    capacity = GaugeMetricFamily("flannel_bpf_map_max_entries", "Capacity of a pinned map.",
                                 labels=["map"])  # fmt: skip
    for spec, count in {REMOTES: remotes, REMOTES6: remotes6, **filled}.items():
        entries.add_metric([spec.name], count)
        capacity.add_metric([spec.name], spec.max_entries)
    yield entries
    yield capacity
    hooks = GaugeMetricFamily(
        "flannel_bpf_program_attached",
        "1 if the program this data path needs is attached at that hook, else 0.",
        labels=["hook"],
    )
    decap = details.get("decap", "")
    wanted = {"tc_encap": not ipv6_only, "xdp_decap": decap == "xdp", "tc_decap": decap == "tc",
              "tc_encap6": cfg is not None and cfg.vtep6_ifindex != 0}  # fmt: skip
    found = attached(cfg.vtep_ifindex, cfg.uplink_ifindex, cfg.vtep6_ifindex) if cfg else {}
    for hook, needed in wanted.items():
        if not needed:
            continue
        present = hook in found or (hook == "xdp_decap" and any(k.startswith("xdp") for k in found))
        hooks.add_metric([hook], present)
    yield hooks
