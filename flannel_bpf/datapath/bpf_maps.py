"""The agent's side of bpf/include/flannel_bpf.h: map layouts, hooks, reasons, and the pinned maps.

tests/test_bpf_layout.py checks every number here against the C header, so the two cannot drift.
"""

from __future__ import annotations

import enum
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Final

from flannel_bpf.datapath import bpf_sys
from flannel_bpf.datapath.vxlan_wire import (
    VXLAN_OVERHEAD as VXLAN_OVERHEAD,  # mirrored in flannel_bpf.h
)
from flannel_bpf.datapath.vxlan_wire import format_mac, mac_to_bytes

UDP_OVERHEAD: Final = 28  # flannel's udp backend: outer IPv4 + UDP; mirrored in flannel_bpf.h
VXLAN6_OVERHEAD: Final = 70  # flannel-v6's frames: outer IPv6 + UDP + VXLAN + inner Ethernet

LAYOUT_VERSION: Final = 4
MAX_REMOTES: Final = 65536
REASON_MAX: Final = 64
MAX_SENDERS: Final = MAX_REMOTES
NEXTHOP_SLOT_BITS: Final = 12
NEXTHOP_SLOTS: Final = 1 << NEXTHOP_SLOT_BITS
NEXTHOP_TTL_JIFFIES: Final = 10
FB_REMOTE_SKIP: Final = 0x0001
FB_REMOTE_IPV6_UNDERLAY: Final = 0x0002  # fb_remotes6: flannel-v6's frame to vtep_ip6
FB_CFG_CHECK_SOURCES: Final = 0x01  # --anti-spoofing
FB_CFG_HOST_ROUTING: Final = 0x02  # --host-routing=bpf
# Host routing (flannel_bpf.h "Host routing"): the mark the agent's mangle rules set on packets
# of validated flows, how long a validation holds, the maps' sizes.
FB_MARK_VALIDATED: Final = 0x00200000
FLOW_TTL_NS: Final = 1_000_000_000
MAX_FLOWS: Final = 65536
MAX_ENDPOINTS: Final = 4096
REASON_FIRST_DROP: Final = 40


class Hook(enum.IntEnum):
    TC_ENCAP = 0
    XDP_DECAP = 1
    TC_DECAP = 2
    POD_EGRESS = 3
    POD_DELIVER = 4

    @property
    def label(self) -> str:
        return self.name.lower()


HOOK_MAX: Final = len(Hook)
STATS_ENTRIES: Final = HOOK_MAX * REASON_MAX


class Reason(enum.IntEnum):
    """Stable numbers (they index pinned counters): append, never renumber."""

    ENCAP_REDIRECT = 0
    DECAP_PASS = 1
    DECAP_REDIRECT = 2
    DECAP_TO_POD = 3
    ENCAP_FROM_POD = 4
    FLOW_LEARNT = 5
    POD_LEARNT = 6

    PASS_NOT_IPV4 = 8
    PASS_IP_OPTIONS = 9
    PASS_NO_REMOTE = 10
    PASS_NO_CONFIG = 11
    PASS_NO_ROUTE = 12
    PASS_NO_NEIGH = 13
    PASS_NOT_FORWARDING = 14
    PASS_TOO_BIG = 15
    PASS_SHORT = 16
    PASS_NOT_OURS = 17
    PASS_FRAGMENT = 18
    PASS_BAD_FLAGS = 19
    PASS_OTHER_VNI = 20
    PASS_OTHER_MAC = 21
    PASS_INNER_NOT_IPV4 = 22
    PASS_ADJUST_FAILED = 23
    PASS_SKIP = 24
    PASS_GSO = 25
    PASS_TTL_EXPIRED = 26
    PASS_NOT_VALIDATED = 27
    PASS_REVALIDATE = 28
    PASS_TCP_CONTROL = 29
    PASS_NO_ENDPOINT = 30
    PASS_NO_PORTS = 31
    PASS_NO_L4_CSUM = 32

    DROP_INNER_MALFORMED = 40
    DROP_WRITE_FAILED = 41
    DROP_UNKNOWN_SENDER = 42
    DROP_SPOOFED_SOURCE = 43

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def outcome(self) -> str:
        """handled / passed (to the kernel, untouched) / dropped."""
        if self < 8:
            return "handled"
        return "passed" if self < REASON_FIRST_DROP else "dropped"


# --------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class MapSpec:
    name: str
    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int = 0


