"""Control-plane benchmark: real etcd, real agents, thousands of peers, in network namespaces.

One run measures, against an etcd 3.4 started in its own namespace:

1. start-up: ``leases`` vxlan leases (flanneld's keys and JSON) are written first, then one agent
   starts on a host namespace; the time from the agent process starting until every peer is
   programmed, for ``--datapath bpf`` (fb_remotes holds them all) and ``--datapath kernel``
   (routes, neighbours and FDB entries on flannel.1);
2. churn (BPF): lease adds, renewals and removals streamed at a fixed rate while the agent runs;
   per event the time from the etcd write returning to the fb_remotes entry appearing or going,
   and whether renewals (the same value put again) make the agent reprogram anything;
3. agent memory (VmRSS, VmHWM and what the mappings hold) at steady state on both data paths;
   the real flanneld (v0.28.9, scripts/build-peers.sh) is started the same way on the same
   leases, and its time to every peer programmed and its memory are rows of the same run;
4. ``agents`` agents with the alloc backend started at once on one etcd: time until each has
   written its subnet file, and whether all subnets are distinct.

Run: ``python -m bench.control_plane [--leases 5000] [--agents 50]`` as root from the
repository. Results go to bench/results/control_plane.json.

How it observes without disturbing: etcd is written through its JSON gateway on a keep-alive
HTTP connection whose socket was opened inside the etcd namespace, so a put's return time is
taken in this process; fb_remotes is read through its pin on the shared bpffs, so the map is
polled from this process too, against the same monotonic clock.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import math
import os
import queue
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final

from bench import unwind_on_sigterm
from flannel_bpf.datapath import bpf_sys, rtnl_batch
from flannel_bpf.datapath.bpf_build import objects
from flannel_bpf.datapath.bpf_maps import REMOTE_KEY, REMOTE_VALUE, remote_key
from flannel_bpf.datapath.loader import WIRE_FORMATS, pin_dir_for, program_source, unpin
from flannel_bpf.datapath.rtnl_batch import NlRequest, RtnlBatch
from flannel_bpf.lab.agent_process import FLANNEL_BPF, FLANNELD, AgentProcess
from flannel_bpf.lab.etcd import EtcdMember, make_cluster
from flannel_bpf.lab.netns import (
    CommandError,
    add_address,
    add_netns,
    add_veth,
    delete_netns,
    entered,
    in_netns,
    link_up,
    netns_exists,
)
from flannel_bpf.lab.netns import run as sh

RESULTS: Final = Path(__file__).resolve().parent / "results" / "control_plane.json"
# Agent starts measured for "peers programmed after agent start" (the median is reported).
STARTUP_RUNS: Final = 3

PREFIX: Final = "/coreos.com/network"
ALLOC_PREFIX: Final = "/fbbench-alloc/network"
UNDERLAY_LEN: Final = 15  # 198.18.0.0/15: hosts in 198.18.x, fake peers' PublicIPs in 198.19.x
ETCD_IP: Final = "198.18.0.2"
ETCD_PORT: Final = 2379
NETWORK: Final = IPv4Network("10.128.0.0/9")
SUBNET_LEN: Final = 24
# Fake peers from 10.129.0.0 up and churn adds from 10.200.0.0 up: the agent itself picks among
# the first free /24s from SubnetMin (10.128.1.0), so it never collides with either.
PEER_BASE: Final = IPv4Address("10.129.0.0")
CHURN_BASE: Final = IPv4Address("10.200.0.0")
MAX_LEASES: Final = 15_000  # 10.129.0.0 + 15,000 /24s stays below CHURN_BASE
ALLOC_NETWORK: Final = "10.64.0.0/14"
MAX_ALLOC_AGENTS: Final = 250
VNI: Final = 1
DEVICE: Final = f"flannel.{VNI}"
TXN_OPS: Final = 128  # etcd's default --max-txn-ops
ETCD_LEASE_TTL: Final = 24 * 3600  # flanneld's subnetTTL
STARTUP_TIMEOUT: Final = 180.0
EVENT_TIMEOUT: Final = 2.0  # an event not programmed within this counts as missed
BPF_LIBS: Final = re.compile(r"libbcc|LLVM|clang", re.IGNORECASE)
# RTM_NEWROUTE (24) and RTM_NEWNEIGH (28, also FDB entries); strace prints the numbers when it
# cannot tell the socket's netlink family.
NETLINK_WRITE: Final = re.compile(r"RTM_NEWROUTE|RTM_NEWNEIGH|nlmsg_type=0x1[8c]\b")
LOG_TS: Final = re.compile(r"^ts=(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z ")


class BenchError(RuntimeError):
    pass


@dataclass(frozen=True)
class KubeAccess:
    """What an agent in Kubernetes mode is given: a kubeconfig and net-conf.json."""

    kubeconfig: Path
    net_conf: Path


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Row:
    metric: str
    path: str  # "bpf" | "kernel" | "alloc" | "flanneld" (the real one)
    value: float
    unit: str
    note: str = ""


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    unit: str
    limit: str
    met: bool
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    def add(self, metric: str, path: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append(Row(metric, path, round(value, 4), unit, note))

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": "control_plane",
            "rows": [asdict(r) for r in self.rows],
            "targets": [asdict(t) for t in self.targets],
            "env": self.env,
        }


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


# --------------------------------------------------------------------------------------------
# Leases as flanneld writes them


@dataclass(frozen=True)
class PeerLease:
    subnet: IPv4Network
    public_ip: IPv4Address
    mac: str

    def key(self, prefix: str = PREFIX) -> str:
        return f"{prefix}/subnets/{self.subnet.network_address}-{self.subnet.prefixlen}"

    def value(self) -> str:
        # Byte for byte what flanneld v0.28 writes for a vxlan node (flannel-compat.md 1.2).
        return (
            f'{{"PublicIP":"{self.public_ip}","PublicIPv6":null,"BackendType":"vxlan",'
            f'"BackendData":{{"VNI":{VNI},"VtepMAC":"{self.mac}"}}}}'
        )

    @property
    def map_key(self) -> bytes:
        return remote_key(self.subnet)


def make_peers(count: int, base: IPv4Address, series: int) -> list[PeerLease]:
    """count fake vxlan peers from base on: unique /24s, PublicIPs in 198.19.x, locally
    administered unicast MACs 0e:fb:<series>:..."""
    step = 1 << (32 - SUBNET_LEN)
    peers = []
    for i in range(count):
        ip = IPv4Address(f"198.19.{series * 100 + i // 250}.{i % 250 + 1}")
        mac = f"0e:fb:{series:02x}:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
        peers.append(PeerLease(IPv4Network((int(base) + i * step, SUBNET_LEN)), ip, mac))
    # The agent lists leases in etcd key order and programs them in that order; probing in the
    # same order keeps the "all present yet?" scan short.
    return sorted(peers, key=lambda p: p.key())


# --------------------------------------------------------------------------------------------
# etcd through its JSON gateway, from inside its namespace


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _range_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass
class EtcdHttp:
    """etcd v3 over HTTP/JSON on one keep-alive connection.

    The socket is created inside ``netns`` (setns on this thread, connect, setns back) and stays
    there; every (re)connect goes through the same door, never through http.client's implicit
    reconnect, which would dial from the root namespace.
    """

    netns: str
    host: str
    port: int = ETCD_PORT
    _conn: http.client.HTTPConnection | None = field(default=None, init=False, repr=False)

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None or self._conn.sock is None:
            self.close()
            with entered(self.netns):
                conn = http.client.HTTPConnection(self.host, self.port, timeout=15)
                conn.connect()
            self._conn = conn
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        payload = json.dumps(body)
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request("POST", path, payload, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
                continue
            if resp.status != 200:
                raise BenchError(f"etcd {path}: HTTP {resp.status}: {raw[:300]!r}")
            result: dict[str, Any] = json.loads(raw)
            return result
        raise AssertionError("unreachable")

    def grant(self, ttl: int) -> int:
        return int(self.call("/v3/lease/grant", {"TTL": ttl})["ID"])

    def put(self, key: str, value: str, lease: int = 0) -> None:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self.call("/v3/kv/put", body)

    def delete(self, key: str) -> int:
        return int(self.call("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    def txn(self, puts: Iterable[tuple[str, str]], deletes: Iterable[str], lease: int = 0) -> None:
        """Many writes in as few transactions as etcd's op limit allows."""
        ops: list[dict[str, Any]] = []
        for key, value in puts:
            put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
            if lease:
                put["lease"] = str(lease)
            ops.append({"requestPut": put})
        ops += [{"requestDeleteRange": {"key": _b64(key)}} for key in deletes]
        for i in range(0, len(ops), TXN_OPS):
            self.call("/v3/kv/txn", {"success": ops[i : i + TXN_OPS]})

    def get_prefix(self, prefix: str) -> dict[str, str]:
        body = {"key": _b64(prefix), "range_end": _b64(_range_end(prefix))}
        resp = self.call("/v3/kv/range", body)
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")).decode()
            for kv in resp.get("kvs", [])
        }

    def count(self, prefix: str) -> int:
        body = {"key": _b64(prefix), "range_end": _b64(_range_end(prefix)), "count_only": True}
        return int(self.call("/v3/kv/range", body).get("count", 0))


