"""The BPF programs, run by the kernel on crafted frames (BPF_PROG_TEST_RUN).

Encapsulation is compared byte for byte with what vxlan.ko emits for the same inner packet: once
against the stored capture (tests/fixtures/kernel_vxlan_encap.json) and once against a capture
made live in this run. Every pass-through and drop reason is provoked and its counter checked,
except three defensive ones no test run can reach: PASS_ADJUST_FAILED and DROP_WRITE_FAILED (the
kernel refusing to resize or write a packet it just accepted) and PASS_SHORT at encapsulation
(non-linear headers; BPF_PROG_TEST_RUN builds linear skbs and refuses IPv4 frames under 34 bytes).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.datapath import bpf_maps, bpf_sys, loader
from flannel_bpf.datapath.bpf_maps import (
    ALL_MAPS,
    FB_REMOTE_SKIP,
    CounterKey,
    DatapathConfig,
    Hook,
    PinnedMaps,
    Reason,
    Remote,
)
from flannel_bpf.lab.netns import add_netns, delete_netns, entered, run

from . import packets as pk
from .conftest import requires_root, unique

pytestmark = requires_root

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "kernel_vxlan_encap.json").read_text())
TOPO = FIXTURE["topology"]
INNER_FRAME = bytes.fromhex(FIXTURE["inner_frame"])
KERNEL_FRAME = bytes.fromhex(FIXTURE["outer_frame"])

TC_ACT_UNSPEC = 0xFFFFFFFF
TC_ACT_SHOT = 2
TC_ACT_REDIRECT = 7
XDP_DROP = 1
XDP_PASS = 2

A_SUBNET, B_SUBNET = "10.5.1.0/24", "10.5.2.0/24"
UNROUTED_VTEP = "198.19.77.1"  # no underlay route to it in either namespace


@dataclass
class Node:
    """One side's namespace, pins, loaded (not attached) programs and maps."""

    ns: str
    pin_dir: Path
    programs: loader.Programs
    maps: PinnedMaps
    config: DatapathConfig

    def run(
        self, hook: Hook, frame: bytes, ctx: bytes | None = None
    ) -> tuple[int, bytes, dict[Reason, tuple[int, int]]]:
        fd = {
            Hook.TC_ENCAP: self.programs.encap,
            Hook.XDP_DECAP: self.programs.xdp_decap,
            Hook.TC_DECAP: self.programs.tc_decap,
        }[hook]
        before = self.maps.counters()
        with entered(self.ns):
            result = bpf_sys.prog_test_run(fd, frame, ctx=ctx)
        after = self.maps.counters()
        delta = {
            key.reason: (after[key][0] - before[key][0], after[key][1] - before[key][1])
            for key in after
            if key.hook is hook and after[key] != before[key]
        }
        return result.retval, result.data, delta

    def close(self) -> None:
        self.maps.close()
        self.programs.close()
        loader.cleanup(self.pin_dir)


def _ip(ns: str, *args: str) -> None:
    run(["ip", "-n", ns, *args])


def _make_node(ns: str, tag: str, config_for: dict[str, Any] | None) -> Node:
    pin_dir = loader.DEFAULT_BPFFS / f"test-{unique(tag)}" / "v1"
    loader.ensure_bpffs()
    programs = loader.compile_programs(pin_dir)
    maps = PinnedMaps(pin_dir)
    with entered(ns):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            up = ipr.link("get", ifname="u0")[0]
            vtep = ipr.link("get", ifname="flannel.1")[0]
    cfg = DatapathConfig(
        local_ip=IPv4Address(config_for["local"]) if config_for else IPv4Address(0),
        vni=1,
        port=8472,
        uplink_ifindex=int(up["index"]),
        uplink_mac=str(up.get_attr("IFLA_ADDRESS")),
        vtep_ifindex=int(vtep["index"]),
        vtep_mac=str(vtep.get_attr("IFLA_ADDRESS")),
    )
    if config_for:
        maps.write_config(cfg)
    return Node(ns, pin_dir, programs, maps, cfg)


