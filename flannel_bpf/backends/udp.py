"""udp: flanneld's userspace TUN-over-UDP backend (pkg/backend/udp, flannel-compat.md section 5.2).

The data plane (:class:`UDPDataPlane`, built by :func:`start_udp_dataplane`) needs only the own
subnet, the Network, the external interface and the port, so tests can run it inside a network
namespace without etcd; :class:`UDPBackend` only acquires the lease and then builds it.

Packets are moved on the asyncio loop itself (``add_reader`` on the TUN fd and on the socket), with
no thread per packet: each readiness callback drains up to :data:`BATCH` packets into one
preallocated buffer, so the per-packet cost is a read, a dict lookup, a TTL patch and a write.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import socket
import struct
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Final, Generic, Protocol, TypeVar

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.backends.base import Backend, BackendError, Network
from flannel_bpf.backends.bpf_fastpath import (
    load_bpf_datapath,
    reconcile_remotes,
    remove_bpf_datapath,
    update_remote,
)
from flannel_bpf.datapath.bpf_maps import (
    UDP_OVERHEAD as UDP_OVERHEAD,  # the payload is the bare inner packet
)
from flannel_bpf.datapath.bpf_maps import Remote
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.datapath.loader import UDP as UDP_WIRE
from flannel_bpf.datapath.loader import BPFDatapath, Device, LoaderError
from flannel_bpf.subnet.config import BackendConfig
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

log = logging.getLogger(__name__)

BACKEND_TYPE: Final = "udp"
DEFAULT_PORT: Final = 8285
TUN_NAME_TEMPLATE: Final = "flannel%d"
NO_MAC: Final = "00:00:00:00:00:00"  # flannel0 is an L3 device; udp remotes carry no MAC

# linux/if_tun.h
TUNSETIFF: Final = 0x400454CA
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFNAMSIZ: Final = 16

IPV4_HEADER_LEN: Final = 20
IPPROTO_ICMP: Final = 1
ICMP_DEST_UNREACH: Final = 3
ICMP_NET_UNREACH: Final = 0
ICMP_ERROR_TTL: Final = 8
# flanneld refuses offenders whose header reaches 20 + MAX_IPOPTLEN (40) bytes.
MAX_OFFENDER_HEADER: Final = 60
# Packets handled per readiness callback: large enough to amortise the event loop's cost, small
# enough that one busy direction cannot starve the other (or the lease watch) for long.
BATCH: Final = 64
# Room above the TUN MTU so a datagram larger than expected is seen as such rather than cut short
# silently; the inner packet still has to fit the TUN MTU to be written.
READ_HEADROOM: Final = 256


# --------------------------------------------------------------------------------------------
# Packet helpers (pure, unit tested)


def ip_checksum(data: bytes | bytearray | memoryview) -> int:
    """The Internet checksum (RFC 1071) of ``data``, padded to an even length."""
    if len(data) % 2:
        data = bytes(data) + b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def decrement_ttl(packet: bytearray) -> bool:
    """Decrement the IPv4 TTL in place with an RFC 1624 incremental checksum fix.

    Returns False, leaving the header untouched, when the TTL would reach 0 (flanneld drops).
    """
    ttl = packet[8]
    if ttl <= 1:
        return False
    packet[8] = ttl - 1
    # RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'); the TTL is the high byte of its 16-bit word, so
    # ~m + m' is always 0xFEFF and only the old checksum varies.
    total = (~((packet[10] << 8) | packet[11]) & 0xFFFF) + 0xFEFF
    total = (total & 0xFFFF) + (total >> 16)
    check = ~total & 0xFFFF
    packet[10] = check >> 8
    packet[11] = check & 0xFF
    return True


def build_net_unreachable(offender: bytes | bytearray | memoryview, source: int) -> bytes | None:
    """flanneld's ICMP net unreachable for a packet it has no route for, or None if none is due.

    None for ICMP offenders (RFC 792: no errors about errors, and flanneld extends this to all
    ICMP), non-first fragments, and malformed headers.
    """
    if len(offender) < IPV4_HEADER_LEN or offender[0] >> 4 != 4:
        return None
    header_len = (offender[0] & 0x0F) * 4
    if header_len < IPV4_HEADER_LEN or header_len >= MAX_OFFENDER_HEADER:
        return None
    if offender[9] == IPPROTO_ICMP:
        return None
    if ((offender[6] << 8) | offender[7]) & 0x1FFF:
        return None
    # Header plus 8 payload bytes; flanneld copies past a shorter packet's end, we pad with zeros.
    quoted = bytes(offender[: header_len + 8]).ljust(header_len + 8, b"\x00")
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, ip_checksum(icmp))
    total_len = IPV4_HEADER_LEN + len(icmp)
    ip = bytearray(
        struct.pack(
            "!BBHHHBBHII",
            0x45,
            0,
            total_len,
            0,
            0,
            ICMP_ERROR_TTL,
            IPPROTO_ICMP,
            0,
            source,
            int.from_bytes(offender[12:16], "big"),
        )
    )
    struct.pack_into("!H", ip, 10, ip_checksum(ip))
    return bytes(ip + icmp)


NextHop = tuple[str, int]
V = TypeVar("V")


class PrefixTable(Generic[V]):
    """Peer subnets to per-peer values, looked up by longest prefix match.

    flanneld keeps a list scanned linearly; here each prefix length present has one dict keyed by
    network address, so a lookup costs one dict probe per distinct length (normally just one).
    Generic over the value so that other userspace planes (vxlan) can keep precomputed per-peer
    state in it and still pay a single lookup per packet.
    """

    def __init__(self) -> None:
        self._routes: dict[IPv4Network, V] = {}
        # (mask, {network int: value}), longest prefix first: the hot path iterates this.
        self._levels: list[tuple[int, dict[int, V]]] = []

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, net: object) -> bool:
        return net in self._routes

    def set(self, net: IPv4Network, next_hop: V) -> None:
        self._routes[net] = next_hop
        self._rebuild()

    def delete(self, net: IPv4Network) -> bool:
        if self._routes.pop(net, None) is None:
            return False
        self._rebuild()
        return True

    def _rebuild(self) -> None:
        # Rebuilt whole on every change: changes come from lease events, lookups from packets.
        by_len: dict[int, dict[int, V]] = {}
        for net, hop in self._routes.items():
            by_len.setdefault(net.prefixlen, {})[int(net.network_address)] = hop
        self._levels = [
            ((0xFFFFFFFF << (32 - plen)) & 0xFFFFFFFF, by_len[plen])
            for plen in sorted(by_len, reverse=True)
        ]

    def lookup(self, dst: int) -> V | None:
        for mask, table in self._levels:
            hop = table.get(dst & mask)
            if hop is not None:
                return hop
        return None


class RouteTable(PrefixTable[NextHop]):
    """The udp plane's table: peer subnets to (PublicIP, port) UDP next hops."""


