"""The userspace VXLAN plane: header helpers in pure Python, then interop with kernel vxlan.

The end-to-end tests put the userspace plane on host A (a child Python in A's namespace) and a
kernel vxlan device, set up by the vxlan backend's own code exactly as flanneld would, on host B.
Whatever B's kernel decapsulates and delivers proves our wire format; the raw capture test then
compares our frames with the kernel's own field by field.
"""

from __future__ import annotations

import hashlib
import json
import random
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
from hypothesis import given, settings
from hypothesis import strategies as st

from flannel_bpf.backends import BackendError
from flannel_bpf.backends.udp import PrefixTable, ip_checksum
from flannel_bpf.backends.vxlan import random_mac
from flannel_bpf.backends.vxlan_userspace import (
    DEFAULT_VXLAN_PORT,
    ENCAP_LEN,
    INNER_ETH_LEN,
    VXLAN_HEADER_LEN,
    VXLANCounters,
    drop_reason,
    encap_header,
    format_mac,
    mac_to_bytes,
    parse_vni,
    start_vxlan_userspace_dataplane,
    vxlan_header,
)
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.lab.netns import in_netns, run

from .conftest import requires_root

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
NETWORK = "10.5.0.0/16"
VNI = 1
MAC = "0e:00:00:00:0a:01"


def ipv4_packet(src: str = "10.5.2.1", dst: str = "10.5.1.1", payload: bytes = b"x" * 12) -> bytes:
    hdr = bytearray(
        struct.pack(
            "!BBHHHBBH4s4s",
            0x45,
            0,
            20 + len(payload),
            1,
            0,
            64,
            17,
            0,
            socket.inet_aton(src),
            socket.inet_aton(dst),
        )
    )
    struct.pack_into("!H", hdr, 10, ip_checksum(hdr))
    return bytes(hdr) + payload


def datagram(
    *,
    flags: bytes = b"\x08\x00\x00\x00",
    vni: int = VNI,
    last: int = 0,
    dst: str = MAC,
    src: str = "0e:00:00:00:0b:02",
    ethertype: int = 0x0800,
    inner: bytes | None = None,
) -> bytes:
    """A VXLAN datagram (UDP payload) with every field open to being wrong."""
    header = flags + bytes([vni >> 16 & 0xFF, vni >> 8 & 0xFF, vni & 0xFF, last])
    eth = mac_to_bytes(dst) + mac_to_bytes(src) + ethertype.to_bytes(2, "big")
    return header + eth + (ipv4_packet() if inner is None else inner)


# --------------------------------------------------------------------------------------------
# Pure unit tests


def test_constants() -> None:
    assert (VXLAN_HEADER_LEN, INNER_ETH_LEN, ENCAP_LEN) == (8, 14, 22)
    assert DEFAULT_VXLAN_PORT == 8472


def test_vxlan_header_layout() -> None:
    assert vxlan_header(1) == bytes.fromhex("08000000 00000100")
    assert vxlan_header(0xABCDEF) == bytes.fromhex("08000000 abcdef00")
    assert vxlan_header(0) == bytes.fromhex("08000000 00000000")
    assert parse_vni(vxlan_header(0x123456)) == 0x123456
    for bad in (-1, 1 << 24):
        with pytest.raises(ValueError):
            vxlan_header(bad)


def test_encap_header_layout() -> None:
    header = encap_header(7, "0E:00:00:00:00:02", "0e-00-00-00-00-01")
    assert len(header) == ENCAP_LEN
    assert header[:8] == bytes.fromhex("08000000 00000700")
    assert header[8:14] == bytes.fromhex("0e0000000002")  # inner destination: the peer
    assert header[14:20] == bytes.fromhex("0e0000000001")  # inner source: us
    assert header[20:22] == b"\x08\x00"


def test_mac_forms() -> None:
    assert mac_to_bytes("aa:BB:cc:00:11:22") == bytes.fromhex("aabbcc001122")
    assert mac_to_bytes("aa-bb-cc-00-11-22") == bytes.fromhex("aabbcc001122")
    assert format_mac(bytes.fromhex("aabbcc001122")) == "aa:bb:cc:00:11:22"
    for bad in (
        "",
        "aa:bb:cc:00:11",
        "aa:bb:cc:00:11:22:33",
        "aabb.cc00.1122",
        "zz:bb:cc:00:11:22",
        " a:bb:cc:00:11:22",
    ):
        with pytest.raises(ValueError):
            mac_to_bytes(bad)


