"""The multi-node lab on network namespaces: an underlay bridge, etcd, hosts running agents, pods.

Layout for a lab named NAME (default "fblab"):
- NAME-ul: the underlay, a bridge br0 that every host's eth1 plugs into (198.18.0.0/24);
- NAME-etcd: etcd at 198.18.0.2 (with --etcd-members 3: also .4 and .5, one member each); with
  --kube also kube-apiserver (198.18.0.2:6443) and kube-controller-manager on it (lab/kube.py),
  the agents then in Kubernetes mode, each with a service-account token of the manifest's RBAC;
- NAME-mon (with --prometheus): Prometheus at 198.18.0.3:9090 scraping every agent's /metrics;
- NAME-nI: host I at 198.18.0.(10+I), running `flannel-bpf run --iface eth1`, or with
  --flanneld-nodes N (hosts 1..N) the real flanneld with the same flags (lab/peers.py);
- NAME-nIpJ: pod J of host I, attached through the node's CNI configuration list by the real
  flannel CNI plugin (delegating to bridge + host-local), as a container runtime would.
Everything the lab starts runs inside those namespaces; `down` kills what runs in them and
deletes them, so it also cleans up after a crashed `up`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any

from flannel_bpf.lab import cni
from flannel_bpf.lab.agent_process import FLANNEL_BPF, FLANNELD, PROGRAMS, AgentProcess
from flannel_bpf.lab.etcd import ETCD_BINARY, EtcdCluster, EtcdTls, make_cluster
from flannel_bpf.lab.kube import ControlPlane, ControlPlaneError
from flannel_bpf.lab.netns import (
    add_address,
    add_netns,
    add_veth,
    delete_netns,
    in_netns,
    link_up,
    list_netns,
    netns_exists,
    run,
    stop_netns_processes,
)
from flannel_bpf.lab.peers import peer
from flannel_bpf.lab.proc import alive
from flannel_bpf.lab.prometheus import Prometheus
from flannel_bpf.lab.tls import make_pki

STATE_ROOT = Path("/run/flannel-bpf/lab")
UNDERLAY = IPv4Network("198.18.0.0/24")
# The underlay's IPv6 half in a dual-stack lab (--ipv6-network): host I at ::(10+I), as in IPv4.
UNDERLAY_V6 = IPv6Network("fd00:198:18::/64")
ETCD_IP = "198.18.0.2"
# Member i of a lab's etcd cluster listens on ETCD_IPS[i] (.3 is the monitor's).
ETCD_IPS = (ETCD_IP, "198.18.0.4", "198.18.0.5", "198.18.0.6", "198.18.0.7")
MONITOR_IP = "198.18.0.3"
METRICS_PORT = 9867  # the agents' default --metrics-addr port
PREFIX = "/coreos.com/network"


class LabError(RuntimeError):
    pass


@dataclass
class PodState:
    name: str  # also its namespace
    node: str
    ip: str = ""
    ip6: str = ""  # dual-stack labs


@dataclass
class NodeState:
    name: str  # also its namespace
    underlay_ip: str
    agent_pid: int = 0
    subnet: str = ""
    subnet6: str = ""  # dual-stack labs
    underlay_ip6: str = ""
    mtu: int = 0
    backend: str = ""
    datapath: str = ""
    agent_args: list[str] = field(default_factory=list)
    agent_env: dict[str, str] = field(default_factory=dict)
    pods: list[PodState] = field(default_factory=list)
    agent: str = FLANNEL_BPF  # or flanneld


@dataclass
class LabState:
    name: str
    network: str
    backend: str
    etcd_endpoint: str  # every member, comma separated: the agents' --etcd-endpoints
    etcd_pids: list[int] = field(default_factory=list)  # per member
    prometheus_url: str = ""  # reachable from the NAME-mon namespace
    nodes: list[NodeState] = field(default_factory=list)
    kube: bool = False  # agents use the Kubernetes subnet manager of the lab's control plane
    kube_pids: dict[str, int] = field(default_factory=dict)  # kube-apiserver, ...-manager
    ipv6_network: str = ""  # dual stack: EnableIPv6 with this IPv6Network
    ipv4: bool = True  # False: IPv6-only (EnableIPv4 false)

    @property
    def dir(self) -> Path:
        return STATE_ROOT / self.name

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2))
        tmp.replace(self.dir / "state.json")

    @classmethod
    def load(cls, name: str) -> LabState:
        path = STATE_ROOT / name / "state.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise LabError(f"no lab named {name!r} is up (no {path})") from None
        nodes = [
            NodeState(**{**n, "pods": [PodState(**p) for p in n.get("pods", [])]})
            for n in raw.pop("nodes", [])
        ]
        return cls(**raw, nodes=nodes)

    def pods(self) -> list[PodState]:
        return [pod for node in self.nodes for pod in node.pods]


@dataclass(frozen=True)
class LabSpec:
    name: str = "fblab"
    nodes: int = 3
    pods_per_node: int = 1
    backend: str = "vxlan"
    network: str = "10.244.0.0/16"
    underlay_mtu: int = 1500
    agent_args: tuple[str, ...] = ()
    # --datapath per node, cycled over the nodes (e.g. ("bpf", "kernel")); empty: the default.
    datapaths: tuple[str, ...] = ()
    # net.ipv4.conf.{all,default}.rp_filter on the hosts, set before the agents start.
    rp_filter: int | None = None
    # A Prometheus scraping the agents, with dashboards/alerts.yml loaded.
    prometheus: bool = False
    # etcd over mutual TLS: a CA, server and client certificates made for this lab (in its
    # state dir, pki/); agents get the client's with --etcd-cafile/certfile/keyfile.
    etcd_tls: bool = False
    # Members of the etcd cluster (1..5); agents are given every member's endpoint.
    etcd_members: int = 1
    # Hosts 1..flanneld_nodes run the real flanneld instead of flannel-bpf, with the same
    # store flags plus flanneld_args; agent_args and datapaths are for the flannel-bpf hosts.
    flanneld_nodes: int = 0
    flanneld_args: tuple[str, ...] = ()
    # Dual stack: EnableIPv6 with this IPv6Network, an IPv6 underlay beside the IPv4 one
    # (UNDERLAY_V6), pods with an address of each family.
    ipv6_network: str = ""
    # False: an IPv6-only network (EnableIPv4 false; Kubernetes mode, as flanneld's etcd mode
    # cannot run one). The nodes keep their IPv4 underlay address to reach the control plane;
    # leases, VTEPs and pods have IPv6 only.
    ipv4: bool = True
    # A Kubernetes control plane on the etcd (v1.36, built by scripts/build-peers.sh) and every
    # agent in Kubernetes mode: Nodes registered, deploy/kube-flannel-bpf.yml applied.
    kube: bool = False


def node_ns(lab: str, index: int) -> str:
    return f"{lab}-n{index}"


def read_env(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key] = value
    return values


def pod_address(pod: str, family: int = 4) -> str | None:
    """The IPv4 (or global IPv6) address CNI gave the pod's eth0, or None (no such pod, or not
    attached)."""
    if not netns_exists(pod):
        return None
    scope = ["scope", "global"] if family == 6 else []
    proc = subprocess.run(
        ["ip", "-n", pod, "-j", f"-{family}", "addr", "show", "dev", "eth0", *scope],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        return None
    for link in json.loads(proc.stdout or "[]"):
        for info in link.get("addr_info", []):
            return str(info["local"])
    return None


def attach_pod(node: str | None, pod: str, conflist: dict[str, Any]) -> str:
    """A pod the way a flannel node's runtime makes one: its own namespace, then the node's CNI
    configuration list (the flannel plugin: a veth on cni0, an address from host-local out of
    the node's subnet). Returns the (IPv4) address; an attached pod is kept."""
    address = pod_address(pod)
    if address is not None:
        return address
    created = not netns_exists(pod)
    if created:
        add_netns(pod)
        # No duplicate address detection: an IPv6 address is usable at once, as the IPv4 one.
        run(["ip", "netns", "exec", pod, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
             "net.ipv6.conf.default.accept_dad=0"])  # fmt: skip
    try:
        result = cni.add(conflist, pod, f"/run/netns/{pod}", node)
        return str(result["ips"][0]["address"].split("/")[0])
    except (cni.CniError, KeyError, IndexError, ValueError) as exc:
        if created:  # a pod that could not be attached is not left behind
            with contextlib.suppress(cni.CniError):
                cni.delete(conflist, pod, f"/run/netns/{pod}", node)
            delete_netns(pod)
        raise LabError(f"pod {pod}: {exc}") from None


def node_conflist(state: LabState, node: str) -> dict[str, Any]:
    """The CNI configuration list on a lab node: the ConfigMap's cni-conf.json in a Kubernetes
    lab (as the DaemonSet's init container installs it), packaging/cni's otherwise, with the
    node's own subnet.env and CNI state directories."""
    node_dir = state.dir / node
    source = node_dir / "cni-conf.json" if state.kube else cni.NODE_CONFLIST
    try:
        if state.ipv6_network:
            return cni.ipv6_conflist(node_dir / "subnet.env", node_dir / "cni")
        return cni.for_node(cni.load_conflist(source), node_dir / "subnet.env", node_dir / "cni")
    except cni.CniError as exc:
        raise LabError(str(exc)) from None


def up(spec: LabSpec) -> LabState:
    if not 1 <= spec.etcd_members <= len(ETCD_IPS):
        raise LabError(f"etcd members must be 1..{len(ETCD_IPS)}")
    if not 0 <= spec.flanneld_nodes <= spec.nodes:
        raise LabError(f"--flanneld-nodes must be 0..{spec.nodes} (the number of nodes)")
    if spec.flanneld_nodes:
        from flannel_bpf.lab.peers import PeerMissing, flanneld_binary

        try:
            flanneld_binary()
        except PeerMissing as exc:
            raise LabError(str(exc)) from None
    if not spec.ipv4 and not (spec.ipv6_network and spec.kube):
        raise LabError("an IPv6-only lab needs --ipv6-network and --kube (flanneld's etcd mode "
                       "cannot run IPv6-only networks)")  # fmt: skip
    down(spec.name, quiet=True)
    scheme = "https" if spec.etcd_tls else "http"
    endpoints = ",".join(f"{scheme}://{ip}:2379" for ip in ETCD_IPS[: spec.etcd_members])
    state = LabState(spec.name, spec.network, spec.backend, endpoints, kube=spec.kube,
                     ipv6_network=spec.ipv6_network, ipv4=spec.ipv4)  # fmt: skip
    if spec.kube and (spec.etcd_tls or spec.etcd_members != 1):
        raise LabError("--kube runs its control plane on one plain etcd member")
    try:
        _build(spec, state)
    except ControlPlaneError as exc:
        down(spec.name, quiet=True)
        raise LabError(f"Kubernetes control plane: {exc}") from None
    except BaseException:
        down(spec.name, quiet=True)
        raise
    return state


def _build(spec: LabSpec, state: LabState) -> None:
    lab = spec.name
    underlay = f"{lab}-ul"
    add_netns(underlay)
    run(["ip", "-n", underlay, "link", "add", "br0", "type", "bridge"])
    link_up(underlay, "br0")

    def plug(ns: str, port: str, address: str, address6: str = "") -> None:
        add_veth(ns, "eth1", underlay, port, mtu=spec.underlay_mtu)
        run(["ip", "-n", underlay, "link", "set", port, "master", "br0"])
        link_up(underlay, port)
        add_address(ns, "eth1", f"{address}/{UNDERLAY.prefixlen}")
        if address6:
            run(["ip", "-n", ns, "-6", "addr", "add", f"{address6}/{UNDERLAY_V6.prefixlen}",
                 "dev", "eth1", "nodad"])  # fmt: skip
        link_up(ns, "eth1")

    etcd_ns = f"{lab}-etcd"
    add_netns(etcd_ns)
    plug(etcd_ns, "etcd", ETCD_IP)
    member_ips = ETCD_IPS[: spec.etcd_members]
    for address in member_ips[1:]:
        add_address(etcd_ns, "eth1", f"{address}/{UNDERLAY.prefixlen}")
    if spec.etcd_tls:
        make_pki(state.dir / "pki", member_ips)
    state.etcd_pids = [0] * spec.etcd_members
    cluster = etcd_cluster(state)
    for i, member in enumerate(cluster.members):
        member.start()
        assert member.process is not None
        state.etcd_pids[i] = member.process.pid
    state.save()
    for member in cluster.members:
        member.wait_ready()
    net_conf: dict[str, Any] = {"Network": spec.network, "Backend": {"Type": spec.backend}}
    if spec.ipv6_network:
        net_conf.update(EnableIPv6=True, IPv6Network=spec.ipv6_network)
    if not spec.ipv4:
        del net_conf["Network"]
        net_conf["EnableIPv4"] = False
    if spec.kube:
        control_plane = start_control_plane(state, net_conf)
    else:
        cluster.members[0].etcdctl("put", f"{PREFIX}/config", json.dumps(net_conf))

    for i in range(1, spec.nodes + 1):
        ns = node_ns(lab, i)
        add_netns(ns)
        address6 = str(UNDERLAY_V6.network_address + 10 + i) if spec.ipv6_network else ""
        plug(ns, f"n{i}", str(UNDERLAY.network_address + 10 + i), address6)
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        if spec.ipv6_network:
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1",
                 "net.ipv6.conf.default.accept_dad=0"])  # fmt: skip
        if "userspace" in spec.datapaths or (spec.flanneld_nodes and spec.backend == "udp"):
            # A NIC finishes checksums and segments before the wire; a veth hands its peer the
            # skb as is (checksum pending, aggregates whole), which a receiving UDP socket cannot
            # use. With a userspace receiver in the lab (ours, or flanneld's udp proxy), every
            # sender does that work in software.
            run(["ip", "netns", "exec", ns, "ethtool", "-K", "eth1", "tx", "off"])
        if spec.rp_filter is not None:
            for scope in ("all", "default", "eth1"):
                sysctl = f"net.ipv4.conf.{scope}.rp_filter={spec.rp_filter}"
                run(["ip", "netns", "exec", ns, "sysctl", "-qw", sysctl])
        program = FLANNELD if i <= spec.flanneld_nodes else FLANNEL_BPF
        if program == FLANNELD:
            extra = list(spec.flanneld_args)
        else:
            k = i - 1 - spec.flanneld_nodes  # datapaths cycle over the flannel-bpf hosts
            datapath = spec.datapaths[k % len(spec.datapaths)] if spec.datapaths else ""
            extra = [*(["--datapath", datapath] if datapath else []), *spec.agent_args]
        node = NodeState(
            ns,
            str(UNDERLAY.network_address + 10 + i),
            underlay_ip6=address6,
            backend=spec.backend,
            agent=program,
            agent_args=agent_args(state, ns, program, extra),
        )
        if spec.kube:
            # What a kubelet and the DaemonSet pod would provide: the Node, a token, the files.
            control_plane.register_node(ns, node.underlay_ip)
            kube_files(state, control_plane, ns)
            node.agent_env = {"NODE_NAME": ns}
        agent = AgentProcess(
            ns, node.agent_args, state.dir / ns / "agent.log", node.agent_env, program=program
        )
        agent.start()
        node.agent_pid = agent.pid or 0
        state.nodes.append(node)
        state.save()

    deadline = time.monotonic() + 60
    for node in state.nodes:
        subnet_file = state.dir / node.name / "subnet.env"
        while not subnet_file.exists():
            if not alive(node.agent_pid):
                log = (state.dir / node.name / "agent.log").read_text(errors="replace")
                raise LabError(f"agent on {node.name} exited:\n{log[-3000:]}")
            if time.monotonic() > deadline:
                raise LabError(f"agent on {node.name} wrote no subnet file within 60 s")
            time.sleep(0.1)
        env = read_env(subnet_file)
        if "FLANNEL_SUBNET" in env:
            node.subnet = str(IPv4Network(env["FLANNEL_SUBNET"], strict=False))
        if "FLANNEL_IPV6_SUBNET" in env:
            node.subnet6 = str(IPv6Network(env["FLANNEL_IPV6_SUBNET"], strict=False))
        node.mtu = int(env["FLANNEL_MTU"])
        node.datapath = node_datapath(state.dir / node.name, node.agent)["datapath"]
        conflist = node_conflist(state, node.name)
        for j in range(1, spec.pods_per_node + 1):
            pod = PodState(f"{node.name}p{j}", node.name)
            node.pods.append(pod)
            state.save()
            address = attach_pod(node.name, pod.name, conflist)
            pod.ip = address if spec.ipv4 else ""
            pod.ip6 = (pod_address(pod.name, 6) or "") if spec.ipv6_network else ""
    state.save()
    if spec.prometheus:
        monitor = f"{lab}-mon"
        add_netns(monitor)
        plug(monitor, "mon", MONITOR_IP)
        server = prometheus_of(state)
        server.start()
        server.wait_ready()
        state.prometheus_url = server.url
        state.save()


