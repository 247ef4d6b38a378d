"""The udp backend: packet helpers in pure Python, and the data plane between two namespaces."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.backends import BACKENDS, BackendError
from flannel_bpf.backends.udp import (
    DEFAULT_PORT,
    RouteTable,
    UDPBackend,
    build_net_unreachable,
    decrement_ttl,
    ip_checksum,
    parse_port,
)
from flannel_bpf.lab.netns import add_address, add_veth, in_netns, link_up, run
from flannel_bpf.subnet.config import BackendConfig

from . import packets as pk
from .conftest import requires_root

PYTHON = sys.executable


def ipv4_header(
    *,
    ttl: int = 64,
    proto: int = 6,
    src: str = "10.55.1.1",
    dst: str = "10.55.2.1",
    frag: int = 0,
    ident: int = 0x1234,
    options: bytes = b"",
    payload: bytes = b"ABCDEFGHIJ",
) -> bytearray:
    return bytearray(
        pk.ipv4(src, dst, payload, proto=proto, ident=ident, ttl=ttl, frag=frag, options=options)
    )


# --------------------------------------------------------------------------------------------
# Pure unit tests


def test_registered() -> None:
    assert BACKENDS["udp"] is UDPBackend


def test_checksum_of_valid_header_is_zero() -> None:
    pkt = ipv4_header()
    assert ip_checksum(pkt[:20]) == 0


def test_decrement_ttl_matches_full_recomputation() -> None:
    rng = random.Random(1624)
    for _ in range(20000):
        hdr = bytearray(rng.randbytes(20))
        hdr[0] = 0x45
        hdr[8] = rng.randint(2, 255)
        hdr[10:12] = b"\x00\x00"
        struct.pack_into("!H", hdr, 10, ip_checksum(hdr))
        expected = bytearray(hdr)
        expected[8] -= 1
        expected[10:12] = b"\x00\x00"
        struct.pack_into("!H", expected, 10, ip_checksum(expected))
        assert decrement_ttl(hdr)
        assert hdr == expected
        assert ip_checksum(hdr) == 0


def test_decrement_ttl_checksum_edge_values() -> None:
    # The words around the carry (0xFEFF and up) are where naive incremental updates go wrong.
    base = ipv4_header(ttl=10)
    for check in range(0xFE00, 0x10000):
        # Pick header contents whose checksum is `check` by adjusting the ident field.
        hdr = bytearray(base)
        hdr[10:12] = b"\x00\x00"
        hdr[4:6] = b"\x00\x00"
        current = ip_checksum(hdr)
        # one's complement: ident = current - check (mod 0xFFFF) makes the checksum `check`.
        ident = (current - check) % 0xFFFF
        struct.pack_into("!H", hdr, 4, ident)
        got = ip_checksum(hdr)
        if got != check:
            continue  # 0xFFFF is unreachable as a computed checksum
        struct.pack_into("!H", hdr, 10, got)
        assert decrement_ttl(hdr)
        assert ip_checksum(hdr) == 0


def test_decrement_ttl_drops_at_zero() -> None:
    for ttl in (0, 1):
        pkt = ipv4_header(ttl=ttl)
        before = bytes(pkt)
        assert not decrement_ttl(pkt)
        assert bytes(pkt) == before


def test_net_unreachable_layout() -> None:
    offender = ipv4_header(proto=17, payload=b"12345678trailing")
    reply = build_net_unreachable(offender, int(IPv4Address("10.55.1.0")))
    assert reply is not None
    assert len(reply) == 20 + 8 + 20 + 8
    ver_ihl, _tos, total, _id, _frag, ttl, proto, _ck, src, dst = struct.unpack(
        "!BBHHHBBH4s4s", reply[:20]
    )
    assert (ver_ihl, total, ttl, proto) == (0x45, len(reply), 8, 1)
    assert socket.inet_ntoa(src) == "10.55.1.0"
    assert socket.inet_ntoa(dst) == "10.55.1.1"
    assert ip_checksum(reply[:20]) == 0
    icmp = reply[20:]
    assert icmp[0] == 3 and icmp[1] == 0
    assert ip_checksum(icmp) == 0
    assert icmp[8:] == bytes(offender[:28])


def test_net_unreachable_with_options_and_short_packet() -> None:
    offender = ipv4_header(proto=6, options=b"\x01\x01\x01\x00", payload=b"xy")
    reply = build_net_unreachable(offender, 0x0A370100)
    assert reply is not None
    quoted = reply[28:]
    assert quoted == bytes(offender) + b"\x00" * 6
    assert ip_checksum(reply[20:]) == 0


def test_net_unreachable_not_for_icmp_fragments_or_garbage() -> None:
    assert build_net_unreachable(ipv4_header(proto=1), 1) is None
    assert build_net_unreachable(ipv4_header(frag=0x0010), 1) is None  # offset 16 * 8
    assert build_net_unreachable(ipv4_header(frag=0x2000), 1) is not None  # MF, first fragment
    assert build_net_unreachable(b"\x45" * 10, 1) is None
    bad = ipv4_header()
    bad[0] = 0x65
    assert build_net_unreachable(bad, 1) is None


def _addr(text: str) -> int:
    return int(IPv4Address(text))


def test_route_table_longest_prefix_match() -> None:
    table = RouteTable()
    table.set(IPv4Network("10.0.0.0/8"), ("1.1.1.1", 1))
    table.set(IPv4Network("10.5.0.0/16"), ("2.2.2.2", 2))
    table.set(IPv4Network("10.5.7.0/24"), ("3.3.3.3", 3))
    assert table.lookup(_addr("10.5.7.9")) == ("3.3.3.3", 3)
    assert table.lookup(_addr("10.5.8.9")) == ("2.2.2.2", 2)
    assert table.lookup(_addr("10.6.0.1")) == ("1.1.1.1", 1)
    assert table.lookup(_addr("11.0.0.1")) is None
    table.set(IPv4Network("10.5.7.0/24"), ("4.4.4.4", 4))  # replace
    assert table.lookup(_addr("10.5.7.1")) == ("4.4.4.4", 4)
    assert len(table) == 3
    assert table.delete(IPv4Network("10.5.7.0/24"))
    assert not table.delete(IPv4Network("10.5.7.0/24"))
    assert table.lookup(_addr("10.5.7.1")) == ("2.2.2.2", 2)
    table.delete(IPv4Network("10.5.0.0/16"))
    table.delete(IPv4Network("10.0.0.0/8"))
    assert table.lookup(_addr("10.5.7.1")) is None


def test_parse_port() -> None:
    assert parse_port(BackendConfig("udp")) == DEFAULT_PORT
    assert parse_port(BackendConfig("udp", {"Type": "udp", "port": 9000})) == 9000
    for bad in ("9000", 9000.5, True, 70000, -1, 0):
        with pytest.raises(BackendError):
            parse_port(BackendConfig("udp", {"Port": bad}))


# --------------------------------------------------------------------------------------------
# Real kernel: two hosts in namespaces on a veth underlay

# Runs inside a namespace: builds the data plane directly (no etcd), feeds it peers through
# UDPNetwork.apply, prints one JSON line when ready and one with the counters per stdin line.
NODE_CODE = r"""
import asyncio, json, socket, sys
from ipaddress import IPv4Address, IPv4Network
from flannel_bpf.backends.udp import UDPNetwork, start_udp_dataplane
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