# --------------------------------------------------------------------------------------------
# The lab: underlay bridge, etcd, hosts; everything it makes it also removes


@dataclass
class BenchLab:
    tag: str
    workdir: Path
    namespaces: list[str] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)
    pin_dirs: list[Path] = field(default_factory=list)
    helpers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    etcd: EtcdMember | None = None
    client: EtcdHttp | None = None

    @property
    def underlay(self) -> str:
        return f"{self.tag}-ul"

    def ns(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def _netns(self, name: str) -> str:
        ns = self.ns(name)
        self.namespaces.append(ns)  # recorded first: a half-made namespace is still removed
        add_netns(ns)
        return ns

    def setup(self) -> None:
        self._netns("ul")
        sh(["ip", "-n", self.underlay, "link", "add", "br0", "type", "bridge"])
        link_up(self.underlay, "br0")
        etcd_ns = self.add_host("etcd", ETCD_IP)
        member = make_cluster(self.workdir / "etcd", 1, host=ETCD_IP, netns=etcd_ns).members[0]
        self.etcd = member
        member.start()
        member.wait_ready(30)
        self.client = EtcdHttp(etcd_ns, ETCD_IP)

    def add_host(self, name: str, address: str) -> str:
        """A namespace with eth1 on the underlay bridge at address/15."""
        ns = self._netns(name)
        port = name[:15]
        add_veth(ns, "eth1", self.underlay, port)
        sh(["ip", "-n", self.underlay, "link", "set", port, "master", "br0"])
        link_up(self.underlay, port)
        add_address(ns, "eth1", f"{address}/{UNDERLAY_LEN}")
        link_up(ns, "eth1")
        return ns

    def node_dir(self, ns: str) -> Path:
        return self.workdir / ns

    def agent(
        self,
        ns: str,
        prefix: str,
        datapath: str = "",
        program: str = FLANNEL_BPF,
        kube: KubeAccess | None = None,
    ) -> AgentProcess:
        """flannel-bpf, or the real flanneld with the same store flags; with kube, both in
        Kubernetes mode as the Node named like the namespace."""
        d = self.node_dir(ns)
        args = ["--iface", "eth1", "--subnet-file", str(d / "subnet.env")]
        if kube is None:
            args += ["--etcd-endpoints", f"http://{ETCD_IP}:{ETCD_PORT}", "--etcd-prefix", prefix]
        else:
            args += ["--kube-subnet-mgr", "--kubeconfig-file", str(kube.kubeconfig),
                     "--net-config-path", str(kube.net_conf)]  # fmt: skip
        if program == FLANNEL_BPF:
            args += ["--status-file", str(d / "status.json")]
            args += ["--datapath", datapath] if datapath else []
        env = {"NODE_NAME": ns} if kube is not None else {}
        agent = AgentProcess(ns, args, d / "agent.log", env=env, program=program)
        self.agents.append(agent)
        return agent

    def stop_agents(self, agents: Sequence[AgentProcess], timeout: float = 15.0) -> None:
        """SIGTERM all first, then wait: fifty agents stop in parallel, not one after another."""
        for agent in agents:
            agent.signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for agent in agents:
            if agent.process is None:
                continue
            try:
                agent.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                agent.stop(timeout=1.0)  # SIGTERM again, then SIGKILL for its session

    def bpf_cleanup(self, ns: str) -> None:
        """`flannel-bpf cleanup` inside the node: detach our programs and unpin its maps."""
        if not netns_exists(ns):
            return
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(
                in_netns(ns, [sys.executable, "-m", "flannel_bpf", "cleanup"]),
                capture_output=True,
                timeout=120,
            )

    def remove_netns(self, ns: str) -> None:
        self._kill_inside(ns)
        delete_netns(ns)

    def _kill_inside(self, ns: str) -> None:
        """Anything still running in one of our namespaces was started by this benchmark."""
        if not netns_exists(ns):
            return
        with contextlib.suppress(CommandError, subprocess.TimeoutExpired):
            for pid in sh(["ip", "netns", "pids", ns], check=False).split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def close(self) -> None:
        """Everything, in the order that leaves nothing behind; each step survives the others."""
        for helper in self.helpers:
            with contextlib.suppress(ProcessLookupError):
                helper.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                helper.wait(5)
        with contextlib.suppress(Exception):
            self.stop_agents([a for a in self.agents if a.running()], timeout=10)
        for agent in self.agents:
            with contextlib.suppress(Exception):
                agent.stop(timeout=2)
        for pin_dir in self.pin_dirs:
            # Pins live on the shared bpffs: take the data path down from inside its namespace.
            ns = self._ns_of_pin(pin_dir)
            if pin_dir.exists() and ns is not None:
                self.bpf_cleanup(ns)
        if self.client is not None:
            self.client.close()
        if self.etcd is not None:
            with contextlib.suppress(Exception):
                self.etcd.stop()
        for ns in reversed(self.namespaces):
            with contextlib.suppress(Exception):
                self.remove_netns(ns)
        for pin_dir in self.pin_dirs:
            # The namespace is gone, so its programs are too; only the pins could remain.
            with contextlib.suppress(OSError):
                unpin(pin_dir)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _ns_of_pin(self, pin_dir: Path) -> str | None:
        for ns in self.namespaces:
            if netns_exists(ns) and pin_dir_of(ns) == pin_dir:
                return ns
        return None


def pin_dir_of(ns: str) -> Path:
    """The agent's pins for flannel.1 in ns: the loader's own rule, applied inside ns."""
    with entered(ns):
        return pin_dir_for(DEVICE)


# --------------------------------------------------------------------------------------------
# Observing an agent


def wait_until(
    what: str, predicate: Callable[[], bool], agent: AgentProcess, timeout: float, interval: float
) -> float:
    """Poll predicate; the monotonic time it first held. Fails fast when the agent dies."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return time.monotonic()
        if not agent.running():
            raise BenchError(f"agent exited while waiting for {what}:\n{agent.log()[-3000:]}")
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def log_time(log: str, text: str) -> float | None:
    """Wall-clock time of the first log line containing text (the agent logs ms, in UTC)."""
    for line in log.splitlines():
        if text in line:
            match = LOG_TS.match(line)
            if match:
                stamp = datetime.strptime(match[1], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
                return stamp.timestamp()
    return None


@dataclass
class RemotesMap:
    """fb_remotes opened through its pin, read with single lookups."""

    fd: int

    @classmethod
    def open(cls, pin_dir: Path) -> RemotesMap:
        return cls(bpf_sys.obj_get(pin_dir / "fb_remotes"))

    def present(self, key: bytes) -> bool:
        return bpf_sys.map_lookup(self.fd, key, REMOTE_VALUE.size) is not None

    def count(self) -> int:
        return sum(1 for _ in bpf_sys.map_keys(self.fd, REMOTE_KEY.size))

    def close(self) -> None:
        os.close(self.fd)


def kernel_counts(ns: str) -> dict[str, int]:
    """Per-peer kernel state on flannel.1: routes, neighbours, FDB entries."""
    routes = sh(["ip", "-n", ns, "-4", "route", "show", "dev", DEVICE]).splitlines()
    neigh = sh(["ip", "-n", ns, "-4", "neigh", "show", "dev", DEVICE]).splitlines()
    fdb = sh(in_netns(ns, ["bridge", "fdb", "show", "dev", DEVICE])).splitlines()
    return {
        "routes": len(routes),
        "neighbours": sum(1 for line in neigh if "lladdr" in line),
        "fdb": sum(1 for line in fdb if " dst " in line),
    }


def route_present(ns: str, subnet: IPv4Network) -> bool:
    """A FIB lookup (no dump of thousands of routes): the host has no default route, so an
    address in subnet resolves through flannel.1 only once the peer's route is there."""
    out = sh(["ip", "-n", ns, "-4", "route", "get", str(subnet.network_address + 1)], check=False)
    return f"dev {DEVICE}" in out


@dataclass(frozen=True)
class Memory:
    rss_kb: int
    hwm_kb: int
    anon_kb: int
    file_kb: int
    bcc_llvm_kb: int  # resident in mappings of libbcc / LLVM / clang
    top_libs: list[tuple[str, int]]

    def note(self) -> str:
        libs = ", ".join(f"{name} {kb / 1024:.1f}" for name, kb in self.top_libs[:4])
        return (
            f"VmHWM {self.hwm_kb / 1024:.1f} MB, RssAnon {self.anon_kb / 1024:.1f} MB, "
            f"RssFile {self.file_kb / 1024:.1f} MB; libbcc/LLVM/clang resident "
            f"{self.bcc_llvm_kb / 1024:.1f} MB; largest file mappings (MB): {libs}"
        )


def memory_of(pid: int) -> Memory:
    status: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            status[name] = int(rest.split()[0])
    per_file: dict[str, int] = {}
    current = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            current = head[5] if len(head) >= 6 else ""
        elif head and head[0] == "Rss:" and current.startswith("/"):
            name = Path(current).name
            per_file[name] = per_file.get(name, 0) + int(head[1])
    return Memory(
        rss_kb=status.get("VmRSS", 0),
        hwm_kb=status.get("VmHWM", 0),
        anon_kb=status.get("RssAnon", 0),
        file_kb=status.get("RssFile", 0),
        bcc_llvm_kb=sum(kb for name, kb in per_file.items() if BPF_LIBS.search(name)),
        top_libs=sorted(per_file.items(), key=lambda item: -item[1])[:6],
    )


# --------------------------------------------------------------------------------------------
# 1. Start-up with N peers already leased


@dataclass(frozen=True)
class Startup:
    path: str
    programmed_s: float
    first_entry_s: float  # BPF: first fb_remotes entry; kernel: first route
    ready_s: float | None  # "flannel is ready" in the agent's log
    reconciled_s: float | None  # BPF: "BPF remotes reconciled" in the log
    setup_s: float | None  # log: "VXLAN config" to "Picking subnet" (device, BPF load)
    counts: dict[str, int]


def start_bpf_agent(
    lab: BenchLab, ns: str, peers: Sequence[PeerLease], kube: KubeAccess | None = None
) -> tuple[AgentProcess, RemotesMap, Startup]:
    pin_dir = pin_dir_of(ns)
    lab.pin_dirs.append(pin_dir)
    if pin_dir.exists():
        # The namespace is brand new, so these pins belong to a dead one whose inode it reuses;
        # left there they could already hold our keys and fake an instant start-up.
        unpin(pin_dir)
    agent = lab.agent(ns, PREFIX, "bpf", kube=kube)
    wall0, t0 = time.time(), time.monotonic()
    agent.start()
    # bcc creates the pins while compiling, before the agent is ready.
    wait_until(
        "fb_remotes pin", (pin_dir / "fb_remotes").exists, agent, STARTUP_TIMEOUT, interval=0.01
    )
    remotes = RemotesMap.open(pin_dir)
    try:
        return agent, remotes, _measure_bpf_startup(lab, ns, agent, remotes, peers, wall0, t0)
    except BaseException:
        remotes.close()
        raise


def _measure_bpf_startup(
    lab: BenchLab,
    ns: str,
    agent: AgentProcess,
    remotes: RemotesMap,
    peers: Sequence[PeerLease],
    wall0: float,
    t0: float,
) -> Startup:
    keys = [p.map_key for p in peers]
    first: list[float] = []
    position = 0

    def all_present() -> bool:
        # Entries only appear during start-up, so a key found stays found: resume from the
        # first key not yet seen instead of rescanning thousands each poll.
        nonlocal position
        while position < len(keys) and remotes.present(keys[position]):
            if not first:
                first.append(time.monotonic())
            position += 1
        return position == len(keys)

    done = wait_until("all peers in fb_remotes", all_present, agent, STARTUP_TIMEOUT, 0.002)
    counts = {"fb_remotes": remotes.count()}
    log = agent.log()
    ready, reconciled = log_time(log, "flannel is ready"), log_time(log, "BPF remotes reconciled")
    status = json.loads((lab.node_dir(ns) / "status.json").read_text())
    reported = (status.get("details") or {}).get("pin_dir")
    if reported != str(pin_dir_of(ns)):
        raise BenchError(f"agent pins at {reported}, benchmark expected {pin_dir_of(ns)}")
    return Startup(
        path="bpf",
        programmed_s=done - t0,
        first_entry_s=(first[0] if first else done) - t0,
        ready_s=None if ready is None else ready - wall0,
        reconciled_s=None if reconciled is None else reconciled - wall0,
        setup_s=setup_time(log),
        counts=counts,
    )


def start_kernel_agent(
    lab: BenchLab,
    ns: str,
    peers: Sequence[PeerLease],
    program: str = FLANNEL_BPF,
    kube: KubeAccess | None = None,
) -> tuple[AgentProcess, Startup]:
    """Our kernel data path, or flanneld's (which programs the same entries)."""
    agent = lab.agent(ns, PREFIX, "kernel", program=program, kube=kube)
    wall0, t0 = time.time(), time.monotonic()
    agent.start()
    first: list[float] = []

    def last_route() -> bool:
        # Peers are programmed in listing order, route last per peer: the last peer's route
        # is the cheap signal; the full count below confirms it.
        if not first:
            if route_present(ns, peers[0].subnet):
                first.append(time.monotonic())
            return False
        return route_present(ns, peers[-1].subnet)

    # flannel.1 appears only once the agent has registered; ip fails until then.
    wait_until(
        "flannel.1",
        lambda: bool(sh(["ip", "-n", ns, "link", "show", DEVICE], check=False)),
        agent,
        STARTUP_TIMEOUT,
        0.02,
    )
    done = wait_until("last peer's route", last_route, agent, STARTUP_TIMEOUT, 0.02)
    counts = kernel_counts(ns)
    while min(counts.values()) < len(peers):
        # Programmed in another order than expected: fall back to full counts.
        done = wait_until(
            "all kernel entries",
            lambda: min(kernel_counts(ns).values()) >= len(peers),
            agent,
            STARTUP_TIMEOUT,
            0.1,
        )
        counts = kernel_counts(ns)
    log = agent.log()
    ready = log_time(log, "flannel is ready")  # flanneld logs in klog's format: not parsed
    return agent, Startup(
        path="kernel" if program == FLANNEL_BPF else FLANNELD,
        programmed_s=done - t0,
        first_entry_s=(first[0] if first else done) - t0,
        ready_s=None if ready is None else ready - wall0,
        reconciled_s=None,
        setup_s=setup_time(log),
        counts=counts,
    )


def setup_time(log: str) -> float | None:
    """The vxlan backend's set-up before it leases: device, and for BPF compile, load, attach."""
    begin, end = log_time(log, "VXLAN config:"), log_time(log, "Picking subnet")
    return None if begin is None or end is None else end - begin


# --------------------------------------------------------------------------------------------
# 2. Churn: lease events to fb_remotes


@dataclass
class Sample:
    kind: str  # "add" | "remove"
    key: bytes
    want_present: bool
    t_sent: float
    t_returned: float = math.nan
    t_seen: float = math.nan

    @property
    def latency_ms(self) -> float:
        """From the etcd write returning to the map showing it; 0 when it was there first."""
        if math.isnan(self.t_seen):
            return math.inf
        return max(0.0, self.t_seen - self.t_returned) * 1000


def poll_samples(
    remotes: RemotesMap, incoming: queue.SimpleQueue[Sample], stop: threading.Event
) -> None:
    """Look up every outstanding key ~2,000 times a second until it reaches its wanted state.

    Samples are queued before their etcd write is sent, so no change can slip by unobserved; a
    short sleep between sweeps keeps this thread from competing with the agent for the CPUs.
    """
    waiting: list[Sample] = []
    while True:
        with contextlib.suppress(queue.Empty):
            while True:
                waiting.append(incoming.get_nowait())
        now = time.monotonic()
        still = []
        for sample in waiting:
            if remotes.present(sample.key) == sample.want_present:
                sample.t_seen = time.monotonic()
            elif now - sample.t_sent < EVENT_TIMEOUT:
                still.append(sample)
        waiting = still
        # stop is set only after the last sample was queued: drained above, so none is lost.
        if stop.is_set() and not waiting:
            return
        time.sleep(0.0005)


@dataclass
class ChurnResult:
    samples: list[Sample]
    renewals: int
    seconds: float
    final: dict[IPv4Network, PeerLease]


def churn(
    lab: BenchLab,
    remotes: RemotesMap,
    peers: Sequence[PeerLease],
    lease_id: int,
    events: int,
    rate: float,
    rng: random.Random,
) -> ChurnResult:
    """A steady stream of adds, renewals and removals (4:3:3), one every 1/rate seconds."""
    assert lab.client is not None
    client = lab.client
    current = {p.subnet: p for p in peers}
    originals = list(peers)
    added: list[tuple[PeerLease, Sample]] = []
    fresh = iter(make_peers(events, CHURN_BASE, series=1))
    pattern = ("add", "renew", "add", "remove", "renew", "add", "remove", "renew", "add", "remove")
    incoming: queue.SimpleQueue[Sample] = queue.SimpleQueue()
    samples: list[Sample] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_samples, args=(remotes, incoming, stop), daemon=True)
    poller.start()
    renewals = 0
    start = time.monotonic()
    try:
        for i in range(events):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            kind = pattern[i % len(pattern)]
            if kind == "renew":
                # A renewal re-puts the same value: nothing for the data path to do.
                lease = rng.choice(originals) if originals else None
                if lease is not None and lease.subnet in current:
                    client.put(lease.key(), lease.value(), lease_id)
                    renewals += 1
                continue
            if kind == "add":
                lease = next(fresh)
                sample = Sample("add", lease.map_key, True, time.monotonic())
                incoming.put(sample)
                client.put(lease.key(), lease.value(), lease_id)
                sample.t_returned = time.monotonic()
                current[lease.subnet] = lease
                added.append((lease, sample))
            else:
                # Alternate between a peer that joined during the churn (once its add has been
                # seen, so the two samples cannot overlap) and one that was there from the start.
                seen = [j for j, (_, s) in enumerate(added) if not math.isnan(s.t_seen)]
                if seen and ((i // len(pattern)) % 2 == 0 or not originals):
                    lease = added.pop(rng.choice(seen))[0]
                elif originals:
                    lease = originals.pop(rng.randrange(len(originals)))
                else:
                    continue  # a tiny lease set, already churned away
                sample = Sample("remove", lease.map_key, False, time.monotonic())
                incoming.put(sample)
                client.delete(lease.key())
                sample.t_returned = time.monotonic()
                del current[lease.subnet]
            samples.append(sample)
        seconds = time.monotonic() - start
    finally:
        stop.set()
        poller.join(EVENT_TIMEOUT + 5)
    return ChurnResult(samples, renewals, seconds, current)


@dataclass(frozen=True)
class RenewalNoise:
    renewals: int
    status_rewrites: int
    traced: bool
    map_updates: int
    netlink_writes: int


def status_rewrites(path: Path, stop: threading.Event, out: list[int]) -> None:
    """Count the agent's status-file rewrites: it rewrites it after each batch it applied."""
    last = path.stat().st_ino
    while not stop.is_set():
        with contextlib.suppress(FileNotFoundError):
            ino = path.stat().st_ino  # os.replace: each rewrite is a new inode
            if ino != last:
                out.append(1)
                last = ino
        time.sleep(0.001)


def renewal_noise(
    lab: BenchLab,
    agent: AgentProcess,
    status_file: Path,
    leases: Sequence[PeerLease],
    lease_id: int,
    count: int,
) -> RenewalNoise:
    """Only renewals, nothing else: does the agent touch the map, the kernel, its status?"""
    assert lab.client is not None and agent.pid is not None
    trace = lab.workdir / "renewal.strace"
    tracer: subprocess.Popen[bytes] | None = None
    if shutil.which("strace"):
        # Every thread of the agent, but not its children (iptables runs every few seconds).
        tids = [f"-p{t.name}" for t in Path(f"/proc/{agent.pid}/task").iterdir()]
        tracer = subprocess.Popen(
            ["strace", "-qq", "-e", "trace=bpf,sendto,sendmsg", "-o", str(trace), *tids],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        lab.helpers.append(tracer)
        time.sleep(1.0)  # attaching to each thread takes a moment
    stop = threading.Event()
    rewrites: list[int] = []
    watcher = threading.Thread(target=status_rewrites, args=(status_file, stop, rewrites))
    watcher.start()
    try:
        start = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, start + i / 50.0 - time.monotonic()))
            lease = leases[i % len(leases)]
            lab.client.put(lease.key(), lease.value(), lease_id)
        time.sleep(1.0)
    finally:
        stop.set()
        watcher.join()
        if tracer is not None:
            tracer.send_signal(signal.SIGINT)  # strace detaches cleanly on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                tracer.wait(10)
    lines = trace.read_text(errors="replace").splitlines() if trace.exists() else []
    return RenewalNoise(
        renewals=count,
        status_rewrites=len(rewrites),
        traced=tracer is not None,
        map_updates=sum("BPF_MAP_UPDATE_ELEM" in line for line in lines),
        netlink_writes=sum(
            bool(NETLINK_WRITE.search(line))
            for line in lines
            if " sendto(" in line or " sendmsg(" in line  # not the acks that echo them
        ),
    )


# --------------------------------------------------------------------------------------------
# 4. Many alloc agents at once


@dataclass(frozen=True)
class AllocResult:
    total_s: float
    per_agent_s: list[float]
    solo_s: float  # one agent alone, before the storm
    imports_s: list[float]  # per agent: process start to its first log line
    allocated_s: list[float]  # per agent: process start to "Allocated lease"
    subnets: list[str]
    leases_in_etcd: int
    races: int


def _since_start(log: str, text: str, wall_start: float) -> float:
    stamp = log_time(log, text)
    return math.nan if stamp is None else stamp - wall_start


def alloc_storm(lab: BenchLab, agents: int) -> AllocResult:
    assert lab.client is not None
    client = lab.client
    config = {"Network": ALLOC_NETWORK, "SubnetLen": SUBNET_LEN, "Backend": {"Type": "alloc"}}
    client.put(f"{ALLOC_PREFIX}/config", json.dumps(config))

    # One agent alone first: what a start costs when it has the CPUs to itself.
    solo_ns = lab.add_host("asolo", "198.18.0.200")
    solo = lab.agent(solo_ns, ALLOC_PREFIX)
    t0 = time.monotonic()
    solo.start()
    try:
        solo_file = lab.node_dir(solo_ns) / "subnet.env"
        solo_s = wait_until("solo subnet file", solo_file.exists, solo, 60, 0.005) - t0
        client.delete(_own_lease_key(lab, solo_ns, ALLOC_PREFIX))
    finally:
        lab.stop_agents([solo])
        lab.remove_netns(solo_ns)

    namespaces = [
        lab.add_host(f"a{i:03d}", f"198.18.{1 + i // 250}.{i % 250 + 1}") for i in range(agents)
    ]
    procs = [lab.agent(ns, ALLOC_PREFIX) for ns in namespaces]
    files = [lab.node_dir(ns) / "subnet.env" for ns in namespaces]
    started: list[float] = []
    walls: list[float] = []
    for proc in procs:
        started.append(time.monotonic())
        walls.append(time.time())
        proc.start()
    written: list[float] = [math.nan] * agents
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while any(math.isnan(t) for t in written):
            for i, path in enumerate(files):
                if math.isnan(written[i]) and path.exists():
                    written[i] = time.monotonic()
                elif math.isnan(written[i]) and not procs[i].running():
                    tail = procs[i].log()[-2000:]
                    raise BenchError(f"alloc agent {namespaces[i]} exited:\n{tail}")
            if time.monotonic() > deadline:
                raise BenchError(f"alloc agents: {sum(map(math.isnan, written))} wrote no file")
            time.sleep(0.01)
        subnets = []
        for path in files:
            env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
            subnets.append(env["FLANNEL_SUBNET"])
        leases = client.count(f"{ALLOC_PREFIX}/subnets/")
        logs = [proc.log() for proc in procs]
    finally:
        lab.stop_agents(procs)
        for ns in namespaces:
            lab.remove_netns(ns)
    return AllocResult(
        total_s=max(written) - started[0],
        per_agent_s=[w - s for w, s in zip(written, started, strict=True)],
        solo_s=solo_s,
        imports_s=[_since_start(x, " starting (pid", w) for x, w in zip(logs, walls, strict=True)],
        allocated_s=[
            _since_start(x, "Allocated lease", w) for x, w in zip(logs, walls, strict=True)
        ],
        subnets=subnets,
        leases_in_etcd=leases,
        races=sum(log.count("was taken by another host") for log in logs),
    )


# --------------------------------------------------------------------------------------------
# The run


def _own_lease_key(lab: BenchLab, ns: str, prefix: str = PREFIX) -> str:
    """The lease key of the subnet an agent wrote to its subnet file."""
    env = (lab.node_dir(ns) / "subnet.env").read_text()
    subnet = IPv4Network(env.split("FLANNEL_SUBNET=")[1].split()[0], strict=False)
    return f"{prefix}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def run(
    leases: int = 5000,
    agents: int = 50,
    *,
    churn_events: int = 400,
    churn_rate: float = 80.0,
    seed: int = 1,
    kube: bool = True,
) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, bpffs)")
    if not 1 <= leases <= MAX_LEASES:
        raise BenchError(f"--leases must be 1..{MAX_LEASES}")
    if not 1 <= agents <= MAX_ALLOC_AGENTS:
        raise BenchError(f"--agents must be 1..{MAX_ALLOC_AGENTS}")
    rng = random.Random(seed)
    tag = f"fbcp{uuid.uuid4().hex[:5]}"
    lab = BenchLab(tag, Path(tempfile.mkdtemp(prefix=f"{tag}-")))
    report = Report()
    report.env = {
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "kernel": os.uname().release,
        "leases": leases,
        "alloc_agents": agents,
        "churn_events": churn_events,
        "churn_rate_per_s": churn_rate,
    }
    try:
        lab.setup()
        assert lab.client is not None
        client = lab.client
        config = {
            "Network": str(NETWORK),
            "SubnetLen": SUBNET_LEN,
            "Backend": {"Type": "vxlan", "VNI": VNI},
        }
        client.put(f"{PREFIX}/config", json.dumps(config))
        peers = make_peers(leases, PEER_BASE, series=0)
        lease_id = client.grant(ETCD_LEASE_TTL)
        t = time.monotonic()
        client.txn(((p.key(), p.value()) for p in peers), (), lease_id)
        written = client.count(f"{PREFIX}/subnets/")
        if written != leases:
            raise BenchError(f"wrote {leases} leases, etcd holds {written}")
        report.env["bulk_write_s"] = round(time.monotonic() - t, 3)

        flanneld = _flanneld_phase(lab, report, peers)
        _bpf_phase(lab, report, peers, lease_id, churn_events, churn_rate, rng, flanneld)
        _kernel_phase(lab, report, peers)
        _netlink_phase(lab, report, peers)
        _compile_phase(report)
        _alloc_phase(lab, report, agents)
        if kube:
            _kube_phase(lab, report, peers)
    finally:
        lab.close()
    return report.as_dict()