# --------------------------------------------------------------------------------------------
# Config


def parse_port(backend: BackendConfig) -> int:
    """``Port`` from the Backend object; flanneld decodes it into a Go int, default 8285."""
    value = backend.get("Port", DEFAULT_PORT)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BackendError(f"error decoding UDP backend config: Port must be an integer: {value!r}")
    if value == 0:
        # Go leaves the default in place only when the key is absent; 0 would bind a random port,
        # which peers (who send to their own Port) could never reach.
        raise BackendError("UDP backend Port must not be 0")
    if not 0 < value < 65536:
        raise BackendError(f"UDP backend Port out of range: {value}")
    return value


# --------------------------------------------------------------------------------------------
# Data plane


@dataclass
class UDPCounters:
    """Packet counters of one UDP data plane (exported as metrics later)."""

    tx_packets: int = 0  # inner packets sent to peers
    tx_bytes: int = 0
    rx_packets: int = 0  # inner packets received from peers and written to the TUN
    rx_bytes: int = 0
    no_route: int = 0  # TUN packets for a destination no lease covers
    icmp_sent: int = 0  # net unreachable messages written back into the TUN
    ttl_expired: int = 0  # dropped on either side because the TTL reached 0
    rx_invalid: int = 0  # datagrams shorter than an IPv4 header, or not IPv4
    tx_invalid: int = 0  # TUN packets that are not IPv4 (the kernel offers IPv6 too)
    tx_errors: int = 0  # failed sends to peers
    rx_errors: int = 0  # failed reads from the socket or the TUN, and failed TUN writes

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def open_tun(name_template: str = TUN_NAME_TEMPLATE) -> tuple[int, str]:
    """A non-persistent, non-blocking TUN device (IFF_TUN | IFF_NO_PI): (fd, kernel-chosen name)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name_template.encode(), IFF_TUN | IFF_NO_PI)
        result = fcntl.ioctl(fd, TUNSETIFF, ifr)
    except OSError:
        os.close(fd)
        raise
    name = result[:IFNAMSIZ].split(b"\x00", 1)[0].decode()
    return fd, name


async def configure_tun(name: str, address: IPv4Address, mtu: int, network: IPv4Network) -> int:
    """Address <subnet .0>/32, the MTU, link up, and the whole Network routed into the TUN."""
    async with AsyncIPRoute() as ipr:
        links = await ipr.link("get", ifname=name)
        index = int(links[0]["index"])
        try:
            await ipr.addr("add", index=index, address=str(address), prefixlen=32)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        await ipr.link("set", index=index, mtu=mtu, state="up")
        try:
            await ipr.route(
                "add",
                dst=str(network.network_address),
                dst_len=network.prefixlen,
                oif=index,
                scope=0,  # universe, as flanneld
            )
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
    return index


class PlaneCounters(Protocol):
    icmp_sent: int
    rx_errors: int


class TunSocketPlane:
    """What every TUN-and-UDP-socket data plane shares: the two fds, the loop hookup, ICMP net
    unreachable into the TUN, and shutdown. Subclasses supply the two per-packet loops, which
    stay hand-inlined because they are the hot path."""

    counters: PlaneCounters

    def __init__(
        self,
        tun_fd: int,
        tun_name: str,
        tun_addr: IPv4Address,
        mtu: int,
        sock: socket.socket,
        port: int,
    ) -> None:
        self.tun_fd = tun_fd
        self.tun_name = tun_name
        self.tun_index = 0  # set once configured; where a BPF fast path attaches
        self.tun_addr = tun_addr
        self.mtu = mtu
        self.port = port
        self.sock = sock
        self._tun_addr_int = int(tun_addr)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Forward on the loop itself: no thread, so peers can change between batches safely."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_reader(self.tun_fd, self._on_tun_readable)
        self._loop.add_reader(self.sock.fileno(), self._on_sock_readable)

    def _on_tun_readable(self) -> None:
        raise NotImplementedError

    def _on_sock_readable(self) -> None:
        raise NotImplementedError

    def _net_unreachable(self, offender: memoryview) -> None:
        reply = build_net_unreachable(offender, self._tun_addr_int)
        if reply is None:
            return
        try:
            os.write(self.tun_fd, reply)
        except OSError as exc:
            self.counters.rx_errors += 1
            log.debug("failed to send ICMP net unreachable: %s", exc)
            return
        self.counters.icmp_sent += 1

    def close(self) -> None:
        """Stop forwarding and close both fds; the kernel removes the TUN device with its fd."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.tun_fd)
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        os.close(self.tun_fd)