@pytest.fixture(scope="module")
def topo() -> Iterator[dict[str, Node]]:
    """Two hosts as in the fixture: same addresses, same MACs, flanneld's vxlan device on A."""
    a, b = unique("pa"), unique("pb")
    nodes: list[Node] = []
    try:
        add_netns(a)
        add_netns(b)
        run(
            [
                "ip", "link", "add", "u0", "netns", a, "address", TOPO["local_underlay_mac"],
                "type", "veth", "peer", "name", "u0", "netns", b,
                "address", TOPO["remote_underlay_mac"],
            ]
        )  # fmt: skip
        for ns, addr, vtep_mac in (
            (a, TOPO["local_underlay"], TOPO["local_vtep_mac"]),
            (b, TOPO["remote_underlay"], TOPO["remote_vtep_mac"]),
        ):
            _ip(ns, "addr", "add", f"{addr}/24", "dev", "u0")
            _ip(ns, "link", "set", "u0", "up")
            _ip(
                ns, "link", "add", "flannel.1", "address", vtep_mac, "type", "vxlan", "id", "1",
                "dev", "u0", "local", addr, "dstport", "8472", "nolearning",
            )  # fmt: skip
            _ip(ns, "link", "set", "flannel.1", "mtu", "1450", "up")
            run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])
        _ip(a, "addr", "add", "10.5.1.0/32", "dev", "flannel.1")
        _ip(a, "neigh", "add", "10.5.2.0", "lladdr", TOPO["remote_vtep_mac"], "dev", "flannel.1",
            "nud", "permanent")  # fmt: skip
        _ip(a, "route", "add", B_SUBNET, "via", "10.5.2.0", "dev", "flannel.1", "onlink")
        run(["bridge", "-n", a, "fdb", "add", TOPO["remote_vtep_mac"], "dev", "flannel.1",
             "dst", TOPO["remote_underlay"]])  # fmt: skip
        _ip(a, "neigh", "add", TOPO["remote_underlay"], "lladdr", TOPO["remote_underlay_mac"],
            "dev", "u0", "nud", "permanent")  # fmt: skip
        node_a = _make_node(a, "a", {"local": TOPO["local_underlay"]})
        nodes.append(node_a)
        node_b = _make_node(b, "b", {"local": TOPO["remote_underlay"]})
        nodes.append(node_b)
        unconfigured = _make_node(a, "u", None)
        nodes.append(unconfigured)
        node_a.maps.set_remote(
            Remote(IPv4Network(B_SUBNET), IPv4Address(TOPO["remote_underlay"]),
                   TOPO["remote_vtep_mac"])
        )  # fmt: skip
        node_a.maps.set_remote(
            Remote(IPv4Network("10.5.3.0/24"), IPv4Address(UNROUTED_VTEP), "0e:fb:00:00:03:01")
        )
        node_a.maps.set_remote(
            Remote(IPv4Network("10.5.4.0/24"), IPv4Address("198.18.0.4"), "0e:fb:00:00:04:01")
        )
        node_a.maps.set_remote(
            Remote(IPv4Network("10.5.5.0/24"), IPv4Address("198.18.0.2"), "0e:fb:00:00:05:01",
                   FB_REMOTE_SKIP)
        )  # fmt: skip
        yield {"a": node_a, "b": node_b, "unconfigured": unconfigured}
    finally:
        for node in nodes:
            node.close()
        delete_netns(a)
        delete_netns(b)


def inner_frame(dst: str = "10.5.2.7", *, payload: bytes = b"x" * 32, **ip: Any) -> bytes:
    return pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"]) + pk.ipv4(
        "10.5.1.5", dst, pk.udp(40000, 7777, payload), **ip
    )


# --------------------------------------------------------------------------------------------
# Encapsulation


