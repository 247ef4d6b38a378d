"""Host routing (--host-routing=bpf) in the namespace lab: validated pod flows go between the
pod's veth and the uplink in BPF, everything the host stack must see (NAT, new connections,
traffic leaving the overlay) still goes through it.

Every lab here runs the agents with --ip-masq, as kube-flannel's DaemonSet does: then the CNI
bridge does not masquerade pod-to-pod traffic (without it every pod flow is SNATed by the
bridge's ipMasq rule, and host routing rightly leaves all of them to the host stack).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from bench.datapath import rx_packets, trafgen, trafgen_frame
from flannel_bpf.lab import lab
from flannel_bpf.lab.lab import LabState

from .conftest import pod_exec, requires_root
from .test_lab_bpf import (
    by_node,
    counters,
    delta,
    iperf_server,
    node_status,
    ping_all,
    stream_through,
    transfer,
    wait_for,
)

pytestmark = [pytest.mark.root, requires_root]

HOST_ROUTING = ("--datapath", "bpf", "--agent-arg=--host-routing=bpf", "--agent-arg=--ip-masq")
CLUSTER_IP = "10.96.0.10"


def sh(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          check=True).stdout  # fmt: skip


def short_way(lab_name: str, ns: str) -> tuple[int, int]:
    """Bytes host routing carried on a node: (from its pods, to its pods)."""
    seen = counters(lab_name, ns)
    return (seen.get(("pod_egress", "encap_from_pod"), (0, 0))[1],
            seen.get(("tc_decap", "decap_to_pod"), (0, 0))[1])  # fmt: skip


Counters = dict[tuple[str, str], tuple[int, int]]


def delta_all(after: Counters, before: Counters) -> Counters:
    return {k: delta(after, before, *k) for k in after}


def wait_ports(lab_name: str, ns: str, pods: int) -> None:
    """The agent checks the bridge's ports every second: wait until each pod's veth carries
    both programs."""
    del lab_name

    def ready() -> int:
        veths = sh(ns, "ip", "-o", "link", "show", "master", "cni0").splitlines()
        names = [line.split(": ")[1].split("@")[0] for line in veths]
        return sum(
            "fb_tc_pod_egress" in sh(ns, "tc", "filter", "show", "dev", name, "ingress")
            and "fb_tc_pod_deliver" in sh(ns, "tc", "filter", "show", "dev", name, "egress")
            for name in names
        )

    deadline = time.monotonic() + 10
    while ready() < pods:
        assert time.monotonic() < deadline, f"{ns}: pod programs not on {pods} veths"
        time.sleep(0.2)


# One TCP connection per transfer (iperf3 opens two, and a Service may send them to different
# backends): the sink answers with the byte count it received.
SINK = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
while True:
    c, _ = s.accept()
    n = 0
    while True:
        d = c.recv(1 << 16)
        if not d:
            break
        n += len(d)
    c.sendall(str(n).encode())
    c.close()
"""
SEND = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
size, chunk, sent = int(sys.argv[3]), b"x" * 65536, 0
while sent < size:
    sent += c.send(chunk[: size - sent])
