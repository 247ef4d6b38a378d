"""Per-packet cost of each BPF program, as the kernel measures it with BPF_PROG_TEST_RUN.

Every case runs ``runs`` times with repeat=1 and we keep the kernel's ``duration`` of each run
(ns for that one run). repeat>1 would rerun the buffer the previous iteration already rewrote,
which is wrong for programs that encapsulate or strip headers. Reported: median, p10 and p90.

Each run is checked, not just timed: the return value and the output length must be what the
program returns when it does the work being measured, and the program's own counter for that
decision (fb_stats, per hook and reason) must move by exactly the number of runs. A case that
fails a check is reported as an error, never as a number.

The cases run interleaved in batches, so a noisy neighbour (another test suite on this machine)
spreads over all of them instead of skewing one. Two trivial programs (``return XDP_PASS``,
``return TC_ACT_UNSPEC``) give the floor of the measurement itself: the kernel's clock reads, bh
disabling and the run context, which every other number includes.

The topology is the one tests/test_bpf_programs.py uses, in two namespaces of our own: a veth
``u0`` between host A (encapsulates) and host B (decapsulates), ``flannel.1`` on both, and on A a
permanent neighbour entry for B's underlay address so that bpf_fib_lookup() answers SUCCESS.
The udp-format encapsulation runs on an L3 TUN device (flannel0), which BPF_PROG_TEST_RUN cannot
model; it is listed as not measurable.

Run as root from the repository root: ``.venv/bin/python -m bench.prog_cost [--runs N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final

from bench import unwind_on_sigterm
from flannel_bpf.datapath import bpf_sys, loader
from flannel_bpf.datapath.bpf_maps import (
    FB_CFG_CHECK_SOURCES,
    VXLAN_OVERHEAD,
    DatapathConfig,
    Hook,
    PinnedMaps,
    Reason,
    Remote,
)
from flannel_bpf.lab import netns
from tests import packets as pk

RESULTS_FILE: Final = Path(__file__).resolve().parent / "results" / "prog_cost.json"

TC_ACT_UNSPEC: Final = 0xFFFFFFFF  # the kernel hands retval back as u32
TC_ACT_REDIRECT: Final = 7
XDP_PASS: Final = 2
XDP_DROP: Final = 1
TC_ACT_SHOT: Final = 2

UDP_OVERHEAD: Final = 28  # flannel's udp format: outer IPv4 + UDP
VXLAN_PORT: Final = 8472
UDP_PORT: Final = 8285

# Addresses live only inside our namespaces; 198.18.0.0/15 is the benchmarking range.
A_IP, B_IP = "198.18.7.1", "198.18.7.2"
A_MAC, B_MAC = "02:fb:be:00:00:01", "02:fb:be:00:00:02"
A_VTEP_MAC, B_VTEP_MAC = "0e:fb:be:00:01:01", "0e:fb:be:00:02:01"
A_POD, B_POD = "10.7.1.5", "10.7.2.7"
A_SUBNET, B_SUBNET = "10.7.1.0/24", "10.7.2.0/24"
STRANGER_IP: Final = "198.18.7.66"  # holds no lease: what anti-spoofing drops
NO_REMOTE_POD: Final = "10.7.9.9"  # no fb_remotes entry covers it

SMALL, LARGE = 64, 1400  # inner IPv4 packet sizes; LARGE still fits a 1500 uplink once wrapped
WARMUP_RUNS: Final = 200
BATCH: Final = 500  # runs per case before moving to the next (interleaving, counter checks)

DECAP_LIMIT_NS: Final = 100.0
ENCAP_LIMIT_NS: Final = 300.0

# BPF instructions for the floor programs: r0 = imm; exit. (BPF_ALU64|BPF_MOV|BPF_K, BPF_JMP|EXIT)
_EXIT: Final = bytes([0x95, 0, 0, 0, 0, 0, 0, 0])


def _return(imm: int) -> bytes:
    return bytes([0xB7, 0, 0, 0]) + imm.to_bytes(4, "little", signed=True) + _EXIT


# --------------------------------------------------------------------------------------------
# Frames


def inner_ip(size: int, src: str = A_POD, dst: str = B_POD, ttl: int = 64) -> bytes:
    """A UDP-in-IPv4 pod packet of exactly ``size`` bytes."""
    return pk.ipv4(src, dst, pk.udp(40000, 7777, b"p" * (size - 28)), ttl=ttl)


def encap_frame(size: int, dst: str = B_POD) -> bytes:
    """What tc egress on flannel.1 sees: the neighbour layer already put the VTEP MACs on."""
    return pk.eth(B_VTEP_MAC, A_VTEP_MAC) + inner_ip(size, dst=dst)


def outer_frame(payload: bytes) -> bytes:
    """A UDP datagram from A's underlay to B's, as B's uplink receives it."""
    return pk.eth(B_MAC, A_MAC) + payload


