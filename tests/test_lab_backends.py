"""End to end in the namespace lab, per backend: every pod pair, a 200 MB TCP transfer, and
peers programmed and unprogrammed within 1 s of a lease appearing and disappearing."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.lab.agent_process import AgentProcess
from flannel_bpf.lab.lab import STATE_ROOT

from .conftest import pod_exec, requires_root

pytestmark = [pytest.mark.root, requires_root]

FAKE_SUBNET = "10.244.250.0/24"
FAKE_KEY = "/coreos.com/network/subnets/10.244.250.0-24"


def etcdctl(lab: str, *args: str) -> str:
    """etcdctl in the lab's etcd namespace; its output."""
    return subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            f"{lab}-etcd",
            "etcdctl",
            "--endpoints",
            "http://198.18.0.2:2379",
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def route_present(node_ns: str, backend: str = "vxlan") -> bool:
    if backend == "udp":
        # udp routes live in the agent's own table, not the kernel's: its log says when.
        lab_name = node_ns.rsplit("-", 1)[0]
        log = (STATE_ROOT / lab_name / node_ns / "agent.log").read_text()
        return log.rfind(f"Subnet added: {FAKE_SUBNET}") > log.rfind(
            f"Subnet removed: {FAKE_SUBNET}"
        )
    out = subprocess.run(
        ["ip", "-n", node_ns, "route", "show", FAKE_SUBNET],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return FAKE_SUBNET.split("/")[0] in out


def seconds_until(predicate: Callable[[], bool], limit: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > limit:
            return float("inf")
        time.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.parametrize(
    ("backend", "datapath"),
    [
        ("vxlan", "bpf"),
        ("vxlan", "kernel"),
        ("host-gw", "kernel"),
        ("udp", "bpf"),
        ("udp", "userspace"),
    ],
)
def test_backend_end_to_end(
    backend: str,
    datapath: str,
    lab_name: str,
    lab_up: Callable[..., dict[str, Any]],
) -> None:
    extra = ["--datapath", datapath] if backend in ("vxlan", "udp") else []
    info = lab_up("--nodes", "3", "--backend", backend, *extra)
    assert all(n["backend"] == backend and n["agent_running"] for n in info["nodes"])
    assert {n["datapath"] for n in info["nodes"]} == {datapath}
    pods = info["pods"]
    for src in pods:
        for dst in pods:
            if src is not dst:
                ping = pod_exec(lab_name, src["namespace"], "ping", "-c1", "-W2", dst["ip"])
                assert ping.returncode == 0, f"{src['namespace']} -> {dst['ip']}: {ping.stdout}"

    # 200 MB of TCP between pods on different nodes
    server = subprocess.Popen(
        ["ip", "netns", "exec", pods[1]["namespace"], "iperf3", "-s", "-1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        client = pod_exec(
            lab_name, pods[0]["namespace"], "iperf3", "-c", pods[1]["ip"], "-n", "200M", "-J"
        )
        assert client.returncode == 0, client.stdout[-2000:]
        result = json.loads(client.stdout)
        print(
            f"\n{backend}/{datapath}: 200 MB pod to pod at "
            f"{result['end']['sum_received']['bits_per_second'] / 1e9:.2f} Gbit/s"
        )
        # TCP delivered all of it; iperf3's receiver tally stops a moment before the end.
        assert result["end"]["sum_sent"]["bytes"] >= 200 * 1024 * 1024
        assert result["end"]["sum_received"]["bytes"] >= 0.95 * 200 * 1024 * 1024
    finally:
        server.kill()
        server.wait()

    # A node joining: its lease appears, every peer programs it within 1 s; leaving likewise.
    if backend == "vxlan":
        value = (
            '{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:00:00:99"}}'
        )
    elif backend == "host-gw":
        value = '{"PublicIP":"198.18.0.99","PublicIPv6":null,"BackendType":"host-gw"}'
    else:
        value = '{"PublicIP":"198.18.0.99","PublicIPv6":null}'
    nodes = [n["namespace"] for n in info["nodes"]]
    start = time.monotonic()
    etcdctl(lab_name, "put", FAKE_KEY, value)
    for node in nodes:
        seconds_until(lambda n=node: route_present(n, backend))  # type: ignore[misc]
    joined = time.monotonic() - start
    start = time.monotonic()
    etcdctl(lab_name, "del", FAKE_KEY)
    for node in nodes:
        seconds_until(lambda n=node: not route_present(n, backend))  # type: ignore[misc]
    left = time.monotonic() - start
    assert all(route_present(n, backend) is False for n in nodes)
    print(
        f"\n{backend}: peers programmed {joined * 1000:.0f} ms after the lease appeared, "
        f"unprogrammed {left * 1000:.0f} ms after it went (incl. etcdctl start-up)"
    )
    assert joined < 1.0, f"join took {joined:.3f}s"
    assert left < 1.0, f"leave took {left:.3f}s"


def sh(ns: str, *cmd: str) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"
    return proc.stdout


def test_mixed_cluster_with_a_flanneld_style_node(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """A peer configured by hand exactly as flanneld configures a vxlan node (flannel-compat.md
    5.1), lease in flanneld's JSON, exchanges pod traffic with flannel-bpf nodes both ways."""
    info = lab_up("--nodes", "2", "--backend", "vxlan")
    ns, mac, public_ip = f"{lab_name}-n9", "0e:aa:bb:cc:dd:09", "198.18.0.99"
    from flannel_bpf.lab.netns import add_address, add_netns, add_veth, link_up, run

    add_netns(ns)  # named like the lab's, so lab down removes it
    add_veth(ns, "eth1", f"{lab_name}-ul", "n9")
    run(["ip", "-n", f"{lab_name}-ul", "link", "set", "n9", "master", "br0"])
    link_up(f"{lab_name}-ul", "n9")
    add_address(ns, "eth1", f"{public_ip}/24")
    link_up(ns, "eth1")
    sh(
        ns,
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        mac,
        "mtu",
        "1450",
        "type",
        "vxlan",
        "id",
        "1",
        "local",
        public_ip,
        "dev",
        "eth1",
        "nolearning",
        "dstport",
        "8472",
    )
    sh(ns, "ip", "addr", "add", "10.244.250.0/32", "dev", "flannel.1")
    sh(ns, "ip", "link", "set", "flannel.1", "up")
    sh(ns, "ip", "addr", "add", "10.244.250.1/32", "dev", "lo")  # its "pod"
    etcdctl(
        lab_name,
        "put",
        FAKE_KEY,
        f'{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}',
    )

    # flanneld's per-peer entries for every flannel-bpf node, from their leases
    out = etcdctl(lab_name, "get", "--prefix", "/coreos.com/network/subnets/").splitlines()
    for key, value in zip(out[::2], out[1::2], strict=True):
        lease = json.loads(value)
        if lease["PublicIP"] == public_ip:
            continue
        net = key.rsplit("/", 1)[1].replace("-", "/")
        gw = net.split("/")[0]
        peer_mac = lease["BackendData"]["VtepMAC"]
        sh(
            ns,
            "ip",
            "neigh",
            "replace",
            gw,
            "lladdr",
            peer_mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        )
        sh(
            ns,
            "bridge",
            "fdb",
            "replace",
            peer_mac,
            "dev",
            "flannel.1",
            "dst",
            lease["PublicIP"],
            "self",
            "permanent",
        )
        sh(ns, "ip", "route", "replace", net, "via", gw, "dev", "flannel.1", "onlink")

    for pod in info["pods"]:
        there = pod_exec(lab_name, pod["namespace"], "ping", "-c1", "-W2", "10.244.250.1")
        assert there.returncode == 0, there.stdout
        back = subprocess.run(
            ["ip", "netns", "exec", ns, "ping", "-c1", "-W2", "-I", "10.244.250.1", pod["ip"]],
            capture_output=True,
            text=True,
        )
        assert back.returncode == 0, back.stdout


def test_dual_network_vxlan_and_host_gw(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """flanneld's "multi" functional test: two agents per host on two prefixes with two subnet
    files, vxlan and host-gw, each network's traffic on its own device."""
    info = lab_up("--nodes", "2", "--pods-per-node", "0", "--backend", "vxlan")
    etcdctl(
        lab_name,
        "put",
        "/hostgw/network/config",
        '{"Network": "10.12.0.0/16", "Backend": {"Type": "host-gw"}}',
    )
    agents = []
    try:
        for node in info["nodes"]:
            agent = AgentProcess(
                node["namespace"],
                [
                    "--iface",
                    "eth1",
                    "--etcd-endpoints",
                    "http://198.18.0.2:2379",
                    "--etcd-prefix",
                    "/hostgw/network",
                    "--subnet-file",
                    str(tmp_path / node["namespace"] / "hostgw.env"),
                    "--status-file",
                    str(tmp_path / node["namespace"] / "hostgw-status.json"),
                ],
                tmp_path / node["namespace"] / "hostgw.log",
            )
            agent.start()
            agents.append(agent)
        envs = []
        for node in info["nodes"]:
            path = tmp_path / node["namespace"] / "hostgw.env"
            assert seconds_until(path.exists, 20) < 20, "no hostgw.env"
            envs.append(path.read_text())
        # The lab's agents hold the default metrics port: the second network's agents carry on
        # without metrics, and say so.
        assert "metrics disabled (choose a port with --metrics-addr)" in agents[0].log()
        host1, host2 = (n["namespace"] for n in info["nodes"])
        # "dummy" addresses on host1 for both networks' FLANNEL_SUBNET .1 (no pods, no cni0)
        hostgw_dest = envs[0].split("FLANNEL_SUBNET=")[1].split("/")[0]
        vxlan_dest = str(IPv4Network(info["nodes"][0]["subnet"]).network_address + 1)
        sh(host1, "ip", "addr", "add", f"{hostgw_dest}/32", "dev", "lo")
        sh(host1, "ip", "addr", "add", f"{vxlan_dest}/32", "dev", "lo")
        # Linux treats a destination as on-link when a socket bound to a device finds no route
        # through it; without arp_ignore host1 would answer ARP for its lo addresses on eth1 and
        # "ping -I eth1" would succeed whatever the routes say.
        sh(host1, "sysctl", "-qw", "net.ipv4.conf.eth1.arp_ignore=1")
        assert seconds_until(lambda: "10.12." in sh(host2, "ip", "route"), 5) < 5, (
            "host-gw peer not programmed"
        )

        def ping(*args: str) -> int:
            return subprocess.run(
                ["ip", "netns", "exec", host2, "ping", "-c1", "-W1", *args], capture_output=True
            ).returncode

        assert ping(hostgw_dest) == 0
        assert ping(vxlan_dest) == 0
        assert ping("-I", "flannel.1", hostgw_dest) != 0
        assert ping("-I", "eth1", vxlan_dest) != 0
    finally:
        for agent in agents:
            agent.stop()
