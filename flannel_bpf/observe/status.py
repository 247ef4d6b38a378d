"""The agent's status file and `flannel-bpf status`: what runs, on which data path, and why.

The agent writes a small JSON document (atomically) when it is ready and whenever its peer set
changes. `flannel-bpf status` reads it, checks the agent process is alive, and adds what only the
kernel knows now: which programs are attached where and the BPF counters from the pinned maps.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flannel_bpf import __version__
from flannel_bpf.cli.flags import DEFAULT_STATUS_FILE, default_status_file, status_dir
from flannel_bpf.datapath.loader import netns_tag
from flannel_bpf.subnet.etcd.store import EtcdSettings, EtcdStore, StoreError

if TYPE_CHECKING:
    from flannel_bpf.backends.base import Network

log = logging.getLogger(__name__)


STATUS_SCHEMA = "flannel-bpf/status/v1"
# `status` with several instances on the host: {"schema": ..., "instances": [status/v1, ...]}.
STATUS_LIST_SCHEMA = "flannel-bpf/status-list/v1"


@dataclass
class AgentStatus:
    path: Path
    backend: str
    iface: str
    public_ip: str
    etcd: dict[str, Any]  # endpoints, prefix and TLS file paths (never the password)
    subnet_file: str = ""
    store: dict[str, str] = field(default_factory=dict)  # etcd or kube, and where
    peers: int = 0

    def document(self, network: Network) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "version": __version__,
            "updated": time.time(),
            "backend": self.backend,
            "datapath": network.datapath,
            "fallbacks": list(network.fallbacks),
            "lease": str(network.lease.identity),  # IPv6-only: the IPv6 subnet
            "lease_expiration": network.lease.expiration,
            "mtu": network.mtu,
            "iface": self.iface,
            "public_ip": self.public_ip,
            "peers": self.peers,
            "etcd": self.etcd,
            "subnet_file": self.subnet_file,
            "store": self.store,
            # Device indexes in the details mean something only in this network namespace.
            "netns": netns_tag(),
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


def status_files(environ: dict[str, str] | None = None) -> list[Path]:
    """Every agent instance's status file in the status directory (status.json first)."""
    directory = Path(status_dir(os.environ if environ is None else environ))
    found = [directory / "status.json"] if (directory / "status.json").is_file() else []
    return found + sorted(p for p in directory.glob("status-*.json") if p.is_file())


def status_file_for_subnet_file(subnet_file: str) -> Path:
    """The status file of the instance writing subnet_file: the one that records it, else the
    default an agent derives from it."""
    for path in status_files():
        try:
            recorded = json.loads(path.read_text()).get("subnet_file")
        except (OSError, ValueError, AttributeError):
            continue
        if recorded == subnet_file:
            return path
    return Path(default_status_file(subnet_file, os.environ))


