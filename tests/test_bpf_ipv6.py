"""The BPF programs on IPv6 pod packets, with BPF_PROG_TEST_RUN on the real kernel (the two-host
topology of test_bpf_programs.py). An IPv6 packet that reaches flannel-v6.<VNI> for a remote IPv6
subnet is encapsulated over the IPv4 underlay to the peer's flannel.<VNI>, byte for byte as
vxlan.ko's flannel.1 sends the same inner packet; both decap hooks take such frames (from us or
from a vxlan.ko that routes IPv6 into flannel.1) with the same checks, counters and
anti-spoofing as IPv4."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv6Address, IPv6Network
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flannel_bpf.datapath.bpf_maps import FB_CFG_CHECK_SOURCES, FB_REMOTE_SKIP, Hook, Reason, Remote
from flannel_bpf.lab.netns import entered

from . import packets as pk
from .conftest import requires_root
from .test_bpf_programs import (
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    TOPO,
    XDP_DROP,
    XDP_PASS,
    Node,
    _ip,
    _next_vxlan_frame,
    _vxlan_frame,
    skb_ctx,
    topo,  # noqa: F401 - the module's fixture, used by name
)

pytestmark = [pytest.mark.root, requires_root]

A6, B6 = "fd10:5:0:1::", "fd10:5:0:2::"
B6_SUBNET = f"{B6}/64"
NO_ROUTE6, SKIPPED6 = "fd10:5:0:9::/64", "fd10:5:0:5::/64"


@pytest.fixture(scope="module")
def topo6(topo: dict[str, Node]) -> Iterator[dict[str, Node]]:  # noqa: F811
    """A also routes B's IPv6 subnet into its flannel.1 (neighbour: B's flannel.1 MAC), so that
    vxlan.ko shows what it sends for an IPv6 packet over the IPv4 underlay; fb_remotes6 holds B's
    IPv6 subnet with B's IPv4 VTEP, and a skipped subnet."""
    a = topo["a"]
    _ip(a.ns, "-6", "addr", "add", f"{A6}/128", "dev", "flannel.1", "nodad")
    _ip(a.ns, "-6", "neigh", "add", B6, "lladdr", TOPO["remote_vtep_mac"], "dev", "flannel.1",
        "nud", "permanent")  # fmt: skip
    _ip(a.ns, "-6", "route", "add", B6_SUBNET, "via", B6, "dev", "flannel.1", "onlink")
    remote = Remote(IPv6Network(B6_SUBNET), IPv4Address(TOPO["remote_underlay"]),
                    TOPO["remote_vtep_mac"])  # fmt: skip
    a.maps.set_remote(remote)
    a.maps.set_remote(Remote(IPv6Network(SKIPPED6), IPv4Address("198.18.0.2"),
                             "0e:fb:00:00:05:01", FB_REMOTE_SKIP))  # fmt: skip
    # B knows A's IPv6 subnet as A's, for anti-spoofing.
    topo["b"].maps.set_remote(
        Remote(IPv6Network(f"{A6}/64"), IPv4Address(TOPO["local_underlay"]), TOPO["local_vtep_mac"])
    )
    try:
        yield topo
    finally:
        for node, subnet in ((a, B6_SUBNET), (a, SKIPPED6), (topo["b"], f"{A6}/64")):
            node.maps.delete_remote(IPv6Network(subnet))


def inner6(dst: str = "fd10:5:0:2::7", *, payload: bytes = b"x" * 32, **ip: Any) -> bytes:
    """An IPv6 UDP packet from A's pod to B's, as it reaches flannel-v6.1 (Ethernet included)."""
    return pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"], pk.ETH_P_IPV6) + pk.ipv6(
        "fd10:5:0:1::5", dst, pk.udp(40000, 7777, payload), **ip
    )


