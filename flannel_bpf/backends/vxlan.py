"""vxlan: flanneld's kernel VXLAN backend (pkg/backend/vxlan, flannel-compat.md section 5.1).

The device setup (:func:`ensure_vxlan_device`, :func:`configure_vxlan_device`) and the per-peer
programming (:class:`VXLANNetwork`) do not need a lease manager, so tests can drive them in a
network namespace without etcd; :class:`VXLANBackend` only glues them to the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import socket
from collections.abc import Coroutine, Hashable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.backends.base import Backend, BackendError, Network
from flannel_bpf.backends.bpf_fastpath import (
    host_routing_keeper,
    keep_pod_ports,
    load_bpf_datapath,
    reconcile_remotes,
    remove_bpf_datapath,
    update_remote,
)
from flannel_bpf.backends.vxlan_userspace import start_vxlan_userspace_dataplane
from flannel_bpf.datapath.bpf_maps import FB_REMOTE_IPV6_UNDERLAY, FB_REMOTE_SKIP, Remote
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.datapath.loader import VXLAN as VXLAN_WIRE
from flannel_bpf.datapath.loader import BPFDatapath, Device, LoaderError
from flannel_bpf.datapath.rtnl_batch import (
    LOOKUP_BUFFER,
    NlRequest,
    RtnlBatch,
    fdb_request,
    neigh_request,
    neigh_use_request,
    one_route_without_gateway,
    route_get_request,
    route_next_hop,
    route_request,
)
from flannel_bpf.datapath.vxlan_wire import (
    DEFAULT_VXLAN_PORT,
    VXLAN_OVERHEAD,
    parse_mac,
    random_mac,
)
from flannel_bpf.subnet.config import BackendConfig
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType
from flannel_bpf.subnet.manager import Manager

log = logging.getLogger(__name__)

BACKEND_TYPE = "vxlan"
IPV6_CONF_DIR = Path("/proc/sys/net/ipv6/conf")
# How often the underlay next hops of IPv4 VTEPs carrying IPv6 subnets are asked for again.
UNDERLAY_NEIGH_PERIOD = 10.0


@dataclass(frozen=True)
class VXLANConfig:
    """The Linux keys of the Backend object; flanneld decodes them into a Go struct."""

    vni: int = 1
    port: int = 0  # 0: not sent, the kernel's udp_port module parameter (8472) applies
    mtu: int = 0  # underlay MTU; 0: the external interface's
    gbp: bool = False
    learning: bool = False
    direct_routing: bool = False

    @property
    def udp_port(self) -> int:
        """The port on the wire: Port, or vxlan.ko's default when flanneld leaves it out."""
        return self.port or DEFAULT_VXLAN_PORT

    @property
    def device_name(self) -> str:
        return f"flannel.{self.vni}"

    @property
    def device_name_v6(self) -> str:
        return f"flannel-v6.{self.vni}"

    def log_line(self) -> str:
        # Go's %v prints bools as true/false.
        def b(value: bool) -> str:
            return "true" if value else "false"

        return (
            f"VXLAN config: VNI={self.vni} Port={self.port} GBP={b(self.gbp)} "
            f"Learning={b(self.learning)} DirectRouting={b(self.direct_routing)}"
        )


def parse_vxlan_config(backend: BackendConfig) -> VXLANConfig:
    """Decode the options as Go's json.Unmarshal into flanneld's config struct would."""

    def int_key(key: str, default: int) -> int:
        value = backend.get(key)
        if value is None:
            return default
        # Go's int field takes integer literals only: no fraction, no exponent, no bools.
        if isinstance(value, bool) or not isinstance(value, int):
            raise BackendError(
                f"error decoding VXLAN backend config: cannot unmarshal {value!r} into "
                f"Go struct field .{key} of type int"
            )
        return int(value)

    def bool_key(key: str) -> bool:
        value = backend.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise BackendError(
                f"error decoding VXLAN backend config: cannot unmarshal {value!r} into "
                f"Go struct field .{key} of type bool"
            )
        return value

    return VXLANConfig(
        vni=int_key("VNI", 1),
        port=int_key("Port", 0),
        mtu=int_key("MTU", 0),
        gbp=bool_key("GBP"),
        learning=bool_key("Learning"),
        direct_routing=bool_key("DirectRouting"),
    )


@dataclass(frozen=True)
class PeerVtep:
    """What a peer's vxlan lease tells us for one family: where its VTEP is and which MAC
    terminates it (flannel.<VNI>'s for IPv4, flannel-v6.<VNI>'s for IPv6)."""

    subnet: IPv4Network | IPv6Network
    public_ip: IPv4Address | IPv6Address
    mac: str
    # IPv6 only: the peer's IPv4 VTEP (PublicIP, flannel.<VNI>'s VtepMAC), where the BPF
    # programs send its IPv6 subnet's packets (fb_remotes6); None when it has no IPv4 half.
    carrier: tuple[IPv4Address, str] | None = None


