"""Data-path benchmark: pod to pod across two lab nodes, every configuration side by side.

All configurations of one underlay MTU are built at once (one namespace lab each) and measured in
interleaved rounds, the real flanneld's vxlan, udp and host-gw among them (both nodes running
flanneld v0.28.9, built by scripts/build-peers.sh), so drift on the machine hits them alike; each
figure is the median of the rounds. Per configuration: TCP throughput with 1 and 4 streams
(iperf3), 64-byte UDP packet rate (iperf3, packets the receiver got per second), TCP and UDP
request/response latency (qperf), CPU seconds per Gbit (all CPUs, /proc/stat, during the 1-stream
run) and underlay frames per GiB on the receiving node's uplink.

Run: ``python -m bench.datapath [--rounds 3] [--seconds 3] [--mtu 1500 9000]``. Results go to
bench/results/datapath.json; ``python -m bench.report`` turns all results into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import unwind_on_sigterm
from flannel_bpf.lab import lab
from tests import packets as pk

RESULTS = Path(__file__).resolve().parent / "results"
IPERF_PORT = 5201
QPERF_PORT = 19765


@dataclass(frozen=True)
class Config:
    """One data path under test: how its lab is built, and what to change once it is up."""

    key: str
    label: str
    backend: str
    datapath: str = ""
    agent_args: tuple[str, ...] = ()
    # Turn TSO off on the bridge ports facing the nodes: what native XDP on a veth forces on its
    # peer, applied to a path without XDP so its numbers can be compared with the XDP ones.
    peer_tso_off: bool = False
    # Both nodes run the real flanneld instead of flannel-bpf (datapath and agent_args unused).
    flanneld: bool = False
    # Dual stack (lab --ipv6-network), measured between the pods' IPv6 addresses; compared with
    # the -v6 rows of the same backends.
    ipv6: bool = False
    # IPv6-only (lab --kube --ipv6-only: EnableIPv4 false, Kubernetes mode as flanneld runs
    # it); compared with the -v6only rows, host-gw with its -v6 row (the same IPv6 routes).
    ipv6_only: bool = False
    note: str = ""


CONFIGS: tuple[Config, ...] = (
    Config("flanneld-vxlan", "flanneld vxlan (the real one)", "vxlan", flanneld=True),
    Config("flanneld-udp", "flanneld udp (the real one)", "udp", flanneld=True),
    Config("flanneld-host-gw", "flanneld host-gw (the real one)", "host-gw", flanneld=True),
    Config("host-gw", "host-gw (no encapsulation)", "host-gw"),
    Config("vxlan-kernel", "kernel vxlan (flannel-bpf)", "vxlan", "kernel"),
    Config("bpf-auto", "BPF vxlan, decap auto", "vxlan", "bpf"),
    Config(
        "bpf-xdp",
        "BPF vxlan, XDP decap",
        "vxlan",
        "bpf",
        ("--bpf-decap=xdp",),
        note="native XDP on a veth forces TSO off on its peer",
    ),
    Config("bpf-tc", "BPF vxlan, tc decap", "vxlan", "bpf", ("--bpf-decap=tc",)),
    Config(
        "bpf-host-routing",
        "BPF vxlan, host routing",
        "vxlan",
        "bpf",
        ("--host-routing=bpf",),
        note="validated flows between the pod's veth and the uplink in BPF (tc decap)",
    ),
    Config(
        "vxlan-kernel-tso-off",
        "kernel vxlan, peer TSO off",
        "vxlan",
        "kernel",
        peer_tso_off=True,
        note="like for like with the XDP row",
    ),
    Config("udp-userspace", "udp, userspace (flannel-bpf)", "udp", "userspace"),
    Config("udp-bpf", "udp format in BPF", "udp", "bpf"),
    # Dual stack, IPv6 pod traffic: flanneld carries it on flannel-v6 over the IPv6 underlay,
    # our BPF data path over the IPv4 one to the peer's flannel.1 (docs/decisions.md section 8).
    Config("flanneld-vxlan-v6", "flanneld vxlan, IPv6 pods", "vxlan", flanneld=True, ipv6=True),
    Config(
        "flanneld-host-gw-v6", "flanneld host-gw, IPv6 pods", "host-gw", flanneld=True, ipv6=True
    ),
    Config("host-gw-v6", "host-gw, IPv6 pods", "host-gw", ipv6=True),
    Config("vxlan-kernel-v6", "kernel vxlan, IPv6 pods (flannel-v6)", "vxlan", "kernel", ipv6=True),
    Config("bpf-auto-v6", "BPF vxlan, IPv6 pods, decap auto", "vxlan", "bpf", ipv6=True),
    Config(
        "bpf-xdp-v6",
        "BPF vxlan, IPv6 pods, XDP decap",
        "vxlan",
        "bpf",
        ("--bpf-decap=xdp",),
        ipv6=True,
        note="native XDP on a veth forces TSO off on its peer",
    ),
)
# IPv6-only, a run of its own (--ipv6-only, results in datapath_v6only.json): each lab has a
# Kubernetes control plane, which would idle beside every row of the main run. No IPv4 VTEP
# anywhere, so the programs send flannel-v6's frame over the IPv6 underlay (single packets, their
# outer checksum derived in BPF; aggregates by vxlan.ko). host-gw's IPv6 row is the reference.
IPV6_ONLY_CONFIGS: tuple[Config, ...] = (
    Config("flanneld-vxlan-v6only", "flanneld vxlan, IPv6-only", "vxlan", flanneld=True,
           ipv6=True, ipv6_only=True),
    Config("vxlan-kernel-v6only", "kernel vxlan, IPv6-only", "vxlan", "kernel", ipv6=True,
           ipv6_only=True),
    Config("bpf-auto-v6only", "BPF vxlan, IPv6-only, decap auto", "vxlan", "bpf", ipv6=True,
           ipv6_only=True),
    next(c for c in CONFIGS if c.key == "host-gw-v6"),
)  # fmt: skip
ALL_CONFIGS = CONFIGS + IPV6_ONLY_CONFIGS[:-1]
IPV6_NETWORK = "fd10:244::/56"


@dataclass
class Sample:
    tcp1_gbps: float = 0.0
    tcp4_gbps: float = 0.0
    udp64_pps: float = 0.0
    gen64_pps: float = 0.0
    tcp_lat_us: float = 0.0
    udp_lat_us: float = 0.0
    cpu_s_per_gbit: float = 0.0
    frames_per_gib: float = 0.0


@dataclass
class Result:
    config: Config
    mtu: int
    decap: str = ""
    samples: list[Sample] = field(default_factory=list)
    error: str = ""

    def median(self, name: str) -> float:
        values = [getattr(s, name) for s in self.samples if getattr(s, name) > 0]
        return statistics.median(values) if values else 0.0


# --------------------------------------------------------------------------------------------
# Running things in the lab


def ns_run(ns: str, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout
    )


@contextmanager
def server(ns: str, *cmd: str) -> Iterator[None]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        yield
    finally:
        proc.kill()
        proc.wait()


def cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (every namespace shares it), in seconds."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / 100.0  # USER_HZ


def rx_packets(ns: str, dev: str = "eth1") -> int:
    out = ns_run(ns, "cat", f"/sys/class/net/{dev}/statistics/rx_packets").stdout
    return int(out.strip() or 0)


def iperf_tcp(client: str, server_ns: str, ip: str, seconds: int, streams: int) -> dict[str, Any]:
    with server(server_ns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)):
        proc = ns_run(
            client, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-t", str(seconds),
            "-P", str(streams), "-J", timeout=seconds + 30,
        )  # fmt: skip
    data: dict[str, Any] = json.loads(proc.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    return data


def iperf_udp64(client: str, server_ns: str, ip: str, seconds: int) -> float:
    """Packets per second the receiver got, 64-byte payloads at the highest rate the sender can."""
    with server(server_ns, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)):
        proc = ns_run(
            client, "iperf3", "-c", ip, "-p", str(IPERF_PORT), "-u", "-b", "0", "-l", "64",
            "-t", str(seconds), "-J", timeout=seconds + 30,
        )  # fmt: skip
    data = json.loads(proc.stdout)
    if "error" in data:
        raise RuntimeError(f"iperf3: {data['error']}")
    total = data["end"]["sum"]
    received = int(total["packets"]) - int(total["lost_packets"])
    return received / float(total["seconds"])


def trafgen_frame(client: str, server_ip: str) -> bytes:
    """The frame trafgen sends from the pod in namespace client: a UDP datagram with 64 zero
    bytes to server_ip port 9, addressed to the pod's gateway as the pod's own stack would."""

    def first(*cmd: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(ns_run(client, "ip", "-j", *cmd).stdout or "[]")
        if not found:
            raise RuntimeError(f"trafgen set-up: nothing from ip {' '.join(cmd)} in {client}")
        return found[0]

    v6 = ":" in server_ip
    family = "-6" if v6 else "-4"
    # Resolves the gateway's MAC; an answered ping also lets host routing learn the pod.
    for _ in range(3):
        if ns_run(client, "ping", family, "-c", "1", "-W", "2", server_ip).returncode == 0:
            break
    own_mac = first("link", "show", "eth0")["address"]
    own_ip = first(family, "addr", "show", "eth0", "scope", "global")["addr_info"][0]["local"]
    gateway = first(family, "route", "show", "default")["gateway"]
    gateway_mac = first(family, "neigh", "show", gateway, "dev", "eth0")["lladdr"]
    datagram = pk.udp(9, 9, bytes(64))
    if v6:
        return pk.eth(gateway_mac, own_mac, pk.ETH_P_IPV6) + pk.ipv6(own_ip, server_ip, datagram)
    return pk.eth(gateway_mac, own_mac) + pk.ipv4(own_ip, server_ip, datagram)


def trafgen(client: str, frame: bytes, *, seconds: int = 0, count: int = 0) -> None:
    """trafgen in the pod's namespace sends frame from its packet ring on one CPU, for seconds
    or count frames. Its skbs carry only the Ethernet header in their linear part."""
    with tempfile.NamedTemporaryFile("w", prefix="fb-trafgen-", suffix=".cfg") as cfg:
        cfg.write("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
        cfg.flush()
        # --no-sock-mem and --notouch-irq: trafgen would otherwise tune the host's socket memory
        # and IRQ affinities.
        cmd = ["trafgen", "--dev", "eth0", "--conf", cfg.name, "--cpus", "1", "--no-sock-mem",
               "--notouch-irq", "--no-cpu-stats"]  # fmt: skip
        if count:
            ns_run(client, *cmd, "--num", str(count), timeout=60)
        else:
            ns_run(client, "timeout", "-s", "INT", str(seconds), *cmd, timeout=seconds + 30)


def trafgen_udp64(client: str, server_ns: str, server_ip: str, seconds: int) -> float:
    """Packets per second the receiving pod got while trafgen, in the sending pod, pushed 64-byte
    UDP payloads through its veth as fast as one CPU can (packet ring, no socket, no qdisc). No
    sender stack stands in the way, so this is where the data path's per-packet cost shows."""
    frame = trafgen_frame(client, server_ip)
    before = rx_packets(server_ns, "eth0")
    start = time.monotonic()
    trafgen(client, frame, seconds=seconds)
    elapsed = time.monotonic() - start
    time.sleep(0.2)  # what is still queued arrives
    received = rx_packets(server_ns, "eth0") - before
    return received / elapsed