def collect(path: Path, probe_etcd: bool = True, password: str = "") -> dict[str, Any]:
    """The status file as the stable status document (docs/cli.md), plus what only the system
    knows now: whether the agent lives, each etcd endpoint's health, and the BPF pins.

    What is wrong goes to "problems" (the agent is gone, its devices are in another network
    namespace or missing); a document with problems makes `status` exit non-zero."""
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        hint = "" if path == Path(DEFAULT_STATUS_FILE) else " (or --subnet-file)"
        raise StatusError(
            f"no status at {path}: the agent is not running, or runs with another "
            f"--status-file{hint}"
        ) from None
    except (OSError, ValueError) as exc:
        raise StatusError(f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise StatusError(f"{path} does not hold a status document")
    pid = raw.get("pid")
    expiration = raw.get("lease_expiration")
    etcd = raw.get("etcd") if isinstance(raw.get("etcd"), dict) else {}
    assert isinstance(etcd, dict)
    details = raw.get("details") if isinstance(raw.get("details"), dict) else {}
    assert isinstance(details, dict)
    running = isinstance(pid, int) and _alive(pid)
    problems: list[str] = []
    if not running:
        problems.append(f"agent not running: pid {pid} from {path} has exited")
    netns = _netns_check(raw)
    if netns["problem"]:
        problems.append(netns["problem"])
    info: dict[str, Any] = {
        "schema": STATUS_SCHEMA,
        "status_file": str(path),
        "running": running,
        "pid": pid,
        "version": raw.get("version"),
        "updated": raw.get("updated"),
        "backend": raw.get("backend"),
        "datapath": raw.get("datapath"),
        "fallbacks": list(raw.get("fallbacks") or []),
        "iface": raw.get("iface"),
        "public_ip": raw.get("public_ip"),
        "mtu": raw.get("mtu"),
        "peers": raw.get("peers"),
        "subnet_file": raw.get("subnet_file"),
        "store": raw.get("store") if isinstance(raw.get("store"), dict) else {"kind": "etcd"},
        "netns": {"agent": netns["agent"], "here": netns["here"]},
        "problems": problems,
        "lease": {
            "subnet": raw.get("lease"),
            "expiration": expiration,
            "expires_in_seconds": (
                round(expiration - time.time(), 3) if isinstance(expiration, float | int) else None
            ),
        },
        "etcd": {
            "prefix": etcd.get("prefix"),
            "endpoints": _etcd_health(etcd, password)
            if probe_etcd
            else [
                {"endpoint": e, "healthy": None, "error": "not probed"}
                for e in etcd.get("endpoints", [])
            ],
        },
        "details": details,
        "bpf": None,
    }
    pin_dir = details.get("pin_dir")
    if info["datapath"] == "bpf" and isinstance(pin_dir, str):
        # Counters live in the pins, readable from any namespace; which programs are attached
        # can only be asked where the devices are.
        info["bpf"] = _bpf_live(Path(pin_dir), devices_here=not netns["problem"])
        attached = info["bpf"].get("attached")
        if isinstance(attached, dict) and "error" in attached:
            problems.append(f"BPF hooks unreadable: {attached['error']}")
    return info


def _netns_check(raw: dict[str, Any]) -> dict[str, str]:
    """Whether this process shares the agent's network namespace (where its ifindexes mean
    something). Status files written before the netns field: taken from the pin directory."""
    here = netns_tag()
    agent = raw.get("netns")
    if not isinstance(agent, str):
        pin_dir = (raw.get("details") or {}).get("pin_dir")
        parts = Path(pin_dir).parts if isinstance(pin_dir, str) else ()
        agent = next((p for p in parts if p == "host" or p.startswith("netns-")), here)
    problem = ""
    if agent != here:
        where = "the host namespace" if agent == "host" else f"network namespace {agent}"
        gone = agent.startswith("netns-") and not _netns_exists(int(agent.removeprefix("netns-")))
        problem = (
            f"devices missing here: the agent's devices are in {where}, which no longer exists"
            if gone
            else f"devices missing here: the agent's devices are in {where}, this command runs "
            f"in {'the host namespace' if here == 'host' else here} (run it there, e.g. "
            "ip netns exec NAME flannel-bpf status)"
        )
    return {"agent": agent, "here": here, "problem": problem}


def _netns_exists(inode: int) -> bool:
    from flannel_bpf.datapath.loader import live_netns_inodes

    return inode in live_netns_inodes()


def _etcd_health(etcd: dict[str, Any], password: str) -> list[dict[str, Any]]:
    """One short read per endpoint, alone, with the agent's TLS files (and a password from the
    environment: the status file never holds it)."""
    endpoints = [e for e in etcd.get("endpoints", []) if isinstance(e, str)]

    async def probe(endpoint: str) -> dict[str, Any]:
        settings = EtcdSettings(
            endpoints=(endpoint,),
            cafile=str(etcd.get("cafile", "")),
            certfile=str(etcd.get("certfile", "")),
            keyfile=str(etcd.get("keyfile", "")),
            username=str(etcd.get("username", "")),
            password=password,
            request_timeout=2.0,
        )
        started = time.monotonic()
        try:
            async with EtcdStore(settings) as store:
                await store.get(f"{etcd.get('prefix', '')}/config")
        except StoreError as exc:
            return {"endpoint": endpoint, "healthy": False, "error": str(exc)}
        took = time.monotonic() - started
        return {"endpoint": endpoint, "healthy": True, "error": "", "seconds": round(took, 4)}

    async def probe_all() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(probe(e) for e in endpoints)))

    logging.getLogger("flannel_bpf.subnet.etcd.store").setLevel(logging.ERROR)
    return asyncio.run(probe_all()) if endpoints else []


