"""flannel-bpf beside the real flanneld (v0.28.9, built from its Go module by
scripts/build-peers.sh) in the namespace lab: `lab up --flanneld-nodes N` runs flanneld on hosts
1..N with the same etcd, prefix and flags. These tests are what the README's mixed-cluster claims
rest on: each data path both ways with transfers and the counters of the path that carried them,
udp and host-gw, agents of both kinds starting together, a node migrated and rolled back under a
ping stream, and a flanneld lease deleted or expired."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any

import pytest

from flannel_bpf.lab import lab
from flannel_bpf.lab.lab import PREFIX, LabState

from .conftest import metric, pod_exec, requires_root
from .test_lab_backends import etcdctl
from .test_lab_bpf import bpf_remotes, by_node, counters, ping_all, transfer, wait_for

pytestmark = [pytest.mark.root, requires_root]

USERSPACE_BYTES = 'flannel_userspace_bytes_total{direction="%s"}'


def path_counter(lab_name: str, ns: str, path: str, device: str) -> Callable[[], tuple[int, int]]:
    """(bytes sent, bytes received) of a host's overlay traffic, by the counters of the data path
    that carries it: BPF encap/decap (XDP) counters, the userspace plane's metrics, or the
    device's own statistics (kernel vxlan, flanneld's flannel.1 or flannel0)."""
    if path == "bpf":

        def bpf() -> tuple[int, int]:
            seen = counters(lab_name, ns)
            sent = seen.get(("tc_encap", "encap_redirect"), (0, 0))[1]
            return sent, seen.get(("xdp_decap", "decap_pass"), (0, 0))[1]

        return bpf
    if path == "userspace":
        return lambda: (
            int(metric(ns, USERSPACE_BYTES % "tx")),
            int(metric(ns, USERSPACE_BYTES % "rx")),
        )
    return lambda: link_bytes(ns, device)[::-1]


def assert_carried(
    counter: Callable[[], tuple[int, int]], start: tuple[int, int], sent: int, received: int,
    what: str,
) -> None:  # fmt: skip
    """The counter moved by at least sent and received bytes, within 10 s: iperf3's client is
    done once its last bytes are in its socket, so a path's counters may lag its report."""
    for i, wanted in ((0, sent), (1, received)):
        moved = lambda i=i: counter()[i] - start[i]  # noqa: E731
        assert wait_for(lambda m=moved, w=wanted: m() >= w), (  # type: ignore[misc]
            f"{what} {('sent', 'received')[i]}: {moved()} < {wanted}"
        )