def agent_args(state: LabState, ns: str, program: str, extra: list[str]) -> list[str]:
    """A host's agent flags: flanneld's own names, which flannel-bpf takes too; flannel-bpf also
    gets a status file in the lab (never the machine's default)."""
    node_dir = state.dir / ns
    if state.kube:
        args = [
            "--iface",
            "eth1",
            "--kube-subnet-mgr",
            "--kubeconfig-file",
            str(node_dir / "kubeconfig"),
            "--net-config-path",
            str(node_dir / "net-conf.json"),
            "--subnet-file",
            str(node_dir / "subnet.env"),
        ]
    else:
        args = [
            "--iface",
            "eth1",
            "--etcd-endpoints",
            state.etcd_endpoint,
            "--etcd-prefix",
            PREFIX,
            "--subnet-file",
            str(node_dir / "subnet.env"),
        ]
    if state.etcd_endpoint.startswith("https://"):
        pki = state.dir / "pki"
        args += ["--etcd-cafile", str(pki / "ca.pem"), "--etcd-certfile", str(pki / "client.pem")]
        args += ["--etcd-keyfile", str(pki / "client-key.pem")]
    if program == FLANNEL_BPF:
        args += ["--status-file", str(node_dir / "status.json")]
    return [*args, *extra]


def control_plane_of(state: LabState) -> ControlPlane:
    return ControlPlane(state.dir / "kube", f"{state.name}-etcd", ETCD_IP, f"http://{ETCD_IP}:2379",
                        cluster_cidr=state.network if state.ipv4 else state.ipv6_network,
                        cluster_cidr_v6=state.ipv6_network if state.ipv4 else "")  # fmt: skip


MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "kube-flannel-bpf.yml"
KUBE_NAMESPACE = "kube-flannel"
SERVICE_ACCOUNT = "flannel"


def manifest_objects(net_conf: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """deploy/kube-flannel-bpf.yml's objects, with the lab's net-conf.json in the ConfigMap."""
    import yaml

    objects = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]
    for obj in objects:
        if net_conf is not None and obj.get("kind") == "ConfigMap":
            obj["data"]["net-conf.json"] = json.dumps(net_conf, indent=2) + "\n"
    return objects


def start_control_plane(state: LabState, net_conf: dict[str, Any]) -> ControlPlane:
    control_plane = control_plane_of(state)
    control_plane.start()
    state.kube_pids = {name: proc.pid for name, proc in control_plane.processes.items()}
    state.save()
    objects = {"apiVersion": "v1", "kind": "List", "items": manifest_objects(net_conf)}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(objects))
    return control_plane


KUBE_COMPONENTS = ("kube-apiserver", "kube-controller-manager")


def stop_kube_component(name: str, component: str, sig: int = signal.SIGTERM) -> None:
    """Stop the lab's kube-apiserver or kube-controller-manager (an outage; start it again
    with start_kube_component)."""
    state = LabState.load(name)
    if component not in KUBE_COMPONENTS or not state.kube:
        raise LabError(f"lab {name!r} has no {component} (components: {KUBE_COMPONENTS})")
    _stop_pid(state.kube_pids.get(component, 0), sig)


