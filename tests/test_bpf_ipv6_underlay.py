"""BPF encapsulation over the IPv6 underlay (an IPv6-only network: peers without an IPv4 VTEP),
on the real kernel: the frame is flannel-v6.<VNI>'s, byte for byte as vxlan.ko's flannel-v6
sends the same inner packet but for the outer UDP source port (per flow) and checksum (which
vxlan.ko leaves to the NIC), and its outer UDP checksum, derived in BPF from the inner one, is
right: a live flannel-v6 built as flanneld builds it (no udp6zerocsumrx) takes it, and drops the
same frame with one bit of the checksum changed. Aggregates and packets without an inner
checksum to derive from are left to vxlan.ko, counted. Live: a node's data path loaded as an
IPv6-only agent loads it (no flannel.<VNI>, no IPv4) carries pings, UDP and TCP from real
sockets (inner checksums still to be filled in: CHECKSUM_PARTIAL) to a vxlan.ko peer that
verifies every outer checksum."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_bpf.backends.bpf_fastpath import load_bpf_datapath
from flannel_bpf.backends.vxlan import PeerVtep, remote_entry
from flannel_bpf.datapath import loader
from flannel_bpf.datapath.bpf_maps import FB_REMOTE_IPV6_UNDERLAY, Hook, Reason, Remote
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.lab.netns import entered, run
from flannel_bpf.observe import metrics, status

from . import packets as pk
from .conftest import requires_root
from .test_bpf_ipv6 import (  # noqa: F401 - module fixtures, used by name
    A6,
    A_UL6,
    A_V6MAC,
    B_UL6,
    B_V6MAC,
    C6_SUBNET,
    _kernel_encapsulate6,
    topo6,
    topo66,
)
from .test_bpf_programs import (  # noqa: F401
    TC_ACT_REDIRECT,
    TC_ACT_UNSPEC,
    TOPO,
    Node,
    _ip,
    check_next_hop_cache,
    one_cpu,
    skb_ctx,
    topo,
)

pytestmark = [pytest.mark.root, requires_root]

UNRESOLVED6 = "fd10:5:0:6::/64"  # its PublicIPv6 is on the underlay's subnet, never answered
UNROUTED6 = "fd10:5:0:7::/64"  # no underlay route to its PublicIPv6


@pytest.fixture(scope="module")
def topo666(topo66: dict[str, Node]) -> Iterator[dict[str, Node]]:  # noqa: F811
    """A sends C6_SUBNET over the IPv6 underlay to B's PublicIPv6 and flannel-v6 MAC (what an
    IPv6-only peer's fb_remotes6 entry says); A's config names its PublicIPv6 and flannel-v6."""
    a = topo66["a"]
    run(["ip", "netns", "exec", a.ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    with entered(a.ns):
        index = socket.if_nametoindex("flannel-v6.1")
    a.config = dataclasses.replace(
        a.config, vtep6_ifindex=index, local_ip6=IPv6Address(A_UL6), vtep6_mac=A_V6MAC,
        hop_limit=64,
    )  # fmt: skip
    a.maps.write_config(a.config)
    remotes = {
        C6_SUBNET: B_UL6,
        UNRESOLVED6: "fd00:198:18::77",
        UNROUTED6: "fd00:99::1",
    }
    for subnet, public6 in remotes.items():
        a.maps.set_remote(_v6_only_remote(subnet, public6))
    try:
        yield topo66
    finally:
        for subnet in remotes:
            a.maps.delete_remote(IPv6Network(subnet))


def _v6_only_remote(subnet: str, public6: str) -> Remote:
    return Remote(IPv6Network(subnet), IPv4Address(0), B_V6MAC, FB_REMOTE_IPV6_UNDERLAY,
                  IPv6Address(public6))  # fmt: skip


def _inner(kind: str = "udp", dst: str = "fd10:5:0:3::7", **ip: Any) -> bytes:
    """An IPv6 packet from A's pod to one behind B, its upper-layer checksum right."""
    src = f"{A6}5"
    if kind == "tcp":
        tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 7, 9, 5 << 4, 0x18, 512, 0, 0) + b"t" * 40
        return pk.with_l4_checksum6(pk.ipv6(src, dst, tcp, nexthdr=6, **ip), 16)
    if kind == "icmpv6":
        echo = struct.pack("!BBHHH", 128, 0, 0, 0x1234, 1) + b"p" * 56
        return pk.with_l4_checksum6(pk.ipv6(src, dst, echo, nexthdr=58, **ip), 2)
    payload = ip.pop("payload", b"u" * 32)
    packet = pk.ipv6(src, dst, pk.udp(40000, 7777, payload), **ip)
    return pk.with_l4_checksum6(packet, 6)