_LATENCY = re.compile(r"latency\s*=\s*([\d.]+)\s*(ns|us|ms|sec)")
_SCALE = {"ns": 1e-3, "us": 1.0, "ms": 1e3, "sec": 1e6}


def qperf_latency(client: str, server_ns: str, ip: str, seconds: int) -> tuple[float, float]:
    with server(server_ns, "qperf", "-lp", str(QPERF_PORT)):
        proc = ns_run(
            client, "qperf", ip, "-lp", str(QPERF_PORT), "-t", str(seconds), "tcp_lat", "udp_lat",
            timeout=2 * seconds + 30,
        )  # fmt: skip
    found = [float(v) * _SCALE[u] for v, u in _LATENCY.findall(proc.stdout)]
    if len(found) != 2:
        raise RuntimeError(f"qperf: {proc.stdout.strip()} {proc.stderr.strip()}")
    return found[0], found[1]


# --------------------------------------------------------------------------------------------
# One configuration


@dataclass
class LiveLab:
    name: str
    result: Result
    client_pod: str = ""
    server_pod: str = ""
    server_ip: str = ""
    server_node: str = ""


def build(config: Config, mtu: int, run_id: str) -> LiveLab:
    name = f"bd{run_id}{ALL_CONFIGS.index(config)}m{mtu}"
    result = Result(config, mtu)
    live = LiveLab(name, result)
    spec = lab.LabSpec(
        name=name,
        nodes=2,
        backend=config.backend,
        underlay_mtu=mtu,
        # Every agent masquerades itself, as kube-flannel's DaemonSet runs them (--ip-masq), so
        # the CNI bridge does not masquerade pod-to-pod traffic (its ipMasq is the complement).
        agent_args=(*config.agent_args, "--ip-masq"),
        flanneld_args=("--ip-masq",),
        datapaths=(config.datapath,) if config.datapath else (),
        flanneld_nodes=2 if config.flanneld else 0,
        ipv6_network=IPV6_NETWORK if config.ipv6 else "",
        kube=config.ipv6_only,
        ipv4=not config.ipv6_only,
    )
    lab.up(spec)
    info = lab.status(name)
    pods = {p["node"]: p for p in info["pods"]}
    nodes = [n["namespace"] for n in info["nodes"]]
    live.client_pod = pods[nodes[0]]["namespace"]
    live.server_pod = pods[nodes[1]]["namespace"]
    live.server_ip = pods[nodes[1]]["ip6" if config.ipv6 else "ip"]
    live.server_node = nodes[1]
    result.decap = str(info["nodes"][1].get("decap") or "")
    if config.peer_tso_off:
        for index in (1, 2):
            subprocess.run(
                ["ip", "netns", "exec", f"{name}-ul", "ethtool", "-K", f"n{index}", "tso", "off"],
                check=True,
                capture_output=True,
            )
    return live