def start_kube_component(name: str, component: str) -> int:
    state = LabState.load(name)
    if component not in KUBE_COMPONENTS or not state.kube:
        raise LabError(f"lab {name!r} has no {component} (components: {KUBE_COMPONENTS})")
    if alive(state.kube_pids.get(component, 0)):
        raise LabError(f"{component} of lab {name!r} is already running")
    control_plane = control_plane_of(state)
    if component == "kube-apiserver":
        control_plane.start_apiserver()
    else:
        control_plane.start_controller_manager()
    state.kube_pids[component] = control_plane.processes[component].pid
    state.save()
    return state.kube_pids[component]


def kube_files(state: LabState, control_plane: ControlPlane, ns: str) -> None:
    """A node's kubeconfig (a token of the manifest's service account, as the DaemonSet pod's)
    and net-conf.json from the ConfigMap (as mounted into the pod)."""
    node_dir = state.dir / ns
    control_plane.service_account_kubeconfig(node_dir / "kubeconfig", SERVICE_ACCOUNT,
                                             KUBE_NAMESPACE)  # fmt: skip
    data = control_plane.json("get", "configmap", "kube-flannel-cfg", "-n", KUBE_NAMESPACE)["data"]
    (node_dir / "net-conf.json").write_text(data["net-conf.json"])
    (node_dir / "cni-conf.json").write_text(data["cni-conf.json"])


