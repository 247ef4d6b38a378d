"""Where the cycles go for one TCP stream, and for 64-byte packets, pod to pod across two lab
nodes, per data path.

For each path (the real flanneld's vxlan, flannel-bpf's BPF path with XDP and with tc decap,
kernel vxlan, host-gw) a two-node namespace lab is built as bench/datapath.py builds it, and
`perf record -a` samples the whole machine while one iperf3 stream runs. Every sampled kernel
function is put in one part of the path (netfilter, bridge, routing, vxlan.ko, BPF, veth and
softirq hand-offs, TCP, copies, ...) and the samples are turned into CPU milliseconds per GiB
carried, so paths of different speed compare by what each byte cost. The 64-byte load
(`--loads udp64`) is bench.datapath's packet rate: trafgen in the sending pod, one CPU, and the
samples turned into CPU nanoseconds per packet the receiving pod got.

Both lab nodes share one kernel and its CPUs: a veth hands a packet to its peer's backlog on the
sending CPU, so the receiving node's stack mostly runs in the sender's softirq. The split is
therefore by role, not by CPU: functions that only the sending side runs (vxlan_xmit, the encap
program, ip_finish_output on the uplink) and those only the receiving side runs (vxlan_rcv, the
decap programs, udp_gro) are listed apart where they can be told apart by name.

Run: ``python -m bench.profile [--seconds 8] [--paths flanneld-vxlan bpf-xdp host-gw]
[--loads tcp udp64]``.
Results go to bench/results/profile.json; ``python -m bench.report`` adds them to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import unwind_on_sigterm
from bench.datapath import (
    CONFIGS,
    IPERF_PORT,
    Config,
    LiveLab,
    build,
    rx_packets,
    server,
    trafgen,
    trafgen_frame,
)
from flannel_bpf.lab import lab

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_PATHS = (
    "flanneld-vxlan",
    "bpf-tc",
    "bpf-xdp",
    "bpf-host-routing",
    "vxlan-kernel",
    "host-gw",
)
FREQUENCY = 1999  # Hz per CPU: about 16,000 samples per CPU in 8 s, cheap enough not to skew

# (part of the path, symbol prefixes): the first match wins, so specific before general.
# Where a name says more in its middle (gro, csum, copy), SUBSTRINGS are searched first.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle", ("default_idle", "pv_native_safe_halt", "cpuidle", "do_idle", "mwait", "acpi_idle",
              "native_safe_halt", "intel_idle", "poll_idle", "arch_cpu_idle", "cpu_idle")),
    ("BPF programs and helpers", ("bpf_prog_", "bpf_", "__bpf_", "sk_filter", "tcf_classify",
                                  "cls_bpf", "tcx_", "xdp_", "__xdp", "do_xdp_generic",
                                  "netif_receive_generic_xdp", "veth_xdp")),
    ("netfilter and conntrack", ("nf_", "__nf_", "ipt_", "nft_", "__nft", "iptable_", "xt_",
                                 "ipv4_conntrack", "ipv4_confirm", "ipv4_helper",
                                 "hash_conntrack", "nat_", "__nat", "masquerade")),
    ("bridge", ("br_", "__br_", "nbp_", "deliver_clone")),
    ("vxlan.ko (send)", ("vxlan_xmit", "vxlan_build_skb", "vxlan_encap", "udp_tunnel_xmit",
                         "iptunnel_xmit", "vxlan_get_route", "vxlan_find_mac",
                         "__vxlan_find_mac")),
    ("vxlan.ko (receive)", ("vxlan_", "__iptunnel_pull", "iptunnel_pull", "udp_tunnel")),
    ("UDP (outer headers)", ("udp", "__udp", "skb_udp_tunnel")),
    ("GRO and GSO", ()),
    ("TCP", ("tcp_", "__tcp_", "tcp4_", "inet_csk", "sk_stream", "__sk_mem", "sk_wait",
             "inet_recvmsg", "inet_sendmsg", "sock_", "__sock", "lock_sock", "release_sock",
             "sk_")),
    ("routing and IPv4", ("ip_", "__ip_", "ip4_", "fib_", "__fib", "ipv4_", "inet_", "dst_",
                          "rt_", "__mkroute", "raw_local", "icmp_", "__ip", "find_exception",
                          "l3mdev")),
    ("neighbour and qdisc", ("neigh_", "__neigh", "dev_queue_xmit", "__dev_queue_xmit",
                             "dev_hard_start_xmit", "sch_direct_xmit", "__qdisc", "qdisc_",
                             "pfifo", "validate_xmit", "netif_skb_features",
                             "skb_network_protocol", "eth_header", "arp_")),
    ("veth and softirq hand-offs", ("veth_", "__netif", "netif_", "process_backlog",
                                    "net_rx_action", "__napi", "napi_", "enqueue_to_backlog",
                                    "__do_softirq", "do_softirq", "handle_softirqs", "irq_exit",
                                    "__local_bh", "local_bh", "eth_type_trans", "skb_defer",
                                    "dev_forward_skb", "__dev_forward_skb", "rps_",
                                    "__raise_softirq", "raise_softirq")),
    ("copies and checksums", ()),
    ("skb and memory", ("kmem_", "kfree", "__kfree", "__alloc", "alloc_", "skb_", "__skb",
                        "kmalloc", "__kmalloc", "page_", "__page", "free_", "__free",
                        "get_page", "put_page", "consume_skb", "__build_skb", "build_skb",
                        "mem_cgroup", "__mod_", "mod_", "refill_", "rmqueue", "__rmqueue",
                        "obj_cgroup", "__memcg", "memcg", "pskb_", "slab_", "___slab",
                        "__slab", "folio", "__folio")),
    ("scheduler, syscalls, timers", ("schedule", "__schedule", "finish_task", "try_to_wake",
                                     "ttwu", "enqueue_", "dequeue_", "update_", "pick_next",
                                     "__switch", "switch_", "entry_SYSCALL", "syscall",
                                     "do_syscall", "__x64", "x64_sys", "__sys_", "ksys_",
                                     "vfs_", "__wake", "wake_up", "select_task", "psi_", "ep_",
                                     "do_epoll", "__fget", "fput", "rcu_", "__rcu", "_raw_spin",
                                     "raw_spin", "native_", "check_preempt", "resched",
                                     "sched_", "__cond_resched", "irqentry", "asm_", "sysvec",
                                     "__sysvec", "hrtimer", "__hrtimer", "tick_", "ktime_",
                                     "read_tsc", "timekeeping", "clockevents", "lapic", "perf_",
                                     "__perf", "x86_pmu")),
)  # fmt: skip
SUBSTRINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("BPF programs and helpers", ("bpf_prog",)),
    ("GRO and GSO", ("gro_", "_gro", "gso", "skb_segment")),
    ("copies and checksums", ("copy_", "memcpy", "memmove", "memset", "rep_movs", "csum",
                              "clear_page", "skb_copy", "skb_datagram")),
)  # fmt: skip
OTHER_KERNEL = "other kernel"
USERSPACE = "userspace (iperf3, trafgen)"
LOADS = ("tcp", "udp64")


def category(symbol: str, dso_kernel: bool) -> str:
    if not dso_kernel:
        return USERSPACE
    for name, words in SUBSTRINGS:
        if any(word in symbol for word in words):
            return name
    for name, prefixes in CATEGORIES:
        if prefixes and symbol.startswith(prefixes):
            return name
    return OTHER_KERNEL


REPORT_LINE = re.compile(r"^\s*([\d.]+)%\s+(\d+)\s+\[([k.])\]\s+(.+?)\s*$")


def parse_report(text: str) -> list[tuple[int, bool, str]]:
    """(samples, in the kernel, symbol) per line of `perf report --sort sym -n --stdio`."""
    rows = []
    for line in text.splitlines():
        match = REPORT_LINE.match(line)
        if match:
            rows.append((int(match.group(2)), match.group(3) == "k", match.group(4)))
    return rows


def perf_record(seconds: int, data: Path) -> None:
    perf = subprocess.run(
        ["perf", "record", "-a", "-F", str(FREQUENCY), "-o", str(data), "--",
         "sleep", str(seconds)],
        capture_output=True, text=True, timeout=seconds + 60,
    )  # fmt: skip
    if perf.returncode != 0:
        raise RuntimeError(f"perf record: {perf.stderr.strip()[-300:]}")


def perf_rows(data: Path) -> list[tuple[int, bool, str]]:
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "sym", "-n", "--stdio",
         "--percent-limit", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return parse_report(report.stdout)


def tcp_load(
    live: LiveLab, seconds: int, data: Path
) -> tuple[list[tuple[int, bool, str]], float, float]:
    """One iperf3 stream while perf samples: (perf rows, GiB carried, Gbit/s)."""
    with server(live.server_pod, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)):
        # The stream runs a second before sampling starts: slow start is not what we profile.
        client = subprocess.Popen(
            ["ip", "netns", "exec", live.client_pod, "iperf3", "-c", live.server_ip,
             "-p", str(IPERF_PORT), "-t", str(seconds + 2), "-J"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        time.sleep(1)
        try:
            perf_record(seconds, data)
        finally:
            out, _ = client.communicate(timeout=seconds + 30)
    result = json.loads(out)
    # Bytes carried while perf sampled: the receiver's per-second intervals inside the window.
    window = [i["sum"] for i in result["intervals"] if 1 <= i["sum"]["start"] < 1 + seconds]
    carried = sum(float(s["bytes"]) for s in window)
    gbps = sum(float(s["bits_per_second"]) for s in window) / max(1, len(window)) / 1e9
    return perf_rows(data), carried / 2**30, gbps


def udp64_load(live: LiveLab, seconds: int, data: Path) -> tuple[list[tuple[int, bool, str]], int]:
    """trafgen's 64-byte packets while perf samples: (perf rows, packets the pod got)."""
    frame = trafgen_frame(live.client_pod, live.server_ip)
    sender = threading.Thread(target=trafgen, args=(live.client_pod, frame),
                              kwargs={"seconds": seconds + 2})  # fmt: skip
    sender.start()
    try:
        time.sleep(1)
        before = rx_packets(live.server_pod, "eth0")
        perf_record(seconds, data)
        received = rx_packets(live.server_pod, "eth0") - before
    finally:
        sender.join()
    return perf_rows(data), received


