"""Kubernetes mode (--kube-subnet-mgr). The pure parts (the annotation prefix rule, CIDR
containment, node to lease, the patch bodies) are ports of flannel's pkg/subnet/kube tests and of
bytes taken from flanneld v0.28.9; the rest runs against the real control plane of the lab
(kube-apiserver and kube-controller-manager v1.36.3 on etcd 3.6.8): real agents, real flanneld."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import IPv4Network, ip_network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flannel_bpf.lab import lab
from flannel_bpf.lab.agent_process import AgentProcess
from flannel_bpf.lab.lab import LabState, control_plane_of
from flannel_bpf.lab.peers import peer
from flannel_bpf.subnet.kube.annotations import (
    BAD_FORMAT,
    TOO_MANY_SLASHES,
    AnnotationPrefixError,
    Annotations,
    normalize_prefix,
)
from flannel_bpf.subnet.kube.manager import (
    NodeLeaseError,
    annotation_patch,
    network_available_patch,
    node_to_lease,
    own_cidrs,
    stored_public_ip,
    wanted_annotations,
)
from flannel_bpf.subnet.lease import LeaseAttrs

from .conftest import cli, metric, requires_root
from .test_interop_flanneld import assert_carried, path_counter
from .test_lab_bpf import bpf_remotes, by_node, counters, delta, ping_all, transfer, wait_for

KEYS = Annotations.from_flag("flannel.alpha.coreos.com")


# --------------------------------------------------------------------------------------------
# Ports of flannel's unit tests (pkg/subnet/kube)


@pytest.mark.parametrize(
    ("prefix", "backend_type_key"),
    [
        ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
        ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
        ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type"),
        ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type"),
        ("org.com", "org.com/backend-type"),
        ("org9.com", "org9.com/backend-type"),
        ("org.com/9", "org.com/9-backend-type"),
    ],
)
def test_annotation_prefixes_as_flanneld(prefix: str, backend_type_key: str) -> None:
    assert Annotations.from_flag(prefix).backend_type == backend_type_key


@pytest.mark.parametrize(
    ("prefix", "error"),
    [
        ("org", BAD_FORMAT),
        ("org/", BAD_FORMAT),
        ("org/prefix", BAD_FORMAT),
        ("org.COM", BAD_FORMAT),
        ("org.com/PREFIX", BAD_FORMAT),
        ("a.com/b/c", TOO_MANY_SLASHES),
    ],
)
def test_bad_annotation_prefixes_are_refused(prefix: str, error: str) -> None:
    with pytest.raises(AnnotationPrefixError, match=error):
        normalize_prefix(prefix)


def test_a_bad_prefix_is_a_usage_error_of_run() -> None:
    proc = cli("run", "--kube-subnet-mgr", "--kube-annotation-prefix", "org.COM")
    assert proc.returncode == 2
    assert "--kube-annotation-prefix" in proc.stderr and BAD_FORMAT in proc.stderr
    assert "Traceback" not in proc.stderr


def node(
    annotations: dict[str, str] | None = None,
    pod_cidr: str = "10.244.1.0/24",
    pod_cidrs: list[str] | None = None,
    name: str = "n1",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"podCIDR": pod_cidr}
    if pod_cidrs is not None:
        spec["podCIDRs"] = pod_cidrs
    meta: dict[str, Any] = {"name": name}
    if annotations is not None:
        meta["annotations"] = annotations
    return {"metadata": meta, "spec": spec}


FLANNEL = {
    KEYS.subnet_kube_managed: "true",
    KEYS.public_ip: "192.168.0.1",
    KEYS.backend_type: "vxlan",
    KEYS.backend_data: '{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
}


def test_node_to_lease() -> None:
    lease = node_to_lease(node(FLANNEL), KEYS)
    assert lease is not None
    assert lease.subnet == IPv4Network("10.244.1.0/24")
    assert str(lease.attrs.public_ip) == "192.168.0.1"
    assert lease.attrs.backend_type == "vxlan"
    assert lease.attrs.backend_json() == {"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"}
    # the first IPv4 entry of podCIDRs wins for a peer
    dual = node(FLANNEL, pod_cidrs=["fd00::/64", "10.244.7.0/24", "10.244.8.0/24"])
    assert node_to_lease(dual, KEYS).subnet == IPv4Network("10.244.7.0/24")  # type: ignore[union-attr]
    # not flannel's: no lease, no error
    assert node_to_lease(node({}), KEYS) is None
    assert node_to_lease(node(None), KEYS) is None  # flanneld panics on this one
    # host-gw and udp write "null": no backend data
    hostgw = {**FLANNEL, KEYS.backend_type: "host-gw", KEYS.backend_data: "null"}
    assert node_to_lease(node(hostgw), KEYS).attrs.backend_data == b""  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({KEYS.public_ip: "not-an-ip"}, "invalid IP address format"),
        ({KEYS.public_ip: "fc00::1"}, "invalid IP address format"),
        ({KEYS.backend_data: "{bad"}, "is not JSON"),
    ],
)
def test_node_to_lease_refuses_bad_annotations(change: dict[str, str], message: str) -> None:
    with pytest.raises(NodeLeaseError, match=message):
        node_to_lease(node({**FLANNEL, **change}), KEYS)


@pytest.mark.parametrize(
    ("pod_cidr", "message"),
    [("", "missing IPv4 address"), ("not-a-cidr", "invalid CIDR"), ("fc00::/64", "missing IPv4")],
)
def test_node_to_lease_refuses_bad_pod_cidrs(pod_cidr: str, message: str) -> None:
    with pytest.raises(NodeLeaseError, match=message):
        node_to_lease(node(FLANNEL, pod_cidr=pod_cidr), KEYS)


@given(
    public_ip=st.sampled_from(["192.168.0.1", "", "not-an-ip", "::1", "fc00::1", "1.2.3.4.5"])
    | st.text(max_size=40),
    cidr=st.sampled_from(["10.244.1.0/24", "fc00::/64", "not-a-cidr", "", "10.0.0.1/33"])
    | st.text(max_size=40),
    backend_type=st.sampled_from(["vxlan", "host-gw", "", "wireguard"]) | st.text(max_size=10),
    data=st.text(max_size=60),
)
def test_node_to_lease_never_crashes(
    public_ip: str, cidr: str, backend_type: str, data: str
) -> None:
    """flannel's FuzzNodeToLease: a lease or NodeLeaseError, whatever the strings."""
    notes = {
        KEYS.subnet_kube_managed: "true",
        KEYS.public_ip: public_ip,
        KEYS.backend_type: backend_type,
        KEYS.backend_data: data,
    }
    try:
        lease = node_to_lease(node(notes, pod_cidr=cidr), KEYS)
    except NodeLeaseError:
        return
    assert lease is not None and isinstance(lease.subnet, IPv4Network)