def _bpf_phase(
    lab: BenchLab,
    report: Report,
    peers: list[PeerLease],
    lease_id: int,
    churn_events: int,
    churn_rate: float,
    rng: random.Random,
    flanneld: FlanneldFigures,
) -> None:
    assert lab.client is not None
    n = len(peers)
    starts = _bpf_starts_only(lab, peers, STARTUP_RUNS - 1)
    ns = lab.add_host("n1", "198.18.0.11")
    agent, remotes, up = start_bpf_agent(lab, ns, peers)
    starts.append(up.programmed_s)
    programmed = statistics.median(starts)
    try:
        between = (
            f"; first entry at {up.first_entry_s:.3f} s"
            + (f", ready logged at {up.ready_s:.3f} s" if up.ready_s is not None else "")
            + (
                f", 'BPF remotes reconciled' logged at {up.reconciled_s:.3f} s"
                if up.reconciled_s is not None
                else ""
            )
        )
        report.add(
            f"{n:,} peers programmed after agent start",
            "bpf",
            programmed,
            "s",
            f"median of {len(starts)} starts ({', '.join(f'{x:.3f}' for x in starts)} s), each "
            f"programming every peer from nothing; the last in detail: fb_remotes holds "
            f"{up.counts['fb_remotes']} entries{between}",
        )
        if up.ready_s is not None:
            report.add(
                "agent logged ready after start", "bpf", up.ready_s, "s", "'flannel is ready'"
            )
        _report_phases(report, up)
        report.add(
            "fb_remotes fill (first to last entry)",
            "bpf",
            up.programmed_s - up.first_entry_s,
            "s",
            "one sweep, written only after every peer's kernel entries: when fb_remotes is "
            "full, routes, neighbours and FDB entries are too",
        )
        report.targets.append(
            Target(
                f"{n:,} peers programmed after agent start (BPF)",
                round(programmed, 3),
                "s",
                "<= 1 s",
                programmed <= 1.0,
                f"median of {len(starts)} starts, slowest {max(starts):.2f} s; agent ready at "
                f"{up.ready_s or math.nan:.2f} s; {flanneld.programmed_note(programmed)}",
            )
        )
        report.targets.append(
            Target(
                f"{n:,} peers programmed after start: flanneld's time / ours",
                round(flanneld.programmed_s / programmed, 2) if programmed else 0.0,
                "x",
                "> 1 (ahead of flanneld)",
                flanneld.programmed_s > programmed,
                f"flanneld {flanneld.programmed_s:.2f} s, flannel-bpf {programmed:.2f} s (BPF), "
                "medians of this run",
            )
        )

        time.sleep(1.0)
        result = churn(lab, remotes, peers, lease_id, churn_events, churn_rate, rng)
        _report_churn(report, result)
        time.sleep(1.0)

        assert agent.pid is not None
        mem = memory_of(agent.pid)
        _report_memory(report, "bpf", n, mem)
        report.targets.append(
            Target(
                f"agent RSS at {n:,} peers (BPF)",
                round(mem.rss_kb / 1024, 1),
                "MB",
                "<= 80 MB",
                mem.rss_kb / 1024 <= 80,
                f"flanneld {flanneld.rss_mb:.1f} MB in this run; {mem.bcc_llvm_kb / 1024:.1f} MB "
                f"resident in libbcc/LLVM/clang mappings",
            )
        )

        originals = {q.subnet for q in peers}
        present = [p for p in result.final.values() if p.subnet in originals] or list(
            result.final.values()
        )
        noise = renewal_noise(
            lab, agent, lab.node_dir(ns) / "status.json", present[:50], lease_id, 50
        )
        traced = (
            f"; strace: {noise.map_updates} BPF_MAP_UPDATE_ELEM, {noise.netlink_writes} "
            f"RTM_NEWNEIGH/RTM_NEWROUTE requests"
            if noise.traced
            else "; strace not available"
        )
        report.add(
            "renewals that made the agent reprogram",
            "bpf",
            noise.status_rewrites,
            "of " + str(noise.renewals),
            f"renewal-only stream at 50/s; counted as status-file rewrites (one per applied "
            f"batch){traced}",
        )
        restore = _restore(lab, peers, result.final, lease_id)
        report.env["restored_after_churn"] = restore
    finally:
        remotes.close()
        lab.stop_agents([agent])
        _remove_bpf_node(lab, ns)


