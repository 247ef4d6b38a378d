"""Shared fixtures: real etcd servers, etcd stores, network namespaces. All cleaned up always."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.lab import lab
from flannel_bpf.lab.etcd import EtcdCluster, EtcdMember, make_cluster
from flannel_bpf.lab.netns import add_netns, delete_netns, list_netns
from flannel_bpf.subnet.etcd.store import EtcdSettings, EtcdStore

RUN_ID = uuid.uuid4().hex[:6]


def unique(tag: str) -> str:
    """A name unique to this test run and call, short enough for an interface name."""
    return f"fb{RUN_ID[:3]}{tag}{uuid.uuid4().hex[:4]}"


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def pytest_ignore_collect(collection_path: Path) -> bool | None:
    """tests/vagrant boots VMs (minutes): its own suite, `make test-vagrant`, not `make test`."""
    if collection_path.name == "vagrant" and collection_path.parent.name == "tests":
        return os.environ.get("FLANNEL_BPF_VAGRANT") != "1" or None
    return None


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """One etcd for the whole session; tests keep apart by using their own prefix."""
    cluster = make_cluster(tmp_path_factory.mktemp("etcd"), 1, name_prefix="session")
    try:
        cluster.start()
        yield cluster.members[0]
    finally:
        cluster.stop()


@pytest.fixture
def etcd_factory(tmp_path: Path) -> Iterator[Callable[..., EtcdCluster]]:
    """Private etcd clusters for tests that stop, compact or reconfigure their server."""
    clusters: list[EtcdCluster] = []

    def factory(size: int = 1, **kwargs: object) -> EtcdCluster:
        cluster = make_cluster(tmp_path / f"c{len(clusters)}", size, **kwargs)  # type: ignore[arg-type]
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        yield factory
    finally:
        for cluster in clusters:
            cluster.stop()


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/network"


@pytest.fixture
async def store(etcd: EtcdMember) -> AsyncIterator[EtcdStore]:
    async with EtcdStore(EtcdSettings(endpoints=[etcd.endpoint])) as s:
        yield s


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Creates uniquely named namespaces on demand; deletes them all afterwards."""
    made: list[str] = []

    def create(tag: str = "ns") -> str:
        name = unique(tag)
        add_netns(name)
        made.append(name)
        return name

    try:
        yield create
    finally:
        for name in made:
            delete_netns(name)


def cli(*args: str, netns: str | None = None) -> subprocess.CompletedProcess[str]:
    """`flannel-bpf ARGS`, in netns when given."""
    from flannel_bpf.lab.netns import in_netns

    command = in_netns(netns, [sys.executable, "-m", "flannel_bpf", *args])
    return subprocess.run(command, capture_output=True, text=True, timeout=180)


@pytest.fixture
def lab_name() -> Iterator[str]:
    name = unique("l")
    try:
        yield name
    finally:
        lab.down(name, quiet=True)
        assert list_netns(f"{name}-") == []


@pytest.fixture
def lab_up(lab_name: str) -> Callable[..., dict[str, Any]]:
    def build(*args: str) -> dict[str, Any]:
        proc = cli("lab", "--name", lab_name, "up", *args)
        assert proc.returncode == 0, proc.stderr
        status = cli("lab", "--name", lab_name, "status", "-o", "json")
        assert status.returncode == 0, status.stderr
        info: dict[str, Any] = json.loads(status.stdout)
        return info

    return build


def metric(netns: str, series: str) -> float:
    """One sample of the agent in netns, by its exposition name with labels (default address)."""
    from flannel_bpf.lab.netns import http_get

    body = http_get(netns, "http://127.0.0.1:9867/metrics")[1].decode()
    match = re.search(rf"^{re.escape(series)} (\S+)$", body, re.M)
    assert match, f"{series} not exported by {netns}"
    return float(match.group(1))


def pod_exec(name: str, pod: str, *cmd: str) -> subprocess.CompletedProcess[str]:
    return cli("lab", "--name", name, "exec", pod, "--", *cmd)


@pytest.fixture
def host_pair(netns: Callable[[str], str]) -> tuple[str, str]:
    """Two hosts on a veth underlay (u0: 198.18.0.1 and .2), each with a workload address in
    its own subnet on lo (10.5.1.1 and 10.5.2.1), standing in for cni0."""
    from flannel_bpf.lab.netns import add_address, add_veth, link_up

    a, b = netns("ha"), netns("hb")
    add_veth(a, "u0", b, "u0")
    for ns, host, workload in ((a, "198.18.0.1", "10.5.1.1"), (b, "198.18.0.2", "10.5.2.1")):
        add_address(ns, "u0", f"{host}/24")
        link_up(ns, "u0")
        add_address(ns, "lo", f"{workload}/32")
    return a, b


def host(netns: Callable[[str], str], tag: str, addr: str = "198.18.0.1") -> str:
    """A namespace with a veth underlay u0 at addr (its peer u1 stays inside, up)."""
    from flannel_bpf.lab.netns import add_address, link_up, run

    ns = netns(tag)
    run(["ip", "-n", ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1"])
    add_address(ns, "u0", f"{addr}/24")
    link_up(ns, "u0")
    link_up(ns, "u1")
    return ns


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_behind() -> Iterator[None]:
    """The session must leave the machine as it found it: no namespace, root-namespace link, BPF
    program, pin or process of the project more than before. A leak fails the run here."""
    if os.geteuid() != 0:
        yield
        return
    from flannel_bpf.datapath.loader import remove_orphans

    from .leftovers import snapshot

    before = snapshot()
    yield
    # Maps pinned by agents in test namespaces outlive the namespaces on the shared bpffs by
    # design (an agent restart must find them); the agent's own sweep removes them.
    remove_orphans()
    deadline = time.monotonic() + 10  # programs and processes go asynchronously
    while (leftovers := snapshot().minus(before)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not leftovers, "left behind by the test session:\n" + "\n".join(
        f"  {kind}: {', '.join(items)}" for kind, items in leftovers.items()
    )
