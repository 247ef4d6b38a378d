"""Fuzzing every BPF program with BPF_PROG_TEST_RUN: random and malformed frames by the thousand.

For each frame the kernel runs the program on, the verdict and the output must agree: passed on
untouched, handled (decapsulated or encapsulated), or dropped. Over each batch, the program's
counters must have grown by exactly one per frame, in the matching outcome: nothing unaccounted.
Frames are derived from valid ones (cut at and around every header boundary, IP options,
fragments, wrong VNI, flags, MAC, ports and protocol, lengths that lie, random bytes in every
header) plus wholly random ones, from a fixed seed so a failure replays.
"""

from __future__ import annotations

import errno
import random
import struct
from collections import Counter
from collections.abc import Callable, Iterator

import pytest

from flannel_bpf.datapath import bpf_sys
from flannel_bpf.datapath.bpf_maps import Hook
from flannel_bpf.lab.netns import entered

from . import packets as pk
from .conftest import requires_root
from .test_bpf_programs import TOPO, Node, _vxlan_frame, inner_frame, topo  # noqa: F401
from .test_bpf_udp import datagram, node  # noqa: F401
from .test_bpf_udp import inner as udp_inner

pytestmark = requires_root

FRAMES_PER_PROGRAM = 50_000  # six programs: 300,000 frames a run
SEED = 20261121

TC_ACT_UNSPEC, TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0xFFFFFFFF, 0, 2, 7
XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 1, 2, 3, 4

# Header boundaries of an encapsulated frame: Ethernet, IPv4, UDP, VXLAN, inner Ethernet, inner IP
VXLAN_BOUNDARIES = (14, 34, 42, 50, 64, 84)
UDP_BOUNDARIES = (14, 34, 42, 62)
INNER_BOUNDARIES = (14, 34, 42)


def mutations(valid: bytes, boundaries: tuple[int, ...], rng: random.Random) -> Iterator[bytes]:
    """Endless malformed variants of one valid frame."""
    while True:
        kind = rng.randrange(9)
        frame = bytearray(valid)
        if kind == 0:  # cut at or next to a header boundary
            cut = rng.choice(boundaries) + rng.choice((-1, 0, 1))
            yield bytes(frame[: max(0, cut)])
        elif kind == 1:  # a random byte somewhere in the headers
            at = rng.randrange(min(len(frame), boundaries[-1] + 20))
            frame[at] = rng.randrange(256)
            yield bytes(frame)
        elif kind == 2:  # several random bytes anywhere
            for _ in range(rng.randrange(1, 8)):
                frame[rng.randrange(len(frame))] = rng.randrange(256)
            yield bytes(frame)
        elif kind == 3:  # an IPv4 total length that lies (outer or inner)
            offset = rng.choice([b for b in boundaries if b in (14, 64)] or [14])
            if offset + 4 <= len(frame):
                frame[offset + 2 : offset + 4] = struct.pack("!H", rng.randrange(65536))
            yield bytes(frame)
        elif kind == 4:  # a UDP length that lies
            if len(frame) >= 40:
                frame[38:40] = struct.pack("!H", rng.randrange(65536))
            yield bytes(frame)
        elif kind == 5:  # IHL and version nibbles
            offset = rng.choice([b for b in boundaries if b in (14, 64)] or [14])
            if offset < len(frame):
                frame[offset] = rng.randrange(256)
            yield bytes(frame)
        elif kind == 6:  # fragment bits and offsets
            if len(frame) >= 22:
                frame[20:22] = struct.pack("!H", rng.choice((0x2000, 0x0001, 0x3FFF, 0x4000)))
            yield bytes(frame)
        elif kind == 7:  # grown or shrunk payload
            extra = rng.randrange(-len(frame), 1600)
            yield (
                bytes(frame[: len(frame) + extra])
                if extra < 0
                else bytes(frame) + rng.randbytes(extra)
            )
        else:  # wholly random
            yield rng.randbytes(rng.randrange(0, 200))


def outcome(hook_kind: str, retval: int, frame: bytes, out: bytes) -> str:
    """What the program did with the frame, from its verdict and output alone."""
    unchanged = out == frame
    if hook_kind == "xdp":
        if retval == XDP_DROP:
            return "dropped"
        if retval == XDP_PASS:
            return "passed" if unchanged else "handled"
        raise AssertionError(f"XDP verdict {retval} for {frame.hex()}")
    if retval == TC_ACT_SHOT:
        return "dropped"
    if retval == TC_ACT_REDIRECT:
        return "handled"
    if retval in (TC_ACT_UNSPEC, TC_ACT_OK):
        assert unchanged, f"passed on but modified: {frame.hex()} -> {out.hex()}"
        return "passed"
    raise AssertionError(f"tc verdict {retval} for {frame.hex()}")