DUAL = {
    **FLANNEL,
    KEYS.public_ipv6: "fd00:198:18::b",
    KEYS.backend_v6_data: '{"VNI":1,"VtepMAC":"3e:2a:cb:e3:bd:e1"}',
}


def test_node_to_lease_dual_stack() -> None:
    """EnableIPv6: the first IPv6 podCIDR, public-ipv6 and backend-v6-data join the lease; a
    peer without them is dropped whole with flanneld's reasons; without EnableIPv6 they are
    not read."""
    dual = node(DUAL, pod_cidrs=["10.244.1.0/24", "fd10:244:0:1::/64", "fd10:244:0:9::/64"])
    lease = node_to_lease(dual, KEYS, ipv6=True)
    assert lease is not None
    assert str(lease.ipv6_subnet) == "fd10:244:0:1::/64"
    assert str(lease.attrs.public_ipv6) == "fd00:198:18::b"
    assert lease.attrs.backend_v6_data == b'{"VNI":1,"VtepMAC":"3e:2a:cb:e3:bd:e1"}'
    single = node_to_lease(dual, KEYS)
    assert single is not None and single.ipv6_subnet is None and not single.attrs.backend_v6_data
    with pytest.raises(NodeLeaseError, match=r"missing IPv6 address on n\.Spec\.PodCIDRs"):
        node_to_lease(node(DUAL), KEYS, ipv6=True)
    with pytest.raises(NodeLeaseError, match=r"invalid IP address format in .*public-ipv6"):
        node_to_lease(node(FLANNEL, pod_cidrs=["10.244.1.0/24", "fd10::/64"]), KEYS, ipv6=True)
    with pytest.raises(NodeLeaseError, match="backend-v6-data is not JSON"):
        bad = {**DUAL, KEYS.backend_v6_data: "{bad"}
        node_to_lease(node(bad, pod_cidrs=["10.244.1.0/24", "fd10::/64"]), KEYS, ipv6=True)