def measure(live: LiveLab, seconds: int) -> Sample:
    client, srv, ip = live.client_pod, live.server_pod, live.server_ip
    sample = Sample()
    frames_before = rx_packets(live.server_node)
    cpu_before = cpu_busy_seconds()
    one = iperf_tcp(client, srv, ip, seconds, 1)
    cpu_spent = cpu_busy_seconds() - cpu_before
    frames = rx_packets(live.server_node) - frames_before
    received = one["end"]["sum_received"]
    sample.tcp1_gbps = float(received["bits_per_second"]) / 1e9
    gbits = float(received["bytes"]) * 8 / 1e9
    if gbits > 0:
        sample.cpu_s_per_gbit = cpu_spent / gbits
        sample.frames_per_gib = frames / (float(received["bytes"]) / 2**30)
    four = iperf_tcp(client, srv, ip, seconds, 4)
    sample.tcp4_gbps = float(four["end"]["sum_received"]["bits_per_second"]) / 1e9
    sample.udp64_pps = iperf_udp64(client, srv, ip, seconds)
    sample.gen64_pps = trafgen_udp64(client, srv, ip, seconds)
    sample.tcp_lat_us, sample.udp_lat_us = qperf_latency(client, srv, ip, max(2, seconds - 1))
    return sample


# --------------------------------------------------------------------------------------------
# The run