def _frame(inner: bytes) -> bytes:
    """inner as it reaches A's flannel-v6.1 (its route's neighbour: B's flannel-v6 MAC)."""
    return pk.eth(B_V6MAC, A_V6MAC, pk.ETH_P_IPV6) + inner


def _masked(frame: bytes) -> bytes:
    """The outer UDP source port (per flow) and checksum zeroed."""
    out = bytearray(frame)
    out[54:56] = out[60:62] = b"\0\0"
    return bytes(out)


@pytest.mark.parametrize(
    ("kind", "ip"),
    [("udp", {}), ("tcp", {}), ("icmpv6", {}), ("udp", {"tclass": 0x03}),
     ("udp", {"tclass": 0xB9}), ("udp", {"hlim": 1}), ("udp", {"payload": b"L" * 1300})],
    ids=["udp", "tcp", "icmpv6", "ecn-ce", "dscp-ect1", "hlim1", "large"],
)  # fmt: skip
def test_encap66_is_flannel_v6s_frame_with_a_right_checksum(
    topo666: dict[str, Node], kind: str, ip: dict[str, Any]
) -> None:
    inner = _inner(kind, **ip)
    kernel = _kernel_encapsulate6(topo666, inner, underlay6=True)
    frame = _frame(inner)
    retval, out, delta = topo666["a"].run(Hook.TC_ENCAP, frame)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.ENCAP_REDIRECT: (1, len(frame))})
    assert len(out) == len(frame) + 70 == len(kernel)
    assert _masked(out) == _masked(kernel)
    assert out[:6] == pk.mac(TOPO["remote_underlay_mac"]) and out[70:76] == pk.mac(B_V6MAC)
    assert pk.outer_udp6_checksum_ok(out), out[60:62].hex()
    # The source port as over the IPv4 underlay: the inner flow's hash in the kernel's range.
    expected = pk.flow_source_port6(inner, TOPO["local_underlay"], (32768, 60999))
    assert struct.unpack("!H", out[54:56])[0] == expected


def test_encap66_then_decap_round_trip(topo666: dict[str, Node]) -> None:
    """B's programs take A's frame off the wire into flannel-v6.1, as they take flanneld's."""
    inner = _inner("tcp")
    _, wire, _ = topo666["a"].run(Hook.TC_ENCAP, _frame(inner))
    retval, out, delta = topo666["b"].run(Hook.TC_DECAP, wire)
    assert (retval, out) == (TC_ACT_REDIRECT, pk.eth(B_V6MAC, A_V6MAC, pk.ETH_P_IPV6) + inner)
    assert delta == {Reason.DECAP_REDIRECT: (1, len(wire))}


def _udp6_errors(ns: str) -> int:
    with entered(ns):
        text = Path("/proc/net/snmp6").read_text()
    return int(next(line.split()[1] for line in text.splitlines()
                    if line.startswith("Udp6InCsumErrors")))  # fmt: skip