class UDPDataPlane(TunSocketPlane):
    """flanneld's udp forwarding: one raw inner IPv4 packet per datagram, TTL decremented."""

    def __init__(
        self,
        tun_fd: int,
        tun_name: str,
        tun_addr: IPv4Address,
        mtu: int,
        sock: socket.socket,
        port: int,
    ) -> None:
        super().__init__(tun_fd, tun_name, tun_addr, mtu, sock, port)
        self.routes = RouteTable()
        self.counters: UDPCounters = UDPCounters()
        # One buffer per direction: both callbacks run on the same loop, but separate buffers keep
        # a future change (e.g. answering from the receive path) from clobbering the other.
        self._tun_buf = bytearray(mtu + READ_HEADROOM)
        self._sock_buf = bytearray(mtu + READ_HEADROOM)

    def set_route(self, subnet: IPv4Network, public_ip: IPv4Address) -> None:
        self.routes.set(subnet, (str(public_ip), self.port))

    def del_route(self, subnet: IPv4Network) -> bool:
        return self.routes.delete(subnet)

    def _on_tun_readable(self) -> None:
        buf = self._tun_buf
        view = memoryview(buf)
        fd = self.tun_fd
        readv = os.readv
        sendto = self.sock.sendto
        lookup = self.routes.lookup
        sent = sent_bytes = no_route = expired = invalid = errors = 0
        try:
            for _ in range(BATCH):
                try:
                    n = readv(fd, (buf,))
                except BlockingIOError:
                    break
                except OSError as exc:
                    errors += 1
                    log.debug("TUN read failed: %s", exc)
                    break
                if n < IPV4_HEADER_LEN or buf[0] >> 4 != 4:
                    # IPv6 (router solicitations, MLD) reaches a NO_PI TUN too; the tunnel
                    # carries IPv4 only, and reading its bytes 16..19 as a destination is junk.
                    invalid += 1
                    continue
                hop = lookup((buf[16] << 24) | (buf[17] << 16) | (buf[18] << 8) | buf[19])
                if hop is None:
                    no_route += 1
                    self._net_unreachable(view[:n])
                    continue
                # Inlined decrement_ttl: this is the per-packet hot path.
                ttl = buf[8]
                if ttl <= 1:
                    expired += 1
                    continue
                buf[8] = ttl - 1
                total = (~((buf[10] << 8) | buf[11]) & 0xFFFF) + 0xFEFF
                check = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
                buf[10] = check >> 8
                buf[11] = check & 0xFF
                try:
                    sendto(view[:n], hop)
                except OSError as exc:
                    errors += 1
                    log.debug("UDP send to %s:%d failed: %s", hop[0], hop[1], exc)
                    continue
                sent += 1
                sent_bytes += n
        finally:
            view.release()
            c = self.counters
            c.tx_packets += sent
            c.tx_bytes += sent_bytes
            c.no_route += no_route
            c.ttl_expired += expired
            c.tx_invalid += invalid
            c.tx_errors += errors

    def _on_sock_readable(self) -> None:
        buf = self._sock_buf
        view = memoryview(buf)
        fd = self.tun_fd
        write = os.write
        recv_into = self.sock.recv_into
        received = received_bytes = invalid = expired = errors = 0
        try:
            for _ in range(BATCH):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # ICMP errors for earlier sends surface here (e.g. port unreachable).
                    errors += 1
                    log.debug("UDP recv failed: %s", exc)
                    continue
                if n < IPV4_HEADER_LEN or buf[0] >> 4 != 4:
                    invalid += 1
                    continue
                ttl = buf[8]
                if ttl <= 1:
                    expired += 1
                    continue
                buf[8] = ttl - 1
                total = (~((buf[10] << 8) | buf[11]) & 0xFFFF) + 0xFEFF
                check = ~((total & 0xFFFF) + (total >> 16)) & 0xFFFF
                buf[10] = check >> 8
                buf[11] = check & 0xFF
                try:
                    write(fd, view[:n])
                except OSError as exc:
                    # EAGAIN included: flanneld spins until the write goes through, but blocking
                    # the loop would stall everything else; TCP inside recovers from the drop.
                    errors += 1
                    log.debug("TUN write failed: %s", exc)
                    continue
                received += 1
                received_bytes += n
        finally:
            view.release()
            c = self.counters
            c.rx_packets += received
            c.rx_bytes += received_bytes
            c.rx_invalid += invalid
            c.ttl_expired += expired
            c.rx_errors += errors


