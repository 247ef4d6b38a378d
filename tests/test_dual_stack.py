"""Dual stack (EnableIPv6 beside IPv4) in the namespace lab, against the real flanneld v0.28.9:
`lab up --ipv6-network` gives every host an IPv6 underlay address beside its IPv4 one and every
pod an address of each family. What flanneld does in dual stack is the reference (leases,
subnet.env, flannel-v6.<VNI>, ip6tables rules, host-gw's IPv6 routes), and every pod reaches
every other over both families, counted by the device that carried it."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from ipaddress import IPv6Network
from typing import Any

import pytest

from flannel_bpf.lab import lab
from flannel_bpf.lab.lab import LabState, control_plane_of, read_env
from flannel_bpf.subnet.kube.annotations import Annotations

from .conftest import metric, pod_exec, requires_root
from .test_interop_flanneld import leases, link_bytes
from .test_lab_bpf import Counters, by_node, counters, delta, node_status, transfer, wait_for

pytestmark = [pytest.mark.root, requires_root]

IPV6_NETWORK = "fd10:244::/56"
KEYS = Annotations.from_flag("flannel.alpha.coreos.com")


def as_v6(pod: dict[str, Any]) -> dict[str, Any]:
    """The pod addressed by its IPv6 address (for the IPv4 helpers)."""
    return {**pod, "ip": pod["ip6"]}


def ping_all_both(lab_name: str, pods: list[dict[str, Any]]) -> None:
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            for flag, ip in (("-4", dst["ip"]), ("-6", dst["ip6"])):
                ping = pod_exec(lab_name, src["namespace"], "ping", flag, "-c2", "-i0.2", "-W2", ip)
                assert ping.returncode == 0, f"{src['namespace']} -> {ip}: {ping.stdout}"


def nat6(ns: str) -> list[str]:
    """Our and flanneld's IPv6 masquerade chain, lease-specific subnets made generic."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ip6tables", "-w", "-t", "nat", "-S"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = [line for line in out.splitlines() if "FLANNEL" in line]
    return [re.sub(r"fd10:244:(?:0:[0-9a-f]+:)?:/64", "POD", line) for line in lines]