def _rx_packets(ns: str, dev: str) -> int:
    out = subprocess.run(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", dev],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


@pytest.mark.parametrize("kind", ["udp", "tcp", "icmpv6"])
def test_a_live_flannel_v6_takes_our_frames_and_drops_a_bad_checksum(
    topo666: dict[str, Node], kind: str
) -> None:
    """Our frame sent on A's underlay: B's vxlan.ko flannel-v6.1 (no udp6zerocsumrx, as flanneld
    makes it) checks the outer UDP checksum before it decapsulates, so it receives the frame;
    the same frame with its checksum one off is counted as a checksum error and not received."""
    _, wire, _ = topo666["a"].run(Hook.TC_ENCAP, _frame(_inner(kind)))
    bad = bytearray(wire)
    bad[61] ^= 0x01
    b = topo666["b"].ns
    for frame, received in ((wire, 1), (bytes(bad), 0)):
        before = _rx_packets(b, "flannel-v6.1"), _udp6_errors(b)
        with entered(topo666["a"].ns):
            sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        with sender:
            sender.bind(("u0", 0))
            sender.send(frame)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            after = _rx_packets(b, "flannel-v6.1"), _udp6_errors(b)
            if after != before:
                break
            time.sleep(0.02)
        assert (after[0] - before[0], after[1] - before[1]) == (received, 1 - received), kind


def test_encap66_leaves_to_vxlan_ko_what_it_cannot_checksum(topo666: dict[str, Node]) -> None:
    """A GSO aggregate (its segments would share one checksum), and inner packets with no
    upper-layer checksum to derive from: an extension header, no next header, UDP's 0, bytes
    after the payload length (which the receiver sums and no inner checksum covers)."""
    a = topo666["a"]
    tcp = _frame(_inner("tcp"))
    assert a.run(Hook.TC_ENCAP, tcp, skb_ctx(gso_size=1380, gso_segs=2))[::2] == (
        TC_ACT_UNSPEC, {Reason.PASS_GSO: (1, len(tcp))}
    )  # fmt: skip
    src, dst = f"{A6}5", "fd10:5:0:3::7"
    no_l4 = [
        pk.ipv6(src, dst, b"\x11\x00" + b"\0" * 6 + pk.udp(1, 2, b"hop-by-hop"), nexthdr=0),
        pk.ipv6(src, dst, b"", nexthdr=59),
        pk.ipv6(src, dst, pk.udp(1, 2, b"no checksum")),
    ]
    frames = [_frame(inner) for inner in no_l4]
    frames += [_frame(_inner(kind)) + b"pad" for kind in ("udp", "tcp", "icmpv6")]
    for frame in frames:
        retval, out, delta = a.run(Hook.TC_ENCAP, frame)
        assert (retval, out, delta) == (
            TC_ACT_UNSPEC, frame, {Reason.PASS_NO_L4_CSUM: (1, len(frame))}
        )  # fmt: skip


@pytest.mark.parametrize(
    ("dst", "reason"),
    [("fd10:5:0:6::1", Reason.PASS_NO_NEIGH), ("fd10:5:0:7::1", Reason.PASS_NO_ROUTE)],
    ids=["no-neigh", "no-route"],
)
def test_encap66_leaves_unreachable_peers_to_vxlan_ko(
    topo666: dict[str, Node], dst: str, reason: Reason
) -> None:
    frame = _frame(_inner(dst=dst))
    retval, out, delta = topo666["a"].run(Hook.TC_ENCAP, frame)
    assert (retval, out, delta) == (TC_ACT_UNSPEC, frame, {reason: (1, len(frame))})


def test_encap66_too_big_and_without_a_public_ipv6(topo666: dict[str, Node]) -> None:
    """A packet that would not fit the underlay with 70 bytes more goes to the kernel (Packet
    Too Big comes from there); a node without a PublicIPv6 has nothing to send from."""
    a = topo666["a"]
    big = _frame(_inner(payload=b"B" * 1400))  # 14 + 40 + 8 + 1400 + 70 > 1514
    assert a.run(Hook.TC_ENCAP, big)[::2] == (TC_ACT_UNSPEC, {Reason.PASS_TOO_BIG: (1, len(big))})
    a.maps.write_config(dataclasses.replace(a.config, local_ip6=None))
    try:
        frame = _frame(_inner())
        assert a.run(Hook.TC_ENCAP, frame)[::2] == (
            TC_ACT_UNSPEC, {Reason.PASS_SKIP: (1, len(frame))}
        )  # fmt: skip
    finally:
        a.maps.write_config(a.config)


@pytest.mark.usefixtures("one_cpu")
def test_encap66_next_hops_are_cached_and_asked_again(topo666: dict[str, Node]) -> None:
    """fb_nexthops6 as fb_nexthops: the FIB's answer for a PublicIPv6 is reused within the TTL
    (here while forwarding is off, which the FIB refuses), asked again after it, and emptied by
    a changed fb_config."""
    a = topo666["a"]
    frame = _frame(_inner())
    check_next_hop_cache(a, frame, IPv6Address(B_UL6), "ipv6")
    a.maps.write_config(a.config)  # unchanged (an agent restart): the cache stays
    assert IPv6Address(B_UL6) in a.maps.nexthops()
    try:
        a.maps.write_config(dataclasses.replace(a.config, hop_limit=63))
        assert a.maps.nexthops() == {}
    finally:
        a.maps.write_config(a.config)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=st.binary(max_size=200), nexthdr=st.sampled_from([0, 6, 17, 44, 58, 59, 255]),
       claimed=st.integers(min_value=0, max_value=0xFFFF))  # fmt: skip
