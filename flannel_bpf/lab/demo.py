"""`make demo`: the namespace lab with pods on three nodes talking across the overlay."""

from __future__ import annotations

import json
import subprocess
import sys

from flannel_bpf.lab import lab
from flannel_bpf.lab.netns import in_netns

NAME = "fblab"


def up(backend: str = "vxlan", kube: bool = False) -> int:
    """kube: the Kubernetes lab (control plane, Nodes, agents in --kube-subnet-mgr mode, one of
    them the real flanneld)."""
    spec = lab.LabSpec(
        name=NAME,
        nodes=3,
        pods_per_node=1,
        backend=backend,
        prometheus=True,
        kube=kube,
        flanneld_nodes=1 if kube else 0,
    )
    try:
        lab.up(spec)
    except lab.LabError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    info = lab.status(NAME)
    print(lab.format_status(info))
    pods = info["pods"]
    print(f"\npods on different nodes talking over the {backend} overlay:")
    ok = True
    for src in pods[:1]:
        for dst in pods[1:]:
            proc = subprocess.run(
                in_netns(src["namespace"], ["ping", "-c", "3", "-i", "0.2", "-W", "2", dst["ip"]]),
                capture_output=True,
                text=True,
                timeout=30,
            )
            summary = [line for line in proc.stdout.splitlines() if "packets transmitted" in line]
            print(
                f"  {src['namespace']} ({src['ip']}) -> {dst['namespace']} ({dst['ip']}): "
                f"{summary[0] if summary else proc.stderr.strip()}"
            )
            ok = ok and proc.returncode == 0
    first, last = pods[-1], pods[0]  # the last node runs flannel-bpf in every demo
    status_file = lab.STATE_ROOT / NAME / first["node"] / "status.json"
    ok = _show_bpf_counters(first["node"], status_file) and ok
    print(f"""
look around:
  flannel-bpf lab status                      nodes, subnets, data paths, pods
  flannel-bpf lab exec {first["namespace"]} -- ping {last["ip"]}
  ip netns exec {first["node"]} flannel-bpf status --status-file {status_file}
                                              data path, hooks, remotes, BPF counters
  ip netns exec {first["node"]} tc filter show dev flannel.1 egress    the encap program
  ip netns exec {first["node"]} tc filter show dev eth1 ingress        the decap program
                      (tc on the lab's veths; native XDP on NICs: see docs/decisions.md)
  bpftool prog show name fb_tc_encap; bpftool map show name fb_remotes
  ip netns exec {first["node"]} ip route       the per-peer routes the agent programmed
  ip netns exec {first["node"]} flannel-bpf peers        the BPF remote map
  ip netns exec {first["node"]} flannel-bpf stats        every BPF counter by hook and reason
  ip netns exec {first["node"]} curl -s localhost:9867/metrics    the agent's metrics
  ip netns exec {NAME}-mon curl -s '{info["prometheus"]}/api/v1/query?query=flannel_peers'
                                              Prometheus, scraping all agents, alerts loaded
  tail -f {lab.STATE_ROOT / NAME / first["node"] / "agent.log"}
  (flannel-bpf is .venv/bin/flannel-bpf)
tear it all down:
  make demo-down""")
    return 0 if ok else 1


def _show_bpf_counters(node: str, status_file: object) -> bool:
    """Print node 1's BPF counters: the proof that the programs, not vxlan.ko, moved the pings."""
    proc = subprocess.run(
        in_netns(
            node,
            [sys.executable, "-m", "flannel_bpf", "status", "-o", "json", "--status-file",
             str(status_file)],
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        print(f"\n{node}: no status ({proc.stderr.strip()})")
        return False
    print(f"\n{node} runs the {info.get('datapath')} data path; its BPF counters:")
    for c in (info.get("bpf") or {}).get("counters", []):
        if c["reason"] in ("encap_redirect", "decap_pass", "decap_redirect"):
            print(f"  {c['hook']:<10} {c['reason']:<16} {c['packets']:>6} packets")
    return bool(info.get("datapath") == "bpf")


def down() -> int:
    lab.down(NAME)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        backends = [a for a in argv[1:] if a != "--kube"]
        return up(backends[0] if backends else "vxlan", kube="--kube" in argv)
    if argv[:1] == ["down"]:
        return down()
    print("usage: python -m flannel_bpf.lab.demo up [--kube] [BACKEND]|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