def test_encap_matches_stored_kernel_capture(topo: dict[str, Node]) -> None:
    retval, out, delta = topo["a"].run(Hook.TC_ENCAP, INNER_FRAME)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.ENCAP_REDIRECT: (1, len(INNER_FRAME))})
    assert delta == {Reason.ENCAP_REDIRECT: (1, len(INNER_FRAME))}
    assert len(out) == len(KERNEL_FRAME) == len(INNER_FRAME) + 50
    # Identical but for the per-packet and per-boot fields, which are checked one by one.
    assert pk.masked(out, source_port=True) == pk.masked(KERNEL_FRAME, source_port=True)
    fields = pk.outer_fields(out)
    assert pk.header_checksum_ok(out)
    assert fields.udp_check == 0
    assert 32768 <= fields.udp_source < 60999


def _kernel_encapsulate(topo: dict[str, Node], inner_ip: bytes) -> bytes:
    """Send inner_ip through vxlan.ko on A and capture what arrives on B's underlay."""
    with entered(topo["b"].ns):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    try:
        capture.bind(("u0", 0))
        capture.settimeout(5)
        with entered(topo["a"].ns):
            sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with sender:
            sender.sendto(inner_ip, (socket.inet_ntoa(inner_ip[16:20]), 0))
        return _next_vxlan_frame(capture)
    finally:
        capture.close()


def _next_vxlan_frame(capture: socket.socket) -> bytes:
    """The next IPv4/UDP frame to port 8472 the capture socket sees."""
    while True:
        frame = capture.recv(65535)
        if frame[12:14] == b"\x08\x00" and frame[23] == 17 and frame[36:38] == b"\x21\x18":
            return frame


@pytest.mark.parametrize(
    "ip_args",
    [
        {},
        {"tos": 0x03},  # CE: the outer header carries ECT(0), as INET_ECN_encapsulate does
        {"tos": 0xB9},  # DSCP stays inside, ECN ECT(1) is copied out
        {"payload": b"y" * 1300},
        {"ttl": 1},
    ],
    ids=["plain", "ecn-ce", "dscp-ect1", "large", "ttl1"],
)
def test_encap_matches_live_kernel_capture(topo: dict[str, Node], ip_args: dict[str, Any]) -> None:
    frame = inner_frame(**ip_args)
    kernel = _kernel_encapsulate(topo, frame[14:])
    retval, out, _ = topo["a"].run(Hook.TC_ENCAP, frame)
    assert retval == TC_ACT_REDIRECT
    assert pk.masked(out, source_port=True) == pk.masked(kernel, source_port=True)
    assert pk.header_checksum_ok(out)
    # The frame carries no flow hash: vxlan.ko dissects it with its per-boot key, we hash it.
    expected = pk.flow_source_port(frame[14:], TOPO["local_underlay"], (32768, 60999))
    assert pk.outer_fields(out).udp_source == expected


def test_encap_and_vxlan_ko_give_a_flow_one_source_port(topo: dict[str, Node]) -> None:
    """Live, on A's flannel.1: the first packet of a flow finds no underlay neighbour and goes to
    vxlan.ko (which resolves it), the next ones are encapsulated by the program. The program
    stores the flow hash it made in the skb, so vxlan.ko sends the flow from the same port."""
    a, b = topo["a"], topo["b"]
    inner = inner_frame(payload=b"same flow")[14:]
    with entered(b.ns):
        capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    _ip(a.ns, "neigh", "del", TOPO["remote_underlay"], "dev", "u0")
    before = a.maps.counters()
    try:
        capture.bind(("u0", 0))
        capture.settimeout(5)
        with entered(a.ns):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                loader.attach_tc(ipr, a.config.vtep_ifindex, loader.TC_EGRESS, a.programs.encap,
                                 "fb_tc_encap")  # fmt: skip
            a.maps.clear_nexthops()
            with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as sender:
                ports = []
                for _ in range(3):
                    sender.sendto(inner, ("10.5.2.7", 0))
                    ports.append(pk.outer_fields(_next_vxlan_frame(capture)).udp_source)
    finally:
        capture.close()
        with entered(a.ns):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                loader.detach_tc(ipr, a.config.vtep_ifindex, loader.TC_EGRESS)
        _ip(a.ns, "neigh", "replace", TOPO["remote_underlay"], "lladdr",
            TOPO["remote_underlay_mac"], "dev", "u0", "nud", "permanent")  # fmt: skip
    after = a.maps.counters()

    def moved(reason: Reason) -> int:
        key = CounterKey(Hook.TC_ENCAP, reason)
        return after[key][0] - before[key][0]

    assert (moved(Reason.PASS_NO_NEIGH), moved(Reason.ENCAP_REDIRECT)) == (1, 2)
    expected = pk.flow_source_port(inner, TOPO["local_underlay"], (32768, 60999))
    assert ports == [expected] * 3