def test_fuzz_encap66_never_crashes(
    topo666: dict[str, Node], payload: bytes, nexthdr: int, claimed: int
) -> None:
    """Any inner bytes towards an IPv6-underlay peer: one verdict, one counter."""
    inner = pk.ipv6(f"{A6}5", "fd10:5:0:3::7", payload, nexthdr=nexthdr, payload_length=claimed)
    retval, _, delta = topo666["a"].run(Hook.TC_ENCAP, _frame(inner))
    assert retval in (TC_ACT_REDIRECT, TC_ACT_UNSPEC)
    assert len(delta) == 1 and sum(p for p, _ in delta.values()) == 1


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    l4=st.sampled_from([(6, 16), (17, 6), (58, 2)]),  # next header, checksum offset
    segment=st.binary(min_size=20, max_size=1300),
    src=st.binary(min_size=16, max_size=16),
    host=st.binary(min_size=8, max_size=8),
    first=st.tuples(st.integers(0, 0xFF), st.integers(0, 0xFFFFF), st.integers(0, 0xFF)),
)
def test_fuzz_encap66_outer_checksum_is_right_for_any_checksummed_inner(
    topo666: dict[str, Node],
    l4: tuple[int, int],
    segment: bytes,
    src: bytes,
    host: bytes,
    first: tuple[int, int, int],
) -> None:
    """Whatever a TCP, UDP or ICMPv6 segment with a right checksum holds (odd lengths, every
    address, traffic class, flow label and hop limit the inner header sums in), the derived
    outer checksum is the one the receiver computes over the whole datagram."""
    nexthdr, offset = l4
    tclass, flow, hlim = first
    dst = socket.inet_ntop(socket.AF_INET6, socket.inet_pton(socket.AF_INET6, B_POD6)[:8] + host)
    packet = pk.ipv6(socket.inet_ntop(socket.AF_INET6, src), dst, segment, nexthdr=nexthdr,
                     tclass=tclass, flow=flow, hlim=hlim)  # fmt: skip
    inner = pk.with_l4_checksum6(packet, offset)
    frame = _frame(inner)
    retval, out, delta = topo666["a"].run(Hook.TC_ENCAP, frame)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.ENCAP_REDIRECT: (1, len(frame))})
    assert out[84:] == inner and pk.outer_udp6_checksum_ok(out), out[60:62].hex()


# --------------------------------------------------------------------------------------------
# Live: an IPv6-only node's data path attached as the agent attaches it, real sockets through it

A_POD6, B_POD6 = "fd10:5:0:1::", "fd10:5:0:3::"  # each side's flannel-v6.1 address (/128)
TCP_MD5SIG = 14  # linux/tcp.h; Python's socket module does not name it


@dataclasses.dataclass
class IPv6OnlyPair:
    a: str  # our node: the BPF data path as an IPv6-only agent loads it
    b: str  # a flanneld-like peer: vxlan.ko's flannel-v6.1 alone
    datapath: loader.BPFDatapath

    def encap(self) -> dict[Reason, tuple[int, int]]:
        assert self.datapath.maps is not None
        return {k.reason: v for k, v in self.datapath.maps.counters().items()
                if k.hook is Hook.TC_ENCAP and v != (0, 0)}  # fmt: skip

    def taken(self) -> tuple[int, int]:
        """B's checksum errors, and frames its flannel-v6.1 decapsulated."""
        return _udp6_errors(self.b), _rx_packets(self.b, "flannel-v6.1")