def fuzz(side: Node, fd: int, hook: Hook, frames: Iterator[bytes], count: int) -> Counter[str]:
    kind = "xdp" if hook is Hook.XDP_DECAP else "tc"
    before = side.maps.counters()
    seen: Counter[str] = Counter()
    refused = 0
    with entered(side.ns):
        for _ in range(count):
            frame = next(frames)
            try:
                result = bpf_sys.prog_test_run(fd, frame)
            except bpf_sys.BPFError as exc:
                # The kernel would not build a packet from this (under an Ethernet header, or an
                # skb it cannot make): the program never ran.
                assert exc.errno == errno.EINVAL, exc
                refused += 1
                continue
            seen[outcome(kind, result.retval, frame, result.data)] += 1
    after = side.maps.counters()
    counted: Counter[str] = Counter()
    for key, (packets, _) in after.items():
        if key.hook is hook:
            counted[key.reason.outcome] += packets - before[key][0]
    assert counted == seen, f"counters {dict(counted)} != verdicts {dict(seen)}"
    assert sum(seen.values()) + refused == count
    assert sum(seen.values()) > count * 0.8, f"the kernel refused {refused} of {count}"
    print(f"fuzz {hook.label}: {count} frames, {dict(seen)}, {refused} refused by the kernel")
    return seen


def _seeded(name: str) -> random.Random:
    return random.Random(f"{SEED}-{name}")


Case = tuple[str, Hook, Callable[[random.Random], Iterator[bytes]], str]


def _vxlan_decap_frames(rng: random.Random) -> Iterator[bytes]:
    valid = [_vxlan_frame(), _vxlan_frame(inner=pk.ipv4("10.5.1.5", "10.5.2.7", b"x" * 1000))]
    streams = [mutations(v, VXLAN_BOUNDARIES, rng) for v in valid]
    while True:
        if rng.random() < 0.1:
            yield rng.choice(valid)  # some valid ones keep the handled path in the mix
        else:
            yield next(rng.choice(streams))


def _vxlan_encap_frames(rng: random.Random) -> Iterator[bytes]:
    valid = [inner_frame(), inner_frame("10.5.4.9"), inner_frame(payload=b"z" * 1300)]
    streams = [mutations(v, INNER_BOUNDARIES, rng) for v in valid]
    while True:
        yield rng.choice(valid) if rng.random() < 0.1 else next(rng.choice(streams))


def _udp_decap_frames(rng: random.Random) -> Iterator[bytes]:
    valid = [datagram(udp_inner()), datagram(udp_inner(payload=b"q" * 1000))]
    streams = [mutations(v, UDP_BOUNDARIES, rng) for v in valid]
    while True:
        yield rng.choice(valid) if rng.random() < 0.1 else next(rng.choice(streams))


def _udp_encap_frames(rng: random.Random) -> Iterator[bytes]:
    # flannel0 is an L3 device: the program sees IP packets; test runs prepend an Ethernet
    # header it must treat as just more bytes. Everything here is therefore malformed for it.
    valid = [pk.eth(TOPO["remote_vtep_mac"], TOPO["local_vtep_mac"]) + udp_inner()]
    stream = mutations(valid[0], INNER_BOUNDARIES, rng)
    while True:
        yield valid[0] if rng.random() < 0.1 else next(stream)


@pytest.mark.parametrize(
    ("program", "hook", "frames"),
    [
        ("encap", Hook.TC_ENCAP, _vxlan_encap_frames),
        ("xdp_decap", Hook.XDP_DECAP, _vxlan_decap_frames),
        ("tc_decap", Hook.TC_DECAP, _vxlan_decap_frames),
    ],
)
def test_fuzz_vxlan_programs(
    topo: dict[str, Node],  # noqa: F811
    program: str,
    hook: Hook,
    frames: Callable[[random.Random], Iterator[bytes]],
) -> None:
    side = topo["a"] if hook is Hook.TC_ENCAP else topo["b"]
    seen = fuzz(side, getattr(side.programs, program), hook, frames(_seeded(program)),
                FRAMES_PER_PROGRAM)  # fmt: skip
    # The mix reached every outcome the program has, not only the first check.
    assert seen["passed"] > 0 and seen["handled"] > 0, seen
    if hook is not Hook.TC_ENCAP:
        assert seen["dropped"] > 0, seen  # malformed inner packets


@pytest.mark.parametrize(
    ("program", "hook", "frames"),
    [
        ("encap", Hook.TC_ENCAP, _udp_encap_frames),
        ("xdp_decap", Hook.XDP_DECAP, _udp_decap_frames),
        ("tc_decap", Hook.TC_DECAP, _udp_decap_frames),
    ],
)
def test_fuzz_udp_programs(
    node: Node,  # noqa: F811
    program: str,
    hook: Hook,
    frames: Callable[[random.Random], Iterator[bytes]],
) -> None:
    seen = fuzz(node, getattr(node.programs, program), hook, frames(_seeded("udp" + program)),
                FRAMES_PER_PROGRAM)  # fmt: skip
    assert seen["passed"] > 0, seen
    if hook is not Hook.TC_ENCAP:
        assert seen["handled"] > 0 and seen["dropped"] > 0, seen
