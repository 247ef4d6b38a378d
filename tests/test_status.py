"""`flannel-bpf status` as an operator meets it: from the wrong namespace, after the agent and its
namespace are gone, and with several agents (flanneld's multi-network mode) on one host."""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.cli.flags import default_status_file
from flannel_bpf.lab.agent_process import AgentProcess
from flannel_bpf.lab.lab import STATE_ROOT
from flannel_bpf.lab.netns import delete_netns

from .conftest import cli, requires_root
from .test_agent import TwoHosts, hosts, wait_for  # noqa: F401 - fixture


def test_default_status_file_is_one_per_subnet_file() -> None:
    env: dict[str, str] = {}
    assert default_status_file("/run/flannel/subnet.env", env) == "/run/flannel-bpf/status.json"
    blue = default_status_file("/run/flannel/networks/blue.env", env)
    red = default_status_file("/run/flannel/networks/red.env", env)
    assert blue == "/run/flannel-bpf/status-run-flannel-networks-blue.env.json"
    assert red != blue
    moved = {"FLANNEL_BPF_STATUS_DIR": "/tmp/x"}
    assert default_status_file("/run/flannel/subnet.env", moved) == "/tmp/x/status.json"
    # odd characters never make a path outside the directory
    assert default_status_file("/a/../b c.env", env) == "/run/flannel-bpf/status-a-..-b-c.env.json"


def _problems(proc: Any) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    return str(proc.stdout + proc.stderr)


@pytest.mark.root
@requires_root
def test_status_outside_the_agents_namespace_and_after_it_is_gone(
    lab_name: str, lab_up: Callable[..., dict[str, Any]], tmp_path: Path
) -> None:
    info = lab_up("--nodes", "1", "--pods-per-node", "0", "--datapath", "bpf")
    node = info["nodes"][0]["namespace"]
    status_file = STATE_ROOT / lab_name / node / "status.json"
    args = ("status", "--no-etcd-probe", "--status-file")

    there = cli(*args, str(status_file), netns=node)
    assert there.returncode == 0, there.stdout + there.stderr
    assert "attached:  tc_encap=fb_tc_encap" in there.stdout

    # The agent runs, but this command does not run where its devices are.
    for elsewhere in (None, f"{lab_name}-etcd"):
        proc = cli(*args, str(status_file), netns=elsewhere)
        text = _problems(proc)
        assert proc.returncode == 1
        assert "running (pid" in text and "devices missing here" in text
        assert "not in the agent's network namespace" in text
        doc = json.loads(cli(*args, str(status_file), "-o", "json", netns=elsewhere).stdout)
        assert doc["running"] is True and doc["netns"]["agent"] != doc["netns"]["here"]
        # the counters still come from the pins
        assert doc["bpf"]["pin_dir"] and "attached" not in doc["bpf"]

    # The agent died (SIGKILL) and its namespace went with the node.
    kept = tmp_path / "status.json"
    shutil.copy(status_file, kept)
    pid = json.loads(kept.read_text())["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}/stat").exists(), 15, "agent exit")
    delete_netns(node)
    proc = cli(*args, str(kept))
    text = _problems(proc)
    assert proc.returncode == 1
    assert f"agent not running: pid {pid}" in text and "NOT running" in text
    assert "which no longer exists" in text


@pytest.mark.root
@requires_root
def test_two_agents_on_one_host_keep_their_own_status(
    hosts: TwoHosts,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """flanneld's multi-network mode: one daemon per -subnet-file and -etcd-prefix. Without
    --status-file each gets its own status file; status shows both or the one asked for."""
    status_dir = tmp_path / "run-flannel-bpf"
    env = {"FLANNEL_BPF_STATUS_DIR": str(status_dir)}
    networks = {"red": "10.30.0.0/16", "blue": "10.31.0.0/16"}
    agents: dict[str, AgentProcess] = {}
    subnet_files = {name: tmp_path / "flannel" / f"{name}.env" for name in networks}
    try:
        for name, network in networks.items():
            prefix = f"{hosts.prefix}-{name}"
            hosts.etcd.etcdctl(
                "put",
                f"{prefix}/config",
                json.dumps({"Network": network, "Backend": {"Type": "alloc"}}),
            )
            agent = AgentProcess(
                hosts.host_ns,
                ["--iface", "eth1", "--etcd-endpoints", hosts.etcd.endpoint,
                 "--etcd-prefix", prefix, "--subnet-file", str(subnet_files[name]),
                 "--metrics-addr", ""],
                tmp_path / f"{name}.log",
                env=env,
            )  # fmt: skip
            agents[name] = agent
            agent.start()
        for name in networks:
            wait_for(lambda n=name: "flannel is ready" in agents[n].log(), 30, f"{name} ready")  # type: ignore[misc]
        files = sorted(p.name for p in status_dir.iterdir() if p.suffix == ".json")
        assert len(files) == 2, files

        def status(*args: str) -> tuple[int, dict[str, Any]]:
            proc = cli("status", "--no-etcd-probe", "-o", "json", *args, netns=hosts.host_ns)
            assert "Traceback" not in proc.stderr, proc.stderr
            return proc.returncode, json.loads(proc.stdout)

        monkeypatch.setenv("FLANNEL_BPF_STATUS_DIR", str(status_dir))  # cli() passes it on
        code, every = status()
        assert code == 0
        assert every["schema"] == "flannel-bpf/status-list/v1"
        leases = {d["subnet_file"]: d["lease"]["subnet"] for d in every["instances"]}
        assert set(leases) == {str(p) for p in subnet_files.values()}
        for name, network in networks.items():
            assert leases[str(subnet_files[name])].startswith(network.split(".0.0/")[0])
        for name in networks:
            code, one = status("--subnet-file", str(subnet_files[name]))
            assert code == 0 and one["schema"] == "flannel-bpf/status/v1"
            assert one["subnet_file"] == str(subnet_files[name])
            assert one["lease"]["subnet"] == leases[str(subnet_files[name])]
            assert one["pid"] == agents[name].pid
        # one instance stops: status of all says so, the other still answers cleanly
        agents["red"].signal(signal.SIGTERM)
        agents["red"].wait(15)
        code, every = status()
        assert code == 1
        running = {d["subnet_file"]: d["running"] for d in every["instances"]}
        assert running == {str(subnet_files["red"]): False, str(subnet_files["blue"]): True}
        code, blue = status("--subnet-file", str(subnet_files["blue"]))
        assert code == 0 and blue["running"]
    finally:
        for agent in agents.values():
            agent.stop()