def kube_nodes(state: LabState) -> list[dict[str, Any]]:
    """Each Node: podCIDR, InternalIP and flannel's annotations (for lab status)."""
    try:
        doc = control_plane_of(state).json("get", "nodes")
    except (ControlPlaneError, OSError, ValueError) as exc:
        return [{"error": str(exc)}]
    out = []
    for item in doc.get("items", []):
        meta, spec = item.get("metadata", {}), item.get("spec", {})
        notes = {k.split("/", 1)[-1]: v for k, v in (meta.get("annotations") or {}).items()
                 if k.startswith("flannel.alpha.coreos.com/")}  # fmt: skip
        addresses = {a["type"]: a["address"] for a in item.get("status", {}).get("addresses", [])}
        out.append({"name": meta.get("name"), "podCIDR": spec.get("podCIDR", ""),
                    "internal_ip": addresses.get("InternalIP", ""),
                    "annotations": notes})  # fmt: skip
    return out


def etcd_cluster(state: LabState) -> EtcdCluster:
    """The lab's etcd members as up made them (same names, addresses, data and TLS files)."""
    tls = None
    if state.etcd_endpoint.startswith("https://"):
        pki = state.dir / "pki"
        tls = EtcdTls(pki / "ca.pem", pki / "server.pem", pki / "server-key.pem")
    size = len(state.etcd_pids)
    binary = peer("etcd").binary("etcd") if state.kube else ETCD_BINARY
    return make_cluster(
        state.dir / "etcd",
        size,
        hosts=ETCD_IPS[:size],
        netns=f"{state.name}-etcd",
        tls=tls,
        binary=binary,
    )