def test_drop_reasons() -> None:
    mac = mac_to_bytes(MAC)
    good = datagram()
    assert drop_reason(good, VNI, mac) is None
    assert drop_reason(bytearray(good), VNI, mac) is None
    assert drop_reason(memoryview(good), VNI, mac) is None
    cases: list[tuple[bytes, str]] = [
        (b"", "rx_short"),
        (good[:41], "rx_short"),
        (datagram(inner=b"\x45" * 19), "rx_short"),
        (datagram(flags=b"\x00\x00\x00\x00"), "rx_bad_flags"),  # I flag missing
        (datagram(flags=b"\x0c\x00\x00\x00"), "rx_bad_flags"),  # another flag as well
        (datagram(flags=b"\x08\x00\x00\x01"), "rx_bad_flags"),  # reserved bits
        (datagram(last=1), "rx_bad_flags"),
        (datagram(vni=2), "rx_other_vni"),
        (datagram(vni=VNI << 8), "rx_other_vni"),
        (datagram(dst="0e:00:00:00:0a:02"), "rx_other_mac"),
        (datagram(dst="ff:ff:ff:ff:ff:ff"), "rx_other_mac"),
        (datagram(ethertype=0x86DD), "rx_not_ipv4"),
        (datagram(ethertype=0x0806), "rx_not_ipv4"),
        (datagram(inner=b"\x60" + bytes(39)), "rx_not_ipv4"),  # IPv6 labelled 0x0800
    ]
    for data, reason in cases:
        assert drop_reason(data, VNI, mac) == reason, (data.hex(), reason)
    # Wrong in every way: counted where the kernel stops first.
    worst = datagram(flags=b"\x00\x00\x00\x00", vni=9, dst="0e:00:00:00:0a:09", ethertype=0)
    assert drop_reason(worst, VNI, mac) == "rx_bad_flags"
    assert drop_reason(datagram(vni=9, dst="0e:00:00:00:0a:09"), VNI, mac) == "rx_other_vni"


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80), st.integers(0, 3))
def test_drop_reason_never_raises_and_accepts_only_good(data: bytes, splice: int) -> None:
    mac = mac_to_bytes(MAC)
    # Splice in a valid prefix of varying length so that the later checks are reached too.
    prefix = datagram()[: (0, 8, 14, 22)[splice]]
    data = prefix + data[len(prefix) :]
    reason = drop_reason(data, VNI, mac)
    accepted = (
        len(data) >= 42
        and data[:14] == vxlan_header(VNI) + mac
        and data[20:22] == b"\x08\x00"
        and data[22] >> 4 == 4
    )
    assert (reason is None) == accepted
    assert reason is None or hasattr(VXLANCounters(), reason)


def test_counters_as_dict() -> None:
    keys = set(VXLANCounters().as_dict())
    assert {
        "tx_packets",
        "tx_bytes",
        "rx_packets",
        "rx_bytes",
        "no_route",
        "icmp_sent",
        "rx_short",
        "rx_bad_flags",
        "rx_other_vni",
        "rx_other_mac",
        "rx_not_ipv4",
        "tx_errors",
        "rx_errors",
    } <= keys


def test_prefix_table_holds_peer_headers() -> None:
    table: PrefixTable[tuple[bytes, tuple[str, int]]] = PrefixTable()
    wide = (encap_header(1, "0e:00:00:00:00:01", MAC), ("198.18.0.1", 8472))
    narrow = (encap_header(1, "0e:00:00:00:00:02", MAC), ("198.18.0.2", 8472))
    table.set(IPv4Network("10.5.0.0/16"), wide)
    table.set(IPv4Network("10.5.2.0/24"), narrow)
    assert table.lookup(int(IPv4Address("10.5.2.9"))) == narrow
    assert table.lookup(int(IPv4Address("10.5.3.9"))) == wide
    assert table.delete(IPv4Network("10.5.2.0/24"))
    assert table.lookup(int(IPv4Address("10.5.2.9"))) == wide


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vni": 1 << 24}, "VNI"),
        ({"vni": -1}, "VNI"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
        ({"mac": "not-a-mac"}, "VtepMAC"),
        ({"device_name": "flannel.1234567890"}, "device name"),
        ({"device_name": ""}, "device name"),
        ({"mtu": 100}, "too small"),
    ],
)
async def test_start_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    # Refused before anything is opened, so this needs neither root nor a namespace.
    addr = IPv4Address("198.18.0.1")
    iface = ExternalInterface("u0", 2, kwargs.pop("mtu", 1500), addr, addr)
    args: dict[str, Any] = {"vni": 1, "port": 8472, "mac": MAC, "device_name": "flannel.1"}
    args.update(kwargs)
    with pytest.raises(BackendError, match=message):
        await start_vxlan_userspace_dataplane(
            IPv4Network("10.5.1.0/24"), IPv4Network(NETWORK), iface, **args
        )