def link_bytes(ns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) bytes of a device, from its kernel statistics."""
    out = subprocess.run(
        ["ip", "-n", ns, "-j", "-s", "link", "show", "dev", dev],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    stats = json.loads(out)[0]["stats64"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])


def leases(lab_name: str) -> dict[str, dict[str, Any]]:
    """subnet -> {"value": the lease JSON as stored, "lease_id": its etcd lease}."""
    doc = json.loads(etcdctl(lab_name, "get", "--prefix", f"{PREFIX}/subnets/", "-w", "json"))
    found = {}
    for kv in doc.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        subnet = key.rsplit("/", 1)[1].replace("-", "/")
        found[subnet] = {"value": base64.b64decode(kv["value"]).decode(), "lease_id": kv["lease"]}
    return found


def kernel_peers(ns: str) -> set[str]:
    """Subnets a host routes through flannel.1 (vxlan: flanneld's and our kernel path)."""
    out = subprocess.run(
        ["ip", "-n", ns, "route", "show", "dev", "flannel.1"], capture_output=True, text=True
    ).stdout
    return {line.split()[0] for line in out.splitlines() if " via " in line}


# --------------------------------------------------------------------------------------------
# vxlan: every data path of ours both ways with flanneld's kernel vxlan


@pytest.mark.parametrize("datapath", ["bpf", "kernel", "userspace"])
def test_vxlan_with_flanneld_both_ways(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], datapath: str
) -> None:
    extra = ["--agent-arg=--bpf-decap=xdp"] if datapath == "bpf" else []
    info = lab_up("--nodes", "2", "--flanneld-nodes", "1", "--datapath", datapath, *extra)
    ours_node, theirs_node = info["nodes"][1], info["nodes"][0]
    assert (theirs_node["agent"], theirs_node["datapath"]) == ("flanneld", "flanneld")
    assert (ours_node["agent"], ours_node["datapath"]) == ("flannel-bpf", datapath)
    ours, theirs = ours_node["namespace"], theirs_node["namespace"]
    pods = by_node(info)
    ping_all(lab_name, info["pods"])
    # Each side programmed the other from its lease.
    assert kernel_peers(theirs) == {ours_node["subnet"]}
    if datapath == "bpf":
        assert set(bpf_remotes(lab_name, ours)) == {theirs_node["subnet"]}
    elif datapath == "kernel":
        assert kernel_peers(ours) == {theirs_node["subnet"]}
    else:  # the userspace plane keeps its peers in its own table
        from .test_lab_bpf import node_status

        assert node_status(lab_name, ours)["peers"] == 1

    theirs_count = path_counter(lab_name, theirs, "flanneld", "flannel.1")
    ours_count = path_counter(lab_name, ours, datapath, "flannel.1")
    theirs_start, ours_start = theirs_count(), ours_count()
    to_flanneld = transfer(lab_name, pods[ours], pods[theirs], "200M")
    from_flanneld = transfer(lab_name, pods[theirs], pods[ours], "200M")
    print(
        f"\n{datapath} -> flanneld {to_flanneld.gbits:.2f} Gbit/s, "
        f"back {from_flanneld.gbits:.2f} Gbit/s"
    )
    # bytes out of ours (into flanneld), bytes into ours (out of flanneld)
    out, into = to_flanneld.received, from_flanneld.received
    # flanneld's vxlan device carried both directions; ours, the path we claim carried them.
    assert_carried(theirs_count, theirs_start, into, out, "flanneld's flannel.1")
    assert_carried(ours_count, ours_start, out, into, f"our {datapath} path")
    if datapath == "kernel":
        assert counters(lab_name, ours) == {}  # and no BPF program is in the way


# --------------------------------------------------------------------------------------------
# udp and host-gw


@pytest.mark.parametrize("datapath", ["bpf", "userspace"])
def test_udp_with_flanneld_both_ways(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], datapath: str
) -> None:
    """flanneld's udp backend (TUN flannel0 and its C proxy, UDP 8285) beside ours."""
    extra = ["--agent-arg=--bpf-decap=xdp"] if datapath == "bpf" else []
    info = lab_up(
        "--nodes", "2", "--flanneld-nodes", "1", "--backend", "udp", "--datapath", datapath,
        *extra,
    )  # fmt: skip
    theirs, ours = (n["namespace"] for n in info["nodes"])
    assert info["nodes"][1]["datapath"] == datapath
    pods = by_node(info)
    ping_all(lab_name, info["pods"])
    size = "50M"
    theirs_count = path_counter(lab_name, theirs, "flanneld", "flannel0")  # its TUN device
    ours_count = path_counter(lab_name, ours, datapath, "flannel0")
    theirs_start, ours_start = theirs_count(), ours_count()
    to_flanneld = transfer(lab_name, pods[ours], pods[theirs], size)
    from_flanneld = transfer(lab_name, pods[theirs], pods[ours], size)
    rates = f"{to_flanneld.gbits:.2f} Gbit/s, back {from_flanneld.gbits:.2f}"
    print(f"\nudp {datapath} -> flanneld {rates}")
    out, into = to_flanneld.received, from_flanneld.received
    assert_carried(theirs_count, theirs_start, into, out, "flanneld's flannel0")
    assert_carried(ours_count, ours_start, out, into, f"our udp {datapath} path")


def test_host_gw_with_flanneld_both_ways(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "2", "--flanneld-nodes", "1", "--backend", "host-gw")
    theirs_node, ours_node = info["nodes"]
    theirs, ours = theirs_node["namespace"], ours_node["namespace"]

    def route(ns: str, subnet: str) -> str:
        return subprocess.run(
            ["ip", "-n", ns, "route", "show", subnet], capture_output=True, text=True
        ).stdout.strip()

    assert (
        route(theirs, ours_node["subnet"])
        == f"{ours_node['subnet']} via {ours_node['underlay_ip']} dev eth1"
    )
    assert (
        route(ours, theirs_node["subnet"])
        == f"{theirs_node['subnet']} via {theirs_node['underlay_ip']} dev eth1"
    )
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    theirs_count = path_counter(lab_name, theirs, "flanneld", "eth1")
    theirs_start = theirs_count()
    out = transfer(lab_name, pods[ours], pods[theirs], "200M").received
    into = transfer(lab_name, pods[theirs], pods[ours], "200M").received
    assert_carried(theirs_count, theirs_start, into, out, "flanneld's eth1")


