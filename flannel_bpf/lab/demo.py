"""`make demo` until the multi-node lab lands: etcd and one agent, each in its own namespace.

State lives in /run/flannel-bpf/demo so that `down` finds and removes everything `up` made,
also after a crash; `up` starts with a `down`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from .agent_process import AgentProcess
from .etcd import make_cluster
from .netns import add_address, add_netns, add_veth, delete_netns, link_up, list_netns

STATE = Path("/run/flannel-bpf/demo")
NS_PREFIX = "fbdemo-"
ETCD_NS, HOST_NS = f"{NS_PREFIX}etcd", f"{NS_PREFIX}host1"
ETCD_IP, HOST_IP = "198.18.0.1", "198.18.0.11"
PREFIX = "/coreos.com/network"
CONFIG = '{"Network": "10.244.0.0/16", "Backend": {"Type": "alloc"}}'


def up() -> int:
    down(quiet=True)
    STATE.mkdir(parents=True, exist_ok=True)
    add_netns(ETCD_NS)
    add_netns(HOST_NS)
    add_veth(ETCD_NS, "eth1", HOST_NS, "eth1")
    add_address(ETCD_NS, "eth1", f"{ETCD_IP}/24")
    add_address(HOST_NS, "eth1", f"{HOST_IP}/24")
    link_up(ETCD_NS, "eth1")
    link_up(HOST_NS, "eth1")
    print(f"namespaces {ETCD_NS} ({ETCD_IP}) and {HOST_NS} ({HOST_IP}) on a veth underlay")

    member = make_cluster(STATE / "etcd", 1, host=ETCD_IP, netns=ETCD_NS).members[0]
    member.start()
    assert member.process is not None
    (STATE / "etcd.pid").write_text(str(member.process.pid))
    member.wait_ready()
    member.etcdctl("put", f"{PREFIX}/config", CONFIG)
    print(f"etcd {member.endpoint} running, config: {CONFIG}")

    subnet_file = STATE / "host1" / "subnet.env"
    agent = AgentProcess(
        HOST_NS,
        ["--iface", "eth1", "--etcd-endpoints", member.endpoint, "--subnet-file", str(subnet_file)],
        STATE / "host1" / "agent.log",
    )
    agent.start()
    (STATE / "agent.pid").write_text(str(agent.pid))
    deadline = time.monotonic() + 30
    while not subnet_file.exists():
        if not agent.running() or time.monotonic() > deadline:
            print(agent.log(), file=sys.stderr)
            print("demo: the agent did not write its subnet file", file=sys.stderr)
            return 1
        time.sleep(0.1)

    print(
        f"\nagent pid {agent.pid} in {HOST_NS}: flannel-bpf run --iface eth1 "
        f"--etcd-endpoints {member.endpoint}"
    )
    print(f"\nits lease in etcd ({PREFIX}/subnets/):")
    print(
        "  " + member.etcdctl("get", "--prefix", f"{PREFIX}/subnets/").strip().replace("\n", "\n  ")
    )
    print(f"\nits {subnet_file}:")
    print("  " + subnet_file.read_text().strip().replace("\n", "\n  "))
    print(f"""
look around:
  tail -f {agent.log_path}
  ip netns exec {ETCD_NS} etcdctl --endpoints {member.endpoint} get --prefix /coreos.com/network
  ip netns exec {HOST_NS} ip -br addr
tear it all down:
  make demo-down""")
    return 0


def _kill(pid_file: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


def down(quiet: bool = False) -> int:
    for name in ("agent.pid", "etcd.pid"):
        _kill(STATE / name)
    removed = list_netns(NS_PREFIX)
    for name in removed:
        delete_netns(name)
    if STATE.exists():
        import shutil

        shutil.rmtree(STATE, ignore_errors=True)
    if not quiet:
        print(f"demo removed ({', '.join(removed) or 'no namespaces left'})")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        return up()
    if argv[:1] == ["down"]:
        return down()
    print("usage: python -m flannel_bpf.lab.demo up|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