def vxlan_frame(size: int, src: str = A_IP) -> bytes:
    """flannel's VXLAN as fb_tc_encap sends it (outer UDP checksum 0)."""
    payload = pk.vxlan(1) + pk.eth(B_VTEP_MAC, A_VTEP_MAC) + inner_ip(size)
    return outer_frame(pk.ipv4(src, B_IP, pk.udp(50000, VXLAN_PORT, payload)))


def plain_udp_frame(size: int) -> bytes:
    """A datagram to B that is not VXLAN (DNS port): the decap programs must leave it alone."""
    return outer_frame(pk.ipv4(A_IP, B_IP, pk.udp(50000, 53, b"d" * (size - 28))))


def udp_format_frame(size: int) -> bytes:
    """flanneld's udp backend: one raw IPv4 packet per UDP 8285 datagram (TTL already one down)."""
    return outer_frame(pk.ipv4(A_IP, B_IP, pk.udp(UDP_PORT, UDP_PORT, inner_ip(size, ttl=63))))


ARP_FRAME: Final = pk.eth("ff:ff:ff:ff:ff:ff", A_MAC, pk.ETH_P_ARP) + bytes(28)


# --------------------------------------------------------------------------------------------
# Setup


@dataclass
class Node:
    """Loaded (never attached) programs of one wire format and their maps, in one namespace."""

    ns: str
    programs: loader.Programs
    maps: PinnedMaps


@dataclass(frozen=True)
class Device:
    index: int
    mac: str


def _devices(ns: str, *names: str) -> dict[str, Device]:
    from pyroute2 import IPRoute

    with netns.entered(ns), IPRoute() as ipr:
        links = {name: ipr.link("get", ifname=name)[0] for name in names}
    return {
        name: Device(int(link["index"]), str(link.get_attr("IFLA_ADDRESS")))
        for name, link in links.items()
    }


def _build_topology(a: str, b: str) -> None:
    netns.add_veth(a, "u0", b, "u0")
    for ns, addr, mac, vtep_mac in ((a, A_IP, A_MAC, A_VTEP_MAC), (b, B_IP, B_MAC, B_VTEP_MAC)):
        netns.run(["ip", "-n", ns, "link", "set", "u0", "address", mac])
        netns.add_address(ns, "u0", f"{addr}/24")
        netns.link_up(ns, "u0")
        netns.run(
            ["ip", "-n", ns, "link", "add", "flannel.1", "address", vtep_mac, "type", "vxlan",
             "id", "1", "dev", "u0", "local", addr, "dstport", str(VXLAN_PORT), "nolearning"]
        )  # fmt: skip
        netns.run(["ip", "-n", ns, "link", "set", "flannel.1", "mtu", "1450", "up"])
        # bpf_fib_lookup() answers FWD_DISABLED unless the uplink forwards, as on a flannel host.
        netns.run(netns.in_netns(ns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))
    # A resolved underlay neighbour: the FIB lookup returns SUCCESS with B's MAC.
    netns.run(
        ["ip", "-n", a, "neigh", "add", B_IP, "lladdr", B_MAC, "dev", "u0", "nud", "permanent"]
    )
    # flannel0 for the udp format: its decap programs redirect there.
    netns.run(["ip", "-n", b, "tuntap", "add", "dev", "flannel0", "mode", "tun"])