def _bpf_starts_only(lab: BenchLab, peers: Sequence[PeerLease], runs: int) -> list[float]:
    """Seconds from start until every peer is in fb_remotes, for agents each started in a fresh
    namespace with no pins, stopped and removed before the next: start-up only."""
    starts = []
    for run in range(runs):
        ns = lab.add_host(f"s{run}", f"198.18.0.{21 + run}")
        try:
            agent, remotes, up = start_bpf_agent(lab, ns, peers)
            remotes.close()
            lab.stop_agents([agent])
            starts.append(up.programmed_s)
        finally:
            _remove_bpf_node(lab, ns)
    return starts


def _remove_bpf_node(lab: BenchLab, ns: str) -> None:
    """Its pins, its namespace, and its lease: the next agent must see exactly the fake peers."""
    assert lab.client is not None
    own = _own_lease_key(lab, ns) if (lab.node_dir(ns) / "subnet.env").exists() else None
    lab.bpf_cleanup(ns)
    lab.remove_netns(ns)
    if own is not None:
        lab.client.delete(own)


def _restore(
    lab: BenchLab,
    peers: Sequence[PeerLease],
    final: dict[IPv4Network, PeerLease],
    lease_id: int,
) -> int:
    """Put the lease set back to the original peers, so the kernel run starts from the same."""
    assert lab.client is not None
    wanted = {p.subnet: p for p in peers}
    puts = [(p.key(), p.value()) for s, p in wanted.items() if s not in final]
    deletes = [p.key() for s, p in final.items() if s not in wanted]
    lab.client.txn(puts, deletes, lease_id)
    return len(puts) + len(deletes)


