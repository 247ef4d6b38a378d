"""Anti-spoofing (--anti-spoofing) in the decap programs of both wire formats, run by the kernel.

With FB_CFG_CHECK_SOURCES set, a frame is decapsulated only when its outer source holds a lease
(fb_senders) and its inner source lies in that lease's subnet (fb_remotes); a frame the programs
leave to vxlan.ko or the udp socket must at least come from a lease holder. Everything else is
dropped and counted as unknown_sender or spoofed_source. Without the flag, nothing changes.
The agent's bookkeeping of fb_senders (several leases per address, moves, sweeps) runs through
the real BPFDatapath on the real maps. tests/test_lab_bpf.py shows a rogue namespace blocked.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.datapath import loader
from flannel_bpf.datapath.bpf_maps import FB_CFG_CHECK_SOURCES, Hook, PinnedMaps, Reason, Remote

from . import packets as pk
from .conftest import requires_root
from .test_bpf_fuzz import VXLAN_BOUNDARIES, fuzz, mutations
from .test_bpf_programs import (  # noqa: F401 - topo is a fixture
    TC_ACT_REDIRECT,
    TC_ACT_SHOT,
    TC_ACT_UNSPEC,
    TOPO,
    XDP_DROP,
    XDP_PASS,
    Node,
    _vxlan_frame,
    topo,
)
from .test_bpf_udp import LOCAL, LOCAL_MAC, PORT, node  # noqa: F401 - node is a fixture
from .test_bpf_udp import inner as udp_inner

pytestmark = requires_root

PEER = TOPO["local_underlay"]  # node A: the sender holding the lease for 10.5.1.0/24
PEER_SUBNET = IPv4Network("10.5.1.0/24")
OTHER_PEER, OTHER_SUBNET = "198.18.0.9", IPv4Network("10.5.9.0/24")
STRANGER = "198.18.0.66"  # on the underlay, holding no lease

HANDLED = {Hook.XDP_DECAP: XDP_PASS, Hook.TC_DECAP: TC_ACT_REDIRECT}
HANDLED_REASON = {Hook.XDP_DECAP: Reason.DECAP_PASS, Hook.TC_DECAP: Reason.DECAP_REDIRECT}
DROPPED = {Hook.XDP_DECAP: XDP_DROP, Hook.TC_DECAP: TC_ACT_SHOT}
PASSED = {Hook.XDP_DECAP: XDP_PASS, Hook.TC_DECAP: TC_ACT_UNSPEC}
HOOKS = pytest.mark.parametrize("hook", [Hook.XDP_DECAP, Hook.TC_DECAP], ids=lambda h: h.label)


def _datapath(side: Node) -> loader.BPFDatapath:
    """The agent's BPFDatapath on a test node's maps (loaded, not attached)."""
    device = loader.Device("flannel.1", side.config.vtep_ifindex, side.config.vtep_mac)
    uplink = loader.Device("u0", side.config.uplink_ifindex, side.config.uplink_mac)
    datapath = loader.BPFDatapath(vtep=device, uplink=uplink, config=side.config,
                                  pin_dir=side.pin_dir)  # fmt: skip
    datapath.maps = PinnedMaps(side.pin_dir)
    return datapath


def _guard(side: Node, remotes: list[Remote]) -> Iterator[loader.BPFDatapath]:
    datapath = _datapath(side)
    checked = dataclasses.replace(side.config, flags=FB_CFG_CHECK_SOURCES)
    try:
        datapath.sync_remotes(remotes)
        side.maps.write_config(checked)
        yield datapath
    finally:
        side.maps.write_config(side.config)
        datapath.sync_remotes([])
        datapath.close()


@pytest.fixture
def guarded(topo: dict[str, Node]) -> Iterator[loader.BPFDatapath]:  # noqa: F811
    """Node B with anti-spoofing on, knowing A's lease and one more peer's."""
    yield from _guard(
        topo["b"],
        [
            Remote(PEER_SUBNET, IPv4Address(PEER), TOPO["local_vtep_mac"]),
            Remote(OTHER_SUBNET, IPv4Address(OTHER_PEER), "0e:fb:00:00:09:01"),
        ],
    )


def _frame(src: str = PEER, inner_src: str = "10.5.1.5", **outer: object) -> bytes:
    inner = pk.ipv4(inner_src, "10.5.2.7", pk.udp(1, 2, b"hello"))
    return _vxlan_frame(src_ip=src, inner=inner, **outer)  # type: ignore[arg-type]


@HOOKS
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_frame(), None),
        (_frame(inner_src="10.5.1.254"), None),
        (_frame(src=STRANGER), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER, inner_src="10.5.9.5"), Reason.DROP_UNKNOWN_SENDER),
        (_frame(inner_src="10.5.9.5"), Reason.DROP_SPOOFED_SOURCE),  # another peer's subnet
        (_frame(inner_src="10.5.2.9"), Reason.DROP_SPOOFED_SOURCE),  # the receiver's own subnet
        (_frame(inner_src="10.99.0.1"), Reason.DROP_SPOOFED_SOURCE),  # in no subnet at all
        (_frame(src=OTHER_PEER), Reason.DROP_SPOOFED_SOURCE),  # a peer sending another's
    ],
    ids=[
        "peer",
        "peer-edge",
        "stranger",
        "stranger-peer-source",
        "other-subnet",
        "own-subnet",
        "nowhere",
        "peer-as-other",
    ],
)
def test_decap_only_from_lease_holders_and_their_subnets(
    topo: dict[str, Node],  # noqa: F811
    guarded: loader.BPFDatapath,
    hook: Hook,
    frame: bytes,
    reason: Reason | None,
) -> None:
    retval, out, delta = topo["b"].run(hook, frame)
    if reason is None:
        assert (retval, delta) == (HANDLED[hook], {HANDLED_REASON[hook]: (1, len(frame))})
        assert len(out) == len(frame) - 50
    else:
        assert (retval, delta) == (DROPPED[hook], {reason: (1, len(frame))})


@HOOKS
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        # vxlan.ko would decapsulate these: a stranger's are dropped, a peer's go on.
        (_frame(src=STRANGER, frag=0x2000), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER, options=b"\x01\x01\x01\x00"), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER, vni=2), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER, flags=0x08000001), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER, inner_mac="ff:ff:ff:ff:ff:ff"), Reason.DROP_UNKNOWN_SENDER),
        (_frame(src=STRANGER)[:60], Reason.DROP_UNKNOWN_SENDER),
        (_frame(frag=0x2000), Reason.PASS_FRAGMENT),
        (_frame(options=b"\x01\x01\x01\x00"), Reason.PASS_IP_OPTIONS),
        (_frame(inner_mac="ff:ff:ff:ff:ff:ff"), Reason.PASS_OTHER_MAC),
        # No UDP header to tell the port by: without its first fragment it never reassembles.
        (_frame(src=STRANGER, frag=0x0010), Reason.PASS_FRAGMENT),
        # Not for our VTEP at all: none of anti-spoofing's business.
        (_frame(src=STRANGER, port=4789), Reason.PASS_NOT_OURS),
        (_frame(src=STRANGER, dst_ip="198.18.0.77"), Reason.PASS_NOT_OURS),
    ],
    ids=[
        "stranger-fragment",
        "stranger-options",
        "stranger-vni",
        "stranger-flags",
        "stranger-broadcast",
        "stranger-short",
        "peer-fragment",
        "peer-options",
        "peer-broadcast",
        "later-fragment",
        "other-port",
        "other-host",
    ],
)
def test_what_the_kernel_would_decapsulate_needs_a_lease_holder(
    topo: dict[str, Node],  # noqa: F811
    guarded: loader.BPFDatapath,
    hook: Hook,
    frame: bytes,
    reason: Reason,
) -> None:
    retval, out, delta = topo["b"].run(hook, frame)
    expected = DROPPED[hook] if reason.outcome == "dropped" else PASSED[hook]
    assert (retval, delta) == (expected, {reason: (1, len(frame))})
    if reason.outcome == "passed":
        assert out == frame


@HOOKS
def test_without_the_flag_anyone_is_decapsulated(topo: dict[str, Node], hook: Hook) -> None:  # noqa: F811
    frame = _frame(src=STRANGER, inner_src="10.99.0.1")
    retval, _, delta = topo["b"].run(hook, frame)
    assert (retval, delta) == (HANDLED[hook], {HANDLED_REASON[hook]: (1, len(frame))})


def test_senders_follow_the_remotes(topo: dict[str, Node]) -> None:  # noqa: F811
    """fb_senders counts the leases per underlay address through every change the agent makes."""
    side = topo["b"]
    datapath = _datapath(side)
    a, b = IPv4Address("198.18.0.21"), IPv4Address("198.18.0.22")

    def remote(subnet: str, address: IPv4Address) -> Remote:
        return Remote(IPv4Network(subnet), address, "0e:fb:00:00:00:21")

    try:
        datapath.sync_remotes([remote("10.5.21.0/24", a)])
        assert side.maps.senders() == {a: 1}
        # A second lease at the same address (a host re-leasing before the old one expires).
        datapath.set_remote(remote("10.5.31.0/24", a))
        assert side.maps.senders() == {a: 2}
        datapath.set_remote(remote("10.5.31.0/24", a))  # renewals re-send Added
        assert side.maps.senders() == {a: 2}
        # The lease moves to another address.
        datapath.set_remote(remote("10.5.31.0/24", b))
        assert side.maps.senders() == {a: 1, b: 1}
        assert datapath.delete_remote(IPv4Network("10.5.21.0/24"))
        assert side.maps.senders() == {b: 1}
        datapath.delete_remote(IPv4Network("10.5.99.0/24"))  # unknown: nothing changes
        assert side.maps.senders() == {b: 1}
        # A restart: stale entries in the pins, swept by the snapshot.
        side.maps.set_sender(IPv4Address("198.18.0.99"), 1)
        restarted = _datapath(side)
        restarted.sync_remotes([remote("10.5.21.0/24", a), remote("10.5.22.0/24", a)])
        assert side.maps.senders() == {a: 2}
        restarted.sync_remotes([])
        assert side.maps.senders() == {}
        restarted.close()
    finally:
        datapath.sync_remotes([])
        datapath.close()


# --------------------------------------------------------------------------------------------
# udp wire format


@pytest.fixture
def guarded_udp(node: Node) -> Iterator[loader.BPFDatapath]:  # noqa: F811
    udp_peer = Remote(IPv4Network("10.5.2.0/24"), IPv4Address(PEER), "00:00:00:00:00:00")
    yield from _guard(node, [udp_peer])


def _datagram(src: str, inner: bytes, **outer: object) -> bytes:
    outer_ip = pk.ipv4(src, LOCAL, pk.udp(PORT, PORT, inner), **outer)  # type: ignore[arg-type]
    return pk.eth(LOCAL_MAC, "02:fb:00:00:00:02") + outer_ip


@HOOKS
@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (_datagram(PEER, udp_inner()), None),
        (_datagram(STRANGER, udp_inner()), Reason.DROP_UNKNOWN_SENDER),
        (_datagram(PEER, pk.ipv4("10.5.3.7", "10.5.1.5", b"x" * 8)), Reason.DROP_SPOOFED_SOURCE),
        # Checked before the TTL: a stranger must not draw an ICMP error from the userspace plane.
        (_datagram(STRANGER, udp_inner(ttl=1)), Reason.DROP_UNKNOWN_SENDER),
        (_datagram(PEER, udp_inner(ttl=1)), Reason.PASS_TTL_EXPIRED),
        (_datagram(STRANGER, udp_inner(), frag=0x2000), Reason.DROP_UNKNOWN_SENDER),
        (_datagram(STRANGER, b"short"), Reason.DROP_UNKNOWN_SENDER),
        (_datagram(PEER, udp_inner(), frag=0x2000), Reason.PASS_FRAGMENT),
    ],
    ids=[
        "peer",
        "stranger",
        "spoofed",
        "stranger-ttl",
        "peer-ttl",
        "stranger-fragment",
        "stranger-short",
        "peer-fragment",
    ],
)
def test_udp_decap_checks_sources_too(
    node: Node,  # noqa: F811
    guarded_udp: loader.BPFDatapath,
    hook: Hook,
    frame: bytes,
    reason: Reason | None,
) -> None:
    retval, _, delta = node.run(hook, frame)
    if reason is None:
        assert (retval, delta) == (HANDLED[hook], {HANDLED_REASON[hook]: (1, len(frame))})
    elif reason.outcome == "dropped":
        assert (retval, delta) == (DROPPED[hook], {reason: (1, len(frame))})
    else:
        assert (retval, delta) == (PASSED[hook], {reason: (1, len(frame))})


# --------------------------------------------------------------------------------------------
# Fuzzing with the check on


def _mixed_senders(rng: random.Random) -> Iterator[bytes]:
    valid = [_frame(), _frame(src=STRANGER), _frame(inner_src="10.5.9.5"), _frame(src=OTHER_PEER)]
    streams = [mutations(v, VXLAN_BOUNDARIES, rng) for v in valid]
    while True:
        yield rng.choice(valid) if rng.random() < 0.2 else next(rng.choice(streams))


@HOOKS
def test_fuzz_with_anti_spoofing(
    topo: dict[str, Node],  # noqa: F811
    guarded: loader.BPFDatapath,
    hook: Hook,
) -> None:
    side = topo["b"]
    fd = side.programs.xdp_decap if hook is Hook.XDP_DECAP else side.programs.tc_decap
    before = side.maps.counters()
    frames = _mixed_senders(random.Random(f"anti-spoofing-{hook.label}"))
    seen = fuzz(side, fd, hook, frames, 20_000)
    assert seen["handled"] > 0 and seen["passed"] > 0 and seen["dropped"] > 0, seen
    after = side.maps.counters()
    for reason in (Reason.DROP_UNKNOWN_SENDER, Reason.DROP_SPOOFED_SOURCE):
        key = next(k for k in after if k.hook is hook and k.reason is reason)
        assert after[key][0] > before[key][0], reason
