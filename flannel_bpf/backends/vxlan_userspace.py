"""A userspace VXLAN data plane: the last resort for ``vxlan`` networks without a vxlan module.

When the kernel can create neither ``flannel.<VNI>`` (no vxlan module) nor the BPF fast path, the
node must still carry the same wire format as flannel's kernel VXLAN, or it would be cut off from
every flanneld peer. This plane does that over a TUN device and one UDP socket, on the asyncio loop
like the udp backend's plane (:mod:`.udp`), whose TUN, routing-table and ICMP helpers it reuses.

Wire format, as the Linux vxlan driver emits it for flanneld's device (``df`` unset, ``ttl`` and
``tos`` 0, and the kernel's default ``udpcsum``, which flanneld leaves alone): outer IPv4/UDP with
DF clear, TTL 64 and a UDP checksum, to the peer's PublicIP and the configured port; then an 8-byte
VXLAN header (flags 0x08, VNI), an inner Ethernet header (peer's VtepMAC, our VtepMAC, 0x0800) and
the inner IPv4 packet. What still differs: the UDP source port (the kernel hashes flows over the
ephemeral range; receivers never look at it), the outer IP ID, and ECN, which the kernel copies
between inner and outer header (RFC 6040) and this plane leaves at 0 on send and ignores on
receive.

Receiving follows the kernel too: the first header word must be exactly 0x08000000 and the last
header byte 0 (the driver drops anything else unless GBP/GPE/RCO are enabled, which flannel's
userspace fallback does not support), the VNI must be ours, the inner destination our VtepMAC.

Known limit, shared with any userspace VTEP: a kernel peer that sends through a device with
checksum offload and no hardware to honour it (a veth, in the lab) leaves inner TCP/UDP checksums
unfinished, since the local receiver normally trusts CHECKSUM_PARTIAL; a UDP socket gets no word of
that, so the packets written to the TUN fail the checksum. Physical NICs complete the checksum on
the wire. On a veth underlay, turn tx checksumming off on the kernel peer's underlay device.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import asdict, dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Final

from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.backends.base import BackendError
from flannel_bpf.backends.udp import (
    BATCH,
    READ_HEADROOM,
    PrefixTable,
    TunSocketPlane,
    configure_tun,
    open_tun,
)
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.datapath.vxlan_wire import (
    DEFAULT_VXLAN_PORT,
    VXLAN_OVERHEAD,
    format_mac,
    mac_to_bytes,
)

log = logging.getLogger(__name__)

VXLAN_HEADER_LEN: Final = 8
INNER_ETH_LEN: Final = 14
# VXLAN header + inner Ethernet header: what precedes the inner packet in every datagram.
ENCAP_LEN: Final = VXLAN_HEADER_LEN + INNER_ETH_LEN
IPV4_HEADER_LEN: Final = 20
# The shortest datagram that can carry an inner IPv4 packet at all.
MIN_DATAGRAM: Final = ENCAP_LEN + IPV4_HEADER_LEN
VXLAN_FLAG_I: Final = 0x08
ETH_P_IP: Final = 0x0800
MAX_VNI: Final = (1 << 24) - 1
IFNAMSIZ: Final = 16
# The largest UDP payload IPv4 can deliver: a receive buffer this big can never truncate, so an
# oversized datagram is passed on whole (the kernel's IP checks judge it) instead of cut short.
MAX_DATAGRAM: Final = 65535 - 28
# Linux socket options Python does not name (linux/in.h).
IP_MTU_DISCOVER: Final = 10
IP_PMTUDISC_DONT: Final = 0

# The first header word the kernel accepts: I flag alone, reserved bytes zero.
_FLAGS_WORD: Final = bytes((VXLAN_FLAG_I, 0, 0, 0))
_ETHERTYPE_IP: Final = ETH_P_IP.to_bytes(2, "big")


# --------------------------------------------------------------------------------------------
# Headers (pure, unit tested)


def vxlan_header(vni: int) -> bytes:
    """The 8-byte VXLAN header (RFC 7348) as the kernel writes it: I flag, VNI, zeros."""
    if not 0 <= vni <= MAX_VNI:
        raise ValueError(f"VNI out of range: {vni}")
    return _FLAGS_WORD + (vni << 8).to_bytes(4, "big")


def encap_header(vni: int, dst_mac: str, src_mac: str) -> bytes:
    """VXLAN + inner Ethernet header for one peer: computed once, sent before every packet."""
    return vxlan_header(vni) + mac_to_bytes(dst_mac) + mac_to_bytes(src_mac) + _ETHERTYPE_IP


def parse_vni(datagram: bytes | bytearray | memoryview) -> int:
    """The VNI of a datagram that holds at least a VXLAN header."""
    return int.from_bytes(datagram[4:7], "big")


def drop_reason(datagram: bytes | bytearray | memoryview, vni: int, mac: bytes) -> str | None:
    """Why the receiver drops ``datagram`` (the counter's name), or None when it is delivered.

    The checks run in the kernel's order, so a datagram wrong in several ways is counted where
    the kernel would have stopped with it.
    """
    if len(datagram) < MIN_DATAGRAM:
        return "rx_short"
    if datagram[0:4] != _FLAGS_WORD or datagram[7] != 0:
        return "rx_bad_flags"
    if parse_vni(datagram) != vni:
        return "rx_other_vni"
    if datagram[8:14] != mac:
        return "rx_other_mac"
    # The version check matters: a NO_PI TUN takes the protocol from the first nibble, so an IPv6
    # packet labelled 0x0800 would otherwise slip in as IPv6.
    if datagram[20:22] != _ETHERTYPE_IP or datagram[ENCAP_LEN] >> 4 != 4:
        return "rx_not_ipv4"
    return None


# --------------------------------------------------------------------------------------------
# Data plane


@dataclass
class VXLANCounters:
    """Packet counters of one userspace VXLAN plane (exported as metrics later).

    Byte counts are inner IPv4 bytes, without the 22 bytes of VXLAN and inner Ethernet header.
    """

    tx_packets: int = 0  # inner packets sent to peers
    tx_bytes: int = 0
    rx_packets: int = 0  # inner packets received from peers and written to the TUN
    rx_bytes: int = 0
    no_route: int = 0  # TUN packets for a destination no peer covers
    icmp_sent: int = 0  # net unreachable messages written back into the TUN
    tx_not_ipv4: int = 0  # TUN packets that are not IPv4 (the kernel offers IPv6 too)
    rx_short: int = 0  # datagrams too short to hold the headers and an IPv4 header
    rx_bad_flags: int = 0  # VXLAN flags other than the I flag alone, or reserved bits set
    rx_other_vni: int = 0
    rx_other_mac: int = 0  # inner destination is not our VtepMAC
    rx_not_ipv4: int = 0  # inner ethertype not 0x0800, or the packet is not IPv4
    tx_errors: int = 0  # failed TUN reads and sends to peers
    rx_errors: int = 0  # failed socket reads and TUN writes (ICMP replies included)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# A peer as the hot path wants it: the 22 header bytes to prepend, and the socket address.
PeerHop = tuple[bytes, tuple[str, int]]


class VXLANUserspacePlane(TunSocketPlane):
    """The TUN device, the UDP socket and the forwarding loop between them."""

    def __init__(
        self,
        tun_fd: int,
        tun_name: str,
        tun_addr: IPv4Address,
        mtu: int,
        sock: socket.socket,
        *,
        vni: int,
        port: int,
        mac: str,
    ) -> None:
        super().__init__(tun_fd, tun_name, tun_addr, mtu, sock, port)
        self.vni = vni
        self._mac_bytes = mac_to_bytes(mac)
        self.mac = format_mac(self._mac_bytes)
        self.routes: PrefixTable[PeerHop] = PrefixTable()
        self.counters: VXLANCounters = VXLANCounters()
        # VXLAN header and our MAC are contiguous in an accepted datagram: one comparison checks
        # flags, VNI, the reserved byte and the inner destination at once.
        self._rx_expect = vxlan_header(vni) + self._mac_bytes
        # TUN reads are bounded by the TUN MTU (no offloads are negotiated); the socket buffer is
        # as large as any datagram so that nothing is silently truncated.
        self._tun_buf = bytearray(mtu + READ_HEADROOM)
        self._sock_buf = bytearray(MAX_DATAGRAM)

    def set_peer(self, subnet: IPv4Network, public_ip: IPv4Address, mac: str) -> None:
        """Route ``subnet`` to the VTEP at ``public_ip`` with VtepMAC ``mac`` (replacing any).

        The encapsulation is built here, once, so that sending costs only a sendmsg.
        """
        header = encap_header(self.vni, mac, self.mac)
        self.routes.set(subnet, (header, (str(public_ip), self.port)))

    def del_peer(self, subnet: IPv4Network) -> bool:
        """Forget ``subnet``; False if it was not there (lease removals may repeat)."""
        return self.routes.delete(subnet)

    def _on_tun_readable(self) -> None:
        buf = self._tun_buf
        view = memoryview(buf)
        fd = self.tun_fd
        readv = os.readv
        sendmsg = self.sock.sendmsg
        lookup = self.routes.lookup
        sent = sent_bytes = no_route = invalid = errors = 0
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
                    invalid += 1
                    continue
                hop = lookup((buf[16] << 24) | (buf[17] << 16) | (buf[18] << 8) | buf[19])
                if hop is None:
                    no_route += 1
                    self._net_unreachable(view[:n])
                    continue
                # No TTL change: the kernel routed the packet into the TUN already, and the
                # kernel vxlan device does not decrement a second time either.
                header, addr = hop
                try:
                    sendmsg((header, view[:n]), (), 0, addr)
                except OSError as exc:
                    errors += 1
                    log.debug("VXLAN send to %s:%d failed: %s", addr[0], addr[1], exc)
                    continue
                sent += 1
                sent_bytes += n
        except Exception:
            # Never out of a reader callback: asyncio would log it and keep calling us anyway.
            errors += 1
            log.exception("unexpected error on the VXLAN transmit path")
        finally:
            view.release()
            c = self.counters
            c.tx_packets += sent
            c.tx_bytes += sent_bytes
            c.no_route += no_route
            c.tx_not_ipv4 += invalid
            c.tx_errors += errors

    def _on_sock_readable(self) -> None:
        buf = self._sock_buf
        view = memoryview(buf)
        fd = self.tun_fd
        write = os.write
        recv_into = self.sock.recv_into
        expect = self._rx_expect
        received = received_bytes = errors = 0
        try:
            for _ in range(BATCH):
                try:
                    n = recv_into(buf)
                except BlockingIOError:
                    break
                except OSError as exc:
                    errors += 1
                    log.debug("UDP recv failed: %s", exc)
                    continue
                if (
                    n < MIN_DATAGRAM
                    or buf[:14] != expect
                    or buf[20] != 0x08
                    or buf[21] != 0x00
                    or buf[22] >> 4 != 4
                ):
                    self._count_drop(view[:n])
                    continue
                try:
                    write(fd, view[ENCAP_LEN:n])
                except OSError as exc:
                    # EAGAIN included: blocking the loop would stall the other direction; TCP
                    # inside recovers from the drop.
                    errors += 1
                    log.debug("TUN write failed: %s", exc)
                    continue
                received += 1
                received_bytes += n - ENCAP_LEN
        except Exception:
            errors += 1
            log.exception("unexpected error on the VXLAN receive path")
        finally:
            view.release()
            c = self.counters
            c.rx_packets += received
            c.rx_bytes += received_bytes
            c.rx_errors += errors

    def _count_drop(self, datagram: memoryview) -> None:
        # Off the hot path: only datagrams the fast check refused get here.
        reason = drop_reason(datagram, self.vni, self._mac_bytes) or "rx_errors"
        setattr(self.counters, reason, getattr(self.counters, reason) + 1)


def _check_device_name(name: str) -> None:
    # TUNSETIFF silently cuts names to 15 bytes; a cut name would not be the device we report.
    encoded = name.encode()
    if not encoded or len(encoded) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name):
        raise BackendError(f"invalid device name for the userspace VXLAN plane: {name!r}")


def _open_socket(iface: ExternalInterface, port: int) -> socket.socket:
    """The UDP socket, sending as the kernel vxlan device does (DF clear)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        # df unset on the device: the outer packet may be fragmented on the way, never refused.
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        sock.bind((str(iface.iface_addr), port))
    except BaseException:
        sock.close()
        raise
    return sock


async def start_vxlan_userspace_dataplane(
    subnet: IPv4Network,
    network: IPv4Network,
    iface: ExternalInterface,
    *,
    vni: int,
    port: int,
    mac: str,
    device_name: str,
) -> VXLANUserspacePlane:
    """Build and start the plane for ``subnet`` (the own lease) inside ``network``.

    The TUN gets the kernel vxlan device's name, address and MTU, so that routes, the subnet file
    and anything else looking at ``flannel.<VNI>`` cannot tell the difference.
    """
    _check_device_name(device_name)
    if not 0 <= vni <= MAX_VNI:
        raise BackendError(f"VXLAN VNI out of range: {vni}")
    if not 0 < port < 65536:
        raise BackendError(f"VXLAN port out of range: {port}")
    try:
        mac = format_mac(mac_to_bytes(mac))
    except ValueError as exc:
        raise BackendError(f"invalid VtepMAC for the userspace VXLAN plane: {exc}") from None
    mtu = iface.mtu - VXLAN_OVERHEAD
    if mtu < 68:
        raise BackendError(f"MTU of {iface.name} ({iface.mtu}) too small for VXLAN")
    tun_addr = subnet.network_address
    try:
        tun_fd, tun_name = open_tun(device_name)
    except OSError as exc:
        raise BackendError(f"failed to open TUN device {device_name}: {exc}") from None
    sock: socket.socket | None = None
    try:
        try:
            await configure_tun(tun_name, tun_addr, mtu, network)
        except (NetlinkError, OSError, IndexError) as exc:
            raise BackendError(f"failed to configure {tun_name}: {exc}") from None
        try:
            sock = _open_socket(iface, port)
        except OSError as exc:
            raise BackendError(
                f"failed to bind VXLAN UDP socket to {iface.iface_addr}:{port}: {exc}"
            ) from None
        plane = VXLANUserspacePlane(
            tun_fd, tun_name, tun_addr, mtu, sock, vni=vni, port=port, mac=mac
        )
        plane.start()
    except BaseException:
        if sock is not None:
            sock.close()
        os.close(tun_fd)
        raise
    log.info(
        "userspace VXLAN: %s %s/32 mtu %d VNI %d VtepMAC %s, listening on %s:%d",
        tun_name,
        tun_addr,
        mtu,
        vni,
        mac,
        iface.iface_addr,
        port,
    )
    return plane


__all__ = [
    "DEFAULT_VXLAN_PORT",
    "ENCAP_LEN",
    "INNER_ETH_LEN",
    "VXLAN_HEADER_LEN",
    "VXLANCounters",
    "VXLANUserspacePlane",
    "drop_reason",
    "encap_header",
    "format_mac",
    "mac_to_bytes",
    "parse_vni",
    "start_vxlan_userspace_dataplane",
    "vxlan_header",
]