def test_own_cidrs_and_v6_annotations_as_flanneld() -> None:
    """Our lease: each family's last podCIDRs entry, three entries refused; annotations: the
    v6 pair for vxlan with v6 data, for host-gw with a PublicIPv6, public-ipv6-overwrite
    honoured; none without IPv6."""
    assert own_cidrs(node(None, pod_cidrs=["10.0.1.0/24", "fd00::/64"])) == (
        ip_network("10.0.1.0/24"), ip_network("fd00::/64")
    )  # fmt: skip
    with pytest.raises(NodeLeaseError, match="IPv4/IPv6 only or dualstack"):
        own_cidrs(node(None, pod_cidrs=["10.0.1.0/24", "fd00::/64", "10.0.2.0/24"]))
    attrs = LeaseAttrs.from_json(
        b'{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::b","BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"0a:00:00:00:00:01"},'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}}'
    )
    wanted = wanted_annotations(attrs, KEYS, {KEYS.public_ipv6_overwrite: "2001:db8::1"})
    assert wanted[KEYS.backend_v6_data] == '{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}'
    assert wanted[KEYS.public_ipv6] == "2001:db8::1"
    hostgw = LeaseAttrs.from_json(
        b'{"PublicIP":"198.18.0.11","PublicIPv6":"fd00:198:18::b","BackendType":"host-gw"}'
    )
    assert wanted_annotations(hostgw, KEYS, {})[KEYS.backend_v6_data] == "null"
    v4 = LeaseAttrs.from_json(b'{"PublicIP":"198.18.0.11","PublicIPv6":null}')
    assert KEYS.public_ipv6 not in wanted_annotations(v4, KEYS, {})


def test_ipv6_only_leases_and_annotations_as_flanneld() -> None:
    """EnableIPv4 false: nodeToLease reads no IPv4 half (a Node without public-ip or an IPv4
    podCIDR is a peer; subnet 0.0.0.0/0, PublicIP 0.0.0.0, told apart by its IPv6 subnet), and
    AcquireLease's annotations for vxlan have no backend-data and no public-ip (flanneld writes
    them only with BackendData), host-gw's still do (0.0.0.0)."""
    v6_only = {k: v for k, v in DUAL.items() if k not in (KEYS.public_ip, KEYS.backend_data)}
    lease = node_to_lease(node(v6_only, pod_cidrs=["fd10:244:0:1::/64"]), KEYS, True, False)
    assert lease is not None
    assert (str(lease.subnet), str(lease.attrs.public_ip)) == ("0.0.0.0/0", "0.0.0.0")
    assert (str(lease.ipv6_subnet), str(lease.identity)) == ("fd10:244:0:1::/64",) * 2
    assert lease.key_name == "0.0.0.0-0&fd10:244:0:1::-64"
    assert lease.attrs.backend_type == "vxlan" and not lease.attrs.backend_data
    with pytest.raises(NodeLeaseError, match="missing IPv6 address"):
        node_to_lease(node(v6_only, pod_cidrs=["10.244.1.0/24"]), KEYS, True, False)
    vxlan = LeaseAttrs.from_json(
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::b","BackendType":"vxlan",'
        b'"BackendV6Data":{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}}'
    )
    assert set(wanted_annotations(vxlan, KEYS, {})) == {
        KEYS.backend_type, KEYS.subnet_kube_managed, KEYS.backend_v6_data, KEYS.public_ipv6
    }  # fmt: skip
    hostgw = LeaseAttrs.from_json(
        b'{"PublicIP":"0.0.0.0","PublicIPv6":"fd00:198:18::b","BackendType":"host-gw"}'
    )
    wanted = wanted_annotations(hostgw, KEYS, {})
    assert (wanted[KEYS.public_ip], wanted[KEYS.backend_data]) == ("0.0.0.0", "null")


def test_stored_public_addresses_as_flanneld() -> None:
    """GetStoredPublicIP: node-public-ip replaces --public-ip, node-public-ipv6 --public-ipv6
    (read only with IPv6 enabled, by the agent); nothing stored is ""."""
    notes = {KEYS.node_public_ip: "203.0.113.7", KEYS.node_public_ipv6: "2001:db8::7"}
    assert stored_public_ip(node(notes), KEYS) == "203.0.113.7"
    assert stored_public_ip(node(notes), KEYS, v6=True) == "2001:db8::7"
    assert stored_public_ip(node(FLANNEL), KEYS, v6=True) == ""
    assert stored_public_ip(node(None), KEYS) == ""


def test_contains_cidr_as_flanneld() -> None:
    """flannel's TestContainsCIDR (the IPv4 rows), through the manager's containment rule."""
    net = IPv4Network("10.244.0.0/16")
    for text, inside in [("10.244.0.0/16", True), ("10.244.0.0/24", True),
                         ("10.244.255.0/24", True), ("10.244.0.0/15", False),
                         ("192.168.0.0/24", False)]:  # fmt: skip
        sub = ip_network(text)
        assert (net.prefixlen <= sub.prefixlen and sub.network_address in net) is inside, text