c.shutdown(socket.SHUT_WR)
print(c.recv(64).decode())
"""


@contextmanager
def sinks(*namespaces: str, port: int = 5201) -> Iterator[None]:
    procs = [subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", SINK, str(port)])
             for ns in namespaces]  # fmt: skip
    try:
        time.sleep(0.5)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def send(ns: str, address: str, port: int, size: int) -> None:
    """size bytes over one connection; the receiving end must have counted every one."""
    out = sh(ns, sys.executable, "-c", SEND, address, str(port), str(size))
    assert int(out.strip()) == size, out


def test_validated_flows_take_the_short_way_both_ways(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "2", "--pods-per-node", "1", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        details = node_status(lab_name, ns)["details"]
        assert (details["host_routing"], details["decap"]) == ("bpf", "tc"), details
        wait_ports(lab_name, ns, 1)
        rules = sh(ns, "iptables", "-t", "mangle", "-S", "FLANNEL-BPF-HOSTRT")
        assert "-o flannel.1" in rules and "-o cni0" in rules and "0x200000" in rules
        liberal = sh(ns, "sysctl", "-n", "net.netfilter.nf_conntrack_tcp_be_liberal").strip()
        assert liberal == "1"
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    before = {ns: short_way(lab_name, ns) for ns in (n1, n2)}
    out = transfer(lab_name, pods[n1], pods[n2], "200M").received
    back = transfer(lab_name, pods[n2], pods[n1], "200M").received
    after = {ns: short_way(lab_name, ns) for ns in (n1, n2)}
    # All but the first packets of each connection (before conntrack calls it established and
    # the long way has validated it) go the short way, on both ends, both directions.
    assert after[n1][0] - before[n1][0] >= 0.9 * out  # n1's pod -> uplink, in BPF
    assert after[n2][1] - before[n2][1] >= 0.9 * out  # uplink -> n2's pod, in BPF
    assert after[n2][0] - before[n2][0] >= 0.9 * back
    assert after[n1][1] - before[n1][1] >= 0.9 * back
    seen = counters(lab_name, n1)
    assert seen[("tc_encap", "flow_learnt")][0] > 0 and seen[("pod_deliver", "flow_learnt")][0] > 0
    # status: what host routing knows now (the pod learnt from the host's own delivery)
    known = node_status(lab_name, n1)["bpf"]["host_routing"]
    assert [p["ip"] for p in known["pods"]] == [pods[n1]["ip"]]
    assert seen[("pod_egress", "pass_tcp_control")][0] > 0  # SYN and FIN: the long way


UDP_SINK = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 9999))
s.settimeout(3)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
except socket.timeout:
    print(n)
"""
UDP_SEND = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[2])):
    s.sendto(b"x" * 36, (sys.argv[1], 9999))
    if i % 100 == 99:
        time.sleep(0.01)