def _load_node(
    stack: contextlib.ExitStack,
    ns: str,
    pin_name: str,
    wire: loader.WireFormat,
    config: DatapathConfig,
) -> Node:
    pin_dir = loader.DEFAULT_BPFFS / pin_name / "v1"
    stack.callback(loader.unpin, pin_dir)  # registered first: runs after the fds are closed
    programs = loader.compile_programs(pin_dir, wire)
    stack.callback(programs.close)
    maps = PinnedMaps(pin_dir)
    stack.callback(maps.close)
    maps.write_config(config)
    return Node(ns, programs, maps)


def _load_floor(stack: contextlib.ExitStack, prog_type: int, imm: int, name: str) -> int:
    flags = bpf_sys.BPF_F_XDP_HAS_FRAGS if prog_type == bpf_sys.BPF_PROG_TYPE_XDP else 0
    # Same load flags as the decap program it is compared with.
    fd = bpf_sys.prog_load(prog_type, _return(imm), name, prog_flags=flags)
    stack.callback(os.close, fd)
    return fd


# --------------------------------------------------------------------------------------------
# Cases and measuring


@dataclass
class Case:
    program: str
    label: str
    ns: str
    fd: int
    frame: bytes
    retval: int
    out_len: int
    hook: Hook | None = None  # with reason: the counter that must move; None for the floor
    reason: Reason | None = None
    maps: PinnedMaps | None = None
    durations: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def verdict(self) -> str:
        return self.reason.label if self.reason is not None else "baseline"


def _counters(case: Case) -> dict[Reason, tuple[int, int]]:
    assert case.maps is not None and case.hook is not None
    return {k.reason: v for k, v in case.maps.counters().items() if k.hook is case.hook}


def _batch(case: Case, count: int, record: bool) -> None:
    """Run ``count`` times; on any surprise set case.error and stop."""
    before = _counters(case) if case.maps is not None else {}
    test_run = bpf_sys.prog_test_run
    durations: list[int] = []
    # The thread's namespace matters: tc test runs use its loopback device, so FIB lookups and
    # redirects resolve against our topology, not the host's.
    with netns.entered(case.ns):
        for _ in range(count):
            result = test_run(case.fd, case.frame)
            if result.retval != case.retval or len(result.data) != case.out_len:
                case.error = (
                    f"returned {result.retval:#x} with {len(result.data)} bytes, expected "
                    f"{case.retval:#x} with {case.out_len}"
                )
                return
            durations.append(result.duration_ns)
    if case.maps is not None and case.reason is not None:
        after = _counters(case)
        delta = {r: (after[r][0] - before[r][0], after[r][1] - before[r][1]) for r in after}
        moved = {r: d for r, d in delta.items() if d != (0, 0)}
        wanted = {case.reason: (count, count * len(case.frame))}
        if moved != wanted:
            shown = {r.label: d for r, d in moved.items()}
            case.error = f"counters moved {shown}, expected {case.reason.label} x{count}"
            return
    if record:
        case.durations.extend(durations)


def _measure(cases: list[Case], runs: int) -> None:
    for case in cases:
        _batch(case, min(WARMUP_RUNS, runs), record=False)
    done = 0
    while done < runs:
        count = min(BATCH, runs - done)
        for case in cases:
            if case.error is None:
                _batch(case, count, record=True)
        done += count