REMOTE_KEY = struct.Struct("<I4s")  # prefixlen (host order), subnet (network order)
REMOTE6_KEY = struct.Struct("<I16s")  # fb_remotes6: prefixlen, IPv6 subnet
REMOTE6_VALUE = struct.Struct("<4s6sH16s")  # fb_remote6: the IPv4 VTEP's fields, PublicIPv6
REMOTE_VALUE = struct.Struct("<4s6sH")  # vtep_ip, vtep_mac, flags
CONFIG = struct.Struct("<4sI2sHHBBII6s6sI16s6sBB")
COUNTER = struct.Struct("<QQ")
INDEX = struct.Struct("<I")
SENDER_KEY = struct.Struct("4s")  # an underlay IPv4 address, network order
SENDER_VALUE = struct.Struct("<I")  # how many leases name it
SENDER6_KEY = struct.Struct("16s")  # an underlay IPv6 address (fb_senders6)
# expires (jiffies), peer (network order), ifindex, mtu, ip_id, smac, dmac
NEXTHOP = struct.Struct("<Q4sIHH6s6s")
# The same for IPv6 peers (fb_nexthops6): expires, peer, ifindex, mtu, smac, dmac, pad
NEXTHOP6 = struct.Struct("<Q16sIH6s6s6s")
# saddr, daddr, sport, dport (network order), proto, dir, pad
FLOW_KEY = struct.Struct("<4s4s2s2sBBH")
FLOW_VALUE = struct.Struct("<Q")  # expires, bpf_ktime_get_ns()
ENDPOINT_KEY = struct.Struct("4s")  # a local pod's IPv4 address
ENDPOINT_VALUE = struct.Struct("<I6s6sI")  # ifindex, pod MAC, bridge MAC, pad

REMOTES = MapSpec(
    "fb_remotes",
    bpf_sys.BPF_MAP_TYPE_LPM_TRIE,
    REMOTE_KEY.size,
    REMOTE_VALUE.size,
    MAX_REMOTES,
    bpf_sys.BPF_F_NO_PREALLOC,
)
REMOTES6 = MapSpec(
    "fb_remotes6",
    bpf_sys.BPF_MAP_TYPE_LPM_TRIE,
    REMOTE6_KEY.size,
    REMOTE6_VALUE.size,
    MAX_REMOTES,
    bpf_sys.BPF_F_NO_PREALLOC,
)
CONFIG_MAP = MapSpec("fb_config", bpf_sys.BPF_MAP_TYPE_ARRAY, 4, CONFIG.size, 1)
STATS = MapSpec("fb_stats", bpf_sys.BPF_MAP_TYPE_PERCPU_ARRAY, 4, COUNTER.size, STATS_ENTRIES)
SENDERS = MapSpec(
    "fb_senders",
    bpf_sys.BPF_MAP_TYPE_HASH,
    SENDER_KEY.size,
    SENDER_VALUE.size,
    MAX_SENDERS,
    bpf_sys.BPF_F_NO_PREALLOC,
)
SENDERS6 = MapSpec(
    "fb_senders6",
    bpf_sys.BPF_MAP_TYPE_HASH,
    SENDER6_KEY.size,
    SENDER_VALUE.size,
    MAX_SENDERS,
    bpf_sys.BPF_F_NO_PREALLOC,
)
NEXTHOPS = MapSpec(
    "fb_nexthops", bpf_sys.BPF_MAP_TYPE_PERCPU_ARRAY, INDEX.size, NEXTHOP.size, NEXTHOP_SLOTS
)
NEXTHOPS6 = MapSpec(
    "fb_nexthops6", bpf_sys.BPF_MAP_TYPE_PERCPU_ARRAY, INDEX.size, NEXTHOP6.size, NEXTHOP_SLOTS
)
FLOWS = MapSpec(
    "fb_flows", bpf_sys.BPF_MAP_TYPE_LRU_HASH, FLOW_KEY.size, FLOW_VALUE.size, MAX_FLOWS
)
ENDPOINTS = MapSpec(
    "fb_endpoints",
    bpf_sys.BPF_MAP_TYPE_LRU_HASH,
    ENDPOINT_KEY.size,
    ENDPOINT_VALUE.size,
    MAX_ENDPOINTS,
)
ALL_MAPS: Final = (
    REMOTES,
    REMOTES6,
    CONFIG_MAP,
    STATS,
    SENDERS,
    SENDERS6,
    NEXTHOPS,
    NEXTHOPS6,
    FLOWS,
    ENDPOINTS,
)


