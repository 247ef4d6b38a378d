"""End to end in the namespace lab, per backend: every pod pair, a 200 MB TCP transfer, and
peers programmed and unprogrammed within 1 s of a lease appearing and disappearing."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from flannel_bpf.lab.lab import STATE_ROOT

from .conftest import pod_exec, requires_root

pytestmark = [pytest.mark.root, requires_root]

FAKE_SUBNET = "10.244.250.0/24"
FAKE_KEY = "/coreos.com/network/subnets/10.244.250.0-24"


def etcdctl(lab: str, *args: str) -> None:
    subprocess.run(
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
        timeout=30,
    )


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


@pytest.mark.parametrize("backend", ["vxlan", "host-gw", "udp"])
def test_backend_end_to_end(
    backend: str,
    lab_name: str,
    lab_up: Callable[..., dict[str, Any]],
) -> None:
    info = lab_up("--nodes", "3", "--backend", backend)
    assert all(n["backend"] == backend and n["agent_running"] for n in info["nodes"])
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
    assert joined < 1.0, f"join took {joined:.3f}s"
    assert left < 1.0, f"leave took {left:.3f}s"