def _build_cases(
    a: Node, b: Node, b_udp: Node, b_checked: Node, floor_xdp: int, floor_tc: int
) -> list[Case]:
    cases: list[Case] = []
    for size in (SMALL, LARGE):
        frame = encap_frame(size)
        cases.append(
            Case("fb_tc_encap", f"vxlan encap, {size} B inner ({len(frame)} B frame)", a.ns,
                 a.programs.encap, frame, TC_ACT_REDIRECT, len(frame) + VXLAN_OVERHEAD,
                 Hook.TC_ENCAP, Reason.ENCAP_REDIRECT, a.maps)
        )  # fmt: skip
    for size in (SMALL, LARGE):
        frame = encap_frame(size, dst=NO_REMOTE_POD)
        cases.append(
            Case("fb_tc_encap", f"encap pass, no remote, {size} B inner ({len(frame)} B frame)",
                 a.ns, a.programs.encap, frame, TC_ACT_UNSPEC, len(frame), Hook.TC_ENCAP,
                 Reason.PASS_NO_REMOTE, a.maps)
        )  # fmt: skip
    for name, fd, hook, retval, reason in (
        ("fb_xdp_decap", b.programs.xdp_decap, Hook.XDP_DECAP, XDP_PASS, Reason.DECAP_PASS),
        ("fb_tc_decap", b.programs.tc_decap, Hook.TC_DECAP, TC_ACT_REDIRECT, Reason.DECAP_REDIRECT),
    ):
        passed = XDP_PASS if hook is Hook.XDP_DECAP else TC_ACT_UNSPEC
        for size in (SMALL, LARGE):
            frame = vxlan_frame(size)
            cases.append(
                Case(name, f"vxlan decap, {size} B inner ({len(frame)} B frame)", b.ns, fd,
                     frame, retval, len(frame) - VXLAN_OVERHEAD, hook, reason, b.maps)
            )  # fmt: skip
        for size in (SMALL, LARGE):
            frame = plain_udp_frame(size)
            cases.append(
                Case(name, f"decap pass, non-VXLAN UDP, {size} B packet ({len(frame)} B frame)",
                     b.ns, fd, frame, passed, len(frame), hook, Reason.PASS_NOT_OURS, b.maps)
            )  # fmt: skip
        cases.append(
            Case(name, f"decap pass, ARP ({len(ARP_FRAME)} B frame)", b.ns, fd, ARP_FRAME, passed,
                 len(ARP_FRAME), hook, Reason.PASS_NOT_IPV4, b.maps)
        )  # fmt: skip
    for name, fd, hook, retval, reason in (
        ("fb_xdp_udp_decap", b_udp.programs.xdp_decap, Hook.XDP_DECAP, XDP_PASS,
         Reason.DECAP_PASS),
        ("fb_tc_udp_decap", b_udp.programs.tc_decap, Hook.TC_DECAP, TC_ACT_REDIRECT,
         Reason.DECAP_REDIRECT),
    ):  # fmt: skip
        for size in (SMALL, LARGE):
            frame = udp_format_frame(size)
            cases.append(
                Case(name, f"udp-format decap, {size} B inner ({len(frame)} B frame)", b.ns, fd,
                     frame, retval, len(frame) - UDP_OVERHEAD, hook, reason, b_udp.maps)
            )  # fmt: skip
    # --anti-spoofing: the same decapsulation plus one LPM lookup; and a stranger's frame dropped.
    for name, fd, hook, retval, reason in (
        ("fb_xdp_decap", b_checked.programs.xdp_decap, Hook.XDP_DECAP, XDP_PASS,
         Reason.DECAP_PASS),
        ("fb_tc_decap", b_checked.programs.tc_decap, Hook.TC_DECAP, TC_ACT_REDIRECT,
         Reason.DECAP_REDIRECT),
    ):  # fmt: skip
        dropped = XDP_DROP if hook is Hook.XDP_DECAP else TC_ACT_SHOT
        frame = vxlan_frame(SMALL)
        cases.append(
            Case(name, f"vxlan decap, anti-spoofing on, {SMALL} B inner ({len(frame)} B frame)",
                 b.ns, fd, frame, retval, len(frame) - VXLAN_OVERHEAD, hook, reason,
                 b_checked.maps)
        )  # fmt: skip
        frame = vxlan_frame(SMALL, src=STRANGER_IP)
        cases.append(
            Case(name, f"anti-spoofing drop, no lease, {SMALL} B inner ({len(frame)} B frame)",
                 b.ns, fd, frame, dropped, len(frame), hook, Reason.DROP_UNKNOWN_SENDER,
                 b_checked.maps)
        )  # fmt: skip
    # The floor, on the very frames the decap cases use: only the program differs.
    for name, fd, retval, what in (
        ("baseline_xdp", floor_xdp, XDP_PASS, "XDP: return XDP_PASS"),
        ("baseline_tc", floor_tc, TC_ACT_UNSPEC, "tc: return TC_ACT_UNSPEC"),
    ):
        for size in (SMALL, LARGE):
            frame = vxlan_frame(size)
            cases.append(
                Case(name, f"trivial {what}, {len(frame)} B frame", b.ns, fd, frame, retval,
                     len(frame))
            )  # fmt: skip
    return cases