def test_patch_bodies_are_flanneld_bytes() -> None:
    """The bytes flanneld v0.28.9 sends for a fresh vxlan node and for CompleteLease (taken from
    its code run against client-go's fake clientset)."""
    attrs = LeaseAttrs(
        public_ip=ip_network("192.168.1.10/32").network_address,  # type: ignore[arg-type]
        backend_type="vxlan",
        backend_data=b'{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}',
    )
    assert annotation_patch(wanted_annotations(attrs, KEYS, {})) == (
        b'{"metadata":{"annotations":{"flannel.alpha.coreos.com/backend-data":"{\\"VNI\\":1,'
        b'\\"VtepMAC\\":\\"12:c6:65:89:b4:e3\\"}","flannel.alpha.coreos.com/backend-type":"vxlan",'
        b'"flannel.alpha.coreos.com/kube-subnet-manager":"true",'
        b'"flannel.alpha.coreos.com/public-ip":"192.168.1.10"}}}'
    )
    # host-gw: no backend data is "null"; an overwrite annotation wins for public-ip
    hostgw = LeaseAttrs(public_ip=attrs.public_ip, backend_type="host-gw")
    wanted = wanted_annotations(hostgw, KEYS, {KEYS.public_ip_overwrite: "203.0.113.7"})
    assert wanted[KEYS.backend_data] == "null" and wanted[KEYS.public_ip] == "203.0.113.7"
    when = datetime(2026, 12, 4, 5, 43, 29, 717000, UTC)
    assert network_available_patch(when) == (
        b'{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False",'
        b'"lastHeartbeatTime":"2026-12-04T05:43:29Z","lastTransitionTime":"2026-12-04T05:43:29Z",'
        b'"reason":"FlannelIsUp","message":"Flannel is running on this node"}]}}'
    )


# --------------------------------------------------------------------------------------------
# Against the real control plane

root = [pytest.mark.root, requires_root]


def kubectl(lab_name: str, *args: str, input: str | None = None) -> str:
    return control_plane_of(LabState.load(lab_name)).kubectl(*args, input=input).stdout


def nodes_json(lab_name: str) -> dict[str, dict[str, Any]]:
    doc = json.loads(kubectl(lab_name, "get", "nodes", "-o", "json"))
    return {n["metadata"]["name"]: n for n in doc["items"]}


@pytest.mark.root
@requires_root
def test_mixed_kube_cluster_with_real_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """n1: the real flanneld --kube-subnet-mgr; n2, n3: flannel-bpf (BPF data path). One
    apiserver; each reads the others' annotations; pods talk both ways; our annotations are
    flanneld's in every key and shape; NetworkUnavailable is cleared on every node."""
    info = lab_up("--nodes", "3", "--kube", "--flanneld-nodes", "1", "--datapath", "bpf",
                  "--agent-arg=--bpf-decap=xdp")  # fmt: skip
    n1, n2, n3 = (n["namespace"] for n in info["nodes"])
    assert [n["agent"] for n in info["nodes"]] == ["flanneld", "flannel-bpf", "flannel-bpf"]
    nodes = nodes_json(lab_name)
    for name, item in nodes.items():
        notes = item["metadata"]["annotations"]
        flannel = {k: v for k, v in notes.items() if k.startswith(KEYS.prefix)}
        assert set(flannel) == set(FLANNEL), (name, flannel)
        assert flannel[KEYS.backend_type] == "vxlan"
        assert flannel[KEYS.public_ip] == next(
            n["underlay_ip"] for n in info["nodes"] if n["namespace"] == name
        )
        data = json.loads(flannel[KEYS.backend_data])
        assert list(data) == ["VNI", "VtepMAC"] and data["VNI"] == 1
        conditions = {c["type"]: c for c in item["status"]["conditions"]}
        assert conditions["NetworkUnavailable"]["status"] == "False"
        assert conditions["NetworkUnavailable"]["reason"] == "FlannelIsUp"
        # the lease is the podCIDR the node IPAM controller assigned
        subnet = next(n["subnet"] for n in info["nodes"] if n["namespace"] == name)
        assert item["spec"]["podCIDR"] == subnet
    # the byte form of our annotation values equals flanneld's for the same inputs
    ours = nodes[n2]["metadata"]["annotations"][KEYS.backend_data]
    theirs = nodes[n1]["metadata"]["annotations"][KEYS.backend_data]
    assert ours.replace(json.loads(ours)["VtepMAC"], "X") == theirs.replace(
        json.loads(theirs)["VtepMAC"], "X"
    )
    assert bpf_remotes(lab_name, n2).keys() == {
        info["nodes"][0]["subnet"],
        info["nodes"][2]["subnet"],
    }
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    before = counters(lab_name, n2)
    to_flanneld = transfer(lab_name, pods[n2], pods[n1], "100M")
    from_flanneld = transfer(lab_name, pods[n1], pods[n2], "100M")
    after = counters(lab_name, n2)
    assert delta(after, before, "tc_encap", "encap_redirect")[1] >= to_flanneld.received
    assert delta(after, before, "xdp_decap", "decap_pass")[1] >= from_flanneld.received
    assert n3 in {p["node"] for p in info["pods"]}
    # Every pod was attached through the ConfigMap's cni-conf.json, as the init container installs
    # it, by the real flannel CNI plugin (its scratch file: the delegate made from subnet.env).
    config_map = json.loads(kubectl(lab_name, "get", "configmap", "kube-flannel-cfg", "-n",
                                    "kube-flannel", "-o", "json"))  # fmt: skip
    state = LabState.load(lab_name)
    for pod in info["pods"]:
        node_dir = state.dir / pod["node"]
        assert (node_dir / "cni-conf.json").read_text() == config_map["data"]["cni-conf.json"]
        delegate = json.loads((node_dir / "cni" / "flannel" / pod["namespace"]).read_text())
        assert delegate["hairpinMode"] is True and delegate["isDefaultGateway"] is True