def run(
    mtus: tuple[int, ...] = (1500, 9000),
    rounds: int = 3,
    seconds: int = 3,
    configs: tuple[Config, ...] = CONFIGS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:4]
    results: list[Result] = []
    for mtu in mtus:
        lives: list[LiveLab] = []
        try:
            for config in configs:
                log(f"[mtu {mtu}] building {config.label}")
                try:
                    lives.append(build(config, mtu, run_id))
                except Exception as exc:  # one broken configuration must not stop the rest
                    failed = Result(config, mtu, error=f"lab failed: {exc}")
                    results.append(failed)
                    log(f"[mtu {mtu}] {config.label}: {failed.error}")
            for round_no in range(1, rounds + 1):
                order = lives[:]
                random.shuffle(order)  # interleaved and shuffled: drift spreads over all rows
                for live in order:
                    label = live.result.config.label
                    try:
                        sample = measure(live, seconds)
                    except Exception as exc:  # recorded with the row
                        live.result.error = str(exc)
                        log(f"[mtu {mtu}] round {round_no} {label}: {exc}")
                        continue
                    live.result.samples.append(sample)
                    log(
                        f"[mtu {mtu}] round {round_no} {label}: "
                        f"{sample.tcp1_gbps:.2f} Gbit/s, {sample.udp64_pps / 1e3:.0f} kpps "
                        f"(trafgen {sample.gen64_pps / 1e3:.0f}), "
                        f"{sample.tcp_lat_us:.1f} us"
                    )
            results.extend(live.result for live in lives)
        finally:
            for live in lives:
                lab.down(live.name, quiet=True)
    return summarize(results, rounds, seconds)