def peer_vtep(lease: Lease) -> PeerVtep:
    """Decode a peer's BackendData (flanneld's vxlanLeaseAttrs); ValueError when unusable."""
    return PeerVtep(lease.subnet, lease.attrs.public_ip, _vtep_mac(lease.attrs.backend_data))


def peer_vtep_v6(lease: Lease) -> PeerVtep | None:
    """The IPv6 half of a peer's lease (its IPv6 subnet, PublicIPv6 and BackendV6Data), or None
    when the peer has no IPv6 (a single-stack node); ValueError when present but unusable."""
    if lease.ipv6_subnet is None or lease.ipv6_subnet.prefixlen == 0:
        return None
    if lease.attrs.public_ipv6 is None:
        raise ValueError(f"the lease of {lease.ipv6_subnet} has no PublicIPv6")
    try:
        mac = _vtep_mac(lease.attrs.backend_v6_data)
    except ValueError as exc:
        raise ValueError(f"BackendV6Data: {exc}") from None
    carrier = None
    if lease.subnet.prefixlen and not lease.attrs.public_ip.is_unspecified:
        # A bad IPv4 half is reported where it is programmed.
        with contextlib.suppress(ValueError):
            carrier = (lease.attrs.public_ip, _vtep_mac(lease.attrs.backend_data))
    return PeerVtep(lease.ipv6_subnet, lease.attrs.public_ipv6, mac, carrier)


