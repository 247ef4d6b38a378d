"""Host routing's programs, run by the kernel on crafted frames (BPF_PROG_TEST_RUN), on the two
hosts of test_bpf_programs.py with host routing switched on in their fb_config.

The short way must put on the wire exactly what the long way would: a pod's packet encapsulated
at its veth equals the same packet encapsulated at flannel.1 after forwarding (TTL minus one),
and a frame handed to a pod is the inner packet with the bridge's MACs and TTL minus one. Every
reason a packet is left to the host stack is provoked and counted.
"""

from __future__ import annotations

import dataclasses
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest

from flannel_bpf.datapath import bpf_sys, loader
from flannel_bpf.datapath.bpf_maps import (
    ENDPOINT_KEY,
    ENDPOINTS,
    FB_CFG_HOST_ROUTING,
    FB_MARK_VALIDATED,
    FLOW_KEY,
    FLOW_VALUE,
    FLOWS,
    Hook,
    Reason,
)
from flannel_bpf.lab.netns import entered

from . import packets as pk
from .conftest import requires_root
from .test_bpf_programs import (  # noqa: F401 - topo is a fixture
    KERNEL_FRAME,
    TC_ACT_REDIRECT,
    TC_ACT_UNSPEC,
    TOPO,
    Node,
    topo,
)

pytestmark = requires_root

TC_ACT_OK = 0
EGRESS, INGRESS = 0, 1
POD_MAC, GW_MAC = "0a:58:0a:05:01:05", "0a:58:0a:05:01:01"
SECOND = 1_000_000_000


@dataclasses.dataclass
class Routed:
    node: Node
    egress: int  # fb_tc_pod_egress
    deliver: int  # fb_tc_pod_deliver
    u0: int

    def run(self, hook: Hook, fd: int, frame: bytes, ctx: bytes | None = None) -> tuple[
        int, bytes, dict[Reason, tuple[int, int]]
    ]:  # fmt: skip
        before = self.node.maps.counters()
        with entered(self.node.ns):
            result = bpf_sys.prog_test_run(fd, frame, ctx=ctx)
        after = self.node.maps.counters()
        delta = {
            key.reason: (after[key][0] - before[key][0], after[key][1] - before[key][1])
            for key in after
            if key.hook is hook and after[key] != before[key]
        }
        return result.retval, result.data, delta

    def set_flow(self, inner_ip: bytes, direction: int, expires_in: float = 60.0) -> None:
        expires = time.monotonic_ns() + int(expires_in * SECOND)
        bpf_sys.map_update(
            self.node.maps.fd(FLOWS), flow_key(inner_ip, direction), FLOW_VALUE.pack(expires)
        )

    def clear(self) -> None:
        self.node.maps.forget_flows()
        self.node.maps.forget_endpoints()


def flow_key(inner_ip: bytes, direction: int) -> bytes:
    proto = inner_ip[9]
    ports = inner_ip[20:24] if proto in (6, 17) else b"\0\0\0\0"
    return FLOW_KEY.pack(inner_ip[12:16], inner_ip[16:20], ports[:2], ports[2:], proto,
                         direction, 0)  # fmt: skip


def forwarded(inner_ip: bytes) -> bytes:
    """What the host's forwarding makes of an IPv4 packet: TTL minus one, checksum redone."""
    header = bytearray(inner_ip[:20])
    header[8] -= 1
    header[10:12] = b"\0\0"
    struct.pack_into("!H", header, 10, pk.ip_checksum(header))
    return bytes(header) + inner_ip[20:]


def skb_ctx(*, mark: int = 0, ifindex: int = 0, ingress_ifindex: int = 0) -> bytes:
    """A struct __sk_buff for BPF_PROG_TEST_RUN with mark, ingress_ifindex (skb_iif: where the
    packet entered the host) and ifindex (all settable)."""
    ctx = bytearray(192)
    struct.pack_into("<I", ctx, 8, mark)
    struct.pack_into("<I", ctx, 36, ingress_ifindex)
    struct.pack_into("<I", ctx, 40, ifindex)
    return bytes(ctx)


@pytest.fixture(scope="module")
def routed(topo: dict[str, Node]) -> Iterator[dict[str, Routed]]:  # noqa: F811
    out: dict[str, Routed] = {}
    try:
        for name in ("a", "b"):
            node = topo[name]
            node.maps.write_config(dataclasses.replace(node.config, flags=FB_CFG_HOST_ROUTING))
            programs = loader.compile_pod_programs(node.pin_dir)
            out[name] = Routed(node, programs.egress, programs.deliver, node.config.uplink_ifindex)
        yield out
    finally:
        for name, r in out.items():
            r.clear()
            loader.PodPrograms(r.egress, r.deliver).close()
            topo[name].maps.write_config(topo[name].config)