"""


def test_a_one_way_udp_stream_goes_short_from_its_second_packet(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """Never answered, so never ESTABLISHED: conntrack's confirmed entry without NAT is what
    validates it (its first packet went through the NAT decision), on both nodes."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        wait_ports(lab_name, ns, 1)
    pods = by_node(info)
    # The sender's pod must be known behind its veth: a little answered traffic first.
    ping_all(lab_name, info["pods"])
    before = {ns: counters(lab_name, ns) for ns in (n1, n2)}
    sink = subprocess.Popen(["ip", "netns", "exec", pods[n2]["namespace"], sys.executable, "-c",
                             UDP_SINK], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        time.sleep(0.5)
        sh(pods[n1]["namespace"], sys.executable, "-c", UDP_SEND, pods[n2]["ip"], "3000")
        received = int(sink.communicate(timeout=30)[0].strip())
    finally:
        sink.kill()
    assert received >= 2900, received
    sent_short = delta(counters(lab_name, n1), before[n1], "pod_egress", "encap_from_pod")[0]
    got_short = delta(counters(lab_name, n2), before[n2], "tc_decap", "decap_to_pod")[0]
    assert sent_short >= 0.9 * 3000, sent_short
    assert got_short >= 0.9 * 3000, got_short


def test_a_pod_that_never_gets_a_validated_packet_is_learnt_from_what_it_does_get(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """A pod whose only traffic in is unvalidated (here the ICMP port-unreachable errors its
    one-way UDP stream draws; in a cluster often a Service's NATed replies) is still learnt from
    what the host routes in to it from the overlay, so its own validated stream goes short."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        wait_ports(lab_name, ns, 1)
    pods = by_node(info)
    before = counters(lab_name, n1)
    # Nobody listens on the port: n2's pod answers with ICMP errors (RELATED, never marked).
    sh(pods[n1]["namespace"], sys.executable, "-c", UDP_SEND, pods[n2]["ip"], "3000")
    after = counters(lab_name, n1)
    assert delta(after, before, "pod_deliver", "pod_learnt")[0] == 1
    assert delta(after, before, "pod_deliver", "flow_learnt")[0] == 0
    sent_short = delta(after, before, "pod_egress", "encap_from_pod")[0]
    assert sent_short >= 0.9 * 3000, sent_short


def test_frames_from_a_packet_ring_go_short(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """trafgen's frames (AF_PACKET's TX_RING, as bench.datapath's 64-byte rate sends them) have
    only their Ethernet header in the skb's linear part: host routing pulls the rest in and
    carries them like any other validated flow, not the long way as too short."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        wait_ports(lab_name, ns, 1)
    pods = by_node(info)
    client, server = pods[n1]["namespace"], pods[n2]["namespace"]
    ping_all(lab_name, info["pods"])
    frame = trafgen_frame(client, pods[n2]["ip"])
    before = counters(lab_name, n1)
    received_before = rx_packets(server, "eth0")
    trafgen(client, frame, count=3000)
    time.sleep(0.3)
    assert rx_packets(server, "eth0") - received_before >= 2900
    sent = delta_all(counters(lab_name, n1), before)
    assert sent.get(("pod_egress", "encap_from_pod"), (0, 0))[0] >= 0.9 * 3000, sent
    assert sent.get(("pod_egress", "pass_short"), (0, 0))[0] == 0, sent


def test_pods_are_learnt_only_from_what_the_host_routes_in_from_the_overlay(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """With br_netfilter, frames bridged between two pods of one node pass mangle POSTROUTING
    "-o cni0" and get the validated mark once their connection is established. They were never
    routed, so they must teach host routing nothing: not who lives behind a veth (a pod could
    otherwise point another pod's address at a third pod's veth), not a flow."""
    info = lab_up("--nodes", "2", "--pods-per-node", "2", *HOST_ROUTING)
    n1 = info["nodes"][0]["namespace"]
    wait_ports(lab_name, n1, 2)
    local = [p for p in info["pods"] if p["node"] == n1]
    assert sh(n1, "sysctl", "-n", "net.bridge.bridge-nf-call-iptables").strip() == "1"
    before = counters(lab_name, n1)
    ping_all(lab_name, local)  # echo replies are ESTABLISHED: marked, and bridged
    assert delta(counters(lab_name, n1), before, "pod_deliver", "flow_learnt") == (0, 0)
    assert node_status(lab_name, n1)["bpf"]["host_routing"]["pods"] == []

    # What comes in from another node's pod is routed by the host: that teaches each pod.
    ping_all(lab_name, info["pods"])
    learnt = {p["ip"]: p for p in node_status(lab_name, n1)["bpf"]["host_routing"]["pods"]}
    assert set(learnt) == {p["ip"] for p in local}
    for pod in local:
        link = json.loads(sh(pod["namespace"], "ip", "-j", "link", "show", "eth0"))[0]
        assert learnt[pod["ip"]]["mac"] == link["address"]
        assert learnt[pod["ip"]]["ifindex"] == link["link_index"]  # its veth, on the node


def test_nated_flows_stay_on_the_long_way(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """A ClusterIP as kube-proxy installs it (DNAT to backends on two nodes), a NodePort from
    outside the cluster (DNAT plus masquerade), and --ip-masq to an address outside the overlay:
    each works, and none of those flows is taken past the host stack where it is NATed."""
    info = lab_up("--nodes", "2", "--pods-per-node", "2", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        wait_ports(lab_name, ns, 2)
    client = next(p for p in info["pods"] if p["node"] == n1)
    local = next(p for p in info["pods"] if p["node"] == n1 and p is not client)
    remote = next(p for p in info["pods"] if p["node"] == n2)
    # kube-proxy's shape: KUBE-SERVICES -> KUBE-SVC (statistic) -> KUBE-SEP (DNAT), in PREROUTING.
    rules = [
        ["-N", "KUBE-SEP-REMOTE"], ["-N", "KUBE-SEP-LOCAL"], ["-N", "KUBE-SVC-TEST"],
        ["-A", "KUBE-SEP-REMOTE", "-p", "tcp", "-j", "DNAT", "--to-destination",
         f"{remote['ip']}:5201"],
        ["-A", "KUBE-SEP-LOCAL", "-p", "tcp", "-j", "DNAT", "--to-destination",
         f"{local['ip']}:5201"],
        ["-A", "KUBE-SVC-TEST", "-m", "statistic", "--mode", "random", "--probability", "0.5",
         "-j", "KUBE-SEP-REMOTE"],
        ["-A", "KUBE-SVC-TEST", "-j", "KUBE-SEP-LOCAL"],
        ["-A", "PREROUTING", "-d", CLUSTER_IP, "-p", "tcp", "--dport", "80", "-j",
         "KUBE-SVC-TEST"],
    ]  # fmt: skip
    for rule in rules:
        sh(n1, "iptables", "-t", "nat", *rule)
    # First straight to the remote pod: n1 learns its client pod from the host's delivery.
    with sinks(remote["namespace"]):
        send(client["namespace"], remote["ip"], 5201, 5 * 1024**2)
    assert wait_for(lambda: client["ip"] in {
        p["ip"] for p in node_status(lab_name, n1)["bpf"]["host_routing"]["pods"]})  # fmt: skip
    before = short_way(lab_name, n1)
    n1_before = counters(lab_name, n1)
    remote_before = counters(lab_name, n2)
    with sinks(remote["namespace"], local["namespace"]):
        for _ in range(8):  # both backends, whichever the statistic picks
            send(client["namespace"], CLUSTER_IP, 80, 5 * 1024**2)
    # n1 DNATs every one of those connections: neither way may skip its conntrack there.
    after = short_way(lab_name, n1)
    assert after[0] - before[0] < 1_000_000, (before, after)
    assert after[1] - before[1] < 1_000_000, (before, after)
    seen = delta_all(counters(lab_name, n1), n1_before)
    # To the ClusterIP: no remote subnet at the pod's veth (DNAT comes later, in the stack).
    assert seen[("pod_egress", "pass_no_remote")][1] > 20 * 1024**2  # of the 40 MB sent
    # The remote backend's answers arrive for n1's un-DNAT: n1 never validated that flow.
    assert seen[("tc_decap", "pass_not_validated")][0] > 0
    # n2 sees a plain pod-to-pod connection (the DNAT happened on n1): it may go short there.
    assert delta(counters(lab_name, n2), remote_before, "tc_decap", "decap_to_pod")[1] > 0

    # A NodePort on n1 for a client outside the cluster (the underlay's etcd namespace):
    # DNAT to the pod on n2 plus masquerade, as kube-proxy does for an external client.
    node_ip = info["nodes"][0]["underlay_ip"]
    sh(n1, "iptables", "-t", "nat", "-A", "PREROUTING", "-d", node_ip, "-p", "tcp", "--dport",
       "30080", "-j", "DNAT", "--to-destination", f"{remote['ip']}:5201")  # fmt: skip
    sh(n1, "iptables", "-t", "nat", "-A", "POSTROUTING", "-d", remote["ip"], "-p", "tcp",
       "--dport", "5201", "-j", "MASQUERADE")  # fmt: skip
    before = short_way(lab_name, n1)
    with sinks(remote["namespace"]):
        send(f"{lab_name}-etcd", node_ip, 30080, 20 * 1024**2)
    after = short_way(lab_name, n1)
    assert after[0] - before[0] < 1_000_000 and after[1] - before[1] < 1_000_000

    # --ip-masq to outside the overlay: no remote subnet, so never the short way.
    before_outside = counters(lab_name, n1)
    with iperf_server(f"{lab_name}-etcd"):
        proc = pod_exec(lab_name, client["namespace"], "iperf3", "-c", "198.18.0.2", "-n", "20M")
    assert proc.returncode == 0, proc.stdout[-1500:]
    no_remote = delta(counters(lab_name, n1), before_outside, "pod_egress", "pass_no_remote")
    assert no_remote[1] >= 0.5 * 20 * 1024**2  # iperf3 -n counts what it wrote, some unsent


def test_a_stream_started_before_switching_modes_survives_both_switches(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """A pod-to-pod stream runs while both agents restart with host routing on, then off again:
    no half second under 100 Mbit/s, 95% delivered; the short way carries it while on, and off
    leaves no program on the pods' veths and no mangle rule."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", "--datapath", "bpf",
                  "--agent-arg=--ip-masq")  # fmt: skip
    n1, n2 = (n["namespace"] for n in info["nodes"])
    pods = by_node(info)

    def restart_all(host_routing: str) -> None:
        state = LabState.load(lab_name)
        for node in state.nodes:
            args = [a for a in node.agent_args if not a.startswith("--host-routing")]
            lab.restart_agent(lab_name, node.name, args=[*args, f"--host-routing={host_routing}"],
                              ready_timeout=60)  # fmt: skip

    before = short_way(lab_name, n1)
    stream_through(pods[n1], pods[n2], 8, lambda: restart_all("bpf"))
    after = short_way(lab_name, n1)
    assert after[0] - before[0] > 50 * 1024**2, (before, after)  # the same stream, now short

    stream_through(pods[n1], pods[n2], 6, lambda: restart_all("kernel"))
    for ns in (n1, n2):
        assert node_status(lab_name, ns)["details"]["host_routing"] == "kernel"
        veths = sh(ns, "ip", "-o", "link", "show", "master", "cni0")
        for line in veths.splitlines():
            name = line.split(": ")[1].split("@")[0]
            assert "fb_tc_pod" not in sh(ns, "tc", "filter", "show", "dev", name, "ingress")
            assert "fb_tc_pod" not in sh(ns, "tc", "filter", "show", "dev", name, "egress")
        assert "FLANNEL-BPF-HOSTRT" not in sh(ns, "iptables", "-t", "mangle", "-S")
    before = short_way(lab_name, n1)
    transfer(lab_name, pods[n1], pods[n2], "50M")
    assert short_way(lab_name, n1) == before


def test_host_routing_beside_a_flanneld_node(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """The wire stays flannel's VXLAN: the real flanneld's vxlan.ko on n1 talks to our host
    routing on n2 both ways, and our side takes the short way in both directions."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", "--flanneld-nodes", "1",
                  "--flanneld-arg=--ip-masq", *HOST_ROUTING)  # fmt: skip
    theirs, ours = (n["namespace"] for n in info["nodes"])
    wait_ports(lab_name, ours, 1)
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    before = short_way(lab_name, ours)
    out = transfer(lab_name, pods[ours], pods[theirs], "200M").received
    into = transfer(lab_name, pods[theirs], pods[ours], "200M").received
    after = short_way(lab_name, ours)
    assert after[0] - before[0] >= 0.9 * out
    assert after[1] - before[1] >= 0.9 * into


def test_a_smaller_underlay_mtu_sends_the_flow_the_long_way(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """The underlay shrinks under validated flows (1500 -> 1400; the pods keep 1450): the
    short way no longer fits (the FIB's MTU, re-read within 100 ms; an aggregate by the size of
    its segments), so those packets go to the host stack, where vxlan.ko carries them as on
    flanneld's path (outer packets fragmented: the outer DF bit is clear). Transfers and a
    full-size ping with DF still get through."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", *HOST_ROUTING)
    n1, n2 = (n["namespace"] for n in info["nodes"])
    for ns in (n1, n2):
        wait_ports(lab_name, ns, 1)
    pods = by_node(info)
    transfer(lab_name, pods[n1], pods[n2], "50M")  # validated and short from here on
    for index, ns in enumerate((n1, n2), start=1):
        sh(ns, "ip", "link", "set", "eth1", "mtu", "1400")
        sh(f"{lab_name}-ul", "ip", "link", "set", f"n{index}", "mtu", "1400")
    time.sleep(0.2)  # past the next-hop cache's 100 ms
    before = counters(lab_name, n1)
    out = transfer(lab_name, pods[n1], pods[n2], "50M").received
    after = counters(lab_name, n1)
    assert delta(after, before, "pod_egress", "pass_too_big")[1] >= 0.5 * out
    assert delta(after, before, "pod_egress", "encap_from_pod")[1] < 0.1 * out
    ping = pod_exec(lab_name, pods[n1]["namespace"], "ping", "-c2", "-M", "do", "-s", "1422",
                    pods[n2]["ip"])  # fmt: skip
    assert ping.returncode == 0, ping.stdout


def test_host_routing_needs_tc_decapsulation(lab_name: str) -> None:
    """XDP runs before there is an skb to hand to a pod: asked for both, the agent says so."""
    from .conftest import cli

    proc = cli("lab", "--name", lab_name, "up", "--nodes", "1", "--pods-per-node", "0",
               *HOST_ROUTING, "--agent-arg=--bpf-decap=xdp")  # fmt: skip
    assert proc.returncode == 1
    assert "host routing needs the vxlan format and tc decapsulation" in proc.stderr
    assert "Traceback" not in proc.stderr
