"""The BPF fast path under a kernel-visible flannel device: loading it for a backend.

The flannel device stays exactly as flanneld sets it up: flannel.<VNI> for vxlan (the fallback for
anything the programs pass on, and the receiver for vxlan.ko peers), flannel0 for udp (the
userspace plane behind it answers what the programs leave alone). The programs only take over
encapsulation and decapsulation of the traffic they recognise. See flannel_bpf/datapath/loader.py
for the life cycle.
"""

from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from pathlib import Path

from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.backends.base import BackendError
from flannel_bpf.datapath.bpf_maps import (
    FB_CFG_CHECK_SOURCES,
    FB_CFG_HOST_ROUTING,
    FB_MARK_VALIDATED,
    DatapathConfig,
    Remote,
)
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.datapath.loader import (
    BPFDatapath,
    Device,
    LoaderError,
    WireFormat,
    cleanup,
    default_ttl,
    ipv6_hop_limit,
    local_port_range,
    pin_dir_for,
)
from flannel_bpf.datapath.traffic_rules import (
    IptablesRules,
    RulesError,
    conntrack_be_liberal,
    host_routing_rules,
    remove_host_routing_rules,
)

log = logging.getLogger(__name__)


def datapath_config(
    iface: ExternalInterface,
    local_ip: IPv4Address | None,
    vni: int,
    port: int,
    uplink_mac: str,
    vtep: Device | None,
    anti_spoofing: bool = False,
    host_routing: bool = False,
    vtep6: Device | None = None,
) -> DatapathConfig:
    low, high = local_port_range()
    return DatapathConfig(
        local_ip=local_ip or IPv4Address(0),  # IPv6-only: no IPv4 frame is ours
        vni=vni,
        port=port,
        uplink_ifindex=iface.index,
        uplink_mac=uplink_mac,
        vtep_ifindex=vtep.index if vtep is not None else 0,
        vtep_mac=vtep.mac if vtep is not None else "00:00:00:00:00:00",
        sport_min=low,
        sport_max=high,
        ttl=default_ttl(),
        flags=(FB_CFG_CHECK_SOURCES if anti_spoofing else 0)
        | (FB_CFG_HOST_ROUTING if host_routing else 0),
        vtep6_ifindex=vtep6.index if vtep6 is not None else 0,
        local_ip6=iface.ext_v6_addr if vtep6 is not None else None,
        vtep6_mac=vtep6.mac if vtep6 is not None else "00:00:00:00:00:00",
        hop_limit=ipv6_hop_limit(iface.name),
    )


async def load_bpf_datapath(
    iface: ExternalInterface,
    vtep: Device | None,
    *,
    wire: WireFormat,
    local_ip: IPv4Address | None,
    port: int,
    bpffs: Path,
    decap_mode: str,
    vni: int = 0,
    anti_spoofing: bool = False,
    pod_bridge: str = "",
    vtep6: Device | None = None,
    pin_name: str = "",
) -> BPFDatapath:
    """Compile, load and attach (in a thread: compiling takes about a second).

    ``local_ip`` is the outer source and the only destination decapsulated: the public address
    for vxlan (what vxlan.ko binds), the interface address for udp (what flanneld's socket binds).
    An IPv6-only network has neither it nor ``vtep`` (flannel.<VNI>): vtep6 alone, and the pins
    stay under ``pin_name`` (flannel.<VNI>'s name), one directory whichever families run.
    """
    name = pin_name or (vtep or vtep6 or Device("", 0, "")).name
    if pod_bridge and vtep is None:
        raise LoaderError("host routing carries IPv4 pods only, and this network is IPv6-only")
    uplink_mac = await asyncio.to_thread(_mac_of, iface.index)
    datapath = BPFDatapath(
        vtep=vtep,
        uplink=Device(iface.name, iface.index, uplink_mac),
        config=datapath_config(
            iface, local_ip, vni, port, uplink_mac, vtep, anti_spoofing, bool(pod_bridge), vtep6
        ),
        pin_dir=pin_dir_for(name, bpffs),
        bpffs_root=bpffs,
        decap_mode=decap_mode,
        wire=wire,
        pod_bridge=pod_bridge,
        vtep6=vtep6,
    )
    try:
        state = await asyncio.to_thread(datapath.load)
    except OSError as exc:
        raise LoaderError(str(exc)) from None
    for what in state.replaced:
        log.info("replaced the running BPF program on %s in place", what)
    try:
        await asyncio.to_thread(_host_routing_rules, name, pod_bridge)
    except RulesError as exc:
        raise LoaderError(f"host routing: {exc}") from None
    if pod_bridge:
        log.info(
            "host routing: validated pod flows go between %s's veths and %s in BPF (%d veths now)",
            pod_bridge,
            iface.name,
            len(datapath.pod_ports),
        )
        log.warning(
            "host routing: packets of a validated flow skip the host's filter rules (iptables "
            "NetworkPolicy included) between validations; a flow is validated through them "
            "when it is established and again every second, so a rule that drops it takes "
            "effect within a second (docs/decisions.md section 7)"
        )
    if anti_spoofing:
        log.info(
            "anti-spoofing on: decapsulating only from underlay addresses holding a lease, "
            "inner sources inside their subnet"
        )
    return datapath