def by_category(rows: list[tuple[int, bool, str]], per: float) -> dict[str, float]:
    """Samples per part of the path, as CPU time (perf's sample period) divided by per."""
    samples: dict[str, int] = defaultdict(int)
    for count, kernel, symbol in rows:
        samples[category(symbol, kernel)] += count
    return {k: v / FREQUENCY / per for k, v in sorted(samples.items())} if per else {}


def top_symbols(rows: list[tuple[int, bool, str]]) -> list[dict[str, Any]]:
    total = sum(r[0] for r in rows) or 1
    return [
        {"symbol": s, "percent": round(100 * n / total, 2), "category": category(s, k)}
        for n, k, s in sorted(rows, reverse=True)[:25]
    ]


def profile_one(
    config: Config, seconds: int, run_id: str, workdir: Path, loads: list[str]
) -> dict[str, dict[str, Any]]:
    """One lab for config, profiled under each load: {load: its result}."""
    live = build(config, 1500, run_id)
    out: dict[str, dict[str, Any]] = {}
    try:
        if "tcp" in loads:
            rows, gib, gbps = tcp_load(live, seconds, workdir / f"{config.key}.tcp.perf")
            ms_per_gib = {k: v * 1000 for k, v in by_category(rows, gib).items()}
            out["tcp"] = {
                "key": config.key,
                "label": config.label,
                "gbps": round(gbps, 2),
                "gib_sampled": round(gib, 2),
                "busy_cpu_ms_per_gib": round(
                    sum(v for k, v in ms_per_gib.items() if k != "idle"), 1
                ),
                "cpu_ms_per_gib": {k: round(v, 1) for k, v in ms_per_gib.items()},
                "top_symbols": top_symbols(rows),
            }
        if "udp64" in loads:
            rows, packets = udp64_load(live, seconds, workdir / f"{config.key}.udp64.perf")
            ns_per_packet = {k: v * 1e9 for k, v in by_category(rows, packets).items()}
            out["udp64"] = {
                "key": config.key,
                "label": config.label,
                "kpps": round(packets / seconds / 1e3, 1),
                "busy_cpu_ns_per_packet": round(
                    sum(v for k, v in ns_per_packet.items() if k != "idle")
                ),
                "cpu_ns_per_packet": {k: round(v) for k, v in ns_per_packet.items()},
                "top_symbols": top_symbols(rows),
            }
    finally:
        lab.down(live.name, quiet=True)
    return out