@pytest.fixture(autouse=True)
def fresh_maps(routed: dict[str, Routed]) -> Iterator[None]:
    # A's pod 10.5.1.5, as learnt behind the device BPF_PROG_TEST_RUN gives skbs (lo, 1).
    _endpoint(routed["a"], "10.5.1.5", ifindex=1)
    yield
    for r in routed.values():
        r.clear()


def pod_frame(**ip: Any) -> bytes:
    """What pod 10.5.1.5 on A sends to a pod on B: to the bridge's MAC, from its own."""
    payload = pk.udp(40000, 7777, b"x" * 32)
    if ip.pop("tcp_flags", None) is not None:
        payload = struct.pack("!HHIIBBHHH", 40000, 80, 1, 0, 0x50, 0x02, 65535, 0, 0)
        ip["proto"] = 6
    return pk.eth(GW_MAC, POD_MAC) + pk.ipv4("10.5.1.5", "10.5.2.7", payload, **ip)


# --------------------------------------------------------------------------------------------
# A pod's veth: the sending side


def test_a_validated_flow_is_encapsulated_as_flannel_1_would_after_forwarding(
    routed: dict[str, Routed],
) -> None:
    a = routed["a"]
    frame = pod_frame()
    a.set_flow(frame[14:], EGRESS)
    retval, out, delta = a.run(Hook.POD_EGRESS, a.egress, frame)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.ENCAP_FROM_POD: (1, len(frame))})
    # The long way: the host forwards it (TTL - 1) to flannel.1, whose program encapsulates it.
    long_way = a.node.run(Hook.TC_ENCAP, pk.eth(GW_MAC, POD_MAC) + forwarded(frame[14:]))[1]
    assert pk.masked(out, source_port=False) == pk.masked(long_way, source_port=False)
    assert pk.header_checksum_ok(out) and pk.header_checksum_ok(out, 64)
    assert out[64 + 8] == 63  # the inner TTL


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no flow", Reason.PASS_NOT_VALIDATED),
        ("lapsed", Reason.PASS_REVALIDATE),
        ("tcp syn", Reason.PASS_TCP_CONTROL),
        ("ttl 1", Reason.PASS_TTL_EXPIRED),
        ("no remote", Reason.PASS_NO_REMOTE),
        ("skip remote", Reason.PASS_SKIP),
        ("fragment", Reason.PASS_NO_PORTS),
        ("ip options", Reason.PASS_IP_OPTIONS),
        ("another veth's pod", Reason.PASS_NO_ENDPOINT),
        ("unknown source", Reason.PASS_NO_ENDPOINT),
    ],
)
def test_everything_else_goes_on_into_the_bridge_untouched(
    routed: dict[str, Routed], case: str, reason: Reason
) -> None:
    a = routed["a"]
    ip: dict[str, Any] = {
        "tcp syn": {"tcp_flags": 0x02},
        "ttl 1": {"ttl": 1},
        "fragment": {"frag": 0x2000},
        "ip options": {"options": b"\x01\x01\x01\x00"},
    }.get(case, {})
    frame = pod_frame(**ip)
    if case == "no remote":
        frame = frame[:14] + pk.ipv4("10.5.1.5", "10.9.9.9", frame[34:])
    if case == "skip remote":
        frame = frame[:14] + pk.ipv4("10.5.1.5", "10.5.5.7", frame[34:])
    if case == "another veth's pod":  # a validated flow of 10.5.1.5, sent from another veth
        _endpoint(a, "10.5.1.5", ifindex=a.u0)
    if case == "unknown source":
        frame = frame[:14] + pk.ipv4("10.5.1.99", "10.5.2.7", frame[34:])
    if case != "no flow":
        a.set_flow(frame[14:], EGRESS, expires_in=-1.0 if case == "lapsed" else 60.0)
    retval, out, delta = a.run(Hook.POD_EGRESS, a.egress, frame)
    assert (retval, out, delta) == (TC_ACT_OK, frame, {reason: (1, len(frame))})