@dataclass(frozen=True)
class Endpoint:
    """A local pod as host routing knows it (fb_endpoints)."""

    address: IPv4Address
    ifindex: int
    mac: str
    gw_mac: str


@dataclass(frozen=True)
class NextHop:
    """One CPU's cached answer of bpf_fib_lookup() for a peer (fb_nexthops)."""

    expires_jiffies: int
    peer: IPv4Address | IPv6Address
    ifindex: int
    mtu: int
    smac: str
    dmac: str

    @classmethod
    def unpack(cls, raw: bytes) -> NextHop:
        expires, peer, ifindex, mtu, _ip_id, smac, dmac = NEXTHOP.unpack(raw)
        return cls(expires, IPv4Address(peer), ifindex, mtu, format_mac(smac), format_mac(dmac))

    @classmethod
    def unpack6(cls, raw: bytes) -> NextHop:
        """An fb_nexthops6 entry (a PublicIPv6 peer)."""
        expires, peer, ifindex, mtu, smac, dmac, _pad = NEXTHOP6.unpack(raw)
        return cls(expires, IPv6Address(peer), ifindex, mtu, format_mac(smac), format_mac(dmac))


@dataclass(frozen=True)
class Remote:
    """One fb_remotes (IPv4 subnet) or fb_remotes6 (IPv6 subnet) entry: a remote subnet and the
    IPv4 VTEP that serves it; for an IPv6 subnet also the peer's PublicIPv6 (the source of its
    flannel-v6 frames)."""

    subnet: IPv4Network | IPv6Network
    vtep_ip: IPv4Address
    vtep_mac: str
    flags: int = 0
    vtep_ip6: IPv6Address | None = None

    def key(self) -> bytes:
        return remote_key(self.subnet)

    @property
    def vtep_address(self) -> IPv4Address | IPv6Address:
        """Where the programs send this subnet's packets: the IPv4 VTEP, or over the IPv6
        underlay the PublicIPv6."""
        if self.flags & FB_REMOTE_IPV6_UNDERLAY and self.vtep_ip6 is not None:
            return self.vtep_ip6
        return self.vtep_ip

    def value(self) -> bytes:
        v4 = (self.vtep_ip.packed, mac_to_bytes(self.vtep_mac), self.flags)
        if self.subnet.version == 6:
            return REMOTE6_VALUE.pack(*v4, (self.vtep_ip6 or IPv6Address(0)).packed)
        return REMOTE_VALUE.pack(*v4)


def remotes_map(subnet: IPv4Network | IPv6Network) -> MapSpec:
    return REMOTES6 if subnet.version == 6 else REMOTES


def remote_key(subnet: IPv4Network | IPv6Network) -> bytes:
    layout = REMOTE6_KEY if subnet.version == 6 else REMOTE_KEY
    return layout.pack(subnet.prefixlen, subnet.network_address.packed)


def decode_remote(key: bytes, value: bytes) -> Remote:
    if len(key) == REMOTE6_KEY.size:
        prefixlen, addr6 = REMOTE6_KEY.unpack(key)
        ip, mac, flags, vtep6 = REMOTE6_VALUE.unpack(value)
        ip6 = IPv6Address(vtep6)
        subnet6 = IPv6Network((IPv6Address(addr6), prefixlen))
        return Remote(subnet6, IPv4Address(ip), format_mac(mac), flags, ip6 if int(ip6) else None)
    prefixlen, addr = REMOTE_KEY.unpack(key)
    ip, mac, flags = REMOTE_VALUE.unpack(value)
    return Remote(
        IPv4Network((IPv4Address(addr), prefixlen)), IPv4Address(ip), format_mac(mac), flags
    )