async def start_udp_dataplane(
    subnet: IPv4Network,
    network: IPv4Network,
    iface: ExternalInterface,
    port: int,
    peers: dict[IPv4Network, IPv4Address] | None = None,
) -> UDPDataPlane:
    """Build and start the data plane for ``subnet`` (the own lease) inside ``network``."""
    mtu = iface.mtu - UDP_OVERHEAD
    tun_addr = subnet.network_address
    try:
        tun_fd, tun_name = open_tun()
    except OSError as exc:
        raise BackendError(f"failed to open TUN device: {exc}") from None
    sock: socket.socket | None = None
    try:
        try:
            tun_index = await configure_tun(tun_name, tun_addr, mtu, network)
        except (NetlinkError, IndexError) as exc:
            raise BackendError(f"failed to configure {tun_name}: {exc}") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            sock.bind((str(iface.iface_addr), port))
        except OSError as exc:
            raise BackendError(
                f"failed to bind UDP socket to {iface.iface_addr}:{port}: {exc}"
            ) from None
        plane = UDPDataPlane(tun_fd, tun_name, tun_addr, mtu, sock, port)
        plane.tun_index = tun_index
    except BaseException:
        if sock is not None:
            sock.close()
        os.close(tun_fd)
        raise
    for peer_subnet, public_ip in (peers or {}).items():
        plane.set_route(peer_subnet, public_ip)
    plane.start()
    log.info(
        "UDP backend: %s %s/32 mtu %d, listening on %s:%d",
        tun_name,
        tun_addr,
        mtu,
        iface.iface_addr,
        port,
    )
    return plane


