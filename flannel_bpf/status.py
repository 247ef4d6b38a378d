"""The agent's status file and `flannel-bpf status`: what runs, on which data path, and why.

The agent writes a small JSON document (atomically) when it is ready and whenever its peer set
changes. `flannel-bpf status` reads it, checks the agent process is alive, and adds what only the
kernel knows now: which programs are attached where and the BPF counters from the pinned maps.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backends.base import Network

log = logging.getLogger(__name__)


@dataclass
class AgentStatus:
    path: Path
    backend: str
    iface: str
    public_ip: str
    peers: int = 0

    def document(self, network: Network) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "updated": time.time(),
            "backend": self.backend,
            "datapath": network.datapath,
            "fallbacks": list(network.fallbacks),
            "lease": str(network.lease.subnet),
            "mtu": network.mtu,
            "iface": self.iface,
            "public_ip": self.public_ip,
            "peers": self.peers,
            "details": network.datapath_status(),
        }

    def write(self, network: Network) -> None:
        """Atomic replace; a status that cannot be written is not worth stopping the agent."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".status-")
            with os.fdopen(fd, "w") as out:
                json.dump(self.document(network), out, indent=2)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot write status file %s: %s", self.path, exc)


class StatusError(Exception):
    pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(path: Path) -> dict[str, Any]:
    """The status document plus live state: process, attachments, BPF remotes and counters."""
    try:
        info: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise StatusError(f"no status at {path}: is the agent running (--status-file)?") from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read {path}: {exc}") from None
    if not isinstance(info, dict):
        raise StatusError(f"{path} does not hold a status document")
    pid = info.get("pid")
    info["running"] = isinstance(pid, int) and _alive(pid)
    details = info.get("details") or {}
    pin_dir = details.get("pin_dir") if isinstance(details, dict) else None
    if info.get("datapath") == "bpf" and isinstance(pin_dir, str):
        info["bpf"] = _bpf_live(Path(pin_dir))
    return info


def _bpf_live(pin_dir: Path) -> dict[str, Any]:
    from .bpf_maps import LayoutMismatch, PinnedMaps
    from .loader import attached

    try:
        maps = PinnedMaps(pin_dir)
    except (OSError, LayoutMismatch) as exc:
        return {"error": f"pinned maps unreadable: {exc}"}
    with maps:
        cfg = maps.read_config()
        remotes = list(maps.remotes())
        counters = maps.counters()
    live: dict[str, Any] = {
        "pin_dir": str(pin_dir),
        "remotes": [
            {"subnet": str(r.subnet), "vtep_ip": str(r.vtep_ip), "vtep_mac": r.vtep_mac}
            for r in sorted(remotes, key=lambda r: r.subnet)
        ],
        "counters": [
            {"hook": key.hook.label, "reason": key.reason.label, "packets": p, "bytes": b}
            for key, (p, b) in counters.items()
            if p
        ],
    }
    if cfg is not None:
        try:
            live["attached"] = attached(cfg.vtep_ifindex, cfg.uplink_ifindex)
        except OSError as exc:
            live["attached"] = {"error": str(exc)}
    return live


def format_status(info: dict[str, Any]) -> str:
    lines = [
        f"agent:     {'running' if info.get('running') else 'NOT running'} (pid {info.get('pid')})",
        f"backend:   {info.get('backend')}    datapath: {info.get('datapath')}",
        f"lease:     {info.get('lease')}    mtu {info.get('mtu')}    peers {info.get('peers')}",
        f"uplink:    {info.get('iface')} ({info.get('public_ip')})",
    ]
    for reason in info.get("fallbacks") or []:
        lines.append(f"fallback:  {reason}")
    details = info.get("details") or {}
    if details.get("decap"):
        why = f" ({details['decap_reason']})" if details.get("decap_reason") else ""
        lines.append(f"decap:     {details['decap']}{why}")
    bpf = info.get("bpf")
    if isinstance(bpf, dict):
        if "error" in bpf:
            lines.append(f"bpf:       {bpf['error']}")
        else:
            hooks = ", ".join(f"{k}={v}" for k, v in (bpf.get("attached") or {}).items())
            lines.append(f"attached:  {hooks or 'nothing'}")
            lines.append(f"pins:      {bpf['pin_dir']}")
            lines.append(f"remotes:   {len(bpf['remotes'])}")
            for r in bpf["remotes"]:
                lines.append(f"  {r['subnet']:<18} via {r['vtep_ip']:<15} {r['vtep_mac']}")
            lines.append("counters:")
            for c in bpf["counters"]:
                lines.append(
                    f"  {c['hook']:<10} {c['reason']:<22} {c['packets']:>12} pkts "
                    f"{c['bytes']:>15} bytes"
                )
    return "\n".join(lines)