# --------------------------------------------------------------------------------------------
# Real kernel: host A runs the userspace plane, host B a kernel vxlan device

# Runs in A's namespace: builds the plane, prints one JSON line when ready, then answers one JSON
# line per request on stdin (counters, set, del); prints the counters once more on EOF.
NODE_CODE = r"""
import asyncio, json, socket, sys
from ipaddress import IPv4Address, IPv4Network
from flannel_bpf.backends.base import BackendError
from flannel_bpf.backends.vxlan_userspace import start_vxlan_userspace_dataplane
from flannel_bpf.datapath.iface import ExternalInterface

async def main() -> None:
    cfg = json.loads(sys.argv[1])
    dev = cfg["dev"]
    mtu = int(open(f"/sys/class/net/{dev}/mtu").read())
    addr = IPv4Address(cfg["addr"])
    iface = ExternalInterface(dev, socket.if_nametoindex(dev), mtu, addr, addr)
    try:
        plane = await start_vxlan_userspace_dataplane(
            IPv4Network(cfg["subnet"]), IPv4Network(cfg["network"]), iface,
            vni=cfg["vni"], port=cfg["port"], mac=cfg["mac"], device_name=cfg["device"])
    except BackendError as exc:
        print(json.dumps({"error": str(exc)}), flush=True)
        return
    for subnet, (ip, mac) in cfg["peers"].items():
        plane.set_peer(IPv4Network(subnet), IPv4Address(ip), mac)
    print(json.dumps({"tun": plane.tun_name, "mtu": plane.mtu, "mac": plane.mac}), flush=True)
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str] = asyncio.Queue()
    loop.add_reader(0, lambda: lines.put_nowait(sys.stdin.readline()))
    try:
        while (line := await lines.get()):
            req = json.loads(line)
            if req["op"] == "set":
                plane.set_peer(IPv4Network(req["subnet"]), IPv4Address(req["ip"]), req["mac"])
            elif req["op"] == "del":
                print(json.dumps({"deleted": plane.del_peer(IPv4Network(req["subnet"]))}),
                      flush=True)
                continue
            print(json.dumps(plane.counters.as_dict()), flush=True)
    finally:
        loop.remove_reader(0)
        plane.close()
        print(json.dumps(plane.counters.as_dict()), flush=True)

asyncio.run(main())
"""

# Runs in B's namespace: flannel.<VNI> set up and programmed with A as its peer by the vxlan
# backend's own code, i.e. as flanneld would. Prints the device's MAC.
KERNEL_PEER = r"""
import asyncio, json, socket, sys
from ipaddress import IPv4Address, IPv4Network
from flannel_bpf.backends.vxlan import (
    VXLANConfig, VXLANNetwork, configure_vxlan_device, ensure_vxlan_device, vxlan_lease_attrs)
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

async def main() -> None:
    cfg = json.loads(sys.argv[1])
    addr = IPv4Address(cfg["addr"])
    iface = ExternalInterface("u0", socket.if_nametoindex("u0"), 1500, addr, addr)
    vx = VXLANConfig(vni=cfg["vni"])
    dev = await ensure_vxlan_device(vx, iface)
    lease = Lease(IPv4Network(cfg["subnet"]), vxlan_lease_attrs(vx, iface, dev))
    await configure_vxlan_device(dev, lease.subnet, IPv4Network(cfg["network"]))
    net = VXLANNetwork(lease, dev)
    data = json.dumps({"VNI": cfg["vni"], "VtepMAC": cfg["peer_mac"]}).encode()
    peer = Lease(IPv4Network(cfg["peer_subnet"]),
                 LeaseAttrs(IPv4Address(cfg["peer_ip"]), backend_type="vxlan", backend_data=data))
    await net.apply([LeaseEvent(LeaseEventType.ADDED, peer)])
    print(json.dumps({"mac": dev.mac, "mtu": dev.mtu}))

asyncio.run(main())
"""