def _report_churn(report: Report, result: ChurnResult) -> None:
    lat = [s.latency_ms for s in result.samples]
    missed = sum(1 for x in lat if math.isinf(x))
    early = sum(1 for x in result.samples if x.t_seen < x.t_returned)
    rate = (len(result.samples) + result.renewals) / result.seconds if result.seconds else 0.0
    context = (
        f"{len(result.samples)} adds/removes + {result.renewals} renewals in "
        f"{result.seconds:.1f} s ({rate:.0f}/s); {missed} not programmed within "
        f"{EVENT_TIMEOUT:.0f} s; {early} seen before the write returned (counted as 0)"
    )
    for kind in ("add", "remove"):
        values = [s.latency_ms for s in result.samples if s.kind == kind]
        if not values:
            continue
        report.add(
            f"lease {kind} -> fb_remotes p50",
            "bpf",
            percentile(values, 50),
            "ms",
            f"{len(values)} events",
        )
        report.add(
            f"lease {kind} -> fb_remotes p99",
            "bpf",
            percentile(values, 99),
            "ms",
            f"{len(values)} events; max {max(values):.2f} ms",
        )
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    report.add("lease event -> fb_remotes p50", "bpf", p50, "ms", context)
    report.add("lease event -> fb_remotes p99", "bpf", p99, "ms", context)
    report.add("lease event -> fb_remotes max", "bpf", max(lat, default=math.nan), "ms", context)
    report.targets.append(
        Target(
            "lease event to programmed p99 (BPF)",
            round(p99, 2),
            "ms",
            "<= 20 ms",
            p99 <= 20.0,
            f"p50 {p50:.2f} ms; measured from the etcd write returning; {context}",
        )
    )


