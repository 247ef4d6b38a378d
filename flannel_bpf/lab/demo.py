"""`make demo`: the namespace lab with pods on three nodes talking across the overlay."""

from __future__ import annotations

import subprocess
import sys

from . import lab
from .netns import in_netns

NAME = "fblab"


def up(backend: str = "vxlan") -> int:
    try:
        lab.up(lab.LabSpec(name=NAME, nodes=3, pods_per_node=1, backend=backend))
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
    first, last = pods[0], pods[-1]
    print(f"""
look around:
  flannel-bpf lab status                      nodes, subnets, data paths, pods
  flannel-bpf lab exec {first["namespace"]} -- ping {last["ip"]}
  ip netns exec {first["node"]} ip route       the per-peer routes the agent programmed
  ip netns exec {first["node"]} bridge fdb show dev flannel.1
  tail -f {lab.STATE_ROOT / NAME / first["node"] / "agent.log"}
  (flannel-bpf is .venv/bin/flannel-bpf)
tear it all down:
  make demo-down""")
    return 0 if ok else 1


def down() -> int:
    lab.down(NAME)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["up"]:
        return up(*argv[1:2])
    if argv[:1] == ["down"]:
        return down()
    print("usage: python -m flannel_bpf.lab.demo up [BACKEND]|down", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