# --------------------------------------------------------------------------------------------
# Both kinds of agent starting together on one etcd


def test_flanneld_and_flannel_bpf_started_together(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """Four agents, two of each, launched back to back (the lab starts every agent before it
    waits for any): they race for subnets in one etcd. Every subnet is distinct and every node
    programs every other."""
    info = lab_up("--nodes", "4", "--flanneld-nodes", "2", "--datapath", "bpf")
    subnets = [n["subnet"] for n in info["nodes"]]
    assert len(set(subnets)) == 4, subnets
    nets = [IPv4Network(s) for s in subnets]
    assert not any(a.overlaps(b) for i, a in enumerate(nets) for b in nets[i + 1 :])
    assert set(leases(lab_name)) == set(subnets)
    for node in info["nodes"]:
        others = set(subnets) - {node["subnet"]}
        ns = node["namespace"]
        if node["agent"] == "flanneld":
            assert wait_for(lambda ns=ns, o=others: kernel_peers(ns) == o), (ns, kernel_peers(ns))
        else:
            assert wait_for(lambda ns=ns, o=others: set(bpf_remotes(lab_name, ns)) == o)
    ping_all(lab_name, info["pods"])


# --------------------------------------------------------------------------------------------
# Migration and rollback of one node under a ping stream


@dataclass
class PingStream:
    """A 10 Hz ping from a pod; lost() are the sequence numbers that got no reply."""

    name: str
    count: int
    process: subprocess.Popen[str] | None = None
    output: str = ""
    started: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, what: str) -> None:
        self.marks[what] = time.monotonic() - self.started

    def lost(self) -> list[int]:
        replies = {int(m) for m in re.findall(r"icmp_seq=(\d+) ttl=", self.output)}
        return sorted(set(range(1, self.count + 1)) - replies)

    def report(self) -> str:
        lost = self.lost()
        when = ", ".join(f"#{seq} at {seq * 0.1:.1f} s" for seq in lost[:10])
        marks = ", ".join(f"{k} at {v:.1f} s" for k, v in self.marks.items())
        answered = f"{self.count - len(lost)}/{self.count} answered"
        return f"{self.name}: {answered} ({when or 'none lost'}); {marks}"