def stop_etcd_member(name: str, index: int, sig: int = signal.SIGTERM) -> None:
    """Stop one etcd member (SIGKILL: a crash); its data stays for start_etcd_member."""
    _stop_pid(_member_pid(LabState.load(name), index), sig)


def start_etcd_member(name: str, index: int, wait: bool = True) -> int:
    """Start a stopped etcd member again on its data; returns its pid. With wait, until it
    answers (which needs a quorum of members up)."""
    state = LabState.load(name)
    if alive(_member_pid(state, index)):
        raise LabError(f"etcd member {index} of lab {name!r} is already running")
    member = etcd_cluster(state).members[index]
    member.start()
    assert member.process is not None
    state.etcd_pids[index] = member.process.pid
    state.save()
    if wait:
        member.wait_ready(timeout=30)
    return member.process.pid


def _member_pid(state: LabState, index: int) -> int:
    if not 0 <= index < len(state.etcd_pids):
        raise LabError(f"lab {state.name!r} has etcd members 0..{len(state.etcd_pids) - 1}")
    return state.etcd_pids[index]


def prometheus_of(state: LabState) -> Prometheus:
    """The lab's Prometheus (started by up with prometheus=True, or about to be)."""
    targets = [
        f"{node.underlay_ip}:{METRICS_PORT}" for node in state.nodes if node.agent == FLANNEL_BPF
    ]
    return Prometheus(f"{state.name}-mon", MONITOR_IP, targets, state.dir / "prometheus")