@pytest.mark.root
@requires_root
@pytest.mark.parametrize(
    ("backend", "datapaths"),
    [("vxlan", ("kernel", "userspace")), ("udp", ("bpf", "userspace")), ("host-gw", ())],
    ids=["vxlan-kernel-userspace", "udp-bpf-userspace", "host-gw"],
)
def test_every_backend_in_kube_mode_with_flanneld(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], backend: str, datapaths: tuple[str, ...]
) -> None:
    """The backends and data paths not covered above, unchanged on the Kubernetes subnet
    manager: n1 the real flanneld --kube-subnet-mgr with that backend, n2 and n3 flannel-bpf on
    two data paths. Our backend annotations are flanneld's (byte-identical where no MAC is in
    them); traffic both ways with flanneld, counted by the path that carried it on each side."""
    extra = ["--datapath", ",".join(datapaths)] if datapaths else []
    if "bpf" in datapaths:
        extra.append("--agent-arg=--bpf-decap=xdp")
    info = lab_up("--nodes", "3", "--kube", "--flanneld-nodes", "1", "--backend", backend, *extra)
    theirs, *ours = info["nodes"]
    assert theirs["agent"] == "flanneld" and all(n["agent"] == "flannel-bpf" for n in ours)
    if datapaths:
        assert [n["datapath"] for n in ours] == list(datapaths)
    nodes = nodes_json(lab_name)

    def flannel_notes(name: str) -> dict[str, str]:
        notes = nodes[name]["metadata"]["annotations"]
        return {k: v for k, v in notes.items() if k.startswith(KEYS.prefix)}

    reference = flannel_notes(theirs["namespace"])
    for node in ours:
        notes = flannel_notes(node["namespace"])
        assert set(notes) == set(reference)
        assert notes[KEYS.backend_type] == reference[KEYS.backend_type]
        if backend != "vxlan":  # no VTEP MAC: the whole value is flanneld's
            assert notes[KEYS.backend_data] == reference[KEYS.backend_data], backend
    ping_all(lab_name, info["pods"])
    pods = by_node(info)
    device = {"vxlan": "flannel.1", "udp": "flannel0", "host-gw": "eth1"}[backend]
    theirs_ns = theirs["namespace"]
    # Enough that socket buffers still in flight when iperf3 reports (some MB) stay under 10%.
    size = "200M" if backend == "host-gw" else "50M"
    for node, datapath in zip(ours, datapaths or ("kernel", "kernel"), strict=True):
        ns = node["namespace"]
        theirs_count = path_counter(lab_name, theirs_ns, "flanneld", device)
        ours_count = path_counter(lab_name, ns, datapath, device)
        theirs_start, ours_start = theirs_count(), ours_count()
        out = transfer(lab_name, pods[ns], pods[theirs_ns], size).received
        into = transfer(lab_name, pods[theirs_ns], pods[ns], size).received
        assert_carried(theirs_count, theirs_start, into, out, f"flanneld's {device}")
        assert_carried(ours_count, ours_start, out, into, f"our {backend} {datapath} path")