def _kernel_encapsulate6(
    nodes: dict[str, Node], inner_ip6: bytes, *, underlay6: bool = False
) -> bytes:
    """Send inner_ip6 from A through vxlan.ko (its route picks flannel.1, or flannel-v6.1 for
    the IPv6 underlay) and capture the VXLAN frame that arrives on B's underlay."""
    with entered(nodes["b"].ns):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        capture.bind(("u0", 0))
        capture.settimeout(5)
        with entered(nodes["a"].ns):
            sender = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with sender:
            sender.sendto(inner_ip6, (socket.inet_ntop(socket.AF_INET6, inner_ip6[24:40]), 0))
        if not underlay6:
            return _next_vxlan_frame(capture)
        while True:
            frame = capture.recv(65535)
            # IPv6, UDP right after the fixed header, to port 8472
            if frame[12:14] == b"\x86\xdd" and frame[20] == 17 and frame[56:58] == b"\x21\x18":
                return frame
    finally:
        capture.close()


# --------------------------------------------------------------------------------------------
# Encapsulation


@pytest.mark.parametrize(
    "ip_args",
    [{}, {"tclass": 0x03}, {"tclass": 0xB9}, {"payload": b"y" * 1300}, {"hlim": 1}],
    ids=["plain", "ecn-ce", "dscp-ect1", "large", "hlim1"],
)
def test_encap6_matches_live_kernel_capture(
    topo6: dict[str, Node], ip_args: dict[str, Any]
) -> None:
    """What vxlan.ko's flannel.1 sends for the same IPv6 packet, but for IP ID, checksums and
    source port (per boot or per packet), which are checked on their own."""
    frame = inner6(**ip_args)
    kernel = _kernel_encapsulate6(topo6, frame[14:])
    retval, out, delta = topo6["a"].run(Hook.TC_ENCAP, frame)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.ENCAP_REDIRECT: (1, len(frame))})
    assert len(out) == len(frame) + 50
    assert pk.masked(out, source_port=True) == pk.masked(kernel, source_port=True)
    assert out[12:14] == b"\x08\x00" and out[62:64] == b"\x86\xdd"
    assert pk.header_checksum_ok(out) and pk.outer_fields(out).udp_check == 0
    expected = pk.flow_source_port6(frame[14:], TOPO["local_underlay"], (32768, 60999))
    assert pk.outer_fields(out).udp_source == expected