# --------------------------------------------------------------------------------------------
# Backend glue


class UDPNetwork(Network):
    """flanneld's udp network: flannel0 and its userspace plane, optionally a BPF fast path.

    With BPF, the programs carry every packet they recognise in the kernel, in the same wire
    format; the plane still answers what they pass on (no lease for a destination: ICMP net
    unreachable; TTL expiring; datagrams the decapsulation leaves to the socket). Each peer is a
    plane route and an fb_remotes entry (written after the route, removed before it).
    """

    def __init__(
        self,
        lease: Lease,
        plane: UDPDataPlane,
        *,
        bpf: BPFDatapath | None = None,
        fallbacks: tuple[str, ...] = (),
    ) -> None:
        self.lease = lease
        self.mtu = plane.mtu
        self.plane = plane
        self.bpf = bpf
        self.datapath = "bpf" if bpf is not None else "userspace"
        self.fallbacks = fallbacks

    @property
    def counters(self) -> UDPCounters:
        return self.plane.counters

    def datapath_status(self) -> dict[str, Any]:
        bpf = self.bpf.status() if self.bpf is not None else {}
        return {"device": self.plane.tun_name, "counters": self.plane.counters.as_dict(), **bpf}

    def programmed_peers(self) -> int:
        return len(self.plane.routes)

    def plane_counters(self) -> dict[str, int]:
        return self.plane.counters.as_dict()

    # accepts() stays the base's "everything": flanneld's udp never checks a peer's BackendType.

    async def apply_snapshot(self, events: list[LeaseEvent]) -> None:
        """Routes as for any batch; fb_remotes swept to exactly these leases in one pass."""
        remotes = self._program(events, snapshot=True)
        if self.bpf is not None:
            reconcile_remotes(self.bpf, remotes)

    async def apply(self, events: list[LeaseEvent]) -> None:
        self._program(events, snapshot=False)

    def _program(self, events: list[LeaseEvent], *, snapshot: bool) -> list[Remote]:
        added: list[Remote] = []
        for event in events:
            lease = event.lease
            if lease.subnet == self.lease.subnet:
                # Our own lease must never become a route back into the tunnel.
                continue
            if event.type is LeaseEventType.ADDED:
                log.info("Subnet added: %s via %s", lease.subnet, lease.attrs.public_ip)
                self.plane.set_route(lease.subnet, lease.attrs.public_ip)
                added.append(Remote(lease.subnet, lease.attrs.public_ip, NO_MAC))
                if not snapshot:
                    self._bpf_update(lease.subnet, added[-1])
            else:
                self._bpf_update(lease.subnet, None)
                if self.plane.del_route(lease.subnet):
                    log.info("Subnet removed: %s", lease.subnet)
        return added

    def _bpf_update(self, subnet: IPv4Network, remote: Remote | None) -> None:
        if self.bpf is not None:
            update_remote(self.bpf, subnet, remote, "the userspace plane")

    async def close(self) -> None:
        if self.bpf is not None:
            self.bpf.close()  # fds only; flannel0 and its encapsulation go with the plane
        self.plane.close()