def _compile_phase(report: Report) -> None:
    """The start-up above loads cached bytecode. The cache lives on /run, so the first start
    after a reboot, or after an upgrade that changes bpf/, compiles first: this long."""
    every_program = tuple(name for wire in WIRE_FORMATS.values() for name in wire.programs)
    with tempfile.TemporaryDirectory(prefix="fbcp-cache-") as cache:
        started = time.monotonic()
        objects(program_source(), every_program, cache_dir=Path(cache))
        elapsed = time.monotonic() - started
    report.add(
        "bcc compile, cold cache (first start after boot)",
        "bpf",
        elapsed,
        "s",
        f"all {len(every_program)} programs, in a child process; every start above found them "
        "cached (/run/flannel-bpf/cache, per source and kernel)",
    )


def _report_phases(report: Report, up: Startup) -> None:
    if up.setup_s is not None:
        what = "flannel.1 plus bcc load, attach" if up.path == "bpf" else "flannel.1"
        report.add(
            "vxlan set-up before leasing",
            up.path,
            up.setup_s,
            "s",
            f"log 'VXLAN config' to 'Picking subnet': {what}; the lease listing alongside",
        )
    if up.ready_s is not None:
        report.add(
            "ready -> all peers programmed",
            up.path,
            up.programmed_s - up.ready_s,
            "s",
            "per peer neighbour + FDB + route (batched rtnetlink requests)"
            + (", then fb_remotes" if up.path == "bpf" else "")
            + "; the lease listing was read during set-up (kernel: time spent, rows below)",
        )


def _report_memory(report: Report, path: str, n: int, mem: Memory) -> None:
    report.add(f"agent VmRSS at {n:,} peers", path, mem.rss_kb / 1024, "MB", mem.note())
    report.add(f"agent VmHWM at {n:,} peers", path, mem.hwm_kb / 1024, "MB", "peak resident")
    report.add(
        "agent RSS in libbcc/LLVM/clang mappings",
        path,
        mem.bcc_llvm_kb / 1024,
        "MB",
        "file-backed pages of the compiler libraries the agent keeps mapped",
    )


@dataclass(frozen=True)
class FlanneldFigures:
    programmed_s: float  # median of STARTUP_RUNS starts
    rss_mb: float

    def programmed_note(self, ours: float) -> str:
        ratio = self.programmed_s / ours if ours else math.nan
        return f"flanneld {self.programmed_s:.2f} s in this run ({ratio:.1f}x ours)"