def test_encap_source_port_follows_the_flow(topo: dict[str, Node]) -> None:
    ports = set()
    for sport in range(40000, 40064):
        frame = pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"]) + pk.ipv4(
            "10.5.1.5", "10.5.2.7", pk.udp(sport, 7777, b"z")
        )
        first = pk.outer_fields(topo["a"].run(Hook.TC_ENCAP, frame)[1]).udp_source
        again = pk.outer_fields(topo["a"].run(Hook.TC_ENCAP, frame)[1]).udp_source
        assert first == again
        ports.add(first)
    assert len(ports) > 48  # spread over the range (entropy for ECMP and RSS)


def test_encap_on_a_host_that_does_not_forward(topo: dict[str, Node]) -> None:
    """bpf_fib_lookup() has no answer without forwarding: vxlan.ko keeps those packets."""
    sysctl = ["ip", "netns", "exec", topo["a"].ns, "sysctl", "-qw"]
    run([*sysctl, "net.ipv4.conf.u0.forwarding=0"])
    try:
        topo["a"].maps.clear_nexthops()
        _passes(topo["a"], Hook.TC_ENCAP, INNER_FRAME, Reason.PASS_NOT_FORWARDING)
    finally:
        run([*sysctl, "net.ipv4.conf.u0.forwarding=1"])


@pytest.fixture
def one_cpu() -> Iterator[None]:
    """Keep this thread on one CPU: fb_nexthops is per CPU."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def check_next_hop_cache(
    node: Node, frame: bytes, underlay: IPv4Address | IPv6Address, family: str
) -> None:
    """The FIB's answer for the peer at underlay (fb_nexthops, or fb_nexthops6) holds the
    uplink, its MTU and both MACs, is reused within the cache's TTL even while forwarding is off
    (which the FIB refuses), and is asked again after it. family: the sysctl's, ipv4 or ipv6."""
    node.maps.clear_nexthops()
    assert node.run(Hook.TC_ENCAP, frame)[0] == TC_ACT_REDIRECT
    (hop,) = node.maps.nexthops()[underlay]
    assert (hop.ifindex, hop.mtu) == (node.config.uplink_ifindex, 1500)
    assert (hop.smac, hop.dmac) == (TOPO["local_underlay_mac"], TOPO["remote_underlay_mac"])
    forwarding = Path(f"/proc/sys/net/{family}/conf/u0/forwarding")

    def set_forwarding(on: bool) -> None:  # in-process: the TTL is 40 ms at HZ=250
        with entered(node.ns):
            forwarding.write_text("1" if on else "0")

    node.maps.clear_nexthops()
    assert node.run(Hook.TC_ENCAP, frame)[0] == TC_ACT_REDIRECT
    set_forwarding(False)
    try:
        # Within the TTL the cached answer still holds (as a STALE neighbour would)...
        assert node.run(Hook.TC_ENCAP, frame)[0] == TC_ACT_REDIRECT
        time.sleep(0.11)
        # ...and after it the FIB is asked again.
        _passes(node, Hook.TC_ENCAP, frame, Reason.PASS_NOT_FORWARDING)
    finally:
        set_forwarding(True)
    assert node.run(Hook.TC_ENCAP, frame)[0] == TC_ACT_REDIRECT


@pytest.mark.usefixtures("one_cpu")
def test_a_cached_next_hop_is_asked_again_within_100_ms(topo: dict[str, Node]) -> None:
    """The FIB's answer is reused for a while, never for longer than the cache's TTL."""
    check_next_hop_cache(topo["a"], INNER_FRAME, IPv4Address(TOPO["remote_underlay"]), "ipv4")