def _load_in(
    ns: str, vtep: loader.Device | None, local_ip: IPv4Address | None
) -> loader.BPFDatapath:
    """load_bpf_datapath in ns as the vxlan backend calls it, with flannel-v6.1 and u0 at
    A_UL6: dual stack with vtep (flannel.1) and local_ip, IPv6-only with neither. The pins go
    under flannel.1's name either way."""
    with entered(ns):  # the loader's threads start from this one, so they are in ns too
        index = socket.if_nametoindex
        iface = ExternalInterface("u0", index("u0"), 1500, local_ip, local_ip,
                                  IPv6Address(A_UL6), IPv6Address(A_UL6))  # fmt: skip
        vtep6 = loader.Device("flannel-v6.1", index("flannel-v6.1"), A_V6MAC)
        return asyncio.run(load_bpf_datapath(
            iface, vtep, wire=loader.VXLAN, local_ip=local_ip, port=8472,
            bpffs=loader.DEFAULT_BPFFS, decap_mode="auto", vni=1, vtep6=vtep6,
            pin_name="flannel.1",
        ))  # fmt: skip


@pytest.fixture
def ipv6_only_pair(netns: Callable[[str], str]) -> Iterator[IPv6OnlyPair]:
    """Two namespaces on a veth with an IPv6 underlay only, each with flannel-v6.1 as flanneld
    builds it (no udp6zerocsumrx: the outer UDP checksum is verified) and the other's subnet
    routed into it. A runs the agent's data path for an IPv6-only network (no flannel.1, no
    IPv4 address: load_bpf_datapath with vtep and local_ip None, pins under flannel.1's name),
    B plain vxlan.ko. A sends with tx checksum offload off on its uplink: a veth hands a
    CHECKSUM_PARTIAL skb to its peer as such, and the receiver takes that as verified, so only
    final checksums make B's UDP check ours."""
    a, b = netns("6a"), netns("6b")
    run(["ip", "link", "add", "u0", "netns", a, "address", TOPO["local_underlay_mac"],
         "type", "veth", "peer", "name", "u0", "netns", b,
         "address", TOPO["remote_underlay_mac"]])  # fmt: skip
    run(["ip", "netns", "exec", a, "ethtool", "-K", "u0", "tx", "off"])
    for ns in (a, b):  # a node forwards its pods' packets (and bpf_fib_lookup wants it on)
        run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
    sides = ((a, A_UL6, A_V6MAC, A_POD6, B_UL6, B_V6MAC, B_POD6),
             (b, B_UL6, B_V6MAC, B_POD6, A_UL6, A_V6MAC, A_POD6))  # fmt: skip
    for ns, ul6, mac, pod, peer_ul6, peer_mac, peer_pod in sides:
        _ip(ns, "-6", "addr", "add", f"{ul6}/64", "dev", "u0", "nodad")
        _ip(ns, "link", "set", "u0", "up")
        _ip(ns, "link", "add", "flannel-v6.1", "address", mac, "type", "vxlan", "id", "1",
            "dev", "u0", "local", ul6, "dstport", "8472", "nolearning")  # fmt: skip
        _ip(ns, "link", "set", "flannel-v6.1", "mtu", "1430", "up")
        _ip(ns, "-6", "addr", "add", f"{pod}/128", "dev", "flannel-v6.1", "nodad")
        _ip(ns, "-6", "neigh", "add", peer_pod, "lladdr", peer_mac, "dev", "flannel-v6.1",
            "nud", "permanent")  # fmt: skip
        _ip(ns, "-6", "route", "add", f"{peer_pod}/64", "via", peer_pod, "dev", "flannel-v6.1",
            "onlink")  # fmt: skip
        run(["bridge", "-n", ns, "fdb", "add", peer_mac, "dev", "flannel-v6.1", "dst", peer_ul6])
    datapath = None
    with entered(a):
        uplink, vtep6 = socket.if_nametoindex("u0"), socket.if_nametoindex("flannel-v6.1")
        pin_dir = loader.pin_dir_for("flannel.1")
    try:
        datapath = _load_in(a, None, None)
        with entered(a):
            assert loader.attached(0, uplink, vtep6) == {
                "tc_encap6": loader.VXLAN.encap, "tc_decap": loader.VXLAN.tc_decap
            }  # fmt: skip
        assert datapath.pin_dir == pin_dir and pin_dir.parent.name == "flannel_1"
        assert datapath.maps is not None
        cfg = datapath.maps.read_config()
        assert cfg is not None and (cfg.local_ip, cfg.vtep_ifindex) == (IPv4Address(0), 0)
        assert (cfg.vtep6_ifindex, cfg.local_ip6) == (vtep6, IPv6Address(A_UL6))
        remote = remote_entry(PeerVtep(IPv6Network(f"{B_POD6}/64"), IPv6Address(B_UL6), B_V6MAC),
                              direct=False)  # fmt: skip
        assert remote.flags == FB_REMOTE_IPV6_UNDERLAY
        datapath.set_remote(remote)
        yield IPv6OnlyPair(a, b, datapath)
    finally:
        if datapath is not None:
            datapath.close()
        with entered(a):
            loader.cleanup(pin_dir)