async def main() -> None:
    cfg = json.loads(sys.argv[1])
    dev = cfg["dev"]
    mtu = int(open(f"/sys/class/net/{dev}/mtu").read())
    addr = IPv4Address(cfg["addr"])
    iface = ExternalInterface(dev, socket.if_nametoindex(dev), mtu, addr, addr)
    subnet = IPv4Network(cfg["subnet"])
    plane = await start_udp_dataplane(subnet, IPv4Network(cfg["network"]), iface, cfg["port"])
    net = UDPNetwork(Lease(subnet, LeaseAttrs(addr)), plane)
    added = [
        LeaseEvent(LeaseEventType.ADDED, Lease(IPv4Network(s), LeaseAttrs(IPv4Address(ip))))
        for s, ip in cfg["peers"].items()
    ]
    # Own lease and a stale peer: neither may end up as a route.
    junk = Lease(IPv4Network("10.55.200.0/24"), LeaseAttrs(IPv4Address("198.18.0.99")))
    await net.apply([LeaseEvent(LeaseEventType.ADDED, junk), *added,
                     LeaseEvent(LeaseEventType.ADDED, net.lease),
                     LeaseEvent(LeaseEventType.REMOVED, junk)])
    print(json.dumps({"tun": plane.tun_name, "mtu": net.mtu, "routes": len(plane.routes)}),
          flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(0, lambda: lines.put_nowait(sys.stdin.readline()))
    while (await lines.get()):
        print(json.dumps(net.counters.as_dict()), flush=True)
    loop.remove_reader(0)
    await net.close()

asyncio.run(main())
"""

NETWORK = "10.55.0.0/16"
PORT = 8285


@dataclass
class Node:
    ns: str
    underlay: str
    subnet: str
    host: str  # an address inside the own subnet, on lo
    proc: subprocess.Popen[str] | None = None
    info: dict[str, Any] | None = None

    def start(self, peers: dict[str, str]) -> None:
        cfg = {
            "dev": "veth0",
            "addr": self.underlay,
            "subnet": self.subnet,
            "network": NETWORK,
            "port": PORT,
            "peers": peers,
        }
        self.proc = subprocess.Popen(
            in_netns(self.ns, [PYTHON, "-c", NODE_CODE, json.dumps(cfg)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(_repo_root()),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"udp node in {self.ns} failed to start (exit {self.proc.poll()})"
        self.info = json.loads(line)

    @property
    def tun(self) -> str:
        assert self.info is not None
        return str(self.info["tun"])

    def counters(self) -> dict[str, int]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write("c\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()

    def sh(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        return run(in_netns(self.ns, list(cmd)), check=check, timeout=timeout)

    def ping(self, dst: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            in_netns(
                self.ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "-I", self.host, *extra, dst]
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def pair(netns: Callable[[str], str]) -> Iterator[tuple[Node, Node]]:
    a = Node(netns("ua"), "198.18.0.1", "10.55.1.0/24", "10.55.1.1")
    b = Node(netns("ub"), "198.18.0.2", "10.55.2.0/24", "10.55.2.1")
    add_veth(a.ns, "veth0", b.ns, "veth0")
    for node in (a, b):
        add_address(node.ns, "veth0", f"{node.underlay}/24")
        link_up(node.ns, "veth0")
        add_address(node.ns, "lo", f"{node.host}/32")
    try:
        a.start({b.subnet: b.underlay})
        b.start({a.subnet: a.underlay})
        yield a, b
    finally:
        a.stop()
        b.stop()


@pytest.mark.root
@requires_root
def test_device_setup(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    assert a.info is not None
    tun = a.info["tun"]
    assert tun.startswith("flannel")
    assert a.info["mtu"] == 1500 - 28
    assert a.info["routes"] == 1  # the peer only: not ourselves, not the removed lease
    link = json.loads(a.sh("ip", "-j", "addr", "show", "dev", tun))[0]
    assert link["mtu"] == 1472
    assert "UP" in link["flags"]
    addrs = [(x["local"], x["prefixlen"]) for x in link["addr_info"] if x["family"] == "inet"]
    assert addrs == [("10.55.1.0", 32)]
    routes = json.loads(a.sh("ip", "-j", "route", "show", "dev", tun))
    assert [r["dst"] for r in routes] == [NETWORK]
    listening = a.sh("ss", "-H", "-u", "-a", "-n")
    assert f"198.18.0.1:{PORT}" in listening


@pytest.mark.root
@requires_root
def test_ping_both_ways_and_ttl(pair: tuple[Node, Node]) -> None:
    a, b = pair
    res = a.ping(b.host)
    assert res.returncode == 0, res.stdout + res.stderr
    # Each hop through the tunnel costs two TTL (sender and receiver decrement).
    assert "ttl=62" in res.stdout
    res = b.ping(a.host)
    assert res.returncode == 0, res.stdout + res.stderr
    ca, cb = a.counters(), b.counters()
    assert ca["tx_packets"] >= 4 and ca["rx_packets"] >= 4
    assert cb["tx_packets"] >= 4 and cb["rx_packets"] >= 4
    # TTL 2: 1 after the sender, 0 at the receiver, which drops it.
    res = a.ping(b.host, "-t", "2")
    assert res.returncode != 0
    assert b.counters()["ttl_expired"] >= 1
    assert a.ping(b.host, "-t", "3").returncode == 0


@pytest.mark.root
@requires_root
def test_tcp_transfer(pair: tuple[Node, Node]) -> None:
    a, b = pair
    size = 16 * 1024 * 1024
    server = subprocess.Popen(
        in_netns(
            b.ns,
            [
                PYTHON,
                "-c",
                "import hashlib, socket, sys\n"
                "s = socket.create_server((sys.argv[1], 5201))\n"
                "print('ready', flush=True)\n"
                "c, _ = s.accept(); h = hashlib.sha256(); n = 0\n"
                "while (d := c.recv(1 << 16)):\n"
                "    h.update(d); n += len(d)\n"
                "print(n, h.hexdigest(), flush=True)\n",
                b.host,
            ],
        ),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        data = random.Random(7).randbytes(size)
        client = subprocess.run(
            in_netns(
                a.ns,
                [
                    PYTHON,
                    "-c",
                    "import socket, sys, time\n"
                    "data = sys.stdin.buffer.read()\n"
                    "c = socket.create_connection(\n"
                    "    (sys.argv[1], 5201), source_address=(sys.argv[2], 0))\n"
                    "t = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR)\n"
                    "c.recv(1); print(time.monotonic() - t)\n",
                    b.host,
                    a.host,
                ],
            ),
            input=data,
            capture_output=True,
            timeout=120,
        )
        assert client.returncode == 0, client.stderr
        out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    n, digest = out.split()
    assert int(n) == size
    assert digest == hashlib.sha256(data).hexdigest()
    seconds = float(client.stdout)
    print(f"\nudp backend python transfer: {size * 8 / seconds / 1e9:.3f} Gbit/s")


@pytest.mark.root
@requires_root
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="iperf3 not installed")
def test_iperf3_throughput(pair: tuple[Node, Node]) -> None:
    a, b = pair
    server = subprocess.Popen(
        in_netns(b.ns, ["iperf3", "-s", "-1", "-B", b.host, "-p", "5202"]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        out = a.sh("iperf3", "-c", b.host, "-B", a.host, "-p", "5202", "-t", "5", "-J", timeout=60)
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    result = json.loads(out)
    bps = result["end"]["sum_received"]["bits_per_second"]
    print(f"\nudp backend iperf3 one TCP stream: {bps / 1e9:.3f} Gbit/s")
    assert bps > 10e6


@pytest.mark.root
@requires_root
def test_unknown_destination_gets_net_unreachable(pair: tuple[Node, Node]) -> None:
    a, _ = pair
    # The ICMP error's source is the TUN address, which is local here; the kernel drops such
    # packets as martians unless accept_local is set (true of flanneld as well, which leaves it).
    a.sh("sysctl", "-qw", f"net.ipv4.conf.{a.tun}.accept_local=1")
    # A UDP socket with IP_RECVERR reports the (soft) net unreachable on its next recv.
    probe = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR\n"
        "s.bind((sys.argv[2], 0)); s.connect((sys.argv[1], 9)); s.settimeout(3)\n"
        "s.send(b'probe')\n"
        "try:\n"
        "    s.recv(100); print('no-error')\n"
        "except OSError as e:\n"
        "    print(errno.errorcode.get(e.errno, e))\n"
    )
    out = a.sh(PYTHON, "-c", probe, "10.55.9.1", a.host).strip()
    assert out == "ENETUNREACH"
    counters = a.counters()
    assert counters["no_route"] >= 1 and counters["icmp_sent"] >= 1
    # flanneld (proxy_amd64.c) never answers ICMP with ICMP, so a ping just times out.
    before = a.counters()
    res = a.ping("10.55.9.1")
    assert res.returncode != 0
    assert "Unreachable" not in res.stdout
    after = a.counters()
    assert after["no_route"] >= before["no_route"] + 2
    assert after["icmp_sent"] == before["icmp_sent"]


@pytest.mark.root
@requires_root
def test_garbage_datagrams_are_dropped_and_counted(pair: tuple[Node, Node]) -> None:
    a, b = pair
    sender = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "for p in (b'', b'x', b'\\x45' * 19, b'\\x60' + b'\\x00' * 39, b'\\x00' * 64):\n"
        "    s.sendto(p, (sys.argv[1], int(sys.argv[2])))\n"
    )
    a.sh(PYTHON, "-c", sender, b.underlay, str(PORT))
    deadline = time.monotonic() + 5
    while b.counters()["rx_invalid"] < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    counters = b.counters()
    assert counters["rx_invalid"] == 5
    assert counters["rx_packets"] == 0
    # Still forwarding afterwards.
    assert a.ping(b.host).returncode == 0