def _vtep_mac(backend_data: bytes) -> str:
    try:
        data = json.loads(backend_data) if backend_data else None
    except ValueError as exc:
        raise ValueError(f"BackendData is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"BackendData is not an object: {backend_data!r}")
    # Receivers read only VtepMAC, but Go still fails the whole decode on a mistyped VNI.
    vni = _go_get(data, "VNI")
    if vni is not None and (isinstance(vni, bool) or not isinstance(vni, int) or vni < 0):
        raise ValueError(f"VNI is not an unsigned integer: {vni!r}")
    mac = _go_get(data, "VtepMAC")
    if mac is None:
        raise ValueError("VtepMAC is missing")
    if not isinstance(mac, str):
        raise ValueError(f"VtepMAC is not a string: {mac!r}")
    return parse_mac(mac)


def remote_entry(peer: PeerVtep, direct: bool) -> Remote:
    """A peer as fb_remotes (or, for its IPv6 subnet, fb_remotes6) holds it: its IPv4 VTEP,
    and for an IPv6 subnet its PublicIPv6 (whose flannel-v6 frames decapsulation checks); the
    IPv6 subnet of a peer without IPv4 goes over the IPv6 underlay to its PublicIPv6 and
    flannel-v6 MAC; direct-routing peers are left to the kernel."""
    flags = FB_REMOTE_SKIP if direct else 0
    if isinstance(peer.public_ip, IPv4Address):
        return Remote(peer.subnet, peer.public_ip, peer.mac, flags)
    if peer.carrier is None:
        flags = flags or FB_REMOTE_IPV6_UNDERLAY
        return Remote(peer.subnet, IPv4Address(0), peer.mac, flags, peer.public_ip)
    return Remote(peer.subnet, peer.carrier[0], peer.carrier[1], flags, peer.public_ip)


def _go_get(obj: dict[str, Any], key: str) -> Any:
    found = None
    for name, value in obj.items():
        if name.lower() == key.lower() and value is not None:
            found = value
    return found


# --------------------------------------------------------------------------------------------
# The device


@dataclass(frozen=True)
class VtepDevice:
    name: str
    index: int
    mac: str
    mtu: int


def _linkinfo(msg: Any) -> tuple[str | None, dict[str, Any]]:
    info = msg.get_attr("IFLA_LINKINFO")
    if info is None:
        return None, {}
    kind = info.get_attr("IFLA_INFO_KIND")
    data = info.get_attr("IFLA_INFO_DATA")
    attrs: dict[str, Any] = {}
    if data is not None and not isinstance(data, str | bytes):
        attrs = {name: value for name, value in data["attrs"]}
    return kind, attrs


def _incompatibility(
    cfg: VXLANConfig, local: IPv4Address | IPv6Address, index: int, msg: Any
) -> str:
    """flanneld's vxlanLinksIncompat: "" when the existing device may be reused as is."""
    kind, data = _linkinfo(msg)
    if kind != "vxlan":
        return f"link type: vxlan vs {kind}"
    vni = data.get("IFLA_VXLAN_ID")
    if vni != cfg.vni:
        return f"vni: {cfg.vni} vs {vni}"
    link = int(data.get("IFLA_VXLAN_LINK") or 0)
    if index and link and link != index:
        return f"vtep (external) interface: {index} vs {link}"
    found = data.get("IFLA_VXLAN_LOCAL6" if local.version == 6 else "IFLA_VXLAN_LOCAL")
    if found and ip_address(found) != local:
        return f"vtep (external) IP: {local} vs {found}"
    if data.get("IFLA_VXLAN_GROUP"):
        return f"group address: <nil> vs {data['IFLA_VXLAN_GROUP']}"
    if int(data.get("IFLA_VXLAN_L2MISS") or 0):
        return "l2miss: false vs true"
    port = int(data.get("IFLA_VXLAN_PORT") or 0)
    if cfg.port > 0 and port > 0 and port != cfg.port:
        return f"port: {cfg.port} vs {port}"
    gbp = "IFLA_VXLAN_GBP" in data
    if gbp != cfg.gbp:
        return f"gbp: {str(cfg.gbp).lower()} vs {str(gbp).lower()}"
    return ""


def _vtep_device(msg: Any) -> VtepDevice:
    return VtepDevice(
        name=str(msg.get_attr("IFLA_IFNAME")),
        index=int(msg["index"]),
        mac=str(msg.get_attr("IFLA_ADDRESS")).lower(),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
    )


async def _get_link(ipr: Any, name: str) -> Any | None:
    try:
        links = await ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise
    return links[0] if links else None


async def stored_vtep_mac(manager: Manager, device_name: str, v6: bool = False) -> str | None:
    """The VtepMAC the store remembers for this host (kube mode: our Node's backend-data
    annotation; etcd mode: none), for a VTEP made anew, so that peers' FDB and neighbour entries
    stay right across a reboot (flanneld's GetStoredMacAddresses). None: take a random one."""
    text = await manager.stored_vtep_mac(v6)
    if not text:
        return None
    try:
        mac = parse_mac(text)
    except ValueError:
        log.error("Failed to parse mac addr(%s): not a MAC address; a random one is used", text)
        return None
    if int(mac[:2], 16) & 1 or mac == "00:00:00:00:00:00":
        log.error("stored mac addr %s is not a unicast address; a random one is used", mac)
        return None
    log.info("Interface %s mac address set to: %s", device_name, mac)
    return mac


async def ensure_vxlan_device(
    cfg: VXLANConfig, iface: ExternalInterface, mac: str | None = None, *, v6: bool = False
) -> VtepDevice:
    """Create flannel.<VNI> (with mac, or a random one), or reuse a compatible existing one,
    which keeps its MAC. v6: flannel-v6.<VNI>, its tunnels from the PublicIPv6."""
    name = cfg.device_name_v6 if v6 else cfg.device_name
    local: IPv4Address | IPv6Address | None = iface.ext_v6_addr if v6 else iface.ext_addr
    if local is None:
        raise BackendError(f"{name} needs the interface's IPv6 address (or --public-ipv6)")
    spec: dict[str, Any] = {
        "ifname": name,
        "kind": "vxlan",
        "address": mac or random_mac(),
        "mtu": (cfg.mtu or iface.mtu) - VXLAN_OVERHEAD,
        "vxlan_id": cfg.vni,
        "vxlan_link": iface.index,
        "vxlan_local6" if v6 else "vxlan_local": str(local),
        # Sent explicitly, as vishvananda/netlink does, so kernel defaults cannot differ.
        "vxlan_ttl": 0,
        "vxlan_tos": 0,
        "vxlan_learning": 1 if cfg.learning else 0,
        "vxlan_proxy": 0,
        "vxlan_rsc": 0,
        "vxlan_l2miss": 0,
        "vxlan_l3miss": 0,
    }
    if cfg.port > 0:
        spec["vxlan_port"] = cfg.port
    if cfg.gbp:
        spec["vxlan_gbp"] = True
    try:
        async with AsyncIPRoute() as ipr:
            try:
                await ipr.link("add", **spec)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
                log.debug("VXLAN device already exists")
                existing = await _get_link(ipr, name)
                if existing is None:
                    raise
                reason = _incompatibility(cfg, local, iface.index, existing)
                if not reason:
                    log.debug("Returning existing device")
                else:
                    log.warning(
                        "%r already exists with incompatible configuration: %s; recreating device",
                        name,
                        reason,
                    )
                    await ipr.link("del", index=int(existing["index"]))
                    await ipr.link("add", **spec)
            created = await _get_link(ipr, name)
    except NetlinkError as exc:
        raise BackendError(f"failed to create VXLAN device {name}: {exc}") from None
    if created is None or _linkinfo(created)[0] != "vxlan":
        raise BackendError(f"created vxlan device {name} is missing or not vxlan")
    conf = IPV6_CONF_DIR / name
    if conf.is_dir():
        # A router advertisement must not give the VTEP a route or address behind our back.
        try:
            (conf / "accept_ra").write_text("0")
        except OSError as exc:
            log.warning("failed to set accept_ra on %s: %s", name, exc)
    return _vtep_device(created)


async def configure_vxlan_device(
    device: VtepDevice, subnet: IPv4Network | IPv6Network, network: IPv4Network | IPv6Network
) -> None:
    """EnsureV4AddressOnLink(<subnet .0>/32), or for flannel-v6.<VNI> EnsureV6AddressOnLink
    (<subnet ::>/128, every other global address removed), and set the device up; check the
    MAC held."""
    wanted = subnet.network_address
    v6 = wanted.version == 6
    try:
        async with AsyncIPRoute() as ipr:
            present = False
            stale: list[tuple[IPv4Address | IPv6Address, int]] = []
            family = socket.AF_INET6 if v6 else socket.AF_INET
            async for msg in await ipr.addr("dump", family=family, index=device.index):
                if int(msg["index"]) != device.index:
                    continue
                text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
                if not text:
                    continue
                address = ip_address(str(text))
                if address == wanted and int(msg["prefixlen"]) == wanted.max_prefixlen:
                    present = True
                elif address in network or (v6 and not address.is_link_local):
                    # Left over from an earlier lease: two subnet addresses would confuse peers.
                    stale.append((address, int(msg["prefixlen"])))
            for address, prefixlen in stale:
                log.info("removing stale address %s/%d from %s", address, prefixlen, device.name)
                await ipr.addr("del", index=device.index, address=str(address), prefixlen=prefixlen)
            if not present:
                await ipr.addr(
                    "add", index=device.index, address=str(wanted), prefixlen=wanted.max_prefixlen
                )
            await ipr.link("set", index=device.index, state="up")
            link = await _get_link(ipr, device.name)
    except NetlinkError as exc:
        raise BackendError(f"failed to configure interface {device.name}: {exc}") from None
    mac = _vtep_device(link).mac if link is not None else None
    if mac != device.mac:
        raise BackendError(
            f"{device.name}'s MAC changed during setup: expected {device.mac}, found {mac}"
        )


def vxlan_lease_attrs(
    cfg: VXLANConfig,
    iface: ExternalInterface,
    device: VtepDevice | None,
    device6: VtepDevice | None = None,
) -> LeaseAttrs:
    """flanneld's vxlan attrs: BackendData for flannel.<VNI>, and with IPv6 PublicIPv6 and
    BackendV6Data for flannel-v6.<VNI> (an IPv6-only node's PublicIP stays 0.0.0.0, as Go's)."""

    def data(dev: VtepDevice | None) -> bytes:
        return f'{{"VNI":{cfg.vni},"VtepMAC":"{dev.mac}"}}'.encode() if dev else b""

    return LeaseAttrs(
        public_ip=iface.public_ip if device else IPv4Address(0),
        public_ipv6=iface.ext_v6_addr if device6 else None,
        backend_type=BACKEND_TYPE,
        backend_data=data(device),
        backend_v6_data=data(device6),
    )


# --------------------------------------------------------------------------------------------
# Peers


class VXLANNetwork(Network):
    """Our lease plus flannel.<VNI>; programs one neighbour, FDB entry and route per peer.
    With IPv6, flannel-v6.<VNI> gets the same three entries per peer that has IPv6 too. An
    IPv6-only network (EnableIPv4 false) has flannel-v6.<VNI> alone, as flanneld's.

    With a BPF data path, each IPv4 peer also gets an fb_remotes entry (written after the kernel
    entries, removed before them), so anything the programs pass on still finds vxlan.ko ready.
    """

    def __init__(
        self,
        lease: Lease,
        device: VtepDevice | None,
        *,
        device6: VtepDevice | None = None,
        direct_routing: bool = False,
        bpf: BPFDatapath | None = None,
        fallbacks: tuple[str, ...] = (),
        retry_attempts: int = 10,
        retry_delay: float = 0.05,
    ) -> None:
        self.lease = lease
        self.device = device
        self.device6 = device6
        vtep = device or device6
        if vtep is None:
            raise BackendError("a vxlan network needs flannel.<VNI> or flannel-v6.<VNI>")
        self.mtu = vtep.mtu  # flanneld's MTU(): the IPv4 device's, else the IPv6 one's
        self.direct_routing = direct_routing
        self.bpf = bpf
        self.datapath = "bpf" if bpf is not None else "kernel"
        self.fallbacks = fallbacks
        self._attempts = max(1, retry_attempts)
        self._delay = retry_delay
        # Peers whose route is in place (the last of their entries), by subnet of each family.
        self._programmed: set[IPv4Network | IPv6Network] = set()

    def background(self) -> list[Coroutine[Any, Any, None]]:
        jobs: list[Coroutine[Any, Any, None]] = []
        if self.bpf is not None and self.bpf.pod_bridge:
            # The mark rules are resynced like flanneld's (the same period, 5 s by default).
            jobs += [keep_pod_ports(self.bpf), host_routing_keeper(self.bpf).keep(5.0)]
        if self.bpf is not None and self.device6 is not None:
            jobs.append(self._keep_underlay_neighbours())
        return jobs

    async def _keep_underlay_neighbours(self, period: float = UNDERLAY_NEIGH_PERIOD) -> None:
        """Every period, have the kernel resolve the underlay next hop to each IPv4 VTEP that
        carries IPv6 subnets (a peer's neighbour entry may have failed and gone since)."""
        while True:
            await asyncio.sleep(period)
            assert self.bpf is not None
            try:
                async with RtnlBatch() as nl:
                    await resolve_underlay(nl, self.bpf.ipv6_carriers())
            except OSError as exc:
                log.warning("resolving underlay neighbours failed: %s", exc)

    def datapath_status(self) -> dict[str, Any]:
        bpf = self.bpf.status() if self.bpf is not None else {"host_routing": "kernel"}
        v4 = {"device": self.device.name} if self.device is not None else {}
        v6 = {"device_v6": self.device6.name} if self.device6 is not None else {}
        return {**v4, **v6, **bpf}

    def programmed_peers(self) -> int:
        """Peers with their IPv4 entries in place (IPv6's are counted apart); in an IPv6-only
        network (no flannel.<VNI>) their IPv6 entries, the only ones they have."""
        version = 4 if self.device is not None else 6
        return sum(1 for subnet in self._programmed if subnet.version == version)

    def programmed_peers_v6(self) -> int:
        return sum(1 for subnet in self._programmed if subnet.version == 6)

    async def apply_snapshot(self, events: list[LeaseEvent]) -> None:
        """Kernel entries as for any batch; fb_remotes swept to exactly these leases at once."""
        remotes = await self._program(events, snapshot=True)
        if self.bpf is not None:
            reconcile_remotes(self.bpf, remotes)

    async def close(self) -> None:
        if self.bpf is not None:
            self.bpf.close()  # fds only: the data path stays attached and pinned

    def accepts(self, lease: Lease) -> bool:
        if lease.attrs.backend_type != BACKEND_TYPE:
            log.debug("Ignoring non-vxlan subnet: type=%s", lease.attrs.backend_type)
            return False
        return True

    async def apply(self, events: list[LeaseEvent]) -> None:
        await self._program(events, snapshot=False)

    async def _program(self, events: list[LeaseEvent], *, snapshot: bool) -> list[Remote]:
        """Program each peer's kernel entries, and its fb_remotes entry unless this is the
        snapshot (reconciled in one sweep afterwards). Returns the remotes of the added peers."""
        peers: list[tuple[LeaseEvent, PeerVtep]] = []
        for event in events:
            lease = event.lease
            if lease.key == self.lease.key:
                continue
            try:
                # 0.0.0.0/0 is an IPv6-only peer; without IPv4 here, no peer's IPv4 half counts.
                if lease.subnet.prefixlen and self.device is not None:
                    peers.append((event, peer_vtep(lease)))
            except ValueError as exc:
                log.warning("error decoding subnet lease JSON for %s: %s", lease.subnet, exc)
            if self.device6 is None:
                continue
            try:
                v6 = peer_vtep_v6(lease)
            except ValueError as exc:
                log.warning("error decoding subnet lease v6 JSON for %s: %s", lease.subnet, exc)
                continue
            if v6 is not None:
                peers.append((event, v6))
        added: list[Remote] = []
        if not peers:
            return added
        # One netlink socket per batch; each phase of a round is a few send()s, not a request
        # per peer and entry.
        async with RtnlBatch() as nl:
            for batch in _rounds(peers):
                added += await self._program_round(nl, batch, snapshot=snapshot)
        return added

    async def _program_round(
        self, nl: RtnlBatch, batch: list[tuple[LeaseEvent, PeerVtep]], *, snapshot: bool
    ) -> list[Remote]:
        """Events touching disjoint kernel entries (see _rounds), so in any order among them."""
        if self.direct_routing:
            direct = await self._directly_connected(nl, [peer for _, peer in batch])
        else:
            direct = [False] * len(batch)
        removed: list[tuple[PeerVtep, bool]] = []
        added: list[tuple[PeerVtep, bool]] = []
        for (event, peer), is_direct in zip(batch, direct, strict=True):
            (added if event.type is LeaseEventType.ADDED else removed).append((peer, is_direct))
        if self.bpf is not None:
            for peer, _ in removed:
                update_remote(self.bpf, peer.subnet, None, "vxlan.ko")
        await self._remove_peers(nl, removed)
        await self._add_peers(nl, added)
        remotes = [remote_entry(peer, direct) for peer, direct in added]
        if self.bpf is not None:
            # IPv6 packets go over the IPv4 underlay, where nothing else may have resolved the
            # peer yet (vxlan.ko's flannel-v6 uses the IPv6 one); a program finding no
            # neighbour hands packets to the kernel, which would never resolve it for us.
            carriers = {r.vtep_ip for r in remotes if r.subnet.version == 6 and not r.flags}
            await resolve_underlay(nl, carriers)
        if self.bpf is not None and not snapshot:
            for remote in remotes:
                update_remote(self.bpf, remote.subnet, remote, "vxlan.ko")
        return remotes

    async def _directly_connected(self, nl: RtnlBatch, peers: list[PeerVtep]) -> list[bool]:
        """ip.DirectRouting: exactly one route to the PublicIP, and it has no gateway."""
        requests = [route_get_request(peer.public_ip) for peer in peers]
        replies = await nl.run(requests, LOOKUP_BUFFER)
        direct = []
        for peer, reply in zip(peers, replies, strict=True):
            if reply.error:
                log.error("couldn't lookup route to %s: %s", peer.public_ip, _error(reply.error))
                direct.append(False)
                continue
            direct.append(one_route_without_gateway(reply))
        return direct

    # The entries, as iproute2 would write them; see the table in flannel-compat.md 5.1.
    def _device_of(self, peer: PeerVtep) -> int:
        if peer.subnet.version == 6:
            assert self.device6 is not None
            return self.device6.index
        assert self.device is not None  # IPv4 peers are programmed only with IPv4 on
        return self.device.index

    def _neigh(self, peer: PeerVtep, add: bool) -> NlRequest:
        return neigh_request(add, self._device_of(peer), peer.subnet.network_address, peer.mac)

    def _fdb(self, peer: PeerVtep, add: bool) -> NlRequest:
        return fdb_request(add, self._device_of(peer), peer.mac, peer.public_ip)

    def _route(self, peer: PeerVtep, add: bool) -> NlRequest:
        dev = self._device_of(peer)
        return route_request(add, peer.subnet, peer.subnet.network_address, dev)

    @staticmethod
    def _direct_route(peer: PeerVtep, add: bool) -> NlRequest:
        return route_request(add, peer.subnet, peer.public_ip)

    async def _add_peers(self, nl: RtnlBatch, peers: list[tuple[PeerVtep, bool]]) -> None:
        """Per peer, as flanneld: neighbour, FDB entry, route; each step only for the peers
        whose previous one succeeded, and a failure removes what that peer already got."""
        direct = [peer for peer, is_direct in peers if is_direct]
        for peer in direct:
            log.debug("Adding direct route to subnet: %s PublicIP: %s", peer.subnet, peer.public_ip)
        errors = await self._retry(nl, [self._direct_route(peer, True) for peer in direct])
        for peer, code in zip(direct, errors, strict=True):
            if code:
                log.error(
                    "Error adding route to %s via %s: %s", peer.subnet, peer.public_ip, _error(code)
                )
            else:
                self._programmed.add(peer.subnet)

        tunnel = [peer for peer, is_direct in peers if not is_direct]
        for peer in tunnel:
            log.debug(
                "adding subnet: %s PublicIP: %s VtepMAC: %s", peer.subnet, peer.public_ip, peer.mac
            )
        errors = await self._retry(nl, [self._neigh(peer, True) for peer in tunnel])
        with_neigh = []
        for peer, code in zip(tunnel, errors, strict=True):
            if code:
                log.error("AddARP failed: %s", _error(code))
            else:
                with_neigh.append(peer)

        errors = await self._retry(nl, [self._fdb(peer, True) for peer in with_neigh])
        with_fdb = []
        undo: list[tuple[str, NlRequest]] = []
        for peer, code in zip(with_neigh, errors, strict=True):
            if code:
                log.error("AddFDB failed: %s", _error(code))
                undo.append(("DelARP", self._neigh(peer, False)))
            else:
                with_fdb.append(peer)
        await self._delete(nl, undo)

        # Last, and only once each neighbour is acknowledged: the kernel must never resolve
        # the gateway (the peer's subnet.0) before the neighbour is in place.
        errors = await self._retry(nl, [self._route(peer, True) for peer in with_fdb])
        undo = []
        for peer, code in zip(with_fdb, errors, strict=True):
            if code:
                log.error(
                    "failed to add vxlanRoute (%s -> %s): %s",
                    peer.subnet,
                    peer.subnet.network_address,
                    _error(code),
                )
                undo += [("DelARP", self._neigh(peer, False)), ("DelFDB", self._fdb(peer, False))]
            else:
                self._programmed.add(peer.subnet)
        await self._delete(nl, undo)

    async def _remove_peers(self, nl: RtnlBatch, peers: list[tuple[PeerVtep, bool]]) -> None:
        deletes: list[tuple[str, NlRequest]] = []
        for peer, is_direct in peers:
            log.debug("removing subnet: %s PublicIP: %s", peer.subnet, peer.public_ip)
            self._programmed.discard(peer.subnet)
            if is_direct:
                deletes.append(("DelRoute", self._direct_route(peer, False)))
            else:
                # In one window these go in this order, as flanneld's calls do.
                deletes += [
                    ("DelARP", self._neigh(peer, False)),
                    ("DelFDB", self._fdb(peer, False)),
                    ("DelRoute", self._route(peer, False)),
                ]
        await self._delete(nl, deletes)

    async def _delete(self, nl: RtnlBatch, deletes: list[tuple[str, NlRequest]]) -> None:
        """Deletes that never raise: each of a peer's entries is removed independently."""
        errors = await self._retry(nl, [request for _, request in deletes])
        for (what, _), code in zip(deletes, errors, strict=True):
            if code in (errno.ENOENT, errno.ESRCH):
                log.debug("%s: already gone", what)
            elif code:
                log.error("%s failed: %s", what, _error(code))

    async def _retry(self, nl: RtnlBatch, requests: list[NlRequest]) -> list[int]:
        """Each request's final errno (0: done). flanneld wraps each call in retry.Do; here the
        failed requests of a batch are retried together, with the same attempts and backoff,
        kept short so one bad peer cannot stall all. A missing entry is final at once."""
        errors = [0] * len(requests)
        pending = list(range(len(requests)))
        delay = self._delay
        for attempt in range(self._attempts if requests else 0):
            replies = await nl.run([requests[index] for index in pending])
            again = []
            for index, reply in zip(pending, replies, strict=True):
                errors[index] = reply.error
                missing = reply.error in (errno.ENOENT, errno.ESRCH)
                if reply.error and not missing and attempt < self._attempts - 1:
                    again.append(index)
            if not again:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
            pending = again
        return errors


async def resolve_underlay(nl: RtnlBatch, addresses: set[IPv4Address]) -> None:
    """Have the kernel resolve the underlay next hop (the address itself, or its route's
    gateway) of each address: `ip neigh replace <hop> dev <oif> nud none use`, best effort."""
    if not addresses:
        return
    targets = sorted(addresses)
    replies = await nl.run([route_get_request(address) for address in targets], LOOKUP_BUFFER)
    uses = []
    for address, reply in zip(targets, replies, strict=True):
        hop = route_next_hop(reply) if not reply.error else None
        if hop is not None:
            oif, gateway = hop
            uses.append(neigh_use_request(oif, gateway or address))
    for reply in await nl.run(uses):
        if reply.error:
            log.debug("underlay neighbour resolution: %s", _error(reply.error))


def _rounds(
    peers: list[tuple[LeaseEvent, PeerVtep]],
) -> list[list[tuple[LeaseEvent, PeerVtep]]]:
    """Split a batch, in order, wherever an event touches an entry an earlier event of the
    current round does: a subnet's neighbour and route, a MAC's FDB entry. Within a round the
    events commute, so they are programmed phase by phase; across rounds event order holds
    (a lease moving to a new subnet with the same VtepMAC, an add then remove)."""
    rounds: list[list[tuple[LeaseEvent, PeerVtep]]] = []
    current: list[tuple[LeaseEvent, PeerVtep]] = []
    seen: set[Hashable] = set()
    for item in peers:
        peer = item[1]
        keys = (peer.subnet.network_address, peer.mac)
        if any(key in seen for key in keys):
            rounds.append(current)
            current, seen = [], set()
        current.append(item)
        seen.update(keys)
    if current:
        rounds.append(current)
    return rounds


def _error(code: int) -> NetlinkError:
    """The errno as pyroute2 would raise it, so log lines read as before."""
    return NetlinkError(code)


async def remove_vxlan_device(name: str) -> None:
    """Delete a kernel flannel.<VNI> left by an earlier run (its socket holds the VXLAN port)."""
    async with AsyncIPRoute() as ipr:
        link = await _get_link(ipr, name)
        if link is not None and _linkinfo(link)[0] == "vxlan":
            log.info("removing the kernel VXLAN device %s for the userspace data path", name)
            await ipr.link("del", index=int(link["index"]))


class VXLANUserspaceNetwork(Network):
    """A vxlan network served from userspace (TUN + UDP socket) when vxlan.ko is unavailable."""

    datapath = "userspace"

    def __init__(self, lease: Lease, plane: Any, fallbacks: tuple[str, ...]) -> None:
        self.lease = lease
        self.plane = plane
        self.mtu = int(plane.mtu)
        self.fallbacks = fallbacks

    def accepts(self, lease: Lease) -> bool:
        return lease.attrs.backend_type == BACKEND_TYPE

    def datapath_status(self) -> dict[str, Any]:
        return {"device": self.plane.tun_name, "counters": self.plane.counters.as_dict()}

    def programmed_peers(self) -> int:
        return len(self.plane.routes)

    def plane_counters(self) -> dict[str, int]:
        counters: dict[str, int] = self.plane.counters.as_dict()
        return counters

    async def apply(self, events: list[LeaseEvent]) -> None:
        for event in events:
            lease = event.lease
            if lease.subnet == self.lease.subnet:
                continue
            if event.type is LeaseEventType.REMOVED:
                self.plane.del_peer(lease.subnet)
                continue
            try:
                peer = peer_vtep(lease)
            except ValueError as exc:
                log.warning("error decoding subnet lease JSON for %s: %s", lease.subnet, exc)
                continue
            self.plane.set_peer(peer.subnet, peer.public_ip, peer.mac)

    async def close(self) -> None:
        self.plane.close()


class VXLANBackend(Backend):
    """flanneld's vxlan, on the data path --datapath asks for (auto: BPF, kernel, userspace)."""

    type = BACKEND_TYPE
    datapaths = ("bpf", "kernel", "userspace")

    async def register_network(self) -> Network:
        cfg = parse_vxlan_config(self.ctx.config.backend)
        log.info("%s", cfg.log_line())
        network = self.ctx.config.network  # None: IPv6-only
        opts, iface = self.ctx.options, self.ctx.iface
        wanted = opts.datapath
        if wanted in ("kernel", "userspace"):
            # Switching away from BPF: programs left attached would keep decapsulating.
            await remove_bpf_datapath(cfg.device_name, Path(opts.bpffs))
        if wanted == "userspace":
            self._ipv4_only("the userspace vxlan data path")
            assert network is not None  # IPv6-only has EnableIPv6: refused just above
            await remove_vxlan_device(cfg.device_name)
            return await self._userspace(cfg, network, ())

        device = None
        if network is not None:
            mac = await stored_vtep_mac(self.ctx.manager, cfg.device_name)
            try:
                device = await ensure_vxlan_device(cfg, iface, mac)
            except BackendError as exc:
                if wanted != "auto":
                    raise
                reason = f"kernel vxlan unavailable: {exc}"
                self._ipv4_only(f"the userspace vxlan data path ({reason})")
                log.warning("%s; falling back to the userspace data path", reason)
                return await self._userspace(cfg, network, (reason,))

        device6 = None
        if self.ctx.config.enable_ipv6:
            # flanneld's v6 VTEP; with BPF, what the programs leave to the kernel goes there.
            mac6 = await stored_vtep_mac(self.ctx.manager, cfg.device_name_v6, v6=True)
            device6 = await ensure_vxlan_device(cfg, iface, mac6, v6=True)
        bpf: BPFDatapath | None = None
        fallbacks: tuple[str, ...] = ()
        if wanted in ("auto", "bpf"):
            try:
                if cfg.gbp:
                    raise LoaderError(
                        "GBP is set: the BPF programs do not speak the group policy extension"
                    )
                host_routing = opts.host_routing == "bpf" and device is not None
                bpf = await load_bpf_datapath(
                    iface,
                    Device(device.name, device.index, device.mac) if device else None,
                    pin_name=cfg.device_name,
                    wire=VXLAN_WIRE,
                    local_ip=iface.ext_addr if device else None,
                    vni=cfg.vni,
                    port=cfg.udp_port,
                    bpffs=Path(opts.bpffs),
                    decap_mode=opts.bpf_decap,
                    anti_spoofing=opts.anti_spoofing,
                    pod_bridge=opts.pod_bridge if host_routing else "",
                    vtep6=Device(device6.name, device6.index, device6.mac) if device6 else None,
                )
            except (LoaderError, BackendError) as exc:
                if wanted == "bpf":
                    raise BackendError(f"BPF data path: {exc}") from None
                reason = f"BPF data path unavailable: {exc}"
                log.warning("%s; falling back to kernel vxlan", reason)
                fallbacks = (reason,)

        if opts.host_routing == "bpf" and (bpf is None or not bpf.pod_bridge):
            why = "the BPF data path" if bpf is None else "IPv4 (it carries IPv4 pods only)"
            log.warning("--host-routing=bpf needs %s; pod traffic goes through the host stack "
                        "(host routing kernel)", why)  # fmt: skip
        lease = await self.acquire(vxlan_lease_attrs(cfg, iface, device, device6))
        if device is not None and network is not None:
            await configure_vxlan_device(device, lease.subnet, network)
        if device6 is not None:
            ipv6_network = self.ctx.config.ipv6_network
            if lease.ipv6_subnet is None or ipv6_network is None:
                raise BackendError(f"failed to configure interface {device6.name}: IPv6 is "
                                   "enabled but the lease has no IPv6")  # fmt: skip
            await configure_vxlan_device(device6, lease.ipv6_subnet, ipv6_network)
        return VXLANNetwork(
            lease,
            device,
            device6=device6,
            direct_routing=cfg.direct_routing,
            bpf=bpf,
            fallbacks=fallbacks,
        )

    def _ipv4_only(self, what: str) -> None:
        if self.ctx.config.enable_ipv6:
            raise BackendError(f"EnableIPv6 is set, and {what} carries IPv4 only")

    async def _userspace(
        self, cfg: VXLANConfig, network: IPv4Network, fallbacks: tuple[str, ...]
    ) -> Network:
        iface = self.ctx.iface
        assert iface.ext_addr is not None  # IPv4 only: refused before in IPv6-only networks
        # The MAC is ours to choose: the stored one (kube mode), else a new one; peers follow
        # the lease either way.
        mac = await stored_vtep_mac(self.ctx.manager, cfg.device_name) or random_mac()
        attrs = LeaseAttrs(
            public_ip=iface.ext_addr,
            backend_type=BACKEND_TYPE,
            backend_data=f'{{"VNI":{cfg.vni},"VtepMAC":"{mac}"}}'.encode(),
        )
        lease = await self.acquire(attrs)
        plane = await start_vxlan_userspace_dataplane(
            lease.subnet,
            network,
            iface,
            vni=cfg.vni,
            port=cfg.udp_port,
            mac=mac,
            device_name=cfg.device_name,
        )
        return VXLANUserspaceNetwork(lease, plane, fallbacks)