def _ping6(pair: IPv6OnlyPair, count: int) -> None:
    ping = subprocess.run(
        ["ip", "netns", "exec", pair.a, "ping", "-6", "-n", "-q", "-c", str(count), "-i", "0.2",
         "-W", "2", "-I", A_POD6, B_POD6],
        capture_output=True, text=True,
    )  # fmt: skip
    assert f"{count} received" in ping.stdout, ping.stdout + ping.stderr


def _md5_key(peer: str) -> bytes:
    """struct tcp_md5sig naming one peer address: sockaddr_storage (a sockaddr_in6), flags,
    prefix length, key length, ifindex, key[80]."""
    key = b"flannel-bpf"
    address = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", 0, 0)
    address += socket.inet_pton(socket.AF_INET6, peer) + struct.pack("=I", 0)
    flags = struct.pack("=BBHi", 0, 0, len(key), 0)  # no prefix, any interface
    return address.ljust(128, b"\0") + flags + key.ljust(80, b"\0")


def _tcp_transfer(
    sender: tuple[str, str], receiver: tuple[str, str], size: int, *, md5: bool = False
) -> None:
    """size bytes from a socket in one (namespace, address) to one in the other, all of them
    checked. md5: both ends sign with TCP-MD5, for which the kernel builds no GSO aggregates
    (sk_gso_disable), so every data segment leaves as a single packet."""
    (src_ns, src_ip), (dst_ns, dst_ip) = sender, receiver
    data = os.urandom(size)
    received = bytearray()
    with entered(dst_ns):
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with entered(src_ns):
        client = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with server, client:
        if md5:
            server.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, _md5_key(src_ip))
            client.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG, _md5_key(dst_ip))
        server.bind((dst_ip, 0))
        server.listen(1)
        for sock in (server, client):
            sock.settimeout(20)
        client.bind((src_ip, 0))
        client.connect((dst_ip, server.getsockname()[1]))
        conn, _ = server.accept()
        with conn:
            conn.settimeout(20)

            def read() -> None:
                while chunk := conn.recv(1 << 16):
                    received.extend(chunk)

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            reader.join(30)
    assert len(received) == size and bytes(received) == data, f"{len(received)} of {size} bytes"


# flannel-v6.1's own multicast (MLD reports, router solicitations): for no peer's subnet
OTHERS = {Reason.PASS_NO_REMOTE}


def _grown(
    before: dict[Reason, tuple[int, int]], after: dict[Reason, tuple[int, int]]
) -> dict[Reason, tuple[int, int]]:
    zero = (0, 0)
    return {r: (after[r][0] - before.get(r, zero)[0], after[r][1] - before.get(r, zero)[1])
            for r in after if after[r] != before.get(r, zero)}  # fmt: skip