def test_encap6_of_an_aggregate_is_checked_per_segment(topo6: dict[str, Node]) -> None:
    """A GSO aggregate is taken whole when each segment will fit the underlay (its size plus
    the repeated headers and 50 bytes), and left to the kernel when one would not."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 0, 5 << 4, 0x10, 512, 0, 0)
    frame = pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"], pk.ETH_P_IPV6) + pk.ipv6(
        "fd10:5:0:1::5", "fd10:5:0:2::7", tcp + b"z" * 2800, nexthdr=6
    )
    # 1380 + 14 + 40 + 20 + 50 = 1504 <= 1500 + 14; 1400 would be 1524.
    ok = topo6["a"].run(Hook.TC_ENCAP, frame, skb_ctx(gso_size=1380, gso_segs=3))
    # Past the size check to the resize, which BPF_PROG_TEST_RUN's skbs cannot pass (no way to
    # give them a TCP GSO type); the lab test sends real aggregates (test_dual_stack.py).
    assert (ok[0], ok[2]) == (TC_ACT_UNSPEC, {Reason.PASS_ADJUST_FAILED: (1, len(frame))})
    too_big = topo6["a"].run(Hook.TC_ENCAP, frame, skb_ctx(gso_size=1400, gso_segs=2))
    assert (too_big[0], too_big[2]) == (TC_ACT_UNSPEC, {Reason.PASS_TOO_BIG: (1, len(frame))})


ENCAP6_PASSES = [
    (inner6("fd10:5:0:9::1"), Reason.PASS_NO_REMOTE),
    (inner6("fd10:5:0:5::1"), Reason.PASS_SKIP),
    # (A frame too short for its IPv6 header never reaches the program: the kernel refuses to
    # run it, as no skb gets that far.)
    (inner6()[:14] + b"\x40" + inner6()[15:], Reason.PASS_NOT_IPV4),  # version 4 inside
]


@pytest.mark.parametrize(("frame", "reason"), ENCAP6_PASSES, ids=lambda x: getattr(x, "label", ""))
def test_encap6_passes_what_it_does_not_handle(
    topo6: dict[str, Node], frame: bytes, reason: Reason
) -> None:
    retval, out, delta = topo6["a"].run(Hook.TC_ENCAP, frame)
    assert (retval, out, delta) == (TC_ACT_UNSPEC, frame, {reason: (1, len(frame))})


# --------------------------------------------------------------------------------------------
# Decapsulation


def test_decap_of_the_kernel_frame_on_both_hooks(topo6: dict[str, Node]) -> None:
    """vxlan.ko's frame for an IPv6 packet: XDP hands the inner packet up under the outer MACs,
    tc redirects it into flannel.1 as vxlan.ko would deliver it there."""
    frame = inner6()
    kernel = _kernel_encapsulate6(topo6, frame[14:])
    retval, out, delta = topo6["b"].run(Hook.XDP_DECAP, kernel)
    assert (retval, delta) == (XDP_PASS, {Reason.DECAP_PASS: (1, len(kernel))})
    assert out == kernel[:12] + b"\x86\xdd" + frame[14:]
    retval, out, delta = topo6["b"].run(Hook.TC_DECAP, kernel)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.DECAP_REDIRECT: (1, len(kernel))})
    assert out == frame


def test_encap6_then_decap_round_trip(topo6: dict[str, Node]) -> None:
    frame = inner6(payload=bytes(range(256)) * 4)
    _, wire, _ = topo6["a"].run(Hook.TC_ENCAP, frame)
    assert topo6["b"].run(Hook.TC_DECAP, wire)[:2] == (TC_ACT_REDIRECT, frame)
    retval, out, _ = topo6["b"].run(Hook.XDP_DECAP, wire)
    assert retval == XDP_PASS and out[14:] == frame[14:]


def _wire6(inner: bytes) -> bytes:
    """inner (an IPv6 packet) as A's vxlan.ko sends it to B over the IPv4 underlay."""
    return _vxlan_frame(inner_proto=pk.ETH_P_IPV6, inner=inner)


MALFORMED6 = [
    pk.ipv6("fd10:5:0:1::5", "fd10:5:0:2::7", b"abc", payload_length=400),  # claims more
    b"\x45" + pk.ipv6("fd10:5:0:1::5", "fd10:5:0:2::7", b"abc")[1:],  # version 4 in an IPv6 frame
]


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize("inner", MALFORMED6, ids=["long", "version"])
def test_decap_drops_malformed_inner_ipv6(topo6: dict[str, Node], hook: Hook, inner: bytes) -> None:
    frame = _wire6(inner)
    retval, _, delta = topo6["b"].run(hook, frame)
    assert retval == (XDP_DROP if hook is Hook.XDP_DECAP else TC_ACT_SHOT)
    assert delta == {Reason.DROP_INNER_MALFORMED: (1, len(frame))}


def test_decap_short_inner_ipv6_goes_to_the_kernel(topo6: dict[str, Node]) -> None:
    frame = _wire6(pk.ipv6("fd10:5:0:1::5", "fd10:5:0:2::7", b""))[:-8]
    for hook, verdict in ((Hook.XDP_DECAP, XDP_PASS), (Hook.TC_DECAP, TC_ACT_UNSPEC)):
        retval, out, delta = topo6["b"].run(hook, frame)
        assert (retval, out, delta) == (verdict, frame, {Reason.PASS_SHORT: (1, len(frame))})