@contextmanager
def ping_stream(lab_name: str, src: str, dst_ip: str, seconds: float) -> Iterator[PingStream]:
    count = int(seconds * 10)
    stream = PingStream(f"{src} -> {dst_ip}", count)
    stream.process = subprocess.Popen(
        ["ip", "netns", "exec", src, "ping", "-i", "0.1", "-c", str(count), "-W", "1", dst_ip],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stream.started = time.monotonic()
    try:
        yield stream
        stream.output, _ = stream.process.communicate(timeout=seconds + 30)
    finally:
        stream.process.kill()
        stream.process.wait()


def test_migrate_a_node_from_flanneld_and_roll_back(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1 and n2 run flanneld, n3 flannel-bpf. n1 stops flanneld and starts flannel-bpf (BPF data
    path) with the same subnet file and public IP, then goes back to flanneld the documented way
    (stop, flannel-bpf cleanup, start flanneld), while pods on n2 and n3 ping n1's pod at 10 Hz."""
    info = lab_up("--nodes", "3", "--flanneld-nodes", "2", "--datapath", "bpf")
    n1, n2, n3 = (n["namespace"] for n in info["nodes"])
    pods = by_node(info)
    ping_all(lab_name, info["pods"])
    subnet = info["nodes"][0]["subnet"]
    lease_before = leases(lab_name)[subnet]["value"]
    state = LabState.load(lab_name)
    bpf_args = lab.agent_args(state, n1, "flannel-bpf", ["--datapath", "bpf"])

    streams: list[PingStream] = []
    with (
        ping_stream(lab_name, pods[n2]["namespace"], pods[n1]["ip"], 40) as from_flanneld,
        ping_stream(lab_name, pods[n3]["namespace"], pods[n1]["ip"], 40) as from_bpf,
    ):
        streams = [from_flanneld, from_bpf]
        time.sleep(3)
        for s in streams:
            s.mark("flanneld stopped")
        lab.restart_agent(lab_name, n1, program="flannel-bpf", args=bpf_args, ready_timeout=60)
        for s in streams:
            s.mark("flannel-bpf ready")
        lease_after = leases(lab_name)[subnet]["value"]
        assert json.loads(lease_after) == json.loads(lease_before), (lease_before, lease_after)
        status = json.loads((state.dir / n1 / "status.json").read_text())
        assert status["lease"] == subnet and status["datapath"] == "bpf"
        time.sleep(3)
        # Rollback: as the README says, cleanup detaches what a stopped flannel-bpf left.
        for s in streams:
            s.mark("flannel-bpf stopped")
        cleanup = [sys.executable, "-m", "flannel_bpf", "cleanup"]
        lab.restart_agent(lab_name, n1, program="flanneld", between=cleanup, ready_timeout=60)
        for s in streams:
            s.mark("flanneld ready")
    for s in streams:
        print(f"\n{s.report()}")
    assert leases(lab_name)[subnet]["value"] == lease_before
    assert not bpf_attached(n1)
    # flanneld leaves flannel.1 and its per-peer entries in place when it stops, and
    # flannel-bpf reuses them (same VTEP MAC), so vxlan.ko forwards through both switches.
    for s in streams:
        assert s.lost() == [], s.report()
    ping_all(lab_name, info["pods"])


def bpf_attached(ns: str) -> bool:
    out = subprocess.run(
        ["ip", "-n", ns, "-d", "link", "show", "dev", "eth1"], capture_output=True, text=True
    ).stdout
    tc = subprocess.run(
        ["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", "flannel.1", "egress"],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    return "prog/xdp" in out or "fb_" in tc


# --------------------------------------------------------------------------------------------
# A flanneld peer that goes away


def test_flanneld_lease_deleted_or_expired_is_unprogrammed_everywhere(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1, n2: flanneld; n3: flannel-bpf (BPF). n2's node dies (flanneld SIGKILLed) and its lease
    expires (its etcd lease revoked: the same DELETE event a TTL's end gives); then an operator
    deletes n1's lease by hand while its flanneld runs."""
    info = lab_up("--nodes", "3", "--flanneld-nodes", "2", "--datapath", "bpf")
    (s1, s2, s3), (n1, _, n3) = zip(
        *((n["subnet"], n["namespace"]) for n in info["nodes"]), strict=True
    )
    assert wait_for(lambda: set(bpf_remotes(lab_name, n3)) == {s1, s2})
    assert wait_for(lambda: kernel_peers(n1) == {s2, s3})

    # Expiry of a dead node's lease.
    state = LabState.load(lab_name)
    lab._stop_pid(state.nodes[1].agent_pid, 9)
    lease_id = leases(lab_name)[s2]["lease_id"]
    etcdctl(lab_name, "lease", "revoke", format(lease_id, "x"))
    assert s2 not in leases(lab_name)
    assert wait_for(lambda: set(bpf_remotes(lab_name, n3)) == {s1}), set(bpf_remotes(lab_name, n3))
    assert wait_for(lambda: kernel_peers(n1) == {s3}), kernel_peers(n1)
    # our kernel-side entries for the vxlan device went too
    assert (
        s2.split("/")[0]
        not in subprocess.run(
            ["ip", "-n", n3, "neigh", "show", "dev", "flannel.1"], capture_output=True, text=True
        ).stdout
    )

    # Deletion by hand of a live flanneld's lease.
    etcdctl(lab_name, "del", f"{PREFIX}/subnets/{s1.replace('/', '-')}")
    assert wait_for(lambda: s1 not in set(bpf_remotes(lab_name, n3))), set(
        bpf_remotes(lab_name, n3)
    )
    # n3 still has its own lease and pings nobody it no longer knows
    assert s3 in leases(lab_name)
    pods = by_node(info)
    lost = pod_exec(lab_name, pods[n3]["namespace"], "ping", "-c1", "-W1", pods[n1]["ip"])
    assert lost.returncode != 0