def test_a_changed_config_empties_the_next_hop_cache(topo: dict[str, Node]) -> None:
    node = topo["a"]
    assert node.run(Hook.TC_ENCAP, INNER_FRAME)[0] == TC_ACT_REDIRECT
    node.maps.write_config(node.config)  # unchanged (an agent restart): the cache stays
    assert node.maps.nexthops()
    try:
        node.maps.write_config(dataclasses.replace(node.config, ttl=63))
        assert node.maps.nexthops() == {}
    finally:
        node.maps.write_config(node.config)


def _passes(node: Node, hook: Hook, frame: bytes, reason: Reason) -> None:
    retval, out, delta = node.run(hook, frame)
    expected = TC_ACT_UNSPEC if hook is not Hook.XDP_DECAP else XDP_PASS
    assert (retval, delta) == (expected, {reason: (1, len(frame))})
    assert out == frame  # untouched


ARP = pk.eth("ff:ff:ff:ff:ff:ff", TOPO["local_vtep_mac"], pk.ETH_P_ARP) + bytes(28)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (ARP, Reason.PASS_NOT_IPV4),
        (inner_frame(options=b"\x01\x01\x01\x00"), Reason.PASS_IP_OPTIONS),
        (inner_frame("10.5.9.9"), Reason.PASS_NO_REMOTE),
        (inner_frame("10.5.3.9"), Reason.PASS_NO_ROUTE),
        (inner_frame("10.5.4.9"), Reason.PASS_NO_NEIGH),  # VTEP routed, no neighbour entry
        (inner_frame(payload=b"b" * 1500), Reason.PASS_TOO_BIG),
        (inner_frame("10.5.5.5"), Reason.PASS_SKIP),
    ],
    ids=lambda v: v.name if isinstance(v, Reason) else "",
)
def test_encap_passes_what_it_does_not_handle(
    topo: dict[str, Node], frame: bytes, reason: Reason
) -> None:
    _passes(topo["a"], Hook.TC_ENCAP, frame, reason)


def test_unconfigured_programs_pass_everything(topo: dict[str, Node]) -> None:
    node = topo["unconfigured"]
    _passes(node, Hook.TC_ENCAP, INNER_FRAME, Reason.PASS_NO_CONFIG)
    _passes(node, Hook.XDP_DECAP, KERNEL_FRAME, Reason.PASS_NO_CONFIG)
    _passes(node, Hook.TC_DECAP, KERNEL_FRAME, Reason.PASS_NO_CONFIG)


# --------------------------------------------------------------------------------------------
# Decapsulation


def test_xdp_decap_of_a_kernel_frame(topo: dict[str, Node]) -> None:
    retval, out, delta = topo["b"].run(Hook.XDP_DECAP, KERNEL_FRAME)
    assert retval == XDP_PASS
    assert delta == {Reason.DECAP_PASS: (1, len(KERNEL_FRAME))}
    # The inner packet, under the outer MACs: addressed to this host's uplink.
    assert out == KERNEL_FRAME[:12] + b"\x08\x00" + KERNEL_FRAME[64:]


def test_tc_decap_of_a_kernel_frame(topo: dict[str, Node]) -> None:
    retval, out, delta = topo["b"].run(Hook.TC_DECAP, KERNEL_FRAME)
    assert retval == TC_ACT_REDIRECT
    assert delta == {Reason.DECAP_REDIRECT: (1, len(KERNEL_FRAME))}
    # As vxlan.ko delivers it on flannel.1: to our VtepMAC, from the peer's.
    expected_eth = pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"])
    assert out == expected_eth + KERNEL_FRAME[64:]