def test_host_routing_off_in_the_config_leaves_every_pod_packet_alone(
    routed: dict[str, Routed],
) -> None:
    a = routed["a"]
    frame = pod_frame()
    a.set_flow(frame[14:], EGRESS)
    a.node.maps.write_config(a.node.config)  # flags 0
    try:
        retval, out, delta = a.run(Hook.POD_EGRESS, a.egress, frame)
    finally:
        a.node.maps.write_config(dataclasses.replace(a.node.config, flags=FB_CFG_HOST_ROUTING))
    assert (retval, out, delta) == (TC_ACT_OK, frame, {Reason.PASS_NO_CONFIG: (1, len(frame))})


# --------------------------------------------------------------------------------------------
# Learning where the long way ends


def test_what_the_host_routes_in_from_the_overlay_teaches_the_pod_and_if_marked_the_flow(
    routed: dict[str, Routed],
) -> None:
    b = routed["b"]
    into_pod = pk.eth(POD_MAC, GW_MAC) + pk.ipv4("10.5.1.5", "10.5.2.7", pk.udp(40000, 7777, b"y"))
    # Routed by the host from the overlay: it came in at flannel.1.
    ctx = skb_ctx(mark=FB_MARK_VALIDATED, ifindex=b.u0, ingress_ifindex=b.node.config.vtep_ifindex)
    retval, out, delta = b.run(Hook.POD_DELIVER, b.deliver, into_pod, ctx)
    assert (retval, out) == (TC_ACT_OK, into_pod)  # never changed
    assert delta == {Reason.POD_LEARNT: (1, len(into_pod)), Reason.FLOW_LEARNT: (1, len(into_pod))}
    (pod,) = b.node.maps.endpoints()
    assert (str(pod.address), pod.ifindex, pod.mac, pod.gw_mac) == ("10.5.2.7", b.u0, POD_MAC,
                                                                     GW_MAC)  # fmt: skip
    expires = bpf_sys.map_lookup(b.node.maps.fd(FLOWS), flow_key(into_pod[14:], INGRESS), 8)
    assert expires is not None
    left = FLOW_VALUE.unpack(expires)[0] - time.monotonic_ns()
    assert 0 < left <= SECOND
    # The pod is written only when new or changed: the flow again, the pod not.
    assert b.run(Hook.POD_DELIVER, b.deliver, into_pod, ctx)[2] == {
        Reason.FLOW_LEARNT: (1, len(into_pod))
    }
    # Unmarked (not established, or NATed) from the overlay: the pod, not the flow.
    b.clear()
    from_overlay = skb_ctx(ifindex=b.u0, ingress_ifindex=b.node.config.vtep_ifindex)
    assert b.run(Hook.POD_DELIVER, b.deliver, into_pod, from_overlay)[2] == {
        Reason.POD_LEARNT: (1, len(into_pod))
    }
    assert [str(e.address) for e in b.node.maps.endpoints()] == ["10.5.2.7"]
    assert bpf_sys.map_lookup(b.node.maps.fd(FLOWS), flow_key(into_pod[14:], INGRESS), 8) is None
    # Not from the overlay (the host's own packets, or bridged): nothing at all.
    b.clear()
    assert b.run(Hook.POD_DELIVER, b.deliver, into_pod, skb_ctx(ifindex=b.u0))[2] == {}
    assert b.node.maps.endpoints() == []
    # Marked but bridged from another pod of the node (br_netfilter marks those too): it
    # entered at that pod's veth, was never routed, and teaches nothing.
    from_a_pod = pk.eth(POD_MAC, "0a:58:0a:05:02:09") + into_pod[14:]
    bridged = skb_ctx(mark=FB_MARK_VALIDATED, ifindex=b.u0, ingress_ifindex=b.u0 + 100)
    assert b.run(Hook.POD_DELIVER, b.deliver, from_a_pod, bridged)[2] == {}
    assert b.node.maps.endpoints() == []
    assert bpf_sys.map_lookup(b.node.maps.fd(FLOWS), flow_key(into_pod[14:], INGRESS), 8) is None
    # A FIN ends the flow's shortcut.
    b.set_flow(into_pod[14:], INGRESS)
    fin = pk.eth(POD_MAC, GW_MAC) + pk.ipv4(
        "10.5.1.5",
        "10.5.2.7",
        struct.pack("!HHIIBBHHH", 40000, 7777, 1, 0, 0x50, 0x01, 1, 0, 0),
        proto=6,
    )
    b.set_flow(fin[14:], INGRESS)
    b.run(Hook.POD_DELIVER, b.deliver, fin, ctx)
    assert bpf_sys.map_lookup(b.node.maps.fd(FLOWS), flow_key(fin[14:], INGRESS), 8) is None