@pytest.fixture
def checking(topo6: dict[str, Node]) -> Iterator[Node]:
    """B with anti-spoofing on, for one test."""
    import dataclasses

    node = topo6["b"]
    node.maps.write_config(dataclasses.replace(node.config, flags=FB_CFG_CHECK_SOURCES))
    node.maps.set_sender(IPv4Address(TOPO["local_underlay"]), 1)
    try:
        yield node
    finally:
        node.maps.write_config(node.config)
        node.maps.delete_sender(IPv4Address(TOPO["local_underlay"]))


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
def test_anti_spoofing_on_inner_ipv6_sources(checking: Node, hook: Hook) -> None:
    """A's IPv6 subnet from A's underlay address passes; a source outside it from A is spoofed;
    the same from an address holding no lease is an unknown sender."""
    own = _wire6(pk.ipv6("fd10:5:0:1::5", "fd10:5:0:2::7", pk.udp(1, 2, b"ok")))
    assert checking.run(hook, own)[2] == {
        Reason.DECAP_PASS if hook is Hook.XDP_DECAP else Reason.DECAP_REDIRECT: (1, len(own))
    }
    spoofed = _wire6(pk.ipv6("fd10:5:0:2::66", "fd10:5:0:2::7", pk.udp(1, 2, b"no")))
    assert checking.run(hook, spoofed)[2] == {Reason.DROP_SPOOFED_SOURCE: (1, len(spoofed))}
    stranger = bytearray(spoofed)
    stranger[26:30] = socket.inet_aton("198.18.0.99")
    struct.pack_into("!H", stranger, 24, 0)
    struct.pack_into("!H", stranger, 24, pk.ip_checksum(bytes(stranger[14:34])))
    assert checking.run(hook, bytes(stranger))[2] == {
        Reason.DROP_UNKNOWN_SENDER: (1, len(stranger))
    }


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(inner=st.binary(max_size=120), cut=st.integers(min_value=0, max_value=200))
def test_fuzz_inner_ipv6_never_crashes_the_hooks(
    topo6: dict[str, Node], inner: bytes, cut: int
) -> None:
    """Any bytes as an IPv6 frame's inside, any length: a verdict and exactly one counted
    reason, never a kernel error (as the IPv4 fuzzing of test_bpf_fuzz.py)."""
    frame = _wire6(b"\x60" + inner)[: 64 + cut]
    for hook in (Hook.XDP_DECAP, Hook.TC_DECAP):
        _, _, delta = topo6["b"].run(hook, frame)
        assert len(delta) == 1 and sum(p for p, _ in delta.values()) == 1
    body = (b"\x60" + inner[:cut]).ljust(40, b"\0")  # the kernel runs no shorter IPv6 frame
    _, _, delta = topo6["a"].run(Hook.TC_ENCAP, inner6()[:14] + body)
    assert len(delta) == 1


# --------------------------------------------------------------------------------------------
# flannel-v6's frames (the IPv6 underlay): what flanneld and vxlan.ko send IPv6 pod packets in

A_UL6, B_UL6 = "fd00:198:18::1", "fd00:198:18::2"
A_V6MAC, B_V6MAC = "0e:fb:00:00:61:01", "0e:fb:00:00:62:01"
C6_SUBNET = "fd10:5:0:3::/64"  # routed by A's flannel-v6.1 to B (B's second IPv6 subnet here)


