"""The namespace lab: real namespaces, etcd, agent processes and CNI-attached pods."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.lab import cni
from flannel_bpf.lab.lab import STATE_ROOT
from flannel_bpf.lab.netns import list_netns

from .conftest import cli, pod_exec, requires_root

pytestmark = [pytest.mark.root, requires_root]


def test_lab_up_status_exec_down(lab_name: str, lab_up: Callable[..., dict[str, Any]]) -> None:
    info = lab_up("--nodes", "2", "--pods-per-node", "2", "--backend", "alloc")
    assert [n["namespace"] for n in info["nodes"]] == [f"{lab_name}-n1", f"{lab_name}-n2"]
    assert all(
        n["agent_running"] and n["underlay_ip"].startswith("198.18.0.") for n in info["nodes"]
    )
    subnets = {n["namespace"]: IPv4Network(n["subnet"]) for n in info["nodes"]}
    assert len(set(subnets.values())) == 2
    assert len(info["pods"]) == 4
    for pod in info["pods"]:
        assert IPv4Address(pod["ip"]) in subnets[pod["node"]]

    # pods are attached by the real flannel CNI plugin (its scratch file holds the bridge
    # delegate it built from subnet.env): cni0 gateway .1, route to the Network
    first = info["pods"][0]
    scratch = STATE_ROOT / lab_name / first["node"] / "cni" / "flannel" / first["namespace"]
    delegate = json.loads(scratch.read_text())
    assert delegate["type"] == "bridge" and delegate["hairpinMode"] is True
    assert delegate["ipam"]["ranges"] == [[{"subnet": str(subnets[first["node"]])}]]
    routes = pod_exec(lab_name, first["namespace"], "ip", "route").stdout
    gateway = subnets[first["node"]].network_address + 1
    assert f"10.244.0.0/16 via {gateway} dev eth0" in routes
    assert f"default via {gateway} dev eth0" in routes
    mtu = pod_exec(lab_name, first["namespace"], "cat", "/sys/class/net/eth0/mtu").stdout
    assert int(mtu) == 1500  # alloc: the uplink MTU, from subnet.env
    same_node = [p for p in info["pods"] if p["node"] == first["node"]][1]
    ping = pod_exec(lab_name, first["namespace"], "ping", "-c1", "-W2", same_node["ip"])
    assert ping.returncode == 0, ping.stdout

    text = cli("lab", "--name", lab_name, "status")
    assert "DATAPATH" in text.stdout and first["ip"] in text.stdout

    down = cli("lab", "--name", lab_name, "down")
    assert down.returncode == 0
    assert list_netns(f"{lab_name}-") == []
    assert cli("lab", "--name", lab_name, "status").returncode == 1


def test_down_cleans_up_after_a_crashed_up(lab_name: str) -> None:
    # What a crash leaves: namespaces with processes in them and no state file.
    from flannel_bpf.lab.netns import add_netns

    add_netns(f"{lab_name}-n1")
    sleeper = subprocess.Popen(["ip", "netns", "exec", f"{lab_name}-n1", "sleep", "600"])
    try:
        assert cli("lab", "--name", lab_name, "down").returncode == 0
        assert sleeper.wait(10) != 0
        assert list_netns(f"{lab_name}-") == []
    finally:
        sleeper.kill()


def test_bad_lab_commands_are_clear(lab_name: str) -> None:
    proc = cli("lab", "--name", lab_name, "exec", "nope", "--", "true")
    assert proc.returncode == 1 and "no lab named" in proc.stderr
    proc = cli("lab", "--name", lab_name, "up", "--nodes", "0")
    assert proc.returncode == 1 and "--nodes" in proc.stderr


def test_bad_vagrant_and_attach_commands_are_clear(tmp_path: Path) -> None:
    # The Vagrant lab's commands without a lab, and a node without a subnet file: one line each.
    proc = cli("vagrant", "status")
    assert proc.returncode == 1 and "no Vagrant lab is up" in proc.stderr
    proc = cli("vagrant", "up", "--workers", "0")
    assert proc.returncode == 1 and "--workers must be 1..20" in proc.stderr
    missing = tmp_path / "10-flannel.conflist"
    proc = cli("lab", "attach-pods", "--cni-conf", str(missing))
    assert proc.returncode == 1 and f"CNI configuration list {missing}" in proc.stderr
    # A node whose agent wrote no subnet.env: the real flannel plugin's own error, and the pod
    # namespace made for the attempt is removed again.
    conflist = cni.for_node(cni.load_conflist(cni.NODE_CONFLIST), tmp_path / "subnet.env", tmp_path)
    missing.write_text(json.dumps(conflist))
    prefix = f"fbt{uuid.uuid4().hex[:6]}p"
    proc = cli("lab", "attach-pods", "--cni-conf", str(missing), "--count", "1", "--prefix", prefix)
    assert proc.returncode == 1 and f"CNI ADD flannel for {prefix}1" in proc.stderr
    assert "subnet.env" in proc.stderr and "Traceback" not in proc.stderr
    assert list_netns(prefix) == []
