"""The real programs flannel-bpf runs beside in the lab, the tests and the benchmarks: flanneld,
the Kubernetes control plane and a newer etcd, built from Go modules by scripts/build-peers.sh
(which `make setup` runs) into a cache keyed by version. This module only finds them."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-peers.sh"
CACHE = Path(os.environ.get("FLANNEL_BPF_PEERS_CACHE", "/var/cache/flannel-bpf/peers"))


class PeerMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Peer:
    name: str  # flanneld, kubernetes or etcd: build-peers.sh's names
    directory: Path

    @property
    def version(self) -> str:
        return self.directory.name.rsplit("-", 1)[-1]

    def binary(self, program: str) -> str:
        path = self.directory / program
        if not os.access(path, os.X_OK):
            raise PeerMissing(
                f"{program} is not built ({path} missing): run scripts/build-peers.sh "
                f"{self.name} (make setup does)"
            )
        return str(path)


def peer(name: str) -> Peer:
    """The pinned version of a peer: the directory build-peers.sh builds it into."""
    if not BUILD_SCRIPT.is_file():
        # An installed wheel has no scripts/: take the newest build in the cache.
        found = sorted(CACHE.glob(f"{name}-v*/BUILD-INFO"))
        if not found:
            raise PeerMissing(f"no {name} built under {CACHE} (scripts/build-peers.sh builds it)")
        return Peer(name, found[-1].parent)
    proc = subprocess.run(
        ["bash", str(BUILD_SCRIPT), "--print-dir", name],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "FLANNEL_BPF_PEERS_CACHE": str(CACHE)},
    )
    if proc.returncode != 0:
        raise PeerMissing(proc.stderr.strip() or f"build-peers.sh --print-dir {name} failed")
    return Peer(name, Path(proc.stdout.strip()))


def flanneld_binary() -> str:
    """FLANNEL_BPF_FLANNELD if set (another flanneld to test against), else the pinned build."""
    return os.environ.get("FLANNEL_BPF_FLANNELD") or peer("flanneld").binary("flanneld")