def test_an_ipv6_only_node_sends_single_packets_vxlan_ko_verifies(
    ipv6_only_pair: IPv6OnlyPair,
) -> None:
    """Pings, UDP datagrams and a TCP transfer without aggregates (TCP-MD5) from A's overlay
    address to B's: all arrive, every packet encapsulated by the programs (not one left to
    vxlan.ko), and B's flannel-v6.1 took each of our frames with no UDP checksum error. A
    wrong outer checksum would be dropped by B (test_a_live_flannel_v6_takes_our_frames...)."""
    pair = ipv6_only_pair
    a, b = (pair.a, A_POD6), (pair.b, B_POD6)
    _ping6(pair, 1)  # B's underlay address resolved (until then: pass_no_neigh, vxlan.ko's)
    errors, rx = pair.taken()

    before = pair.encap()
    _ping6(pair, 5)
    with _udp_sockets(pair) as (sink, source):
        sizes = [1, 100, 1000, 1382]  # 1382: 1430 with the IPv6 and UDP headers
        for size in sizes:
            source.sendto(bytes([size % 251]) * size, (B_POD6, sink.getsockname()[1]))
        assert sorted(len(sink.recv(2048)) for _ in sizes) == sizes
    singles = _grown(before, pair.encap())
    assert singles.keys() - OTHERS == {Reason.ENCAP_REDIRECT}, singles
    assert singles[Reason.ENCAP_REDIRECT][0] == 9

    before = pair.encap()
    _tcp_transfer(a, b, 4 << 20, md5=True)
    grown = _grown(before, pair.encap())
    assert grown.keys() - OTHERS == {Reason.ENCAP_REDIRECT}, grown  # no pass_gso, nothing else
    assert grown[Reason.ENCAP_REDIRECT][1] > 4 << 20

    after = pair.taken()
    assert after[0] == errors, "B counted UDP checksum errors"
    sent = singles[Reason.ENCAP_REDIRECT][0] + grown[Reason.ENCAP_REDIRECT][0]
    assert after[1] - rx >= sent  # every frame of ours decapsulated (and B's own replies' not)


def test_an_ipv6_only_node_leaves_aggregates_to_vxlan_ko(ipv6_only_pair: IPv6OnlyPair) -> None:
    """Plain TCP both ways: A's aggregates go to vxlan.ko (pass_gso, which asks for per-segment
    checksums), its single packets (ACKs of B's transfer, pure ACKs: no payload to sum) are
    the programs', and B verifies them all."""
    pair = ipv6_only_pair
    _ping6(pair, 1)
    errors = pair.taken()[0]
    before = pair.encap()
    _tcp_transfer((pair.a, A_POD6), (pair.b, B_POD6), 8 << 20)
    assert _grown(before, pair.encap()).get(Reason.PASS_GSO, (0, 0))[0] > 0
    before = pair.encap()
    _tcp_transfer((pair.b, B_POD6), (pair.a, A_POD6), 8 << 20)
    grown = _grown(before, pair.encap())
    assert grown.get(Reason.ENCAP_REDIRECT, (0, 0))[0] > 0, grown
    assert pair.taken()[0] == errors


UDP_NO_CHECK6_TX, UDP_NO_CHECK6_RX = 101, 102  # linux/udp.h