def test_the_encap_program_learns_marked_egress_flows(routed: dict[str, Routed]) -> None:
    a = routed["a"]
    frame = pod_frame()
    ctx = skb_ctx(mark=FB_MARK_VALIDATED)
    retval, _, delta = a.node.run(Hook.TC_ENCAP, frame, ctx)
    assert retval == TC_ACT_REDIRECT
    assert delta[Reason.FLOW_LEARNT][0] == 1 and delta[Reason.ENCAP_REDIRECT][0] == 1
    assert bpf_sys.map_lookup(a.node.maps.fd(FLOWS), flow_key(frame[14:], EGRESS), 8)
    # Now the pod's next packet of the flow takes the short way.
    assert a.run(Hook.POD_EGRESS, a.egress, frame)[0] == TC_ACT_REDIRECT


# --------------------------------------------------------------------------------------------
# The uplink: the receiving side


def _endpoint(r: Routed, address: str = "10.5.2.7", ifindex: int = 0) -> None:
    value = struct.pack("<I6s6sI", ifindex or r.u0, pk.mac(POD_MAC), pk.mac(GW_MAC), 0)
    key = ENDPOINT_KEY.pack(bytes(int(x) for x in address.split(".")))
    bpf_sys.map_update(r.node.maps.fd(ENDPOINTS), key, value)


def test_a_validated_flow_is_handed_to_the_pod_as_the_host_would(
    routed: dict[str, Routed],
) -> None:
    b = routed["b"]
    inner = KERNEL_FRAME[64:]
    _endpoint(b)
    b.set_flow(inner, INGRESS)
    retval, out, delta = b.node.run(Hook.TC_DECAP, KERNEL_FRAME)
    assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.DECAP_TO_POD: (1, len(KERNEL_FRAME))})
    assert out == pk.eth(POD_MAC, GW_MAC) + forwarded(inner)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("no pod", Reason.PASS_NO_ENDPOINT),
        ("no flow", Reason.PASS_NOT_VALIDATED),
        ("lapsed", Reason.PASS_REVALIDATE),
    ],
)
def test_otherwise_the_uplink_decapsulates_into_flannel_1_as_before(
    routed: dict[str, Routed], case: str, reason: Reason
) -> None:
    b = routed["b"]
    inner = KERNEL_FRAME[64:]
    if case != "no pod":
        _endpoint(b)
    if case == "lapsed":
        b.set_flow(inner, INGRESS, expires_in=-1.0)
    retval, out, delta = b.node.run(Hook.TC_DECAP, KERNEL_FRAME)
    assert retval == TC_ACT_REDIRECT  # into flannel.1, the long way
    assert out == pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"]) + inner
    assert delta == {reason: (1, 0), Reason.DECAP_REDIRECT: (1, len(KERNEL_FRAME))}


def _tcp_aggregate(mss: int) -> bytes:
    """A pod's TCP aggregate of two segments of mss bytes (header 20 bytes, flags ACK)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 7777, 1, 1, 0x50, 0x10, 65535, 0, 0)
    return pk.eth(GW_MAC, POD_MAC) + pk.ipv4("10.5.1.5", "10.5.2.7", tcp + b"z" * 2 * mss,
                                             proto=6)  # fmt: skip


@pytest.mark.parametrize(("mss", "fits"), [(1398, True), (1420, False)])
def test_an_aggregate_fits_when_each_segment_will(
    routed: dict[str, Routed], mss: int, fits: bool
) -> None:
    """Segments of 1398 bytes + 54 of headers + 50 of VXLAN = 1502 fit a 1500 MTU underlay (plus
    its 14-byte Ethernet header); 1420 do not, and the aggregate goes the long way, where vxlan.ko
    tells the pod the path MTU. bpf_check_mtu() would have passed both."""
    from .test_bpf_programs import skb_ctx as gso_ctx

    a = routed["a"]
    frame = _tcp_aggregate(mss)
    a.set_flow(frame[14:], EGRESS)
    retval, _, delta = a.run(Hook.POD_EGRESS, a.egress, frame, gso_ctx(gso_size=mss, gso_segs=2))
    if fits:
        # Past the size check to the resize, which BPF_PROG_TEST_RUN's skbs cannot pass (no way
        # to give them a TCP GSO type); the lab's PMTU test sends real aggregates.
        assert (retval, delta) == (TC_ACT_UNSPEC, {Reason.PASS_ADJUST_FAILED: (1, len(frame))})
    else:
        assert (retval, delta) == (TC_ACT_UNSPEC, {Reason.PASS_TOO_BIG: (1, len(frame))})