class UDPBackend(Backend):
    """flanneld's udp, on the data path --datapath asks for (auto: BPF, else userspace)."""

    type = BACKEND_TYPE
    datapaths = ("bpf", "userspace")

    async def register_network(self) -> Network:
        ctx = self.ctx
        opts, iface = ctx.options, ctx.iface
        if ctx.config.network is None or iface.iface_addr is None or iface.ext_addr is None:
            raise BackendError(
                "the udp backend carries IPv4 only (as flanneld's), and this network is "
                "IPv6-only (EnableIPv4 false): use vxlan or host-gw"
            )
        port = parse_port(ctx.config.backend)
        if opts.host_routing == "bpf":
            log.warning("--host-routing=bpf is for the vxlan backend (flannel's VXLAN on the "
                        "wire); udp runs with host routing kernel")  # fmt: skip
        if ctx.config.enable_ipv6:
            # As flanneld's: the lease still gets its IPv6 subnet (subnet.env names it), but
            # no peer learns an IPv6 address of ours and nothing carries IPv6 pod traffic.
            log.warning("EnableIPv6 is set, but the udp backend carries IPv4 only (as flanneld's "
                        "udp): pods' IPv6 traffic between hosts is not carried; use vxlan or "
                        "host-gw for IPv6")  # fmt: skip
        # flanneld's udp writes PublicIP only: no BackendType, no BackendData.
        lease = await self.acquire(LeaseAttrs(public_ip=iface.ext_addr))
        plane = await start_udp_dataplane(lease.subnet, ctx.config.network, iface, port)
        tun = Device(plane.tun_name, plane.tun_index, NO_MAC)
        if opts.datapath == "userspace":
            # Switching away from BPF: a decapsulation left on the uplink would keep running.
            await remove_bpf_datapath(tun.name, Path(opts.bpffs))
            return UDPNetwork(lease, plane)
        try:
            bpf = await load_bpf_datapath(
                iface,
                tun,
                wire=UDP_WIRE,
                local_ip=iface.iface_addr,  # flanneld's socket binds IfaceAddr
                port=port,
                bpffs=Path(opts.bpffs),
                decap_mode=opts.bpf_decap,
                anti_spoofing=opts.anti_spoofing,
            )
        except (LoaderError, BackendError) as exc:
            if opts.datapath == "bpf":
                plane.close()
                raise BackendError(f"BPF data path: {exc}") from None
            reason = f"BPF data path unavailable: {exc}"
            log.warning("%s; staying on the userspace data path", reason)
            return UDPNetwork(lease, plane, fallbacks=(reason,))
        return UDPNetwork(lease, plane, bpf=bpf)


__all__ = [
    "BACKEND_TYPE",
    "DEFAULT_PORT",
    "PrefixTable",
    "RouteTable",
    "TunSocketPlane",
    "UDPBackend",
    "UDPCounters",
    "UDPDataPlane",
    "UDPNetwork",
    "build_net_unreachable",
    "decrement_ttl",
    "ip_checksum",
    "open_tun",
    "parse_port",
    "start_udp_dataplane",
]