def _flanneld_phase(lab: BenchLab, report: Report, peers: list[PeerLease]) -> FlanneldFigures:
    """The real flanneld on the same leases: started STARTUP_RUNS times, each in a fresh
    namespace, until its routes, neighbours and FDB entries cover every peer; memory of the
    last at steady state."""
    assert lab.client is not None
    n = len(peers)
    starts: list[float] = []
    mem: Memory | None = None
    counts: dict[str, int] = {}
    for run_no in range(STARTUP_RUNS):
        ns = lab.add_host(f"f{run_no}", f"198.18.0.{31 + run_no}")
        agent: AgentProcess | None = None
        try:
            agent, up = start_kernel_agent(lab, ns, peers, program=FLANNELD)
            starts.append(up.programmed_s)
            counts = up.counts
            if run_no == STARTUP_RUNS - 1:
                time.sleep(2.0)
                assert agent.pid is not None
                mem = memory_of(agent.pid)
        finally:
            if agent is not None:
                lab.stop_agents([agent])
            own = _own_lease_key(lab, ns) if (lab.node_dir(ns) / "subnet.env").exists() else None
            lab.remove_netns(ns)
            if own is not None:
                lab.client.delete(own)
    assert mem is not None
    programmed = statistics.median(starts)
    report.add(
        f"{n:,} peers programmed after agent start",
        FLANNELD,
        programmed,
        "s",
        f"the real flanneld {flanneld_version()}: median of {len(starts)} starts "
        f"({', '.join(f'{x:.3f}' for x in starts)} s); routes {counts.get('routes')}, "
        f"neighbours {counts.get('neighbours')}, FDB {counts.get('fdb')} on {DEVICE}",
    )
    report.add(f"agent VmRSS at {n:,} peers", FLANNELD, mem.rss_kb / 1024, "MB", mem.note())
    report.add(f"agent VmHWM at {n:,} peers", FLANNELD, mem.hwm_kb / 1024, "MB", "peak resident")
    return FlanneldFigures(programmed, mem.rss_kb / 1024)


def _kube_phase(lab: BenchLab, report: Report, peers: list[PeerLease]) -> None:
    """Kubernetes mode at scale: the same peers as Node objects (podCIDR and flannel's
    annotations, as flanneld writes them) in a real kube-apiserver v1.36 on etcd 3.6; flannel-bpf
    (BPF) and the real flanneld each started as one more Node until every peer is programmed."""
    from flannel_bpf.lab.etcd import EtcdMember
    from flannel_bpf.lab.kube import ControlPlane
    from flannel_bpf.lab.peers import peer

    n = len(peers)
    etcd_ns = lab.ns("etcd")
    member = EtcdMember("kube0", lab.workdir / "kube-etcd" / "data", ETCD_IP, 2479, 2480,
                        netns=etcd_ns, binary=peer("etcd").binary("etcd"))  # fmt: skip
    control_plane = ControlPlane(lab.workdir / "kube", etcd_ns, ETCD_IP, member.endpoint,
                                 cluster_cidr=str(NETWORK))  # fmt: skip
    try:
        member.start()
        member.wait_ready(30)
        control_plane.start(controller_manager=False)
        net_conf = lab.workdir / "net-conf.json"
        net_conf.write_text(json.dumps({"Network": str(NETWORK), "Backend": {"Type": "vxlan"}}))
        access = KubeAccess(control_plane.admin_kubeconfig, net_conf)
        t = time.monotonic()
        for start in range(0, n, 500):
            items = [_peer_node(f"peer-{start + i:05d}", p) for i, p in
                     enumerate(peers[start : start + 500])]  # fmt: skip
            control_plane.kubectl("create", "-f", "-", timeout=600, input=json.dumps(
                {"apiVersion": "v1", "kind": "List", "items": items}))  # fmt: skip
        report.env["kube_nodes_created_s"] = round(time.monotonic() - t, 2)

        def agent_node(name: str, index: int, address: str) -> str:
            ns = lab.add_host(name, address)
            subnet = f"{NETWORK.network_address + (index << 8)}/{SUBNET_LEN}"
            control_plane.kubectl("create", "-f", "-", input=json.dumps({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": ns, "annotations": {"example.com/kubelet": "true"}},
                "spec": {"podCIDR": subnet, "podCIDRs": [subnet]},
            }))  # fmt: skip
            return ns

        ns = agent_node("k1", 1, "198.18.0.41")
        agent, remotes, up = start_bpf_agent(lab, ns, peers, kube=access)
        try:
            time.sleep(2.0)
            assert agent.pid is not None
            mem = memory_of(agent.pid)
        finally:
            remotes.close()
            lab.stop_agents([agent])
            lab.bpf_cleanup(ns)
        report.add(f"{n:,} Nodes: peers programmed after agent start", "kube:bpf",
                   up.programmed_s, "s", f"fb_remotes holds {up.counts['fb_remotes']}; first "
                   f"entry at {up.first_entry_s:.3f} s; one paged list of the Nodes (250 a page) "
                   "and the programming")  # fmt: skip
        report.add(f"agent VmRSS at {n:,} Nodes", "kube:bpf", mem.rss_kb / 1024, "MB", mem.note())

        ns_f = agent_node("k2", 2, "198.18.0.42")
        fagent, fup = start_kernel_agent(lab, ns_f, peers, program=FLANNELD, kube=access)
        try:
            time.sleep(2.0)
            assert fagent.pid is not None
            fmem = memory_of(fagent.pid)
        finally:
            lab.stop_agents([fagent])
        report.add(f"{n:,} Nodes: peers programmed after agent start", "kube:flanneld",
                   fup.programmed_s, "s", f"the real flanneld {flanneld_version()} "
                   f"--kube-subnet-mgr: routes {fup.counts.get('routes')}, neighbours "
                   f"{fup.counts.get('neighbours')}, FDB {fup.counts.get('fdb')}")  # fmt: skip
        report.add(f"agent VmRSS at {n:,} Nodes", "kube:flanneld", fmem.rss_kb / 1024, "MB",
                   fmem.note())  # fmt: skip
        ours, theirs = up.programmed_s, fup.programmed_s
        report.targets.append(Target(
            f"{n:,} Nodes: peers programmed after start (kube mode, BPF)", round(ours, 3), "s",
            "<= 2 s and ahead of flanneld", ours <= 2.0 and ours < theirs,
            f"flanneld {theirs:.2f} s in this run ({theirs / ours:.1f}x ours)",
        ))  # fmt: skip
        report.targets.append(Target(
            f"agent RSS at {n:,} Nodes (kube mode, BPF)", round(mem.rss_kb / 1024, 1), "MB",
            "<= 80 MB", mem.rss_kb / 1024 <= 80,
            f"flanneld {fmem.rss_kb / 1024:.1f} MB in this run",
        ))  # fmt: skip
    finally:
        control_plane.stop()
        member.stop()


def _peer_node(name: str, p: PeerLease) -> dict[str, Any]:
    prefix = "flannel.alpha.coreos.com/"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "annotations": {
            prefix + "backend-data": f'{{"VNI":{VNI},"VtepMAC":"{p.mac}"}}',
            prefix + "backend-type": "vxlan",
            prefix + "kube-subnet-manager": "true",
            prefix + "public-ip": str(p.public_ip),
        }},
        "spec": {"podCIDR": str(p.subnet), "podCIDRs": [str(p.subnet)]},
    }  # fmt: skip


def flanneld_version() -> str:
    from flannel_bpf.lab.peers import peer

    return peer("flanneld").version


def _kernel_phase(lab: BenchLab, report: Report, peers: list[PeerLease]) -> None:
    assert lab.client is not None
    n = len(peers)
    held = lab.client.count(f"{PREFIX}/subnets/")
    if held != n:
        raise BenchError(f"before the kernel run etcd holds {held} leases, expected {n}")
    ns = lab.add_host("n2", "198.18.0.12")
    agent, up = start_kernel_agent(lab, ns, peers)
    try:
        report.add(
            f"{n:,} peers programmed after agent start",
            "kernel",
            up.programmed_s,
            "s",
            f"routes {up.counts['routes']}, neighbours {up.counts['neighbours']}, FDB "
            f"{up.counts['fdb']} on {DEVICE}; first route at {up.first_entry_s:.3f} s"
            + (f", ready logged at {up.ready_s:.3f} s" if up.ready_s is not None else ""),
        )
        if up.ready_s is not None:
            report.add(
                "agent logged ready after start", "kernel", up.ready_s, "s", "'flannel is ready'"
            )
        _report_phases(report, up)
        time.sleep(2.0)
        assert agent.pid is not None
        _report_memory(report, "kernel", n, memory_of(agent.pid))
    finally:
        lab.stop_agents([agent])
        own = _own_lease_key(lab, ns) if (lab.node_dir(ns) / "subnet.env").exists() else None
        lab.remove_netns(ns)
        if own is not None:
            lab.client.delete(own)