def reconcile_remotes(bpf: BPFDatapath, remotes: list[Remote]) -> None:
    """fb_remotes becomes exactly these (the lease snapshot), in one mark-and-sweep pass."""
    try:
        written, removed = bpf.sync_remotes(remotes)
    except (OSError, LoaderError) as exc:
        log.error("reconciling fb_remotes with the lease set failed: %s", exc)
        return
    log.info(
        "BPF remotes reconciled with %d leases: %d written, %d stale removed",
        len(remotes),
        written,
        removed,
    )


def update_remote(
    bpf: BPFDatapath, subnet: IPv4Network | IPv6Network, remote: Remote | None, fallback: str
) -> None:
    """Write a peer's fb_remotes entry, or delete it (None). A failure is logged, not raised: the
    backend's own entries for the peer are in place, and ``fallback`` carries it meanwhile."""
    try:
        if remote is None:
            bpf.delete_remote(subnet)
        else:
            bpf.set_remote(remote)
    except (OSError, LoaderError) as exc:
        log.error("fb_remotes update for %s failed (%s serves it): %s", subnet, fallback, exc)


async def remove_bpf_datapath(device: str, bpffs: Path) -> None:
    """Take down a BPF data path left on ``device`` by an earlier run that wanted one."""
    pin_dir = pin_dir_for(device, bpffs)
    if pin_dir.exists():
        for line in await asyncio.to_thread(cleanup, pin_dir):
            log.info("BPF data path not wanted: %s", line)
        await asyncio.to_thread(remove_host_routing_rules)


def _mac_of(index: int) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link("get", index=index)
    mac = links[0].get_attr("IFLA_ADDRESS") if links else None
    if not mac:
        raise BackendError(f"interface {index} has no MAC address")
    return str(mac).lower()


async def keep_pod_ports(bpf: BPFDatapath, interval: float = 1.0) -> None:
    """Host routing: every interval, new pods' veths get the programs (a pod's first packets
    take the long way until then, which is always correct)."""
    while True:
        await asyncio.sleep(interval)
        try:
            attached = await asyncio.to_thread(bpf.refresh_pod_ports)
        except (OSError, LoaderError, NetlinkError) as exc:
            log.warning("host routing: checking %s's veths failed: %s", bpf.pod_bridge, exc)
            continue
        if attached:
            log.info("host routing on new pod veths: %s", ", ".join(attached))


def host_routing_keeper(bpf: BPFDatapath) -> IptablesRules:
    return IptablesRules(
        host_routing_rules(bpf.vtep.name if bpf.vtep else "", bpf.pod_bridge, FB_MARK_VALIDATED),
        "host routing",
    )


def _host_routing_rules(vtep: str, pod_bridge: str) -> None:
    """The mangle rules that validate flows, in place when host routing is on, gone when off."""
    if not pod_bridge:
        remove_host_routing_rules()
        return
    IptablesRules(host_routing_rules(vtep, pod_bridge, FB_MARK_VALIDATED), "host routing").apply()
    if conntrack_be_liberal():
        log.info("host routing: set net.netfilter.nf_conntrack_tcp_be_liberal=1 (segments that "
                 "follow a stretch carried in BPF are out of conntrack's window)")  # fmt: skip