@pytest.fixture(scope="module")
def topo66(topo6: dict[str, Node]) -> Iterator[dict[str, Node]]:
    """Both hosts get an IPv6 underlay address and flanneld's flannel-v6.1; A routes C6_SUBNET
    into its flannel-v6.1 towards B (neighbour, FDB to B's IPv6 underlay address), so vxlan.ko
    shows what flanneld sends; B's config names its flannel-v6.1 and PublicIPv6, and its
    fb_remotes6 knows A's IPv6 subnet with A's PublicIPv6."""
    import dataclasses

    a, b = topo6["a"], topo6["b"]
    for node, address, mac in ((a, A_UL6, A_V6MAC), (b, B_UL6, B_V6MAC)):
        _ip(node.ns, "-6", "addr", "add", f"{address}/64", "dev", "u0", "nodad")
        _ip(node.ns, "link", "add", "flannel-v6.1", "address", mac, "type", "vxlan", "id", "1",
            "dev", "u0", "local", address, "dstport", "8472", "nolearning")  # fmt: skip
        _ip(node.ns, "link", "set", "flannel-v6.1", "mtu", "1430", "up")
    _ip(a.ns, "-6", "neigh", "add", B_UL6, "lladdr", TOPO["remote_underlay_mac"], "dev", "u0",
        "nud", "permanent")  # fmt: skip
    _ip(a.ns, "-6", "neigh", "add", "fd10:5:0:3::", "lladdr", B_V6MAC, "dev", "flannel-v6.1",
        "nud", "permanent")  # fmt: skip
    _ip(a.ns, "-6", "route", "add", C6_SUBNET, "via", "fd10:5:0:3::", "dev", "flannel-v6.1",
        "onlink")  # fmt: skip
    run_bridge = ["bridge", "-n", a.ns, "fdb", "add", B_V6MAC, "dev", "flannel-v6.1", "dst", B_UL6]
    from flannel_bpf.lab.netns import run

    run(run_bridge)
    with entered(b.ns):
        index = socket.if_nametoindex("flannel-v6.1")
    b.config = dataclasses.replace(
        b.config, vtep6_ifindex=index, local_ip6=IPv6Address(B_UL6), vtep6_mac=B_V6MAC
    )
    b.maps.write_config(b.config)
    b.maps.set_remote(Remote(IPv6Network(f"{A6}/64"), IPv4Address(TOPO["local_underlay"]),
                             TOPO["local_vtep_mac"], 0, IPv6Address(A_UL6)))  # fmt: skip
    yield topo6


def test_decap_of_flannel_v6_frames_on_both_hooks(topo66: dict[str, Node]) -> None:
    """vxlan.ko's flannel-v6 frame (as flanneld sends): XDP strips 70 bytes and hands the inner
    packet up under the outer MACs; tc redirects it into flannel-v6.1, to its MAC from the
    peer's, as vxlan.ko would deliver it."""
    inner = pk.ipv6("fd10:5:0:1::5", "fd10:5:0:3::7", pk.udp(40000, 7777, b"v6 over v6"))
    kernel = _kernel_encapsulate6(topo66, inner, underlay6=True)
    assert kernel[84:] == inner and kernel[70:76] == pk.mac(B_V6MAC)
    retval, out, delta = topo66["b"].run(Hook.XDP_DECAP, kernel)
    assert (retval, delta) == (XDP_PASS, {Reason.DECAP_PASS: (1, len(kernel))})
    assert out == kernel[:14] + inner
    retval, out, delta = topo66["b"].run(Hook.TC_DECAP, kernel)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.DECAP_REDIRECT: (1, len(kernel))})
    assert out == pk.eth(B_V6MAC, A_V6MAC, pk.ETH_P_IPV6) + inner


def _wire66(
    inner: bytes | None = None,
    *,
    dst: str = B_UL6,
    src: str = A_UL6,
    nexthdr: int = 17,
    mac: str = B_V6MAC,
    inner_proto: int = pk.ETH_P_IPV6,
    vni: int = 1,
) -> bytes:
    if inner is None:
        inner = pk.ipv6("fd10:5:0:1::5", "fd10:5:0:3::7", pk.udp(1, 2, b"hello"))
    payload = pk.vxlan(vni) + pk.eth(mac, A_V6MAC, inner_proto) + inner
    outer = pk.ipv6(src, dst, pk.udp(50000, 8472, payload), nexthdr=nexthdr)
    return pk.eth(TOPO["remote_underlay_mac"], TOPO["local_underlay_mac"], pk.ETH_P_IPV6) + outer