# --------------------------------------------------------------------------------------------
# Results


UDP_ENCAP_ROW: Final = {
    "program": "fb_tc_udp_encap",
    "case": "udp-format encap: runs on flannel0, an L3 TUN device, which BPF_PROG_TEST_RUN "
    "cannot model (it builds Ethernet skbs); not measured here",
    "median_ns": None,
    "p10_ns": None,
    "p90_ns": None,
    "verdict": "not_measurable",
}


def _row(case: Case) -> dict[str, Any]:
    if case.error is not None or len(case.durations) < 2:
        error = case.error or "no runs recorded"
        return {"program": case.program, "case": case.label, "median_ns": None, "p10_ns": None,
                "p90_ns": None, "verdict": f"error: {error}"}  # fmt: skip
    deciles = statistics.quantiles(case.durations, n=10, method="inclusive")
    return {
        "program": case.program,
        "case": case.label,
        "median_ns": float(statistics.median(case.durations)),
        "p10_ns": float(deciles[0]),
        "p90_ns": float(deciles[-1]),
        "verdict": case.verdict,
    }


def _find(rows: list[dict[str, Any]], program: str, prefix: str) -> dict[str, Any]:
    return next(r for r in rows if r["program"] == program and r["case"].startswith(prefix))


def _target(name: str, row: dict[str, Any], floor: dict[str, Any], limit: float) -> dict[str, Any]:
    value = row["median_ns"]
    if value is None:
        return {"name": name, "value": None, "unit": "ns", "limit": f"<= {limit:g}", "met": False,
                "note": f"{row['program']} {row['case']}: {row['verdict']}"}  # fmt: skip
    note = f"{row['program']}, {row['case']}: p10 {row['p10_ns']:g}, p90 {row['p90_ns']:g}"
    if floor["median_ns"] is not None:
        net = value - floor["median_ns"]
        note += (
            f"; includes the test-run floor ({floor['program']} {floor['median_ns']:g} ns), "
            f"{net:g} ns without it"
        )
    return {"name": name, "value": value, "unit": "ns", "limit": f"<= {limit:g}",
            "met": value <= limit, "note": note}  # fmt: skip


def _targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    small = f"vxlan decap, {SMALL} B"
    floor_xdp = _find(rows, "baseline_xdp", "trivial")
    floor_tc = _find(rows, "baseline_tc", "trivial")
    return [
        _target(
            "VXLAN decapsulation (XDP) per packet",
            _find(rows, "fb_xdp_decap", small),
            floor_xdp,
            DECAP_LIMIT_NS,
        ),
        _target(
            "VXLAN decapsulation (tc ingress) per packet",
            _find(rows, "fb_tc_decap", small),
            floor_tc,
            DECAP_LIMIT_NS,
        ),
        _target(
            "VXLAN encapsulation per packet",
            _find(rows, "fb_tc_encap", f"vxlan encap, {SMALL} B"),
            floor_tc,
            ENCAP_LIMIT_NS,
        ),
    ]