def _alloc_phase(lab: BenchLab, report: Report, agents: int) -> None:
    result = alloc_storm(lab, agents)
    distinct = len(set(result.subnets))
    imports = [x for x in result.imports_s if not math.isnan(x)]
    allocated = [x for x in result.allocated_s if not math.isnan(x)]
    report.add(
        f"{agents} alloc agents: all subnet files written",
        "alloc",
        result.total_s,
        "s",
        f"started at once, from the first agent's start; {distinct} distinct subnets of "
        f"{agents}, {result.leases_in_etcd} leases in etcd, {result.races} lost creation races "
        f"retried",
    )
    report.add(
        "alloc agent start -> subnet file p50",
        "alloc",
        percentile(result.per_agent_s, 50),
        "s",
        f"per agent, from its own process start; p50 to its first log line (interpreter and "
        f"imports) {percentile(imports, 50):.2f} s, to 'Allocated lease' "
        f"{percentile(allocated, 50):.2f} s",
    )
    report.add(
        "alloc agent start -> subnet file p99",
        "alloc",
        percentile(result.per_agent_s, 99),
        "s",
        f"max {max(result.per_agent_s):.2f} s",
    )
    report.add(
        "one alloc agent alone: start -> subnet file",
        "alloc",
        result.solo_s,
        "s",
        f"baseline with the CPUs to itself ({os.cpu_count()} CPUs on this host)",
    )
    report.add("alloc distinct subnets", "alloc", distinct, f"of {agents}", "must equal agents")
    if distinct != agents or result.leases_in_etcd != agents:
        raise BenchError(
            f"alloc: {distinct} distinct subnets and {result.leases_in_etcd} leases "
            f"for {agents} agents"
        )


# --------------------------------------------------------------------------------------------
# The kernel's own cost of a peer's entries


async def _timed(nl: RtnlBatch, requests: list[NlRequest]) -> float:
    """Seconds the kernel took for requests (answered inside send(): the agent's own batching)."""
    started = time.perf_counter()
    replies = await nl.run(requests)
    elapsed = time.perf_counter() - started
    failed = [r.error for r in replies if r.error]
    if failed:
        raise BenchError(f"{len(failed)} of {len(requests)} netlink requests failed: {failed[0]}")
    return elapsed


async def _entry_costs(peers: Sequence[PeerLease], oif: int) -> dict[str, float]:
    """Each kind of entry for every peer, the way the agent writes them, one kind after the
    other; flanneld's routes in slices, to show their cost growing with the routes in place."""
    tenth = max(1, len(peers) // 10)
    costs: dict[str, float] = {}
    async with RtnlBatch() as nl:
        costs["neighbours"] = await _timed(
            nl,
            [rtnl_batch.neigh_request(True, oif, p.subnet.network_address, p.mac) for p in peers],
        )
        costs["fdb"] = await _timed(
            nl, [rtnl_batch.fdb_request(True, oif, p.mac, p.public_ip) for p in peers]
        )
        routes = [
            rtnl_batch.route_request(True, p.subnet, p.subnet.network_address, oif) for p in peers
        ]
        costs["routes_first_tenth"] = await _timed(nl, routes[:tenth])
        costs["routes_middle"] = await _timed(nl, routes[tenth:-tenth])
        costs["routes_last_tenth"] = await _timed(nl, routes[-tenth:])
        await _timed(
            nl,
            [
                rtnl_batch.route_request(False, p.subnet, p.subnet.network_address, oif)
                for p in peers
            ],
        )
        # One nexthop object per peer, its ID the subnet's address: unique, as a peer's gateway.
        costs["nexthops"] = await _timed(
            nl,
            [
                rtnl_batch.nexthop_request(int(p.subnet.network_address), p.subnet[0], oif)
                for p in peers
            ],
        )
        costs["routes_by_nexthop"] = await _timed(
            nl,
            [
                rtnl_batch.route_by_nexthop_request(p.subnet, int(p.subnet.network_address))
                for p in peers
            ],
        )
    return costs


def _netlink_phase(lab: BenchLab, report: Report, peers: list[PeerLease]) -> None:
    """No agent: the kernel's time for the entries behind '5,000 peers programmed', the floor
    of that number, and why routes dominate it."""
    n, tenth = len(peers), max(1, len(peers) // 10)
    ns = lab.add_host("nl", "198.18.0.13")
    try:
        sh(["ip", "-n", ns, "link", "add", DEVICE, "type", "vxlan", "id", str(VNI), "local",
            "198.18.0.13", "dev", "eth1", "dstport", "8472", "nolearning"])  # fmt: skip
        sh(["ip", "-n", ns, "link", "set", DEVICE, "up"])
        oif = int(sh(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{DEVICE}/ifindex"]))
        with entered(ns):
            costs = asyncio.run(_entry_costs(peers, oif))
    finally:
        lab.remove_netns(ns)

    def each(seconds: float, count: int) -> str:
        return f"{seconds / count * 1e6:.1f} us each"

    report.add(f"kernel: {n:,} neighbour entries", "netlink", costs["neighbours"] * 1e3, "ms",
               each(costs["neighbours"], n))  # fmt: skip
    report.add(f"kernel: {n:,} FDB entries", "netlink", costs["fdb"] * 1e3, "ms",
               each(costs["fdb"], n))  # fmt: skip
    routes = costs["routes_first_tenth"] + costs["routes_middle"] + costs["routes_last_tenth"]
    report.add(
        f"kernel: {n:,} routes via on-link gateways (flanneld's)",
        "netlink",
        routes * 1e3,
        "ms",
        f"first {tenth:,}: {each(costs['routes_first_tenth'], tenth)}, last {tenth:,}: "
        f"{each(costs['routes_last_tenth'], tenth)}. Each route's gateway is its own, and the "
        "kernel's fib_info hash leaves gateways out: every new route walks all the others",
    )
    report.add(
        f"kernel: {n:,} nexthop objects + routes by nhid (not used)",
        "netlink",
        (costs["nexthops"] + costs["routes_by_nexthop"]) * 1e3,
        "ms",
        f"nexthops {each(costs['nexthops'], n)}, routes {each(costs['routes_by_nexthop'], n)}; "
        "the same forwarding, but not the route flanneld writes (docs/decisions.md)",
    )


# --------------------------------------------------------------------------------------------
# Command line


def format_report(result: dict[str, Any]) -> str:
    lines = [f"{'METRIC':<46} {'PATH':<7} {'VALUE':>10} {'UNIT':<6} NOTE"]
    for row in result["rows"]:
        lines.append(
            f"{row['metric']:<46} {row['path']:<7} {row['value']:>10.3f} {row['unit']:<6} "
            f"{row['note']}"
        )
    lines += ["", "targets:"]
    for t in result["targets"]:
        verdict = "MET" if t["met"] else "MISSED"
        lines.append(
            f"  {verdict:<7} {t['name']}: {t['value']} {t['unit']} (limit {t['limit']}) {t['note']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.control_plane", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--leases", type=int, default=5000, help="vxlan peers in etcd")
    parser.add_argument("--agents", type=int, default=50, help="alloc agents started at once")
    parser.add_argument("--churn-events", type=int, default=400)
    parser.add_argument("--churn-rate", type=float, default=80.0, help="events per second")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-kube", action="store_true", help="leave out the Kubernetes-mode rows")
    opts = parser.parse_args(argv)

    unwind_on_sigterm()  # unwinds through run()'s cleanup
    try:
        result = run(
            opts.leases,
            opts.agents,
            churn_events=opts.churn_events,
            churn_rate=opts.churn_rate,
            kube=not opts.no_kube,
        )
    except BenchError as exc:
        print(f"control_plane: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("control_plane: interrupted; everything it created was removed", file=sys.stderr)
        return 130
    print(format_report(result))
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwritten to {opts.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