@pytest.mark.root
@requires_root
def test_kube_manifest_is_accepted_by_the_apiserver(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    from flannel_bpf.lab.lab import MANIFEST

    lab_up("--nodes", "1", "--pods-per-node", "0", "--kube")
    out = kubectl(lab_name, "apply", "--dry-run=server", "-f", "-", input=MANIFEST.read_text())
    for kind in ("namespace/kube-flannel", "clusterrole.rbac.authorization.k8s.io/flannel-bpf",
                 "configmap/kube-flannel-cfg", "daemonset.apps/kube-flannel-bpf-ds"):  # fmt: skip
        assert kind in out, out


@pytest.mark.root
@requires_root
def test_each_rbac_rule_is_needed(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """The agent works with exactly the manifest's ClusterRole (the lab's agents run with its
    service account) and fails with a clear line without any one of its rules."""
    info = lab_up("--nodes", "1", "--pods-per-node", "0", "--kube", "--datapath", "kernel")
    node = info["nodes"][0]
    assert node["agent_running"] and node["subnet"]
    state = LabState.load(lab_name)
    cp = control_plane_of(state)
    role = json.loads(kubectl(lab_name, "get", "clusterrole", "flannel-bpf", "-o", "json"))
    rules = [(r["resources"][0], verb) for r in role["rules"] for verb in r["verbs"]]
    assert sorted(rules) == [("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
                             ("nodes/status", "patch")]  # fmt: skip
    ns = node["namespace"]
    # The lab's own agent stops (it would write the annotations back); each run below starts from
    # a Node without them, so that every rule is exercised.
    lab._stop_pid(state.nodes[0].agent_pid, 15)
    for missing in rules:
        kubectl(lab_name, "annotate", "node", ns, *(f"{key}-" for key in FLANNEL))
        name = f"rbac-{missing[0].replace('/', '-')}-{missing[1]}"
        grouped: dict[str, list[str]] = {}
        for resource, verb in rules:
            if (resource, verb) != missing:
                grouped.setdefault(resource, []).append(verb)
        objects = {"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": name, "namespace": "kube-flannel"}},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": {"name": name},
             "rules": [{"apiGroups": [""], "resources": [res], "verbs": verbs}
                       for res, verbs in grouped.items()]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": name},
             "subjects": [{"kind": "ServiceAccount", "name": name,
                           "namespace": "kube-flannel"}]},
        ]}  # fmt: skip
        kubectl(lab_name, "apply", "-f", "-", input=json.dumps(objects))
        kubeconfig = cp.service_account_kubeconfig(tmp_path / f"{name}.kubeconfig", name,
                                                   "kube-flannel")  # fmt: skip
        agent = AgentProcess(
            ns,
            ["--iface", "eth1", "--kube-subnet-mgr", "--kubeconfig-file", str(kubeconfig),
             "--net-config-path", str(state.dir / ns / "net-conf.json"),
             "--subnet-file", str(tmp_path / f"{name}.env"),
             "--status-file", str(tmp_path / f"{name}.json"), "--datapath", "kernel",
             "--metrics-addr", ""],
            tmp_path / f"{name}.log",
            env={"NODE_NAME": ns},
        )  # fmt: skip
        agent.start()
        try:
            if missing in (("nodes", "list"), ("nodes", "watch")):
                # Ready (the lease needs only get and patch), but the peer watch is refused:
                # said in the log, over and over, never silently.
                assert wait_for(lambda a=agent: "forbidden" in a.log().lower(), 30), agent.log()
                assert "nodes" in agent.log()
            else:
                code = agent.wait(30)
                assert code == 1, agent.log()[-2000:]
                assert "forbidden" in agent.log().lower() and "Traceback" not in agent.log()
        finally:
            agent.stop()