def summarize(results: list[Result], rounds: int, seconds: int) -> dict[str, Any]:
    rows = []
    for r in results:
        row: dict[str, Any] = {
            "config": r.config.key,
            "label": r.config.label,
            "mtu": r.mtu,
            "decap": r.decap,
            "note": r.config.note,
            "samples": len(r.samples),
            "error": r.error,
        }
        for name in Sample.__dataclass_fields__:
            row[name] = r.median(name)
        rows.append(row)
    by_key = {(row["config"], row["mtu"]): row for row in rows}
    for row, r in zip(rows, results, strict=True):
        # the real flanneld of the same backend: what an operator would switch from
        suffix = "-v6only" if r.config.ipv6_only else "-v6" if r.config.ipv6 else ""
        bases = tuple(
            base + suffix for base in ("host-gw", "vxlan-kernel", f"flanneld-{r.config.backend}")
        )
        for base, name in zip(bases, ("host-gw", "vxlan-kernel", "flanneld"), strict=True):
            ref = by_key.get((base, row["mtu"]))
            if ref is None and suffix == "-v6only":
                ref = by_key.get((base.replace("-v6only", "-v6"), row["mtu"]))
            for metric in ("tcp1_gbps", "tcp4_gbps", "udp64_pps", "gen64_pps"):
                ratio = row[metric] / ref[metric] if ref and ref[metric] else 0.0
                row[f"{metric}_vs_{name}"] = ratio
            if name == "flanneld":
                # lower is better: flanneld's latency and CPU cost over ours (> 1: ours wins)
                for metric in ("tcp_lat_us", "udp_lat_us", "cpu_s_per_gbit"):
                    ratio = ref[metric] / row[metric] if ref and row[metric] else 0.0
                    row[f"{metric}_gain_vs_flanneld"] = ratio
    return {
        "section": "datapath",
        "rounds": rounds,
        "seconds": seconds,
        "rows": rows,
        "targets": targets(by_key),
        "samples": [
            {"config": r.config.key, "mtu": r.mtu, **asdict(s)} for r in results for s in r.samples
        ],
    }