def run(runs: int = 20000) -> dict[str, Any]:
    """Build the namespaces, load the programs, measure every case; everything is removed after."""
    if runs < 10:
        raise ValueError("runs must be at least 10 (percentiles)")
    if os.geteuid() != 0:
        raise PermissionError("needs root: network namespaces, bpffs and BPF_PROG_TEST_RUN")
    token = f"{os.getpid()}{uuid.uuid4().hex[:6]}"
    ns_a, ns_b = f"fbbench{token}a", f"fbbench{token}b"
    with contextlib.ExitStack() as stack:
        for ns in (ns_a, ns_b):
            stack.callback(netns.delete_netns, ns)  # registered first: runs last
            netns.add_netns(ns)
        _build_topology(ns_a, ns_b)
        loader.ensure_bpffs()
        dev_a = _devices(ns_a, "u0", "flannel.1")
        dev_b = _devices(ns_b, "u0", "flannel.1", "flannel0")

        def vxlan_config(local: str, devs: dict[str, Device]) -> DatapathConfig:
            return DatapathConfig(
                local_ip=IPv4Address(local),
                vni=1,
                port=VXLAN_PORT,
                uplink_ifindex=devs["u0"].index,
                uplink_mac=devs["u0"].mac,
                vtep_ifindex=devs["flannel.1"].index,
                vtep_mac=devs["flannel.1"].mac,
            )

        a = _load_node(stack, ns_a, f"bench-{token}-a", loader.VXLAN, vxlan_config(A_IP, dev_a))
        b = _load_node(stack, ns_b, f"bench-{token}-b", loader.VXLAN, vxlan_config(B_IP, dev_b))
        b_udp = _load_node(
            stack,
            ns_b,
            f"bench-{token}-u",
            loader.UDP,
            DatapathConfig(
                local_ip=IPv4Address(B_IP),
                vni=0,
                port=UDP_PORT,
                uplink_ifindex=dev_b["u0"].index,
                uplink_mac=dev_b["u0"].mac,
                vtep_ifindex=dev_b["flannel0"].index,
                vtep_mac="00:00:00:00:00:00",
            ),
        )
        b_checked = _load_node(
            stack,
            ns_b,
            f"bench-{token}-c",
            loader.VXLAN,
            dataclasses.replace(vxlan_config(B_IP, dev_b), flags=FB_CFG_CHECK_SOURCES),
        )
        b_checked.maps.set_remote(Remote(IPv4Network(A_SUBNET), IPv4Address(A_IP), A_VTEP_MAC))
        b_checked.maps.set_sender(IPv4Address(A_IP), 1)
        a.maps.set_remote(Remote(IPv4Network(B_SUBNET), IPv4Address(B_IP), B_VTEP_MAC))
        floor_xdp = _load_floor(stack, bpf_sys.BPF_PROG_TYPE_XDP, XDP_PASS, "bench_floor_xdp")
        floor_tc = _load_floor(stack, bpf_sys.BPF_PROG_TYPE_SCHED_CLS, -1, "bench_floor_tc")

        cases = _build_cases(a, b, b_udp, b_checked, floor_xdp, floor_tc)
        _measure(cases, runs)

    rows = [_row(case) for case in cases]
    rows.append(dict(UDP_ENCAP_ROW))
    return {
        "section": "program_cost",
        "unit": "ns",
        "runs": runs,
        "rows": rows,
        "targets": _targets(rows),
    }


# --------------------------------------------------------------------------------------------
# Command line


def _ns(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    width = max(len(r["case"]) for r in rows if r["verdict"] != "not_measurable")
    lines = [
        f"BPF program cost, BPF_PROG_TEST_RUN repeat=1, {result['runs']} runs per case "
        f"(kernel {os.uname().release}, {os.cpu_count()} CPUs)",
        "",
        f"{'program':<18} {'case':<{width}} {'median':>7} {'p10':>6} {'p90':>6}  verdict",
    ]
    notes = []
    for r in rows:
        if r["verdict"] == "not_measurable":
            notes.append(f"{r['program']}: {r['case']}")
            continue
        lines.append(
            f"{r['program']:<18} {r['case']:<{width}} {_ns(r['median_ns']):>7} "
            f"{_ns(r['p10_ns']):>6} {_ns(r['p90_ns']):>6}  {r['verdict']}"
        )
    lines += ["", "ns per packet; baseline_* rows are the measurement floor every row includes."]
    lines += notes
    lines += ["", "Targets (small-packet medians):"]
    for t in result["targets"]:
        state = "MET" if t["met"] else "MISSED"
        lines.append(f"  {state:<6} {t['name']}: {_ns(t['value'])} ns (limit {t['limit']} ns)")
        lines.append(f"         {t['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prog_cost", description=__doc__)
    parser.add_argument("--runs", type=int, default=20000, help="runs per case (default 20000)")
    args = parser.parse_args(argv)
    unwind_on_sigterm()  # a killed run still tears down what it built
    started = time.monotonic()
    try:
        result = run(args.runs)
    except (loader.LoaderError, netns.CommandError, PermissionError, ValueError) as exc:
        print(f"prog_cost: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prog_cost: interrupted; everything it created was removed", file=sys.stderr)
        return 130
    print(format_table(result))
    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {RESULTS_FILE} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