@dataclass
class UserspaceNode:
    ns: str
    proc: subprocess.Popen[str] | None = None
    info: dict[str, Any] | None = None
    final: dict[str, int] | None = None

    def start(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            in_netns(self.ns, [PYTHON, "-c", NODE_CODE, json.dumps(cfg)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=str(REPO),
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"userspace vxlan node in {self.ns} failed (exit {self.proc.poll()})"
        self.info = json.loads(line)

    def request(self, **req: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return dict(json.loads(self.proc.stdout.readline()))

    def counters(self) -> dict[str, int]:
        return self.request(op="counters")

    def wait_counter(self, name: str, at_least: int, timeout: float = 5) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        counters = self.counters()
        while counters[name] < at_least and time.monotonic() < deadline:
            time.sleep(0.05)
            counters = self.counters()
        return counters

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
            self.proc.wait(timeout=5)
            assert self.proc.stdout is not None
            tail = [line for line in self.proc.stdout.read().splitlines() if line.startswith("{")]
            if tail:
                self.final = json.loads(tail[-1])
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()


@dataclass
class Pair:
    a: str  # userspace plane
    b: str  # kernel vxlan
    node: UserspaceNode
    mac_a: str
    mac_b: str

    def ping(self, ns: str, src: str, dst: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            in_netns(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "2", "-I", src, *extra, dst]),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def ping_ab(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.ping(self.a, "10.5.1.1", "10.5.2.1", *extra)

    def ping_ba(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.ping(self.b, "10.5.2.1", "10.5.1.1", *extra)


def kernel_stats(ns: str, dev: str) -> dict[str, int]:
    link = json.loads(run(in_netns(ns, ["ip", "-j", "-s", "link", "show", "dev", dev])))[0]
    return {f"rx_{k}": v for k, v in link["stats64"]["rx"].items()} | {
        f"tx_{k}": v for k, v in link["stats64"]["tx"].items()
    }


@pytest.fixture
def pair(host_pair: tuple[str, str]) -> Iterator[Pair]:
    a, b = host_pair
    # B's veth would leave the inner TCP checksums of B's packets unfinished (CHECKSUM_PARTIAL:
    # no hardware ever completes them, the local receiver trusts the skb state); the UDP socket
    # on A cannot see that and A's kernel would drop them. A physical NIC finishes them on the
    # wire; with tx checksumming off, B's kernel does it in software, as such a NIC would.
    run(in_netns(b, ["ethtool", "-K", "u0", "tx", "off"]))
    mac_a = random_mac()
    peer_cfg = {
        "addr": "198.18.0.2",
        "vni": VNI,
        "subnet": "10.5.2.0/24",
        "network": NETWORK,
        "peer_mac": mac_a,
        "peer_subnet": "10.5.1.0/24",
        "peer_ip": "198.18.0.1",
    }
    out = run(in_netns(b, [PYTHON, "-c", KERNEL_PEER, json.dumps(peer_cfg)]), timeout=60)
    mac_b = json.loads(out)["mac"]
    node = UserspaceNode(a)
    try:
        node.start(
            {
                "dev": "u0",
                "addr": "198.18.0.1",
                "subnet": "10.5.1.0/24",
                "network": NETWORK,
                "vni": VNI,
                "port": DEFAULT_VXLAN_PORT,
                "mac": mac_a,
                "device": f"flannel.{VNI}",
                "peers": {"10.5.2.0/24": ["198.18.0.2", mac_b]},
            }
        )
        yield Pair(a, b, node, mac_a, mac_b)
    finally:
        node.stop()


@pytest.mark.root
@requires_root
def test_device_setup(pair: Pair) -> None:
    assert pair.node.info == {"tun": "flannel.1", "mtu": 1450, "mac": pair.mac_a}
    link = json.loads(run(in_netns(pair.a, ["ip", "-d", "-j", "addr", "show", "flannel.1"])))[0]
    assert link["mtu"] == 1450
    assert link["linkinfo"]["info_kind"] == "tun"
    assert "UP" in link["flags"]
    addrs = [(x["local"], x["prefixlen"]) for x in link["addr_info"] if x["family"] == "inet"]
    assert addrs == [("10.5.1.0", 32)]
    routes = json.loads(run(in_netns(pair.a, ["ip", "-j", "route", "show", "dev", "flannel.1"])))
    assert [r["dst"] for r in routes] == [NETWORK]
    assert "198.18.0.1:8472" in run(in_netns(pair.a, ["ss", "-H", "-u", "-a", "-n"]))
    # B really is the kernel's vxlan, with the MTU flanneld gives it.
    peer = json.loads(run(in_netns(pair.b, ["ip", "-d", "-j", "link", "show", "flannel.1"])))[0]
    assert peer["linkinfo"]["info_kind"] == "vxlan"
    assert peer["mtu"] == 1450


@pytest.mark.root
@requires_root
def test_ping_both_ways(pair: Pair) -> None:
    before = kernel_stats(pair.b, "flannel.1")
    res = pair.ping_ab()
    assert res.returncode == 0, res.stdout + res.stderr
    # Neither side decrements the TTL on the way through the tunnel (the kernel does not).
    assert "ttl=64" in res.stdout
    res = pair.ping_ba()
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ttl=64" in res.stdout
    counters = pair.node.counters()
    assert counters["tx_packets"] >= 4 and counters["rx_packets"] >= 4
    assert counters["rx_bytes"] >= 4 * 84
    # B's kernel decapsulated our frames and sent its own through flannel.1: the format holds.
    after = kernel_stats(pair.b, "flannel.1")
    assert after["rx_packets"] - before["rx_packets"] >= 4
    assert after["tx_packets"] - before["tx_packets"] >= 4
    drops = {k: v for k, v in counters.items() if k.startswith("rx_") and v and "packets" not in k}
    assert drops.keys() <= {"rx_bytes"}, drops


TCP_SERVER = (
    "import hashlib, socket, sys\n"
    "s = socket.create_server((sys.argv[1], 5201))\n"
    "print('ready', flush=True)\n"
    "c, _ = s.accept(); h = hashlib.sha256(); n = 0\n"
    "while (d := c.recv(1 << 16)):\n"
    "    h.update(d); n += len(d)\n"
    "print(n, h.hexdigest(), flush=True)\n"
)
TCP_CLIENT = (
    "import socket, sys, time\n"
    "data = sys.stdin.buffer.read()\n"
    "c = socket.create_connection((sys.argv[1], 5201), source_address=(sys.argv[2], 0))\n"
    "t = time.monotonic(); c.sendall(data); c.shutdown(socket.SHUT_WR); c.recv(1)\n"
    "print(time.monotonic() - t)\n"
)


def tcp_transfer(src_ns: str, src: str, dst_ns: str, dst: str, data: bytes) -> float:
    """Send ``data`` over TCP and check it arrived whole; returns the seconds it took."""
    server = subprocess.Popen(
        in_netns(dst_ns, [PYTHON, "-c", TCP_SERVER, dst]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert server.stdout.readline().strip() == "ready"
        client = subprocess.run(
            in_netns(src_ns, [PYTHON, "-c", TCP_CLIENT, dst, src]),
            input=data,
            capture_output=True,
            timeout=15,
        )
        assert client.returncode == 0, client.stderr
        out, _ = server.communicate(timeout=5)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    n, digest = out.split()
    assert int(n) == len(data)
    assert digest == hashlib.sha256(data).hexdigest()
    return float(client.stdout)


@pytest.mark.root
@requires_root
def test_tcp_transfer_both_ways(pair: Pair) -> None:
    data = random.Random(8472).randbytes(4 * 1024 * 1024)
    out = tcp_transfer(pair.a, "10.5.1.1", pair.b, "10.5.2.1", data)
    back = tcp_transfer(pair.b, "10.5.2.1", pair.a, "10.5.1.1", data[::-1])
    counters = pair.node.counters()
    assert counters["tx_bytes"] > len(data) and counters["rx_bytes"] > len(data)
    # Segments no larger than the MTU both ways: nothing was coalesced or cut on the way.
    assert counters["tx_bytes"] / counters["tx_packets"] <= 1450
    assert counters["rx_bytes"] / counters["rx_packets"] <= 1450
    assert counters["tx_errors"] == counters["rx_errors"] == 0
    bits = len(data) * 8 / 1e9
    print(
        f"\nuserspace vxlan: to kernel peer {bits / out:.3f} Gbit/s, back {bits / back:.3f} Gbit/s"
    )


# Runs in B's namespace: the first VXLAN frame B receives on u0 and the first it sends.
CAPTURE = r"""
import json, socket, sys, time
# ETH_P_ALL: only such taps see outgoing frames as well.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("u0", 0))
s.settimeout(0.2)
print("ready", flush=True)
frames = {}
deadline = time.monotonic() + 10
while len(frames) < 2 and time.monotonic() < deadline:
    try:
        data, addr = s.recvfrom(65535)
    except TimeoutError:
        continue
    ip = data[14:]
    ihl = (ip[0] & 15) * 4
    if data[12:14] != b"\x08\x00" or len(ip) < ihl + 8 or ip[9] != 17:
        continue
    if ip[ihl + 2:ihl + 4] != (8472).to_bytes(2, "big"):
        continue
    frames.setdefault("out" if addr[2] == socket.PACKET_OUTGOING else "in", data.hex())
print(json.dumps(frames), flush=True)
"""


def parse_frame(text: str) -> dict[str, Any]:
    frame = bytes.fromhex(text)
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    udp = ip[ihl:]
    payload = udp[8:]
    inner = payload[ENCAP_LEN:]
    return {
        "ethertype": frame[12:14].hex(),
        "version": ip[0] >> 4,
        "ihl": ihl,
        "tos": ip[1],
        "total_length_ok": struct.unpack("!H", ip[2:4])[0] == len(ip),
        "df": bool(ip[6] & 0x40),
        "ttl": ip[8],
        "proto": ip[9],
        "src": socket.inet_ntoa(ip[12:16]),
        "dst": socket.inet_ntoa(ip[16:20]),
        "sport": struct.unpack("!H", udp[0:2])[0],
        "dport": struct.unpack("!H", udp[2:4])[0],
        "udp_length_ok": struct.unpack("!H", udp[4:6])[0] == len(udp),
        # Present and right: the pseudo header, the UDP header and payload sum to zero.
        "udp_csum_ok": struct.unpack("!H", udp[6:8])[0] != 0
        and ip_checksum(ip[12:20] + struct.pack("!BBH", 0, 17, len(udp)) + udp) == 0,
        "vxlan": payload[:8].hex(),
        "inner_dst": format_mac(payload[8:14]),
        "inner_src": format_mac(payload[14:20]),
        "inner_ethertype": payload[20:22].hex(),
        "inner_ttl": inner[8],
        "inner_proto": inner[9],
        "inner_src_ip": socket.inet_ntoa(inner[12:16]),
        "inner_dst_ip": socket.inet_ntoa(inner[16:20]),
    }


@pytest.mark.root
@requires_root
def test_wire_format_matches_kernel(pair: Pair) -> None:
    # Checksums finished in software on A as well, so the capture shows what a NIC would send.
    run(in_netns(pair.a, ["ethtool", "-K", "u0", "tx", "off"]))
    capture = subprocess.Popen(
        in_netns(pair.b, [PYTHON, "-c", CAPTURE]), stdout=subprocess.PIPE, text=True
    )
    try:
        assert capture.stdout is not None
        assert capture.stdout.readline().strip() == "ready"
        res = pair.ping_ab("-c", "1")
        assert res.returncode == 0, res.stdout + res.stderr
        out, _ = capture.communicate(timeout=15)
    finally:
        if capture.poll() is None:
            capture.kill()
            capture.wait()
    frames = json.loads(out)
    ours, kernels = parse_frame(frames["in"]), parse_frame(frames["out"])
    assert ours == {
        "ethertype": "0800",
        "version": 4,
        "ihl": 20,
        "tos": 0,
        "total_length_ok": True,
        "df": False,
        "ttl": 64,
        "proto": 17,
        "src": "198.18.0.1",
        "dst": "198.18.0.2",
        "sport": DEFAULT_VXLAN_PORT,
        "dport": DEFAULT_VXLAN_PORT,
        "udp_length_ok": True,
        "udp_csum_ok": True,
        "vxlan": "0800000000000100",
        "inner_dst": pair.mac_b,
        "inner_src": pair.mac_a,
        "inner_ethertype": "0800",
        "inner_ttl": 64,
        "inner_proto": 1,
        "inner_src_ip": "10.5.1.1",
        "inner_dst_ip": "10.5.2.1",
    }
    # The kernel's echo reply, field by field: only the direction and the source port differ.
    mirrored = {
        "src": "198.18.0.1",
        "dst": "198.18.0.2",
        "sport": DEFAULT_VXLAN_PORT,
        "inner_dst": pair.mac_b,
        "inner_src": pair.mac_a,
        "inner_src_ip": "10.5.1.1",
        "inner_dst_ip": "10.5.2.1",
    }
    assert kernels["sport"] != 0
    assert kernels | mirrored == ours
    assert (kernels["src"], kernels["inner_src"], kernels["inner_dst"]) == (
        "198.18.0.2",
        pair.mac_b,
        pair.mac_a,
    )


SENDER = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin:
    s.sendto(bytes.fromhex(line.strip()), (sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.root
@requires_root
def test_bad_datagrams_dropped_and_counted(pair: Pair) -> None:
    mac_a = pair.mac_a
    inner_ok = ipv4_packet("10.5.2.1", "10.5.1.1")
    crafted: dict[str, list[bytes]] = {
        "rx_short": [b"", b"\x08", datagram(dst=mac_a)[:41]],
        "rx_bad_flags": [
            datagram(dst=mac_a, flags=b"\x00\x00\x00\x00"),
            datagram(dst=mac_a, flags=b"\x88\x00\x00\x00"),  # GBP: not for this plane
            datagram(dst=mac_a, last=0xFF),
        ],
        "rx_other_vni": [datagram(dst=mac_a, vni=2), datagram(dst=mac_a, vni=0)],
        "rx_other_mac": [datagram(dst=pair.mac_b), datagram(dst="ff:ff:ff:ff:ff:ff")],
        "rx_not_ipv4": [
            datagram(dst=mac_a, ethertype=0x86DD),
            datagram(dst=mac_a, ethertype=0x0806),
            datagram(dst=mac_a, inner=b"\x60" + bytes(39)),
        ],
    }
    garbage = [random.Random(i).randbytes(random.Random(-i).randint(0, 120)) for i in range(300)]
    before = pair.node.counters()
    payloads = [p for group in crafted.values() for p in group] + garbage
    payloads.append(datagram(dst=mac_a, inner=inner_ok))  # the one that gets through
    subprocess.run(
        in_netns(pair.b, [PYTHON, "-c", SENDER, "198.18.0.1", str(DEFAULT_VXLAN_PORT)]),
        input="\n".join(p.hex() for p in payloads) + "\n",
        text=True,
        check=True,
        timeout=15,
    )
    drop_names = list(crafted)
    deadline = time.monotonic() + 5
    while True:
        after = pair.node.counters()
        seen = sum(after[k] - before[k] for k in [*drop_names, "rx_packets"])
        if seen >= len(payloads) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    delta = {k: after[k] - before[k] for k in after}
    assert delta["rx_packets"] == 1
    assert delta["rx_bytes"] == len(inner_ok)
    assert delta["rx_errors"] == 0
    # The garbage lands somewhere among the reasons; the crafted ones exactly where expected.
    mac = mac_to_bytes(mac_a)
    expected = {k: len(v) for k, v in crafted.items()}
    for junk in garbage:
        reason = drop_reason(junk, VNI, mac)
        assert reason is not None
        expected[reason] += 1
    assert {k: delta[k] for k in drop_names} == expected
    assert expected["rx_short"] > len(crafted["rx_short"])
    # Still forwarding both ways afterwards.
    assert pair.ping_ab().returncode == 0
    assert pair.ping_ba().returncode == 0


PROBE = r"""
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR: the net unreachable shows on recv
s.bind((sys.argv[2], 0)); s.connect((sys.argv[1], 9)); s.settimeout(3)
s.send(b"probe")
try:
    s.recv(100); print("no-error")
except OSError as e:
    print(errno.errorcode.get(e.errno, e))
"""


@pytest.mark.root
@requires_root
def test_unknown_destination_gets_net_unreachable(pair: Pair) -> None:
    # The ICMP error comes from the TUN address, which is local; without accept_local the kernel
    # drops it as a martian (true of the udp backend and flanneld as well).
    run(in_netns(pair.a, ["sysctl", "-qw", "net.ipv4.conf.flannel/1.accept_local=1"]))
    before = pair.node.counters()
    out = run(in_netns(pair.a, [PYTHON, "-c", PROBE, "10.5.9.1", "10.5.1.1"])).strip()
    assert out == "ENETUNREACH"
    after = pair.node.counters()
    assert after["no_route"] == before["no_route"] + 1
    assert after["icmp_sent"] == before["icmp_sent"] + 1
    assert after["tx_packets"] == before["tx_packets"]
    # No ICMP about ICMP: a ping just goes unanswered.
    res = pair.ping(pair.a, "10.5.1.1", "10.5.9.1")
    assert res.returncode != 0 and "Unreachable" not in res.stdout
    last = pair.node.counters()
    assert last["no_route"] == after["no_route"] + 2
    assert last["icmp_sent"] == after["icmp_sent"]


@pytest.mark.root
@requires_root
def test_del_and_set_peer(pair: Pair) -> None:
    assert pair.node.request(op="del", subnet="10.5.2.0/24") == {"deleted": True}
    assert pair.node.request(op="del", subnet="10.5.2.0/24") == {"deleted": False}
    before = pair.node.counters()
    assert pair.ping_ab("-c", "1").returncode != 0
    assert pair.node.counters()["no_route"] == before["no_route"] + 1
    # A wrong VtepMAC: B's kernel drops the frames (not addressed to flannel.1), no reply.
    pair.node.request(op="set", subnet="10.5.2.0/24", ip="198.18.0.2", mac="0e:00:00:00:00:99")
    stats = kernel_stats(pair.b, "flannel.1")
    assert pair.ping_ab("-c", "1").returncode != 0
    assert kernel_stats(pair.b, "flannel.1")["tx_packets"] == stats["tx_packets"]
    # A wider route to the same peer, then the right MAC for the narrow one: longest prefix wins.
    pair.node.request(op="set", subnet="10.5.0.0/17", ip="198.18.0.2", mac="0e:00:00:00:00:98")
    pair.node.request(op="set", subnet="10.5.2.0/24", ip="198.18.0.2", mac=pair.mac_b)
    res = pair.ping_ab()
    assert res.returncode == 0, res.stdout + res.stderr


# Runs in a namespace of its own: each way the start can fail, and what is left behind.
START_ERRORS = r"""
import asyncio, json, os, socket
from ipaddress import IPv4Address, IPv4Network
from flannel_bpf.backends.base import BackendError
from flannel_bpf.backends.vxlan_userspace import start_vxlan_userspace_dataplane
from flannel_bpf.datapath.iface import ExternalInterface

async def attempt(device: str, addr: str) -> str:
    ip = IPv4Address(addr)
    iface = ExternalInterface("u0", socket.if_nametoindex("u0"), 1500, ip, ip)
    try:
        plane = await start_vxlan_userspace_dataplane(
            IPv4Network("10.5.1.0/24"), IPv4Network("10.5.0.0/16"), iface,
            vni=1, port=8472, mac="0e:00:00:00:0a:01", device_name=device)
    except BackendError as exc:
        return str(exc)
    plane.close()
    return "started"

async def main() -> None:
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("198.18.0.1", 8472))
    result = {
        "taken": await attempt("flannel.1", "198.18.0.1"),
        "port": await attempt("flannel.2", "198.18.0.1"),
        "addr": await attempt("flannel.3", "198.18.0.77"),
    }
    busy.close()
    result["ok"] = await attempt("flannel.4", "198.18.0.1")
    result["links"] = sorted(os.listdir("/sys/class/net"))
    result["fds"] = len(os.listdir("/proc/self/fd"))
    print(json.dumps(result))

asyncio.run(main())
"""


@pytest.mark.root
@requires_root
def test_start_failures_close_what_was_opened(netns: Callable[[str], str]) -> None:
    from .conftest import host

    ns = host(netns, "vu")
    run(["ip", "-n", ns, "link", "add", "flannel.1", "type", "veth", "peer", "name", "flx"])
    result = json.loads(run(in_netns(ns, [PYTHON, "-c", START_ERRORS])))
    assert result["taken"].startswith("failed to open TUN device flannel.1:")
    assert result["port"].startswith("failed to bind VXLAN UDP socket to 198.18.0.1:8472:")
    assert "Address already in use" in result["port"]
    assert result["addr"].startswith("failed to bind VXLAN UDP socket to 198.18.0.77:8472:")
    assert result["ok"] == "started"
    # The failed TUN devices went with their fds, and so did the working one on close().
    assert result["links"] == ["flannel.1", "flx", "lo", "u0", "u1"]
    assert result["fds"] <= 8