@dataclass(frozen=True)
class DatapathConfig:
    """fb_config: everything the programs need that is not per peer."""

    local_ip: IPv4Address
    vni: int
    port: int
    uplink_ifindex: int
    uplink_mac: str
    vtep_ifindex: int
    vtep_mac: str
    sport_min: int = 32768
    sport_max: int = 60999
    ttl: int = 64
    flags: int = 0
    vtep6_ifindex: int = 0  # flannel-v6.<VNI>, 0 without IPv6
    local_ip6: IPv6Address | None = None  # our PublicIPv6: flannel-v6 frames decapsulated to it
    vtep6_mac: str = "00:00:00:00:00:00"  # flannel-v6.<VNI>'s MAC
    hop_limit: int = 64  # outer IPv6 hop limit over the IPv6 underlay (the uplink's)

    def pack(self) -> bytes:
        return CONFIG.pack(
            self.local_ip.packed,
            self.vni,
            socket.htons(self.port).to_bytes(2, "little"),
            self.sport_min,
            self.sport_max,
            self.ttl,
            self.flags,
            self.uplink_ifindex,
            self.vtep_ifindex,
            mac_to_bytes(self.vtep_mac),
            mac_to_bytes(self.uplink_mac),
            self.vtep6_ifindex,
            (self.local_ip6 or IPv6Address(0)).packed,
            mac_to_bytes(self.vtep6_mac),
            self.hop_limit,
            0,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> DatapathConfig:
        (ip, vni, port, smin, smax, ttl, flags, up_idx, vtep_idx, vtep_mac, up_mac, vtep6_idx,
         local6, vtep6_mac, hop_limit, _pad) = CONFIG.unpack(raw)  # fmt: skip
        return cls(
            local_ip=IPv4Address(ip),
            vni=vni,
            port=int.from_bytes(port, "big"),
            uplink_ifindex=up_idx,
            uplink_mac=format_mac(up_mac),
            vtep_ifindex=vtep_idx,
            vtep_mac=format_mac(vtep_mac),
            sport_min=smin,
            sport_max=smax,
            ttl=ttl,
            flags=flags,
            vtep6_ifindex=vtep6_idx,
            local_ip6=IPv6Address(local6) if int.from_bytes(local6, "big") else None,
            vtep6_mac=format_mac(vtep6_mac),
            hop_limit=hop_limit,
        )


# --------------------------------------------------------------------------------------------
# Pinned maps


class LayoutMismatch(Exception):
    """A pin exists under our name but holds a map of another shape."""


def check_layout(fd: int, spec: MapSpec) -> None:
    info = bpf_sys.map_info(fd)
    found = (info.type, info.key_size, info.value_size, info.max_entries, info.flags)
    wanted = (spec.type, spec.key_size, spec.value_size, spec.max_entries, spec.flags)
    if found != wanted:
        raise LayoutMismatch(
            f"{spec.name}: (type, key, value, max_entries, flags) is {found}, expected {wanted}"
        )


@dataclass(frozen=True)
class CounterKey:
    hook: Hook
    reason: Reason


class PinnedMaps:
    """Open fds of one agent instance's maps, checked against our layout."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        try:
            for spec in ALL_MAPS:
                fd = bpf_sys.obj_get(pin_dir / spec.name)
                self._fds[spec.name] = fd
                check_layout(fd, spec)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, spec: MapSpec) -> int:
        return self._fds[spec.name]

    @property
    def stats_map_id(self) -> int:
        """Counters reset only when this changes (the map was recreated)."""
        return bpf_sys.map_info(self.fd(STATS)).id

    def count(self, spec: MapSpec) -> int:
        """Entries in a hash or trie map (a walk of its keys)."""
        return bpf_sys.map_count(self.fd(spec), spec.key_size)

    # fb_config
    def write_config(self, cfg: DatapathConfig) -> None:
        previous = self.read_config()
        bpf_sys.map_update(self.fd(CONFIG_MAP), INDEX.pack(0), cfg.pack())
        # Next hops cached under another config were looked up for another address or uplink.
        # Unconfigured programs cache nothing, and a restart with the same config keeps them.
        if previous is not None and previous != cfg:
            self.clear_nexthops()

    def read_config(self) -> DatapathConfig | None:
        raw = bpf_sys.map_lookup(self.fd(CONFIG_MAP), INDEX.pack(0), CONFIG.size)
        if raw is None or raw == bytes(CONFIG.size):
            return None
        return DatapathConfig.unpack(raw)

    # fb_remotes and fb_remotes6, by the subnet's family
    def set_remote(self, remote: Remote) -> None:
        bpf_sys.map_update(self.fd(remotes_map(remote.subnet)), remote.key(), remote.value())

    def delete_remote(self, subnet: IPv4Network | IPv6Network) -> bool:
        return bpf_sys.map_delete(self.fd(remotes_map(subnet)), remote_key(subnet))

    def remotes(self) -> Iterator[Remote]:
        """Every entry of both maps, IPv4 first."""
        for spec in (REMOTES, REMOTES6):
            fd = self.fd(spec)
            for key in list(bpf_sys.map_keys(fd, spec.key_size)):
                value = bpf_sys.map_lookup(fd, key, spec.value_size)
                if value is not None:
                    yield decode_remote(key, value)

    # fb_nexthops
    def nexthops(self) -> dict[IPv4Address | IPv6Address, list[NextHop]]:
        """The cached next hop to each peer (both underlays), one per CPU that holds one
        (expired or not)."""
        found: dict[IPv4Address | IPv6Address, list[NextHop]] = {}
        for spec, layout, unpack in (
            (NEXTHOPS, NEXTHOP, NextHop.unpack),
            (NEXTHOPS6, NEXTHOP6, NextHop.unpack6),
        ):
            fd = self.fd(spec)
            for slot in range(NEXTHOP_SLOTS):
                for raw in bpf_sys.map_lookup_percpu(fd, INDEX.pack(slot), layout.size) or []:
                    hop = unpack(raw)
                    if hop.expires_jiffies:
                        found.setdefault(hop.peer, []).append(hop)
        return found

    def clear_nexthops(self) -> None:
        """Forget every cached next hop (both families): the programs ask the FIB again."""
        for spec, layout in ((NEXTHOPS, NEXTHOP), (NEXTHOPS6, NEXTHOP6)):
            fd = self.fd(spec)
            empty = bytes(((layout.size + 7) & ~7) * bpf_sys.possible_cpus())
            for slot in range(NEXTHOP_SLOTS):
                bpf_sys.map_update(fd, INDEX.pack(slot), empty)

    # fb_senders
    # fb_senders and fb_senders6, by the address's family
    def set_sender(self, address: IPv4Address | IPv6Address, leases: int) -> None:
        spec = SENDERS6 if address.version == 6 else SENDERS
        bpf_sys.map_update(self.fd(spec), address.packed, SENDER_VALUE.pack(leases))

    def delete_sender(self, address: IPv4Address | IPv6Address) -> bool:
        spec = SENDERS6 if address.version == 6 else SENDERS
        return bpf_sys.map_delete(self.fd(spec), address.packed)

    def senders(self) -> dict[IPv4Address | IPv6Address, int]:
        found: dict[IPv4Address | IPv6Address, int] = {}
        for spec in (SENDERS, SENDERS6):
            fd = self.fd(spec)
            for key in list(bpf_sys.map_keys(fd, spec.key_size)):
                value = bpf_sys.map_lookup(fd, key, SENDER_VALUE.size)
                if value is not None:
                    address = IPv6Address(key) if spec is SENDERS6 else IPv4Address(key)
                    found[address] = SENDER_VALUE.unpack(value)[0]
        return found

    # host routing
    def endpoints(self) -> list[Endpoint]:
        fd = self.fd(ENDPOINTS)
        found = []
        for key in list(bpf_sys.map_keys(fd, ENDPOINT_KEY.size)):
            value = bpf_sys.map_lookup(fd, key, ENDPOINT_VALUE.size)
            if value is not None:
                ifindex, mac, gw_mac, _ = ENDPOINT_VALUE.unpack(value)
                found.append(Endpoint(IPv4Address(key), ifindex, format_mac(mac),
                                      format_mac(gw_mac)))  # fmt: skip
        return found

    def forget_endpoints(self, ifindex: int | None = None) -> int:
        """Drop the pods behind a veth (gone), or every pod; returns how many."""
        fd = self.fd(ENDPOINTS)
        dropped = 0
        for key in list(bpf_sys.map_keys(fd, ENDPOINT_KEY.size)):
            value = bpf_sys.map_lookup(fd, key, ENDPOINT_VALUE.size)
            if value is not None and (
                ifindex is None or ENDPOINT_VALUE.unpack(value)[0] == ifindex
            ):
                dropped += bpf_sys.map_delete(fd, key)
        return dropped

    def flows(self) -> int:
        return self.count(FLOWS)

    def forget_flows(self) -> int:
        fd = self.fd(FLOWS)
        return sum(bpf_sys.map_delete(fd, key) for key in list(bpf_sys.map_keys(fd, FLOW_KEY.size)))

    # fb_stats
    def counters(self) -> dict[CounterKey, tuple[int, int]]:
        """Packets and bytes per (hook, reason), summed over CPUs; only the known reasons."""
        fd = self.fd(STATS)
        totals: dict[CounterKey, tuple[int, int]] = {}
        for hook in Hook:
            for reason in Reason:
                index = hook * REASON_MAX + reason
                per_cpu = bpf_sys.map_lookup_percpu(fd, INDEX.pack(index), COUNTER.size) or []
                packets = bytes_ = 0
                for raw in per_cpu:
                    p, b = COUNTER.unpack(raw)
                    packets += p
                    bytes_ += b
                totals[CounterKey(hook, reason)] = (packets, bytes_)
        return totals