def test_dual_stack_vxlan_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1 flanneld, n2 flannel-bpf on BPF (IPv4 in the programs, IPv6 on flannel-v6.1), n3 on
    kernel vxlan, all with --ip-masq: leases, subnet.env and ip6tables rules as flanneld's, every
    pod pings every other over both families, 200 MB over IPv6 each way between our BPF node
    and flanneld's, carried by flannel-v6.1 on both sides."""
    info = lab_up("--nodes", "3", "--flanneld-nodes", "1", "--datapath", "bpf,kernel",
                  "--ipv6-network", IPV6_NETWORK, "--agent-arg=--ip-masq",
                  "--flanneld-arg=--ip-masq", "--pods-per-node", "1")  # fmt: skip
    n1, n2, n3 = (f"{lab_name}-n{i}" for i in (1, 2, 3))
    nodes = {n["namespace"]: n for n in info["nodes"]}
    assert [nodes[n]["datapath"] for n in (n1, n2, n3)] == ["flanneld", "bpf", "kernel"]
    assert info["ipv6_network"] == IPV6_NETWORK

    # Leases: one key per host with both subnets, our values shaped as flanneld's.
    stored = leases(lab_name)
    assert len(stored) == 3
    for key, lease in stored.items():
        assert "&fd10:244:0:" in key and key.endswith("::/64"), key  # leases() shows CIDRs
        value = json.loads(lease["value"])
        assert value["PublicIPv6"].startswith("fd00:198:18::")
        assert set(value) == {"PublicIP", "PublicIPv6", "BackendType", "BackendData",
                              "BackendV6Data"}  # fmt: skip
        assert value["BackendV6Data"]["VtepMAC"] != value["BackendData"]["VtepMAC"]

    # subnet.env: the same four network lines on every host, each with its own subnets.
    for ns in (n1, n2, n3):
        env = read_env(lab_state_dir(lab_name) / ns / "subnet.env")
        assert env["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK
        subnet6 = IPv6Network(env["FLANNEL_IPV6_SUBNET"], strict=False)
        assert env["FLANNEL_IPV6_SUBNET"] == f"{subnet6.network_address + 1}/64"
        assert str(subnet6) == nodes[ns]["subnet6"]
    # ip6tables: our masquerade and forward rules are flanneld's, line for line.
    assert nat6(n2) == nat6(n1) == nat6(n3)
    assert any("! -d ff00::/8" in line and "MASQUERADE" in line for line in nat6(n2))

    pods = by_node(info)
    ping_all_both(lab_name, list(pods.values()))
    # Our BPF node sends IPv6 over the IPv4 underlay into flanneld's flannel.1 (its programs'
    # counter, flanneld's flannel.1 receiving); flanneld sends it over the IPv6 underlay from its
    # flannel-v6.1, and our programs take it off the wire (what they leave, aggregates, reaches
    # our flannel-v6.1).
    for src, dst, sent, got in (
        (n2, n1, bpf_encap(lab_name, n2), device(n1, "flannel.1", 0)),
        (n1, n2, device(n1, "flannel-v6.1", 1), bpf_decap_or_device(lab_name, n2)),
    ):
        start = (sent(), got())
        received = transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received
        assert wait_for(lambda s=sent, b=start[0], r=received: s() - b >= r), (src, "sent")
        assert wait_for(lambda g=got, b=start[1], r=received: g() - b >= r), (dst, "received")


def bpf_encap(lab_name: str, ns: str) -> Callable[[], int]:
    return lambda: counters(lab_name, ns).get(("tc_encap", "encap_redirect"), (0, 0))[1]


def bpf_decap_or_device(lab_name: str, ns: str) -> Callable[[], int]:
    """IPv6 bytes a BPF node took in from flannel-v6 frames: decapsulated by its programs (XDP
    or tc), or left to its flannel-v6.1."""

    def total() -> int:
        seen = counters(lab_name, ns)
        keys = (("xdp_decap", "decap_pass"), ("tc_decap", "decap_redirect"))
        by_bpf = sum(seen.get(key, (0, 0))[1] for key in keys)
        return by_bpf + link_bytes(ns, "flannel-v6.1")[0]

    return total


def device(ns: str, dev: str, index: int) -> Callable[[], int]:
    """A device's received (index 0) or sent (1) bytes."""
    return lambda: link_bytes(ns, dev)[index]


def test_dual_stack_between_bpf_nodes_with_xdp(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """Two BPF nodes (XDP decapsulation) and a kernel one: IPv6 pod traffic between the BPF
    nodes is encapsulated and decapsulated by the programs alone (flannel-v6.1 carries none of
    it), counted on both; to and from the kernel node it crosses by its flannel.1 / flannel-v6.1."""
    info = lab_up("--nodes", "3", "--datapath", "bpf,bpf,kernel", "--ipv6-network", IPV6_NETWORK,
                  "--agent-arg=--bpf-decap=xdp", "--pods-per-node", "1")  # fmt: skip
    n1, n2, n3 = (f"{lab_name}-n{i}" for i in (1, 2, 3))
    nodes = {n["namespace"]: n for n in info["nodes"]}
    assert [nodes[n]["datapath"] for n in (n1, n2, n3)] == ["bpf", "bpf", "kernel"]
    pods = by_node(info)
    ping_all_both(lab_name, list(pods.values()))
    for src, dst in ((n1, n2), (n2, n1)):
        before = counters(lab_name, src), counters(lab_name, dst)
        kernel_before = link_bytes(src, "flannel-v6.1")[1]
        received = transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received

        def moved(ns: str, old: Counters, hook: str, reason: str) -> int:
            return delta(counters(lab_name, ns), old, hook, reason)[1]

        assert wait_for(lambda s=src, b=before[0], r=received:
                        moved(s, b, "tc_encap", "encap_redirect") >= r)  # fmt: skip
        assert wait_for(lambda d=dst, b=before[1], r=received:
                        moved(d, b, "xdp_decap", "decap_pass") >= r)  # fmt: skip
        assert link_bytes(src, "flannel-v6.1")[1] - kernel_before < 0.01 * received
    for src, dst in ((n3, n1), (n1, n3)):
        assert transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received > 0
    # Status shows both families' remotes (IPv6 ones served by the peers' IPv4 VTEPs) and the
    # encapsulation attached at flannel-v6.1; metrics count fb_remotes6.
    status = node_status(lab_name, n1)
    remotes = {r["subnet"]: r["vtep_ip"] for r in status["bpf"]["remotes"]}
    assert remotes[nodes[n2]["subnet6"]] == nodes[n2]["underlay_ip"]
    assert len([s for s in remotes if ":" in s]) == 2
    assert status["bpf"]["attached"]["tc_encap6"] == "fb_tc_encap"
    assert metric(n1, 'flannel_bpf_map_entries{map="fb_remotes6"}') == 2


def test_dual_stack_host_gw_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """host-gw: each host routes the other's IPv6 subnet via its PublicIPv6 on eth1, as
    flanneld does; pods ping over both families and 200 MB cross over IPv6 each way."""
    info = lab_up("--nodes", "2", "--flanneld-nodes", "1", "--backend", "host-gw",
                  "--ipv6-network", IPV6_NETWORK, "--pods-per-node", "1")  # fmt: skip
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    nodes = {n["namespace"]: n for n in info["nodes"]}
    for ns, peer in ((n1, n2), (n2, n1)):
        routes = subprocess.run(["ip", "-n", ns, "-6", "route", "show", nodes[peer]["subnet6"]],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"via {nodes[peer]['underlay_ip6']} dev eth1" in routes, (ns, routes)
    pods = by_node(info)
    ping_all_both(lab_name, list(pods.values()))
    for src, dst in ((n2, n1), (n1, n2)):
        assert transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received > 0


def test_dual_stack_in_kubernetes_mode_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """--kube: node IPAM gives each Node a podCIDR of each family; our Node's flannel
    annotations are flanneld's (the same keys, values shaped alike: backend-v6-data with
    flannel-v6's MAC, public-ipv6), and pods of a flanneld node and of ours (BPF and kernel)
    reach each other over both families, 200 MB over IPv6 each way."""
    info = lab_up("--kube", "--nodes", "3", "--flanneld-nodes", "1", "--datapath", "bpf,kernel",
                  "--ipv6-network", IPV6_NETWORK, "--pods-per-node", "1")  # fmt: skip
    n1, n2, n3 = (f"{lab_name}-n{i}" for i in (1, 2, 3))
    notes = {node["name"]: node["annotations"] for node in info["kube"]["nodes"]}
    assert set(notes[n2]) == set(notes[n1]) == set(notes[n3])
    for ns in (n1, n2, n3):
        assert notes[ns]["public-ipv6"].startswith("fd00:198:18::")
        data6 = json.loads(notes[ns]["backend-v6-data"])
        assert set(data6) == {"VNI", "VtepMAC"} and data6["VNI"] == 1
        assert data6["VtepMAC"] != json.loads(notes[ns]["backend-data"])["VtepMAC"]
        env = read_env(lab_state_dir(lab_name) / ns / "subnet.env")
        assert env["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK and "FLANNEL_IPV6_SUBNET" in env
    pods = by_node(info)
    ping_all_both(lab_name, list(pods.values()))
    for src, dst in ((n2, n1), (n1, n2)):
        assert transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received > 0

    # GetStoredPublicIP for IPv6: a node-public-ipv6 annotation (a second address of n2's)
    # replaces the interface's at the next start; our kernel node n3 follows the new PublicIPv6.
    # (flanneld's n1 does not: it takes a Node update only when both families' annotations
    # changed, and n2's IPv4 ones did not; docs/decisions.md section 6.)
    moved = "fd00:198:18::7c"
    subprocess.run(["ip", "-n", n2, "-6", "addr", "add", f"{moved}/64", "dev", "eth1", "nodad"],
                   check=True)  # fmt: skip
    control_plane_of(LabState.load(lab_name)).kubectl(
        "annotate", "node", n2, "--overwrite", f"{KEYS.node_public_ipv6}={moved}"
    )
    lab.restart_agent(lab_name, n2, ready_timeout=60)

    def published() -> str:
        nodes = {n["name"]: n for n in lab.status(lab_name)["kube"]["nodes"]}
        return str(nodes[n2]["annotations"].get("public-ipv6"))

    assert wait_for(lambda: published() == moved, 15), published()
    fdb = lambda: subprocess.run(  # noqa: E731
        ["bridge", "-n", n3, "fdb", "show", "dev", "flannel-v6.1"], capture_output=True,
        text=True, check=True,
    ).stdout  # fmt: skip
    assert wait_for(lambda: f"dst {moved} " in fdb(), 15), fdb()
    ping_all_both(lab_name, list(pods.values()))


def test_ipv6_only_in_kubernetes_mode_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """EnableIPv4 false (IPv6-only, Kubernetes mode as flanneld runs it): n1 flanneld, n2 and
    n3 ours on BPF, n4 ours on kernel vxlan, all with --ip-masq. No node has an IPv4 lease,
    flannel.1 or IPv4 masquerade rule; our annotations are flanneld's (no backend-data, no
    public-ip); every pod pings every other, and 200 MB cross each way between our BPF node and
    flanneld's and between our two BPF nodes, over the IPv6 underlay, counted by what carried
    them: the programs (single packets encapsulated with their outer checksum, flanneld's
    frames and ours decapsulated) or flannel-v6.1 (aggregates vxlan.ko encapsulates)."""
    info = lab_up("--kube", "--nodes", "4", "--flanneld-nodes", "1", "--datapath",
                  "bpf,bpf,kernel", "--ipv6-network", IPV6_NETWORK, "--ipv6-only",
                  "--agent-arg=--ip-masq", "--flanneld-arg=--ip-masq",
                  "--pods-per-node", "1")  # fmt: skip
    n1, n2, n3, n4 = (f"{lab_name}-n{i}" for i in (1, 2, 3, 4))
    nodes = {n["namespace"]: n for n in info["nodes"]}
    assert [nodes[n]["datapath"] for n in (n1, n2, n3, n4)] == ["flanneld", "bpf", "bpf", "kernel"]
    notes = {node["name"]: node["annotations"] for node in info["kube"]["nodes"]}
    assert set(notes[n1]) == set(notes[n2]) == set(notes[n4])
    assert {"public-ip", "backend-data"}.isdisjoint(notes[n2]) and "public-ipv6" in notes[n2]
    for ns in (n1, n2, n3, n4):
        env = read_env(lab_state_dir(lab_name) / ns / "subnet.env")
        assert "FLANNEL_NETWORK" not in env and "FLANNEL_SUBNET" not in env
        assert env["FLANNEL_IPV6_NETWORK"] == IPV6_NETWORK
        # flanneld writes the IPv4 device's MTU even without one (1450); ours is flannel-v6's.
        assert env["FLANNEL_MTU"] == ("1450" if ns == n1 else "1430")
        links = subprocess.run(["ip", "-n", ns, "-o", "link", "show"], capture_output=True,
                               text=True, check=True).stdout  # fmt: skip
        assert "flannel-v6.1" in links and "flannel.1:" not in links
        nat4 = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", "-t", "nat", "-S"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "FLANNEL" not in nat4
    assert nat6(n2) == nat6(n1) == nat6(n4) and nat6(n2)

    pods = [as_v6(pod) for pod in by_node(info).values()]
    for src in pods:
        for dst in pods:
            if src is not dst:
                ping = pod_exec(lab_name, src["namespace"], "ping", "-6", "-c2", "-i0.2", "-W2",
                                dst["ip"])  # fmt: skip
                assert ping.returncode == 0, f"{src['namespace']} -> {dst['ip']}: {ping.stdout}"
    by_ns = {pod["node"]: pod for pod in pods}
    encap = bpf_encap(lab_name, n2)
    before = encap()
    assert pod_exec(lab_name, by_ns[n2]["namespace"], "ping", "-6", "-c3", "-i0.2",
                    by_ns[n1]["ip"]).returncode == 0  # fmt: skip
    assert wait_for(lambda: encap() - before >= 3 * 118), "pings not encapsulated by the programs"

    def sent(ns: str) -> Callable[[], int]:
        """IPv6 bytes a BPF node sent: encapsulated by its programs, or by its flannel-v6.1."""
        return lambda: bpf_encap(lab_name, ns)() + link_bytes(ns, "flannel-v6.1")[1]

    for src, dst, out, got in (
        (n2, n1, sent(n2), device(n1, "flannel-v6.1", 0)),
        (n1, n2, device(n1, "flannel-v6.1", 1), bpf_decap_or_device(lab_name, n2)),
        (n2, n3, sent(n2), bpf_decap_or_device(lab_name, n3)),
    ):
        start = (out(), got())
        received = transfer(lab_name, by_ns[src], by_ns[dst], "200M").received
        assert wait_for(lambda s=out, b=start[0], r=received: s() - b >= r), (src, "sent")
        assert wait_for(lambda g=got, b=start[1], r=received: g() - b >= r), (dst, "received")
    seen = counters(lab_name, n2)
    assert seen.get(("tc_encap", "pass_gso"), (0, 0))[0] > 0  # aggregates: vxlan.ko's
    assert ("tc_encap", "encap_redirect") in seen
    status = node_status(lab_name, n2)
    remotes = status["bpf"]["remotes"]  # 3 peers, each reached at its PublicIPv6
    assert {r["vtep_ip"] for r in remotes} == {nodes[n]["underlay_ip6"] for n in (n1, n3, n4)}
    assert status["bpf"]["attached"]["tc_encap6"] == "fb_tc_encap"


def test_ipv6_only_host_gw_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """IPv6-only host-gw: our Node's annotations are flanneld's value for value (host-gw writes
    public-ip 0.0.0.0 and null data even without IPv4), each host routes the other's IPv6
    subnet via its PublicIPv6, and 200 MB cross each way."""
    info = lab_up("--kube", "--nodes", "2", "--flanneld-nodes", "1", "--backend", "host-gw",
                  "--ipv6-network", IPV6_NETWORK, "--ipv6-only",
                  "--pods-per-node", "1")  # fmt: skip
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    nodes = {n["namespace"]: n for n in info["nodes"]}
    notes = {node["name"]: node["annotations"] for node in info["kube"]["nodes"]}
    assert {k: v for k, v in notes[n2].items() if k != "public-ipv6"} == {
        k: v for k, v in notes[n1].items() if k != "public-ipv6"
    }
    assert notes[n2]["public-ip"] == "0.0.0.0"
    for ns, peer in ((n1, n2), (n2, n1)):
        routes = subprocess.run(["ip", "-n", ns, "-6", "route", "show", nodes[peer]["subnet6"]],
                                capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert f"via {nodes[peer]['underlay_ip6']} dev eth1" in routes, (ns, routes)
    pods = by_node(info)
    for src, dst in ((n2, n1), (n1, n2)):
        assert transfer(lab_name, as_v6(pods[src]), as_v6(pods[dst]), "200M").received > 0


def test_a_dual_stack_node_restarted_ipv6_only(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """Both BPF nodes of a dual-stack Kubernetes lab restarted with EnableIPv4 false: the
    encapsulation leaves flannel.1 (flanneld would leave the device itself, and so do we), the
    IPv4 remotes are swept, each peer is reached over the IPv6 underlay, and pods still ping
    over IPv6."""
    info = lab_up("--kube", "--nodes", "2", "--datapath", "bpf", "--ipv6-network", IPV6_NETWORK,
                  "--pods-per-node", "1")  # fmt: skip
    n1, n2 = (f"{lab_name}-n{i}" for i in (1, 2))
    nodes = {n["namespace"]: n for n in info["nodes"]}

    def encap_on(ns: str, dev: str) -> bool:
        out = subprocess.run(["tc", "-n", ns, "filter", "show", "dev", dev, "egress"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return "fb_tc_encap" in out

    assert encap_on(n1, "flannel.1") and encap_on(n1, "flannel-v6.1")
    v6_only = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": IPV6_NETWORK,
               "Backend": {"Type": "vxlan"}}  # fmt: skip
    for ns in (n1, n2):
        (lab_state_dir(lab_name) / ns / "net-conf.json").write_text(json.dumps(v6_only))
        lab.restart_agent(lab_name, ns, ready_timeout=60)
    assert not encap_on(n1, "flannel.1") and encap_on(n1, "flannel-v6.1")
    env = read_env(lab_state_dir(lab_name) / n1 / "subnet.env")
    assert "FLANNEL_SUBNET" not in env and env["FLANNEL_IPV6_SUBNET"].startswith("fd10:244:")
    remotes = node_status(lab_name, n1)["bpf"]["remotes"]
    assert [r["vtep_ip"] for r in remotes] == [nodes[n2]["underlay_ip6"]]
    pods = by_node(info)
    encap = bpf_encap(lab_name, n1)
    before = encap()
    ping = pod_exec(lab_name, pods[n1]["namespace"], "ping", "-6", "-c2", "-i0.2", "-W2",
                    pods[n2]["ip6"])  # fmt: skip
    assert ping.returncode == 0, ping.stdout
    assert wait_for(lambda: encap() > before)


def lab_state_dir(lab_name: str) -> Any:
    from flannel_bpf.lab.lab import STATE_ROOT

    return STATE_ROOT / lab_name
