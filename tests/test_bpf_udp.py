"""The udp-format decapsulation programs, run by the kernel on crafted frames (BPF_PROG_TEST_RUN).

The reference is flanneld's receiver, as the userspace plane implements it: the datagram payload
is the inner packet, its TTL one lower (checksum fixed incrementally). Both hooks must produce
exactly that behind the original Ethernet header, and leave everything else alone with its reason
counted. The encapsulation program runs on flannel0 (an L3 TUN device), which BPF_PROG_TEST_RUN
cannot model; tests/test_lab_bpf.py drives it through a real TUN and compares the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from flannel_bpf.backends.udp import decrement_ttl, ip_checksum
from flannel_bpf.datapath import loader
from flannel_bpf.datapath.bpf_maps import DatapathConfig, Hook, PinnedMaps, Reason
from flannel_bpf.lab.netns import add_netns, delete_netns, entered, run

from . import packets as pk
from .conftest import requires_root, unique
from .test_bpf_programs import (
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    XDP_DROP,
    XDP_PASS,
    Node,
)

pytestmark = requires_root

LOCAL, PEER = "198.18.0.1", "198.18.0.2"
LOCAL_MAC, PEER_MAC = "02:fb:00:00:00:01", "02:fb:00:00:00:02"
PORT = 8285


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    """One host: an uplink, a flannel0 TUN, the udp-format programs with their config written."""
    ns = unique("pu")
    pin_dir = loader.DEFAULT_BPFFS / f"test-{unique('udp')}" / "v1"
    add_netns(ns)
    built: Node | None = None
    try:
        run(["ip", "-n", ns, "link", "add", "u0", "address", LOCAL_MAC, "type", "veth",
             "peer", "name", "u1"])  # fmt: skip
        run(["ip", "-n", ns, "tuntap", "add", "dev", "flannel0", "mode", "tun"])
        run(["ip", "-n", ns, "addr", "add", f"{LOCAL}/24", "dev", "u0"])
        loader.ensure_bpffs()
        programs = loader.compile_programs(pin_dir, loader.UDP)
        with entered(ns):
            from pyroute2 import IPRoute

            with IPRoute() as ipr:
                uplink = ipr.link("get", ifname="u0")[0]
                tun = ipr.link("get", ifname="flannel0")[0]
        config = DatapathConfig(
            local_ip=IPv4Address(LOCAL),
            vni=0,
            port=PORT,
            uplink_ifindex=int(uplink["index"]),
            uplink_mac=LOCAL_MAC,
            vtep_ifindex=int(tun["index"]),
            vtep_mac="00:00:00:00:00:00",
        )
        built = Node(ns, pin_dir, programs, PinnedMaps(pin_dir), config)
        built.maps.write_config(config)
        yield built
    finally:
        if built is not None:
            built.close()
        else:
            loader.unpin(pin_dir)
        delete_netns(ns)


def inner(ttl: int = 63, payload: bytes = b"p" * 40, **ip: object) -> bytes:
    return pk.ipv4("10.5.2.7", "10.5.1.5", pk.udp(40000, 7777, payload), ttl=ttl, **ip)  # type: ignore[arg-type]


def datagram(
    payload: bytes,
    *,
    dst: str = LOCAL,
    dport: int = PORT,
    proto: int = 17,
    **outer: object,
) -> bytes:
    body = pk.udp(PORT, dport, payload) if proto == 17 else payload
    return pk.eth(LOCAL_MAC, PEER_MAC) + pk.ipv4(PEER, dst, body, proto=proto, **outer)  # type: ignore[arg-type]


def flanneld_receive(packet: bytes) -> bytes:
    """What flanneld's receiver writes into flannel0 for this payload."""
    buf = bytearray(packet)
    assert decrement_ttl(buf)
    return bytes(buf)


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize(
    "packet",
    [inner(), inner(ttl=2), inner(payload=b"q" * 1400), inner(options=b"\x01\x01\x01\x00")],
    ids=["plain", "ttl-2", "large", "inner-options"],
)
def test_decap_delivers_what_flanneld_writes_to_the_tun(
    node: Node, hook: Hook, packet: bytes
) -> None:
    frame = datagram(packet)
    retval, out, delta = node.run(hook, frame)
    if hook is Hook.XDP_DECAP:
        assert (retval, delta) == (XDP_PASS, {Reason.DECAP_PASS: (1, len(frame))})
    else:
        assert (retval, delta) == (TC_ACT_REDIRECT, {Reason.DECAP_REDIRECT: (1, len(frame))})
    assert out == frame[:14] + flanneld_receive(packet)
    header_len = (out[14] & 0x0F) * 4
    assert ip_checksum(out[14 : 14 + header_len]) == 0


V6_PACKET = bytes([0x60]) + bytes(39)


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (pk.eth(LOCAL_MAC, PEER_MAC, pk.ETH_P_ARP) + bytes(28), Reason.PASS_NOT_IPV4),
        (datagram(inner(), dport=8472), Reason.PASS_NOT_OURS),
        (datagram(inner(), dst="198.18.0.9"), Reason.PASS_NOT_OURS),
        (datagram(inner(), proto=6), Reason.PASS_NOT_OURS),
        (datagram(inner(), options=b"\x01\x01\x01\x00"), Reason.PASS_IP_OPTIONS),
        (datagram(inner(), frag=0x2000), Reason.PASS_FRAGMENT),
        (datagram(b"short"), Reason.PASS_SHORT),  # flanneld drops these; the socket counts them
        (datagram(V6_PACKET), Reason.PASS_INNER_NOT_IPV4),
        (datagram(inner(ttl=1)), Reason.PASS_TTL_EXPIRED),
        (datagram(inner(ttl=0)), Reason.PASS_TTL_EXPIRED),
    ],
    ids=lambda v: v.name if isinstance(v, Reason) else "",
)
def test_decap_passes_what_it_does_not_handle(
    node: Node, hook: Hook, frame: bytes, reason: Reason
) -> None:
    retval, out, delta = node.run(hook, frame)
    expected = XDP_PASS if hook is Hook.XDP_DECAP else TC_ACT_UNSPEC
    assert (retval, delta) == (expected, {reason: (1, len(frame))})
    assert out == frame


@pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)
@pytest.mark.parametrize(
    "packet",
    [
        inner(total_length=2000),  # claims more than the datagram carries
        inner(total_length=12),  # shorter than its own header
        bytes([0x44]) + inner()[1:],  # IHL 4
    ],
    ids=["length-lies-long", "length-lies-short", "ihl-4"],
)
def test_decap_drops_malformed_inner_packets(node: Node, hook: Hook, packet: bytes) -> None:
    frame = datagram(packet)
    retval, _, delta = node.run(hook, frame)
    assert retval == (XDP_DROP if hook is Hook.XDP_DECAP else TC_ACT_SHOT)
    assert delta == {Reason.DROP_INNER_MALFORMED: (1, len(frame))}


def test_unconfigured_udp_programs_pass_everything(node: Node) -> None:
    frame = datagram(inner())
    node.maps.write_config(
        DatapathConfig(IPv4Address(0), 0, 0, 0, "00:00:00:00:00:00", 0, "00:00:00:00:00:00")
    )
    try:
        for hook in (Hook.XDP_DECAP, Hook.TC_DECAP):
            _, out, delta = node.run(hook, frame)
            assert delta == {Reason.PASS_NO_CONFIG: (1, len(frame))}
            assert out == frame
    finally:
        node.maps.write_config(node.config)