def skb_ctx(*, gso_size: int = 0, gso_segs: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN: only the fields the kernel lets us set."""
    ctx = bytearray(192)
    struct.pack_into("<I", ctx, 164, gso_segs)
    struct.pack_into("<I", ctx, 176, gso_size)
    return bytes(ctx)


def test_tc_decap_leaves_aggregates_to_vxlan_ko(topo: dict[str, Node]) -> None:
    frame = _vxlan_frame(inner=pk.ipv4("10.5.1.5", "10.5.2.7", pk.udp(1, 2, b"a" * 2800)))
    retval, out, delta = topo["b"].run(Hook.TC_DECAP, frame, skb_ctx(gso_size=1400, gso_segs=2))
    assert (retval, delta) == (TC_ACT_UNSPEC, {Reason.PASS_GSO: (1, len(frame))})
    assert out == frame
    # The same frame, not an aggregate, is ours.
    assert topo["b"].run(Hook.TC_DECAP, frame)[0] == TC_ACT_REDIRECT


def test_encap_then_decap_round_trip(topo: dict[str, Node]) -> None:
    frame = inner_frame(payload=bytes(range(256)) * 4)
    _, wire, _ = topo["a"].run(Hook.TC_ENCAP, frame)
    retval, out, _ = topo["b"].run(Hook.TC_DECAP, wire)
    assert retval == TC_ACT_REDIRECT
    assert out == frame
    retval, out, _ = topo["b"].run(Hook.XDP_DECAP, wire)
    assert retval == XDP_PASS
    assert out[14:] == frame[14:]


def _vxlan_frame(
    *,
    src_ip: str = TOPO["local_underlay"],
    dst_ip: str = TOPO["remote_underlay"],
    proto: int = 17,
    port: int = 8472,
    flags: int = 0x08000000,
    vni: int = 1,
    inner_mac: str = TOPO["remote_vtep_mac"],
    inner_proto: int = pk.ETH_P_IP,
    inner: bytes | None = None,
    frag: int = 0,
    options: bytes = b"",
) -> bytes:
    if inner is None:
        inner = pk.ipv4("10.5.1.5", "10.5.2.7", pk.udp(1, 2, b"hello"))
    payload = pk.vxlan(vni, flags) + pk.eth(inner_mac, TOPO["local_vtep_mac"], inner_proto) + inner
    outer = pk.ipv4(
        src_ip, dst_ip, pk.udp(50000, port, payload), proto=proto, frag=frag,
        options=options,
    )  # fmt: skip
    return pk.eth(TOPO["remote_underlay_mac"], TOPO["local_underlay_mac"]) + outer


DECAP_PASSES = [
    (ARP, Reason.PASS_NOT_IPV4),
    (_vxlan_frame(dst_ip="198.18.0.9"), Reason.PASS_NOT_OURS),
    (_vxlan_frame(proto=6), Reason.PASS_NOT_OURS),
    (_vxlan_frame(port=4789), Reason.PASS_NOT_OURS),
    (_vxlan_frame(options=b"\x01\x01\x01\x00"), Reason.PASS_IP_OPTIONS),
    (_vxlan_frame(frag=0x2000), Reason.PASS_FRAGMENT),
    (_vxlan_frame(frag=0x0010), Reason.PASS_FRAGMENT),
    (_vxlan_frame(flags=0x08000001), Reason.PASS_BAD_FLAGS),
    (_vxlan_frame(flags=0x88000000), Reason.PASS_BAD_FLAGS),
    (_vxlan_frame(vni=2), Reason.PASS_OTHER_VNI),
    (_vxlan_frame(inner_mac="0e:fb:00:00:09:09"), Reason.PASS_OTHER_MAC),
    (_vxlan_frame(inner_proto=pk.ETH_P_ARP, inner=bytes(28)), Reason.PASS_INNER_NOT_IPV4),
    (_vxlan_frame()[:60], Reason.PASS_SHORT),
]


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize(
    ("frame", "reason"),
    DECAP_PASSES,
    ids=[f"{r.label}-{i}" for i, (_, r) in enumerate(DECAP_PASSES)],
)
def test_decap_passes_what_is_not_ours(
    topo: dict[str, Node], hook: Hook, frame: bytes, reason: Reason
) -> None:
    _passes(topo["b"], hook, frame, reason)


MALFORMED_INNER = [
    pk.ipv4("10.5.1.5", "10.5.2.7", b"abc", total_length=400),  # claims more than there is
    pk.ipv4("10.5.1.5", "10.5.2.7", b"abc", total_length=12),  # shorter than its header
    b"\x65" + pk.ipv4("10.5.1.5", "10.5.2.7", b"abc")[1:],  # version 6, ihl 5
    b"\x44" + pk.ipv4("10.5.1.5", "10.5.2.7", b"abc")[1:],  # ihl 4
]


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize("inner", MALFORMED_INNER, ids=["long", "short", "version", "ihl"])
def test_decap_drops_malformed_inner_packets(
    topo: dict[str, Node], hook: Hook, inner: bytes
) -> None:
    frame = _vxlan_frame(inner=inner)
    retval, _, delta = topo["b"].run(hook, frame)
    assert retval == (XDP_DROP if hook is Hook.XDP_DECAP else TC_ACT_SHOT)
    assert delta == {Reason.DROP_INNER_MALFORMED: (1, len(frame))}


def test_decap_accepts_nonzero_outer_udp_checksums(topo: dict[str, Node]) -> None:
    # vxlan.ko peers send udpcsum; the fixture frame carries one.
    assert pk.outer_fields(KERNEL_FRAME).udp_check != 0
    assert topo["b"].run(Hook.XDP_DECAP, KERNEL_FRAME)[0] == XDP_PASS


def test_counters_sum_over_cpus_and_keep_bytes(topo: dict[str, Node]) -> None:
    node = topo["b"]
    before = node.maps.counters()[CounterKey(Hook.XDP_DECAP, Reason.DECAP_PASS)]
    for _ in range(5):
        node.run(Hook.XDP_DECAP, KERNEL_FRAME)
    after = node.maps.counters()[CounterKey(Hook.XDP_DECAP, Reason.DECAP_PASS)]
    assert (after[0] - before[0], after[1] - before[1]) == (5, 5 * len(KERNEL_FRAME))


def test_struct_sizes_match_the_kernel_maps(topo: dict[str, Node]) -> None:
    info = {spec.name: bpf_sys.map_info(topo["a"].maps.fd(spec)) for spec in ALL_MAPS}
    assert info["fb_remotes"].key_size == 8 and info["fb_remotes"].value_size == 12
    assert info["fb_remotes6"].key_size == 20 and info["fb_remotes6"].value_size == 28
    assert info["fb_senders6"].key_size == 16
    assert info["fb_config"].value_size == struct.calcsize("<4sI2sHHBBII6s6sI16s6sBB") == 64
    assert info["fb_nexthops6"].value_size == bpf_maps.NEXTHOP6.size == 48
    assert info["fb_stats"].value_size == 16 and info["fb_stats"].max_entries == 5 * 64
    assert info["fb_flows"].key_size == 16 and info["fb_flows"].value_size == 8
    assert info["fb_endpoints"].key_size == 4 and info["fb_endpoints"].value_size == 20


def test_a_pin_with_another_layout_is_recreated_not_reused() -> None:
    from bcc import BPF

    pin_dir = loader.DEFAULT_BPFFS / f"test-{unique('lay')}" / "v1"
    pin_dir.mkdir(parents=True)
    try:
        # An older agent's fb_config: same name, another value size.
        text = f'BPF_TABLE_PINNED("array", u32, u64, fb_config, 1, "{pin_dir}/fb_config");'
        BPF(text=text.encode()).cleanup()
        fd = bpf_sys.obj_get(pin_dir / "fb_config")
        assert bpf_sys.map_info(fd).value_size == 8
        os.close(fd)
        removed = loader.prepare_pins(pin_dir)
        assert len(removed) == 1 and "fb_config" in removed[0]
        programs = loader.compile_programs(pin_dir)
        programs.close()
        with PinnedMaps(pin_dir) as maps:  # opens only if every layout is ours
            assert maps.read_config() is None
    finally:
        loader.cleanup(pin_dir)
