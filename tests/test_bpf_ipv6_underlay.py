"""BPF encapsulation over the IPv6 underlay (an IPv6-only network: peers without an IPv4 VTEP),
on the real kernel: the frame is flannel-v6.<VNI>'s, byte for byte as vxlan.ko's flannel-v6
sends the same inner packet but for the outer UDP source port (per flow) and checksum (which
vxlan.ko leaves to the NIC), and its outer UDP checksum, derived in BPF from the inner one, is
right: a live flannel-v6 built as flanneld builds it (no udp6zerocsumrx) takes it, and drops the
same frame with one bit of the checksum changed. Aggregates and packets without an inner
checksum to derive from are left to vxlan.ko, counted."""

from __future__ import annotations

import dataclasses
import json
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_bpf.datapath.bpf_maps import FB_REMOTE_IPV6_UNDERLAY, Hook, Reason, Remote
from flannel_bpf.lab.netns import entered, run

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
    assert 32768 <= struct.unpack("!H", out[54:56])[0] < 60999  # the kernel's port range


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
    upper-layer checksum to derive from: an extension header, no next header, UDP's 0."""
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
    for inner in no_l4:
        frame = _frame(inner)
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
