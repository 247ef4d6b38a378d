"""`flannel-bpf run` as a real process in a network namespace, etcd in another one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flannel_bpf.lab.agent_process import AgentProcess
from flannel_bpf.lab.etcd import EtcdMember, make_cluster
from flannel_bpf.lab.netns import add_address, add_veth, link_up

from .conftest import requires_root, unique

pytestmark = [pytest.mark.root, requires_root]

ETCD_IP = "198.18.0.1"
HOST_IP = "198.18.0.2"


@dataclass
class TwoHosts:
    etcd: EtcdMember
    host_ns: str
    tmp: Path
    prefix: str
    agents: list[AgentProcess]

    def agent(
        self, *extra: str, name: str = "agent", env: dict[str, str] | None = None
    ) -> AgentProcess:
        agent = AgentProcess(
            self.host_ns,
            [
                "--iface",
                "eth1",
                "--etcd-endpoints",
                self.etcd.endpoint,
                "--etcd-prefix",
                self.prefix,
                "--subnet-file",
                str(self.subnet_file),
                # Never the machine's default (/run/flannel-bpf/status.json): a real agent's.
                "--status-file",
                str(self.tmp / f"{name}{len(self.agents)}-status.json"),
                "-v",
                "2",
                *extra,
            ],
            self.tmp / f"{name}{len(self.agents)}.log",
            env=env or {},
        )
        self.agents.append(agent)
        agent.start()
        return agent

    @property
    def subnet_file(self) -> Path:
        return self.tmp / "run" / "flannel" / "subnet.env"

    def put_config(self, value: str) -> None:
        self.etcd.etcdctl("put", f"{self.prefix}/config", value)

    def leases(self) -> dict[str, str]:
        out = self.etcd.etcdctl("get", "--prefix", f"{self.prefix}/subnets/", "-w", "json")
        kvs = json.loads(out).get("kvs", [])
        import base64

        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv["value"]).decode()
            for kv in kvs
        }


@pytest.fixture
def hosts(netns: Callable[[str], str], tmp_path: Path) -> Iterator[TwoHosts]:
    etcd_ns, host_ns = netns("e"), netns("h")
    add_veth(etcd_ns, "eth1", host_ns, "eth1")
    add_address(etcd_ns, "eth1", f"{ETCD_IP}/24")
    add_address(host_ns, "eth1", f"{HOST_IP}/24")
    link_up(etcd_ns, "eth1")
    link_up(host_ns, "eth1")
    cluster = make_cluster(tmp_path / "etcd", 1, host=ETCD_IP, netns=etcd_ns)
    setup = TwoHosts(cluster.members[0], host_ns, tmp_path, f"/{unique('p')}/network", [])
    try:
        cluster.start()
        yield setup
    finally:
        for agent in setup.agents:
            agent.stop()
        cluster.stop()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_agent_in_a_namespace_writes_its_lease_and_subnet_env(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent()
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    env = hosts.subnet_file.read_text()
    lines = env.splitlines()
    assert [line.split("=")[0] for line in lines] == [
        "FLANNEL_NETWORK",
        "FLANNEL_SUBNET",
        "FLANNEL_MTU",
        "FLANNEL_IPMASQ",
    ]
    assert lines[0] == "FLANNEL_NETWORK=10.244.0.0/16"
    assert lines[2] == "FLANNEL_MTU=1500" and lines[3] == "FLANNEL_IPMASQ=false"
    assert hosts.subnet_file.stat().st_mode & 0o777 == 0o644
    subnet = lines[1].split("=")[1]  # e.g. 10.244.37.1/24
    assert subnet.endswith(".1/24")
    key = f"{hosts.prefix}/subnets/{subnet.replace('.1/24', '.0-24')}"
    assert hosts.leases() == {key: f'{{"PublicIP":"{HOST_IP}","PublicIPv6":null}}'}

    # SIGTERM: exit 0, "Exiting cleanly", the lease left in place.
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert "Exiting cleanly" in agent.log()
    assert key in hosts.leases()

    # A restart keeps the same subnet (reuse by PublicIP).
    hosts.subnet_file.unlink()
    hosts.agent()
    wait_for(hosts.subnet_file.exists, 20, "subnet.env after restart")
    assert hosts.subnet_file.read_text() == env


def test_missing_and_invalid_config_is_waited_for(hosts: TwoHosts) -> None:
    agent = hosts.agent()
    agent.wait_for_log("flannel config not found in etcd store")
    hosts.put_config('{"Network": "10.244.0.0/16", "SubnetLen": 31}')
    agent.wait_for_log("SubnetLen must be less than /31")
    assert not hosts.subnet_file.exists() and agent.running()
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    wait_for(hosts.subnet_file.exists, 20, "subnet.env once the config is valid")
    assert "Traceback" not in agent.log()


def test_sigterm_while_waiting_for_config_is_a_clean_exit(hosts: TwoHosts) -> None:
    agent = hosts.agent()
    agent.wait_for_log("flannel config not found in etcd store")
    agent.signal(signal.SIGTERM)
    assert agent.wait(10) == 0
    assert "Exiting cleanly" in agent.log() and "Traceback" not in agent.log()


def test_deleting_our_lease_is_a_clean_shutdown(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent()
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    (key,) = hosts.leases()
    hosts.etcd.etcdctl("del", key)
    assert agent.wait(10) == 0
    assert "Lease has been revoked. Shutting down daemon." in agent.log()


def test_etcd_outage_does_not_crash_the_agent(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent()
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    before = hosts.leases()
    hosts.etcd.stop()
    time.sleep(4)
    assert agent.running()
    hosts.etcd.start()
    hosts.etcd.wait_ready()
    agent.wait_for_log("etcd reachable again", timeout=20)
    assert agent.running()
    assert hosts.leases() == before
    log = agent.log()
    assert "Traceback" not in log
    # One line when etcd goes, one when it is back, however many retries lie between.
    assert log.count("etcd unreachable") == 1 and log.count("etcd reachable again") == 1
    assert "own lease watch re-established" in log


def test_unknown_backend_is_one_clear_line_and_exit_1(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "bogus"}}')
    agent = hosts.agent()
    assert agent.wait(20) == 1
    assert "unknown backend type: bogus" in agent.log()
    assert "Traceback" not in agent.log()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--no-such-flag"], "no-such-flag"),
        (["--subnet-lease-renew-margin=0"], "out of acceptable range"),
        (["-ip-masq=maybe"], "maybe"),
    ],
)
def test_bad_flags_are_one_line_and_non_zero(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "flannel_bpf", "run", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_ip_masq_rules_installed_and_resynced(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent("--ip-masq", "--iptables-resync=1")
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    assert "FLANNEL_IPMASQ=true" in hosts.subnet_file.read_text()
    subnet = hosts.subnet_file.read_text().split("FLANNEL_SUBNET=")[1].split()[0]
    subnet = subnet.replace(".1/", ".0/")

    def nat() -> str:
        return subprocess.run(
            ["ip", "netns", "exec", hosts.host_ns, "iptables", "-t", "nat", "-S"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    assert f"-A FLANNEL-POSTRTG -s {subnet} -d 10.244.0.0/16" in nat()
    assert nat().count("flanneld masq") == 7
    subprocess.run(
        ["ip", "netns", "exec", hosts.host_ns, "iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"],
        check=True,
    )
    wait_for(lambda: nat().count("flanneld masq") == 7, 5, "masquerade rules re-added")
    assert agent.running()


def test_a_change_to_our_lease_in_etcd_is_one_clear_line(hosts: TwoHosts) -> None:
    hosts.put_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}')
    agent = hosts.agent()
    wait_for(hosts.subnet_file.exists, 20, "subnet.env")
    (key,) = hosts.leases()
    hosts.etcd.etcdctl("put", key, '{"PublicIP":"198.18.0.77","PublicIPv6":null}')
    agent.wait_for_log("was changed in etcd")
    line = next(x for x in agent.log().splitlines() if "was changed in etcd" in x)
    assert "public ip 198.18.0.77" in line and f"was {HOST_IP}" in line
    assert agent.running()