def targets(by_key: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    bpf, kernel, hostgw = (by_key.get((k, 1500)) for k in ("bpf-auto", "vxlan-kernel", "host-gw"))
    decap = f"auto chose {bpf['decap']}" if bpf else ""

    def ratio_target(name: str, metric: str, ref: dict[str, Any] | None, limit: float) -> None:
        if not bpf or not ref or not ref[metric]:
            out.append({"name": name, "value": 0.0, "unit": "x", "limit": f">= {limit}",
                        "met": False, "note": "not measured"})  # fmt: skip
            return
        value = bpf[metric] / ref[metric]
        out.append({"name": name, "value": round(value, 3), "unit": "x", "limit": f">= {limit}",
                    "met": value >= limit, "note": decap})  # fmt: skip

    flanneld = by_key.get(("flanneld-vxlan", 1500))
    ratio_target("BPF TCP throughput vs flanneld vxlan (MTU 1500)", "tcp1_gbps", flanneld, 1.10)
    ratio_target("BPF 64-byte packet rate vs flanneld vxlan (MTU 1500)", "gen64_pps", flanneld, 1.5)
    ratio_target("BPF TCP throughput vs kernel vxlan (MTU 1500)", "tcp1_gbps", kernel, 1.10)
    ratio_target("BPF TCP throughput vs host-gw (MTU 1500)", "tcp1_gbps", hostgw, 0.95)
    # The packet rate where the data path is the bottleneck: trafgen, not a socket, sends.
    ratio_target("BPF 64-byte packet rate vs kernel vxlan (MTU 1500)", "gen64_pps", kernel, 1.5)
    if bpf and kernel and kernel["udp64_pps"]:
        out[-1]["note"] += (
            f"; trafgen in the sending pod; through an iperf3 socket "
            f"{bpf['udp64_pps'] / kernel['udp64_pps']:.2f} x (the socket is the limit there)"
        )
    for metric, name in (("tcp_lat_us", "TCP"), ("udp_lat_us", "UDP")):
        if bpf and kernel and kernel[metric]:
            out.append({
                "name": f"BPF {name} latency vs kernel vxlan (MTU 1500)",
                "value": round(bpf[metric], 1), "unit": "us",
                "limit": f"<= {kernel[metric]:.1f} (kernel vxlan)",
                "met": bpf[metric] <= kernel[metric], "note": decap,
            })  # fmt: skip
    if bpf and flanneld and flanneld["tcp_lat_us"]:
        out.append({
            "name": "BPF TCP latency vs flanneld vxlan (MTU 1500)",
            "value": round(bpf["tcp_lat_us"], 1), "unit": "us",
            "limit": f"<= {flanneld['tcp_lat_us']:.1f} (flanneld)",
            "met": bpf["tcp_lat_us"] <= flanneld["tcp_lat_us"], "note": decap,
        })  # fmt: skip
    out += host_routing_targets(by_key)
    user, flanneld_udp = by_key.get(("udp-userspace", 1500)), by_key.get(("flanneld-udp", 1500))
    if user and flanneld_udp and flanneld_udp["tcp1_gbps"]:
        value = user["tcp1_gbps"] / flanneld_udp["tcp1_gbps"]
        out.append({
            "name": "userspace udp TCP throughput vs flanneld udp (MTU 1500)",
            "value": round(value, 2), "unit": "x", "limit": ">= 1, aim 2",
            "met": value >= 1.0,
            "note": f"{user['tcp1_gbps']:.2f} vs {flanneld_udp['tcp1_gbps']:.2f} Gbit/s"
            + ("; 2x flanneld" if value >= 2 else "; below 2x flanneld"),
        })  # fmt: skip
    return out


def host_routing_targets(by_key: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 19's targets for --host-routing=bpf at MTU 1500, against the real flanneld's vxlan
    and host-gw measured in the same rounds."""
    routed = by_key.get(("bpf-host-routing", 1500))
    flanneld = by_key.get(("flanneld-vxlan", 1500))
    hostgw = by_key.get(("host-gw", 1500))
    out: list[dict[str, Any]] = []

    def target(name: str, value: float | None, limit: float, higher: bool, note: str) -> None:
        if value is None:
            out.append({"name": name, "value": 0.0, "unit": "x", "limit": "", "met": False,
                        "note": "not measured"})  # fmt: skip
            return
        met = value >= limit if higher else value <= limit
        out.append({"name": name, "value": round(value, 3), "unit": "x",
                    "limit": f"{'>=' if higher else '<='} {limit}", "met": met,
                    "note": note})  # fmt: skip

    def ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, metric: str) -> float | None:
        if not a or not b or not a[metric] or not b[metric]:
            return None
        return float(a[metric]) / float(b[metric])

    def both(metric: str, unit: str) -> str:
        if not routed or not flanneld:
            return ""
        return f"{routed[metric]:.2f} vs flanneld {flanneld[metric]:.2f} {unit}"

    target("host routing TCP throughput vs flanneld vxlan (MTU 1500)",
           ratio(routed, flanneld, "tcp1_gbps"), 1.15, True,
           both("tcp1_gbps", "Gbit/s"))  # fmt: skip
    target("host routing TCP throughput vs host-gw (MTU 1500)",
           ratio(routed, hostgw, "tcp1_gbps"), 0.95, True,
           f"host-gw {hostgw['tcp1_gbps']:.2f} Gbit/s" if hostgw else "")  # fmt: skip
    # Latency: how many times shorter than flanneld's round trip.
    target("host routing TCP request/response vs flanneld vxlan (MTU 1500)",
           ratio(flanneld, routed, "tcp_lat_us"), 1.3, True, both("tcp_lat_us", "us"))  # fmt: skip
    target("host routing 64-byte packet rate vs flanneld vxlan (MTU 1500)",
           ratio(routed, flanneld, "gen64_pps"), 1.5, True, both("gen64_pps", "pps"))  # fmt: skip
    target("host routing CPU seconds per Gbit vs flanneld vxlan (MTU 1500)",
           ratio(routed, flanneld, "cpu_s_per_gbit"), 0.85, False,
           both("cpu_s_per_gbit", "s/Gbit"))  # fmt: skip
    return out


def print_table(report: dict[str, Any]) -> None:
    header = (
        f"{'configuration':36} {'MTU':>5} {'decap':>6} {'1 strm':>7} {'4 strm':>7} "
        f"{'xKvx':>5} {'xHgw':>5} {'xFld':>5} {'64B kpps':>9} {'gen kpps':>9} {'tcp us':>7} "
        f"{'udp us':>7} "
        f"{'CPUs/Gb':>8} {'fr/GiB':>8}"
    )
    print(header)
    for row in report["rows"]:
        if row["error"] and not row["samples"]:
            print(f"{row['label']:36} {row['mtu']:>5}  ERROR {row['error']}")
            continue
        print(
            f"{row['label']:36} {row['mtu']:>5} {row['decap']:>6} {row['tcp1_gbps']:>7.2f} "
            f"{row['tcp4_gbps']:>7.2f} {row['tcp1_gbps_vs_vxlan-kernel']:>5.2f} "
            f"{row['tcp1_gbps_vs_host-gw']:>5.2f} {row['tcp1_gbps_vs_flanneld']:>5.2f} "
            f"{row['udp64_pps'] / 1e3:>9.0f} "
            f"{row['gen64_pps'] / 1e3:>9.0f} "
            f"{row['tcp_lat_us']:>7.1f} {row['udp_lat_us']:>7.1f} {row['cpu_s_per_gbit']:>8.3f} "
            f"{row['frames_per_gib'] / 1e3:>7.0f}k"
        )
    print()
    for t in report["targets"]:
        verdict = "MET   " if t["met"] else "MISSED"
        print(f"{verdict} {t['name']}: {t['value']} {t['unit']} (target {t['limit']}) {t['note']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mtu", type=int, nargs="+", default=[1500, 9000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument(
        "--only", nargs="+", choices=[c.key for c in ALL_CONFIGS], help="a subset of configurations"
    )
    parser.add_argument(
        "--ipv6-only", action="store_true", help="the IPv6-only run (datapath_v6only.json)"
    )
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # a killed run still tears down what it built
    chosen = IPV6_ONLY_CONFIGS if args.ipv6_only else CONFIGS
    configs = tuple(c for c in chosen if not args.only or c.key in args.only)
    try:
        report = run(tuple(args.mtu), args.rounds, args.seconds, configs)
    except KeyboardInterrupt:
        print("datapath: interrupted; every lab it built was taken down", file=sys.stderr)
        return 130
    RESULTS.mkdir(parents=True, exist_ok=True)
    section = "datapath_v6only" if args.ipv6_only else "datapath"
    report["section"] = section
    if args.ipv6_only:
        report["targets"] = []  # the targets are the main run's; this run has their rows not
    (RESULTS / f"{section}.json").write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