def _bpf_live(pin_dir: Path, devices_here: bool) -> dict[str, Any]:
    from pyroute2.netlink.exceptions import NetlinkError

    from flannel_bpf.datapath.bpf_maps import LayoutMismatch, PinnedMaps
    from flannel_bpf.datapath.loader import attached

    try:
        maps = PinnedMaps(pin_dir)
    except (OSError, LayoutMismatch) as exc:
        return {"error": f"pinned maps unreadable: {exc}"}
    from flannel_bpf.datapath.bpf_maps import FB_CFG_HOST_ROUTING, FLOWS

    with maps:
        cfg = maps.read_config()
        remotes = list(maps.remotes())
        counters = maps.counters()
        routing = cfg is not None and bool(cfg.flags & FB_CFG_HOST_ROUTING)
        pods = maps.endpoints() if routing else []
        flows = maps.count(FLOWS) if routing else 0
    live: dict[str, Any] = {
        "pin_dir": str(pin_dir),
        "remotes": [
            {"subnet": str(r.subnet), "vtep_ip": str(r.vtep_address), "vtep_mac": r.vtep_mac}
            for r in sorted(remotes, key=lambda r: (r.subnet.version, r.subnet))
        ],
        "counters": [
            {"hook": key.hook.label, "reason": key.reason.label, "packets": p, "bytes": b}
            for key, (p, b) in counters.items()
            if p
        ],
    }
    if routing:  # what host routing knows now: local pods and validated flows
        live["host_routing"] = {
            "pods": [{"ip": str(e.address), "ifindex": e.ifindex, "mac": e.mac} for e in pods],
            "flows": flows,
        }
    if cfg is not None and devices_here:
        try:
            live["attached"] = attached(cfg.vtep_ifindex, cfg.uplink_ifindex, cfg.vtep6_ifindex)
        except NetlinkError as exc:
            # The namespace is right but a device went (deleted by hand, or mid-shutdown).
            # (An IPv6-only network names no flannel.<VNI>: its ifindex 0 is not a device.)
            devices = (cfg.uplink_ifindex, cfg.vtep_ifindex, cfg.vtep6_ifindex)
            listed = " or ".join(str(index) for index in devices if index)
            live["attached"] = {
                "error": f"device ifindex {listed} missing "
                f"here ({exc.args[-1] if exc.args else exc})"
            }
        except OSError as exc:
            live["attached"] = {"error": str(exc)}
    return live


def format_status(info: dict[str, Any]) -> str:
    lease = info.get("lease") or {}
    left = lease.get("expires_in_seconds")
    expiry = "reservation (no expiry)" if left is None else f"expires in {_human(left)}"
    running = "running" if info.get("running") else "NOT running"
    lines = [
        f"agent:     {running} (pid {info.get('pid')}, version {info.get('version')})",
        *(f"PROBLEM:   {problem}" for problem in info.get("problems") or []),
        f"backend:   {info.get('backend')}    datapath: {info.get('datapath')}",
        f"lease:     {lease.get('subnet')}    {expiry}",
        f"overlay:   mtu {info.get('mtu')}    peers {info.get('peers')}",
        f"uplink:    {info.get('iface')} ({info.get('public_ip')})",
    ]
    for reason in info.get("fallbacks") or []:
        lines.append(f"fallback:  {reason}")
    etcd = info.get("etcd") or {}
    for ep in etcd.get("endpoints") or []:
        state = {True: "healthy", False: "UNHEALTHY", None: "not probed"}[ep.get("healthy")]
        detail = f": {ep['error']}" if ep.get("error") and ep.get("healthy") is False else ""
        lines.append(f"etcd:      {ep.get('endpoint')} {state}{detail}")
    details = info.get("details") or {}
    if details.get("decap"):
        why = f" ({details['decap_reason']})" if details.get("decap_reason") else ""
        lines.append(f"decap:     {details['decap']}{why}")
    if details.get("host_routing"):
        lines.append(f"host routing: {details['host_routing']}")
    bpf = info.get("bpf")
    if isinstance(bpf, dict):
        if "error" in bpf:
            lines.append(f"bpf:       {bpf['error']}")
        else:
            hooks_here = bpf.get("attached")
            if hooks_here is None:
                lines.append("attached:  unknown (not in the agent's network namespace)")
            elif "error" in hooks_here:
                lines.append(f"attached:  unknown ({hooks_here['error']})")
            else:
                hooks = ", ".join(f"{k}={v}" for k, v in hooks_here.items())
                lines.append(f"attached:  {hooks or 'nothing'}")
            lines.append(f"pins:      {bpf['pin_dir']}")
            lines.append(f"remotes:   {len(bpf['remotes'])} (flannel-bpf peers lists them)")
            if "host_routing" in bpf:
                known = bpf["host_routing"]
                lines.append(f"short way: {len(known['pods'])} local pods learnt, "
                             f"{known['flows']} validated flows")  # fmt: skip
            handled = [c for c in bpf["counters"] if c["reason"] in _HANDLED]
            for c in handled:
                lines.append(f"  {c['hook']:<10} {c['reason']:<16} {c['packets']:>12} pkts")
            lines.append("           (flannel-bpf stats shows every counter)")
    return "\n".join(lines)


# What each way carried: the host stack's (encap at flannel.<VNI>, decap into the stack) and
# host routing's short way (pod veth to uplink, uplink to pod).
_HANDLED = ("encap_redirect", "decap_pass", "decap_redirect", "encap_from_pod", "decap_to_pod")


def _human(seconds: float) -> str:
    if seconds < 0:
        return f"EXPIRED {int(-seconds)}s ago"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