@pytest.mark.root
@requires_root
def test_pod_cidr_arriving_late_and_bad_nodes_skipped(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    """A node whose podCIDR the IPAM controller has not assigned yet waits (one clear line),
    then takes it when it comes; Nodes with malformed flannel annotations are skipped with one
    warning each while the real peer stays programmed."""
    info = lab_up("--nodes", "2", "--pods-per-node", "0", "--kube", "--datapath", "bpf")
    n1, n2 = (n["namespace"] for n in info["nodes"])
    state = LabState.load(lab_name)
    cp = control_plane_of(state)
    # No IPAM for a while: the controller manager stops, a new node registers.
    lab.stop_kube_component(lab_name, "kube-controller-manager")
    late = f"{lab_name}-n9"
    from flannel_bpf.lab.netns import add_address, add_netns, add_veth, link_up, run

    add_netns(late)
    add_veth(late, "eth1", f"{lab_name}-ul", "n9")
    run(["ip", "-n", f"{lab_name}-ul", "link", "set", "n9", "master", "br0"])
    link_up(f"{lab_name}-ul", "n9")
    add_address(late, "eth1", "198.18.0.19/24")
    link_up(late, "eth1")
    cp.register_node(late, "198.18.0.19")
    (state.dir / late).mkdir(parents=True, exist_ok=True)
    from flannel_bpf.lab.lab import kube_files

    kube_files(state, cp, late)
    args = [
        "--iface", "eth1", "--kube-subnet-mgr",
        "--kubeconfig-file", str(state.dir / late / "kubeconfig"),
        "--net-config-path", str(state.dir / late / "net-conf.json"),
        "--subnet-file", str(tmp_path / "late.env"), "--status-file", str(tmp_path / "late.json"),
        "--datapath", "bpf", "--metrics-addr", "",
    ]  # fmt: skip
    agent = AgentProcess(late, args, tmp_path / "late.log", env={"NODE_NAME": late})
    agent.start()
    try:
        agent.wait_for_log(f"waiting for node {late} to get a podCIDR", 30)
        time.sleep(2)
        assert not (tmp_path / "late.env").exists()
        patch = json.dumps({"spec": {"podCIDR": "10.244.99.0/24", "podCIDRs": ["10.244.99.0/24"]}})
        kubectl(lab_name, "patch", "node", late, "-p", patch)
        agent.wait_for_log("flannel is ready", 30)
        assert "FLANNEL_SUBNET=10.244.99.1/24" in (tmp_path / "late.env").read_text()
        assert wait_for(lambda: "10.244.99.0/24" in bpf_remotes(lab_name, n1), 10)

        # Bad nodes: not flannel's (ignored), bad public-ip, bad backend-data, bad podCIDR.
        bad = {
            "bad-ip": ({**FLANNEL, KEYS.public_ip: "x" * 5000}, "10.244.200.0/24"),
            "bad-data": ({**FLANNEL, KEYS.backend_data: "{bad"}, "10.244.201.0/24"),
            "no-ipv4": (FLANNEL, "fd00:1::/64"),
            "not-flannel": ({"example.com/x": "y"}, "10.244.202.0/24"),
        }
        for name, (notes, cidr) in bad.items():
            obj = {"apiVersion": "v1", "kind": "Node",
                   "metadata": {"name": f"{lab_name}-{name}", "annotations": notes},
                   "spec": {"podCIDR": cidr, "podCIDRs": [cidr]}}  # fmt: skip
            kubectl(lab_name, "create", "-f", "-", input=json.dumps(obj))
        log1 = state.dir / n1 / "agent.log"
        assert wait_for(lambda: log1.read_text().count("skipped") >= 3, 10), log1.read_text()[
            -3000:
        ]
        time.sleep(1)
        text = log1.read_text()
        for name in ("bad-ip", "bad-data", "no-ipv4"):
            assert text.count(f"node '{lab_name}-{name}' to lease") == 1, name
        assert f"{lab_name}-not-flannel" not in text
        assert "x" * 100 not in text  # bounded quoting
        peers = bpf_remotes(lab_name, n1)
        assert set(peers) == {info["nodes"][1]["subnet"], "10.244.99.0/24"}
        assert metric(n1, "flannel_lease_invalid_entries_total") >= 3
    finally:
        agent.stop()
    del n2


@pytest.mark.root
@requires_root
def test_annotations_edited_by_someone_else_and_public_ip_overwrite(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    info = lab_up("--nodes", "2", "--pods-per-node", "0", "--kube", "--datapath", "bpf")
    n1, n2 = (n["namespace"] for n in info["nodes"])
    s2, ip2 = info["nodes"][1]["subnet"], info["nodes"][1]["underlay_ip"]
    assert bpf_remotes(lab_name, n1) == {s2: ip2}
    # Someone edits n2's public-ip: n2's agent writes its own back, n1 ends where it was.
    kubectl(lab_name, "annotate", "node", n2, "--overwrite", f"{KEYS.public_ip}=198.18.0.250")
    assert wait_for(
        lambda: nodes_json(lab_name)[n2]["metadata"]["annotations"][KEYS.public_ip] == ip2, 15
    )
    assert "changed by someone else" in (LabState.load(lab_name).dir / n2 / "agent.log").read_text()
    assert wait_for(lambda: bpf_remotes(lab_name, n1) == {s2: ip2}, 10)
    # public-ip-overwrite: peers tunnel to the overwrite address (flanneld's NAT case).
    kubectl(lab_name, "annotate", "node", n2, f"{KEYS.public_ip_overwrite}=198.18.0.99")
    assert wait_for(lambda: bpf_remotes(lab_name, n1) == {s2: "198.18.0.99"}, 15), bpf_remotes(
        lab_name, n1
    )
    notes = nodes_json(lab_name)[n2]["metadata"]["annotations"]
    assert notes[KEYS.public_ip] == "198.18.0.99"
    # taken away again: back to the detected address
    kubectl(lab_name, "annotate", "node", n2, f"{KEYS.public_ip_overwrite}-")


@pytest.mark.root
@requires_root
def test_vtep_mac_kept_across_a_reboot_from_the_annotation(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """flanneld's GetStoredMacAddresses: a VTEP made anew (a reboot: agent stopped, flannel.1
    gone) takes the VtepMAC of our backend-data annotation, so peers' entries stay right. A
    stored value that is no unicast MAC is refused with an error line and a random MAC taken."""
    info = lab_up("--nodes", "2", "--pods-per-node", "1", "--kube", "--datapath", "kernel,bpf")
    n1, n2 = (n["namespace"] for n in info["nodes"])
    state = LabState.load(lab_name)

    def device_mac() -> str:
        out = subprocess.run(["ip", "-n", n2, "-j", "link", "show", "dev", "flannel.1"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return str(json.loads(out)[0]["address"])

    def annotated_mac() -> str:
        notes = nodes_json(lab_name)[n2]["metadata"]["annotations"]
        return str(json.loads(notes[KEYS.backend_data])["VtepMAC"])

    def fdb_of_n1() -> str:
        return subprocess.run(["bridge", "-n", n1, "fdb", "show", "dev", "flannel.1"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip

    before = device_mac()
    assert annotated_mac() == before and before in fdb_of_n1()
    lab.restart_agent(lab_name, n2, ready_timeout=60, between=["ip", "link", "del", "flannel.1"])
    assert device_mac() == before and annotated_mac() == before
    assert (
        f"Interface flannel.1 mac address set to: {before}"
        in (state.dir / n2 / "agent.log").read_text()
    )
    ping_all(lab_name, info["pods"])

    # A broadcast address stored (while the agent is down, so it is not written back at once).
    kubectl_binary = peer("kubernetes").binary("kubectl")
    admin = control_plane_of(state).admin_kubeconfig
    stored = f'{KEYS.backend_data}={{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}}'
    annotate = [kubectl_binary, f"--kubeconfig={admin}", "annotate", "node", n2, "--overwrite",
                stored]  # fmt: skip
    reboot = "ip link del flannel.1 && " + shlex.join(annotate)
    lab.restart_agent(lab_name, n2, ready_timeout=60, between=["sh", "-c", reboot])
    fresh = device_mac()
    assert fresh not in (before, "ff:ff:ff:ff:ff:ff")
    assert (
        "stored mac addr ff:ff:ff:ff:ff:ff is not a unicast address"
        in (state.dir / n2 / "agent.log").read_text()
    )
    assert wait_for(lambda: annotated_mac() == fresh, 15)
    assert wait_for(lambda: fresh in fdb_of_n1(), 15)  # the peer follows the new lease
    ping_all(lab_name, info["pods"])


@pytest.mark.root
@requires_root
def test_apiserver_stopped_30s_and_a_410_under_pings(
    lab_name: str, lab_up: Callable[..., dict[str, Any]]
) -> None:
    """kube-apiserver stopped for 30 s while pods ping at 10 Hz: no ping lost, no peer dropped;
    meanwhile a node joins and etcd is compacted, so the agents' watches come back to a 410 Gone
    and re-list: the new peer is programmed, the old ones never left."""
    info = lab_up("--nodes", "2", "--kube", "--datapath", "bpf")
    n1, n2 = (n["namespace"] for n in info["nodes"])
    pods = by_node(info)
    state = LabState.load(lab_name)
    cp = control_plane_of(state)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", pods[n1]["namespace"], "ping", "-i", "0.1", "-c", "450", "-W", "1",
         pods[n2]["ip"]], stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(2)
        lab.stop_kube_component(lab_name, "kube-apiserver")
        down_at = time.monotonic()
        # While it is down: compact etcd past everything the agents have seen.
        from flannel_bpf.lab.lab import etcd_cluster

        member = etcd_cluster(state).members[0]
        rev = json.loads(member.etcdctl("endpoint", "status", "-w", "json"))[0]["Status"]["header"][
            "revision"
        ]
        member.etcdctl("compact", str(rev))
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        assert set(bpf_remotes(lab_name, n1)) == {info["nodes"][1]["subnet"]}  # nothing dropped
        lab.start_kube_component(lab_name, "kube-apiserver")
        cp.register_node(f"{lab_name}-n7", "198.18.0.17")
        patch = json.dumps(
            {
                "metadata": {"annotations": {**FLANNEL, KEYS.public_ip: "198.18.0.17"}},
                "spec": {"podCIDR": "10.244.77.0/24", "podCIDRs": ["10.244.77.0/24"]},
            }
        )
        kubectl(lab_name, "patch", "node", f"{lab_name}-n7", "-p", patch)
        assert wait_for(lambda: "10.244.77.0/24" in bpf_remotes(lab_name, n1), 60), bpf_remotes(
            lab_name, n1
        )
        out, _ = ping.communicate(timeout=60)
    finally:
        ping.kill()
    received = len({line for line in out.splitlines() if "icmp_seq=" in line and "ttl=" in line})
    assert received == 450, out[-2000:]
    log = (state.dir / n1 / "agent.log").read_text()
    assert "watch of nodes interrupted" in log
    assert "watch of nodes expired" in log  # the 410 Gone, and the re-list after it