@contextmanager
def _udp_sockets(
    pair: IPv6OnlyPair, *, no_checksum: bool = False
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(sink bound on B's pod address, source on A), optionally sending and taking UDP
    without a checksum."""
    with entered(pair.b):
        sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with entered(pair.a):
        source = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with sink, source:
        if no_checksum:
            sink.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_RX, 1)
            source.setsockopt(socket.IPPROTO_UDP, UDP_NO_CHECK6_TX, 1)
        sink.bind((B_POD6, 0))
        sink.settimeout(5)
        yield sink, source


def test_an_ipv6_only_node_leaves_zero_checksum_udp_to_vxlan_ko(
    ipv6_only_pair: IPv6OnlyPair,
) -> None:
    """A UDP socket that sends without a checksum (UDP_NO_CHECK6_TX, as tunnels' sockets may):
    no inner checksum to derive the outer one from, so vxlan.ko carries it (pass_no_l4_csum)
    and B gets it."""
    pair = ipv6_only_pair
    _ping6(pair, 1)
    with _udp_sockets(pair, no_checksum=True) as (sink, source):
        before = pair.encap()
        source.sendto(b"no checksum", (B_POD6, sink.getsockname()[1]))
        assert sink.recv(64) == b"no checksum"
    grown = _grown(before, pair.encap())
    assert grown.keys() - OTHERS == {Reason.PASS_NO_L4_CSUM}, grown
    assert grown[Reason.PASS_NO_L4_CSUM][0] == 1


def test_an_ipv6_only_node_reports_what_it_runs(ipv6_only_pair: IPv6OnlyPair) -> None:
    """Status and metrics of a node without flannel.<VNI>: the encapsulation attached is
    flannel-v6's alone and no missing tc_encap is reported (its alert would fire for good); the
    peer is programmed in fb_remotes6, its only subnet, shown at its PublicIPv6."""
    pair = ipv6_only_pair
    pin_dir = pair.datapath.pin_dir
    with entered(pair.a):  # where the devices fb_config names are
        live = status._bpf_live(pin_dir, devices_here=True)
        families = {f.name: f for f in metrics._bpf_families(pin_dir, {"decap": "tc"})}
    assert live["attached"] == {"tc_encap6": loader.VXLAN.encap, "tc_decap": loader.VXLAN.tc_decap}
    assert live["remotes"] == [{"subnet": f"{B_POD6}/64", "vtep_ip": B_UL6, "vtep_mac": B_V6MAC}]
    hooks = {s.labels["hook"]: s.value for s in families["flannel_bpf_program_attached"].samples}
    assert hooks == {"tc_encap6": 1, "tc_decap": 1}
    (programmed,) = families[metrics.PEERS_PROGRAMMED].samples
    assert programmed.value == 1


def test_switching_between_dual_stack_and_ipv6_only_keeps_one_pin_directory(
    netns: Callable[[str], str],
) -> None:
    """A node restarted IPv6-only (flannel.1 left behind, as an agent finds it) and back: one
    pin directory, the one under flannel.1's name, keeps the maps (a peer's entry survives);
    the encapsulation leaves flannel.1 while IPv4 is off and comes back with it."""
    ns = netns("6s")
    _ip(ns, "link", "add", "u0", "type", "veth", "peer", "name", "u1")
    _ip(ns, "addr", "add", "198.18.0.1/24", "dev", "u0")
    _ip(ns, "-6", "addr", "add", f"{A_UL6}/64", "dev", "u0", "nodad")
    for dev in ("u0", "u1"):
        _ip(ns, "link", "set", dev, "up")
    for name, local in (("flannel.1", "198.18.0.1"), ("flannel-v6.1", A_UL6)):
        _ip(ns, "link", "add", name, "type", "vxlan", "id", "1", "dev", "u0", "local", local,
            "dstport", "8472", "nolearning")  # fmt: skip
    with entered(ns):
        uplink, v4, v6 = (socket.if_nametoindex(n) for n in ("u0", "flannel.1", "flannel-v6.1"))
        pin_dir = loader.pin_dir_for("flannel.1")
    flannel1 = loader.Device("flannel.1", v4, TOPO["local_vtep_mac"])
    dual = {"tc_encap": loader.VXLAN.encap, "tc_encap6": loader.VXLAN.encap,
            "tc_decap": loader.VXLAN.tc_decap}  # fmt: skip
    remote = remote_entry(PeerVtep(IPv6Network(f"{B_POD6}/64"), IPv6Address(B_UL6), B_V6MAC),
                          direct=False)  # fmt: skip
    try:
        for start, (vtep, local_ip, hooks) in enumerate((
            (flannel1, IPv4Address("198.18.0.1"), dual),
            (None, None, {k: v for k, v in dual.items() if k != "tc_encap"}),
            (flannel1, IPv4Address("198.18.0.1"), dual),
        )):  # fmt: skip
            datapath = _load_in(ns, vtep, local_ip)
            try:
                assert datapath.pin_dir == pin_dir and datapath.maps is not None
                with entered(ns):
                    assert loader.attached(v4, uplink, v6) == hooks
                    assert loader.instance_dirs() == [pin_dir]
                cfg = datapath.maps.read_config()
                assert cfg is not None and cfg.vtep_ifindex == (v4 if vtep else 0)
                if start == 0:
                    datapath.set_remote(remote)  # the later starts find it pinned
                assert list(datapath.maps.remotes()) == [remote]
            finally:
                datapath.close()
    finally:
        with entered(ns):
            loader.cleanup(pin_dir)