INNER_V4 = _wire66(pk.ipv4("10.5.1.5", "10.5.2.7", b"x"), inner_proto=pk.ETH_P_IP)
DECAP66_PASSES = [
    (_wire66(dst="fd00:198:18::9"), Reason.PASS_NOT_OURS),
    (_wire66(nexthdr=44), Reason.PASS_FRAGMENT),
    (_wire66(nexthdr=0), Reason.PASS_IP_OPTIONS),  # hop-by-hop options: the kernel parses them
    (_wire66(vni=2), Reason.PASS_OTHER_VNI),
    (_wire66(mac="0e:fb:00:00:09:09"), Reason.PASS_OTHER_MAC),
    (INNER_V4, Reason.PASS_INNER_NOT_IPV4),
    (_wire66()[:100], Reason.PASS_SHORT),
]


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize(
    ("frame", "reason"),
    DECAP66_PASSES,
    ids=[f"{r.label}-{i}" for i, (_, r) in enumerate(DECAP66_PASSES)],
)
def test_decap_leaves_other_ipv6_frames_to_the_kernel(
    topo66: dict[str, Node], hook: Hook, frame: bytes, reason: Reason
) -> None:
    retval, out, delta = topo66["b"].run(hook, frame)
    assert retval == (XDP_PASS if hook is Hook.XDP_DECAP else TC_ACT_UNSPEC)
    assert (out, delta) == (frame, {reason: (1, len(frame))})


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
def test_decap_drops_malformed_inner_of_flannel_v6_frames(
    topo66: dict[str, Node], hook: Hook
) -> None:
    frame = _wire66(pk.ipv6("fd10:5:0:1::5", "fd10:5:0:3::7", b"abc", payload_length=400))
    retval, _, delta = topo66["b"].run(hook, frame)
    assert retval == (XDP_DROP if hook is Hook.XDP_DECAP else TC_ACT_SHOT)
    assert delta == {Reason.DROP_INNER_MALFORMED: (1, len(frame))}


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
def test_anti_spoofing_on_flannel_v6_frames(topo66: dict[str, Node], hook: Hook) -> None:
    """The inner source's IPv6 subnet must name the outer source as its PublicIPv6; a frame to
    our port from an IPv6 address holding no lease is dropped even when left to the kernel."""
    import dataclasses

    node = topo66["b"]
    node.maps.write_config(dataclasses.replace(node.config, flags=FB_CFG_CHECK_SOURCES))
    node.maps.set_sender(IPv6Address(A_UL6), 1)
    try:
        handled = Reason.DECAP_PASS if hook is Hook.XDP_DECAP else Reason.DECAP_REDIRECT
        own = _wire66()
        assert node.run(hook, own)[2] == {handled: (1, len(own))}
        spoofed = _wire66(pk.ipv6("fd10:5:0:3::66", "fd10:5:0:3::7", pk.udp(1, 2, b"no")))
        assert node.run(hook, spoofed)[2] == {Reason.DROP_SPOOFED_SOURCE: (1, len(spoofed))}
        stranger = _wire66(src="fd00:198:18::99")
        assert node.run(hook, stranger)[2] == {Reason.DROP_UNKNOWN_SENDER: (1, len(stranger))}
        odd = _wire66(src="fd00:198:18::99", vni=2)  # left to the kernel: still a stranger
        assert node.run(hook, odd)[2] == {Reason.DROP_UNKNOWN_SENDER: (1, len(odd))}
    finally:
        node.maps.write_config(node.config)
        node.maps.delete_sender(IPv6Address(A_UL6))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(inner=st.binary(max_size=120), cut=st.integers(min_value=0, max_value=200))
def test_fuzz_flannel_v6_frames_never_crash_the_hooks(
    topo66: dict[str, Node], inner: bytes, cut: int
) -> None:
    frame = _wire66(b"\x60" + inner)[: 54 + cut]  # never shorter than the outer IPv6 header
    for hook in (Hook.XDP_DECAP, Hook.TC_DECAP):
        _, _, delta = topo66["b"].run(hook, frame)
        assert len(delta) == 1 and sum(p for p, _ in delta.values()) == 1