def print_table(
    paths: list[dict[str, Any]], unit: str, head: str, head_field: str, total_field: str, field: str
) -> None:
    names = [name for name, _ in CATEGORIES if name != "idle"] + [OTHER_KERNEL, USERSPACE]
    print(f"\n{unit:<30}" + "".join(f"{p['key']:>18}" for p in paths))
    print(f"{head:<30}" + "".join(f"{p[head_field]:>18.2f}" for p in paths))
    for name in names:
        cells = [p[field].get(name, 0.0) for p in paths]
        if any(cells):
            print(f"{name:<30}" + "".join(f"{c:>18.1f}" for c in cells))
    print(f"{'busy total':<30}" + "".join(f"{p[total_field]:>18.1f}" for p in paths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=int, default=8)
    keys = [c.key for c in CONFIGS]
    parser.add_argument("--paths", nargs="+", choices=keys, default=list(DEFAULT_PATHS))
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS),
                        help="one TCP stream, trafgen's 64-byte packets, or both")  # fmt: skip
    parser.add_argument("--output", type=Path, default=RESULTS / "profile.json")
    opts = parser.parse_args(argv)
    unwind_on_sigterm()
    run_id = uuid.uuid4().hex[:4]
    by_load: dict[str, list[dict[str, Any]]] = {load: [] for load in opts.loads}
    with tempfile.TemporaryDirectory(prefix="fbprof-") as tmp:
        for key in opts.paths:
            config = next(c for c in CONFIGS if c.key == key)
            print(f"profiling {config.label} ({' and '.join(opts.loads)}, {opts.seconds} s each)",
                  flush=True)  # fmt: skip
            try:
                for load, result in profile_one(config, opts.seconds, run_id, Path(tmp),
                                                opts.loads).items():  # fmt: skip
                    by_load[load].append(result)
            except (RuntimeError, OSError, ValueError, KeyError, lab.LabError,
                    subprocess.SubprocessError) as exc:  # fmt: skip
                print(f"  {config.label}: {exc}", file=sys.stderr)
    if not any(by_load.values()):
        return 1
    report = {
        "bench": "profile",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": opts.seconds,
        "frequency_hz": FREQUENCY,
        "kernel": os.uname().release,
        "paths": by_load.get("tcp", []),
        "udp64_paths": by_load.get("udp64", []),
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(report, indent=2) + "\n")
    if report["paths"]:
        print_table(report["paths"], "CPU ms per GiB", "one stream, Gbit/s", "gbps",
                    "busy_cpu_ms_per_gib", "cpu_ms_per_gib")  # fmt: skip
    if report["udp64_paths"]:
        print_table(report["udp64_paths"], "CPU ns per 64 B packet", "64 B kpps", "kpps",
                    "busy_cpu_ns_per_packet", "cpu_ns_per_packet")  # fmt: skip
    print(f"\nwrote {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