def node_datapath(node_dir: Path, program: str = FLANNEL_BPF) -> dict[str, Any]:
    """What the node's agent reports it runs (its status file): data path, decap hook, fallbacks.
    flanneld keeps no such file: its data path is the kernel's, as it builds it."""
    if program == FLANNELD:
        return {"datapath": "flanneld", "decap": "", "fallbacks": []}
    try:
        info = json.loads((node_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {"datapath": "?", "decap": "", "fallbacks": []}
    details = info.get("details") or {}
    return {
        "datapath": str(info.get("datapath", "?")),
        "decap": str(details.get("decap", "")),
        "fallbacks": list(info.get("fallbacks") or []),
    }


def status(name: str) -> dict[str, Any]:
    state = LabState.load(name)
    return {
        "name": state.name,
        "network": state.network if state.ipv4 else "",
        "backend": state.backend,
        "etcd": {
            "endpoint": state.etcd_endpoint,
            "members": [
                {"member": i, "endpoint": endpoint, "pid": pid, "running": alive(pid)}
                for i, (endpoint, pid) in enumerate(
                    zip(state.etcd_endpoint.split(","), state.etcd_pids, strict=True)
                )
            ],
        },
        "prometheus": state.prometheus_url,
        "nodes": [
            {
                "namespace": n.name,
                "underlay_ip": n.underlay_ip,
                "subnet": n.subnet,
                **({"subnet6": n.subnet6, "underlay_ip6": n.underlay_ip6} if n.subnet6 else {}),
                "backend": n.backend,
                "agent": n.agent,
                **node_datapath(state.dir / n.name, n.agent),
                "mtu": n.mtu,
                "agent_pid": n.agent_pid,
                "agent_running": alive(n.agent_pid),
            }
            for n in state.nodes
        ],
        "pods": [
            {"namespace": p.name, "node": p.node, "ip": p.ip, **({"ip6": p.ip6} if p.ip6 else {})}
            for p in state.pods()
        ],
        **({"ipv6_network": state.ipv6_network} if state.ipv6_network else {}),
        "kube": {
            "server": control_plane_of(state).server,
            "kubeconfig": str(control_plane_of(state).admin_kubeconfig),
            "nodes": kube_nodes(state),
        }
        if state.kube
        else None,
    }


def format_status(info: dict[str, Any]) -> str:
    members = info["etcd"]["members"]
    up_count = sum(1 for m in members if m["running"])
    if len(members) == 1:
        etcd = f"etcd {info['etcd']['endpoint']} ({'up' if up_count else 'DOWN'})"
    else:
        quorum = "" if up_count > len(members) // 2 else ", NO QUORUM"
        etcd = f"etcd {len(members)} members ({up_count} up{quorum})"
    lines = [
        f"lab {info['name']}: network {info['network']}, backend {info['backend']}, {etcd}",
        "",
        f"{'NODE':<14}{'UNDERLAY':<15}{'SUBNET':<17}{'BACKEND':<9}{'DATAPATH':<14}{'MTU':<6}AGENT",
    ]
    notes = []
    for n in info["nodes"]:
        agent = f"{n.get('agent', FLANNEL_BPF)} {n['agent_pid']}"
        agent += "" if n["agent_running"] else " (exited)"
        datapath = n["datapath"] + (f"/{n['decap']}" if n.get("decap") else "")
        lines.append(
            f"{n['namespace']:<14}{n['underlay_ip']:<15}{n['subnet']:<17}"
            f"{n['backend']:<9}{datapath:<14}{n['mtu']:<6}{agent}"
        )
        notes += [f"  {n['namespace']}: {reason}" for reason in n.get("fallbacks", [])]
    if notes:
        lines += ["", "fallbacks:", *notes]
    if info.get("prometheus"):
        lines += ["", f"prometheus {info['prometheus']} in {info['name']}-mon, scraping every "
                  f"agent's :{METRICS_PORT}/metrics"]  # fmt: skip
    kube = info.get("kube")
    if kube:
        lines += ["", f"kubernetes {kube['server']} (v1.36, in {info['name']}-etcd); kubectl: "
                  f"ip netns exec {info['name']}-etcd kubectl --kubeconfig {kube['kubeconfig']} "
                  "get nodes", "", f"{'NODE OBJECT':<16}{'PODCIDR':<17}{'PUBLIC-IP':<15}"
                  f"{'BACKEND':<9}ANNOTATIONS"]  # fmt: skip
        for n in kube["nodes"]:
            notes = n.get("annotations", {})
            lines.append(
                f"{n.get('name', n.get('error', '?')):<16}{n.get('podCIDR', ''):<17}"
                f"{notes.get('public-ip', '-'):<15}{notes.get('backend-type', '-'):<9}"
                f"{notes.get('backend-data', '-')}"
            )
    lines += ["", f"{'POD':<16}{'NODE':<14}IP"]
    lines += [f"{p['namespace']:<16}{p['node']:<14}{p['ip']}" for p in info["pods"]]
    return "\n".join(lines)


def exec_in_pod(name: str, pod: str, command: list[str]) -> int:
    state = LabState.load(name)
    if pod not in {p.name for p in state.pods()} | {n.name for n in state.nodes}:
        known = ", ".join(p.name for p in state.pods())
        raise LabError(f"no pod or node {pod!r} in lab {name!r} (pods: {known})")
    if not command:
        raise LabError("no command given: flannel-bpf lab exec POD -- CMD")
    return subprocess.call(in_netns(pod, command))


def restart_agent(
    name: str,
    node_name: str,
    sig: int = signal.SIGTERM,
    *,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    ready_timeout: float | None = None,
    program: str | None = None,
    between: list[str] | None = None,
) -> int:
    """Stop a node's agent with sig (SIGKILL: a crash) and start it again; returns the new pid.

    args and env, when given, replace the agent's flags and extra environment from then on (an
    upgrade: e.g. FLANNEL_BPF_SOURCE_DIR pointing at changed programs). program switches the node
    between flannel-bpf and flanneld (a migration or a rollback: same subnet file and public IP;
    args default to the lab's for that program); between is a command run in the node's
    namespace after the stop (e.g. flannel-bpf cleanup before flanneld takes over). With
    ready_timeout, returns only once the new agent is ready (flannel-bpf: its status file has
    its pid; flanneld: it has written the subnet file)."""
    state = LabState.load(name)
    node = next((n for n in state.nodes if n.name == node_name), None)
    if node is None:
        raise LabError(f"no node {node_name!r} in lab {name!r}")
    if program is not None and program not in PROGRAMS:
        raise LabError(f"program must be one of {', '.join(PROGRAMS)}")
    if program is not None and program != node.agent:
        node.agent = program
        node.agent_env = {"NODE_NAME": node.name} if state.kube else {}
        if args is None:
            args = agent_args(state, node.name, program, [])
    if args is not None:
        node.agent_args = list(args)
    if env is not None:
        node.agent_env = dict(env)
    _stop_pid(node.agent_pid, sig)
    if between:
        run(in_netns(node.name, between))
    log_path = state.dir / node.name / "agent.log"
    started = time.time()
    agent = AgentProcess(
        node.name, node.agent_args, log_path, env=node.agent_env, program=node.agent
    )
    agent.start()
    node.agent_pid = agent.pid or 0
    state.save()
    if ready_timeout is not None:
        _wait_ready(state.dir / node.name, node.agent_pid, ready_timeout, node.agent, started)
    return node.agent_pid


def _wait_ready(
    node_dir: Path, pid: int, timeout: float, program: str = FLANNEL_BPF, since: float = 0.0
) -> None:
    """Until the agent with this pid is ready: flannel-bpf has written its status file with its
    pid; flanneld has written the subnet file (after since)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if program == FLANNELD:
                if (node_dir / "subnet.env").stat().st_mtime >= since:
                    return
            elif json.loads((node_dir / "status.json").read_text()).get("pid") == pid:
                return
        except (OSError, ValueError):
            pass
        if not alive(pid):
            log = (node_dir / "agent.log").read_text(errors="replace")
            raise LabError(f"agent {pid} exited before it was ready:\n{log[-3000:]}")
        if time.monotonic() > deadline:
            raise LabError(f"agent {pid} not ready after {timeout:.0f} s")
        time.sleep(0.1)


def _stop_pid(pid: int, sig: int) -> None:
    """Signal a lab process and wait for it to go (SIGKILL after 15 s)."""
    if not alive(pid):
        return
    os.kill(pid, sig)
    deadline = time.monotonic() + 15
    while alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)


def down(name: str, quiet: bool = False) -> list[str]:
    """Kill whatever runs in the lab's namespaces, delete them and the state. Always safe."""
    removed = list_netns(f"{name}-")
    for ns in removed:
        stop_netns_processes(ns)
    for ns in removed:
        delete_netns(ns)
    # The agents' pinned maps outlive their namespaces on the shared bpffs: sweep the orphans.
    from flannel_bpf.datapath.loader import remove_orphans

    remove_orphans()
    shutil.rmtree(STATE_ROOT / name, ignore_errors=True)
    if not quiet:
        print(f"lab {name} removed ({len(removed)} namespaces)")
    return removed
