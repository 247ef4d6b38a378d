"""The vxlan backend against a real kernel, inside throwaway network namespaces.

The backend code runs in a child Python started with `ip netns exec`, so every netlink call it
makes lands in the test's namespace; nothing touches the root namespace.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import socket
import struct
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest
from pyroute2 import AsyncIPRoute

from flannel_bpf.backends import BACKENDS, BackendError
from flannel_bpf.backends.vxlan import (
    PeerVtep,
    VtepDevice,
    VXLANBackend,
    VXLANConfig,
    VXLANNetwork,
    _rounds,
    configure_vxlan_device,
    ensure_vxlan_device,
    parse_vxlan_config,
    peer_vtep,
    vxlan_lease_attrs,
)
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.datapath.rtnl_batch import (
    ACK_BUFFER,
    NlReply,
    NlRequest,
    RtnlBatch,
    fdb_request,
    neigh_request,
    nexthop_request,
    route_by_nexthop_request,
    route_get_request,
    route_request,
)
from flannel_bpf.datapath.vxlan_wire import parse_mac
from flannel_bpf.lab.netns import add_address, entered, run
from flannel_bpf.subnet.config import BackendConfig
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

from .conftest import host, requires_root

NETWORK = "10.5.0.0/16"

# Sets up flannel.<VNI> over `iface` as the backend does after acquiring `subnet`, then applies
# the given peer events as one batch. Prints the device and our lease value as JSON.
DRIVER = r"""
import asyncio, json, logging, socket, sys
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from flannel_bpf.backends.vxlan import (
    VXLANNetwork, configure_vxlan_device, ensure_vxlan_device, parse_vxlan_config,
    vxlan_lease_attrs,
)
from flannel_bpf.subnet.config import BackendConfig
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
logging.getLogger("flannel_bpf").setLevel(logging.DEBUG)
args = json.loads(sys.argv[1])

async def main() -> None:
    addr = IPv4Address(args["addr"])
    addr6 = IPv6Address(args["addr6"]) if "addr6" in args else None
    iface = ExternalInterface(args["iface"], socket.if_nametoindex(args["iface"]), 1500, addr,
                              addr, addr6, addr6)
    cfg = parse_vxlan_config(BackendConfig("vxlan", args.get("backend", {})))
    logging.getLogger("flannel_bpf").info("%s", cfg.log_line())
    dev = await ensure_vxlan_device(cfg, iface)
    dev6 = await ensure_vxlan_device(cfg, iface, v6=True) if addr6 else None
    attrs = vxlan_lease_attrs(cfg, iface, dev, dev6)
    subnet6 = IPv6Network(args["subnet6"]) if dev6 else None
    lease = Lease(IPv4Network(args["subnet"]), attrs, subnet6)
    await configure_vxlan_device(dev, lease.subnet, IPv4Network(args["network"]))
    if dev6 is not None and subnet6 is not None:
        await configure_vxlan_device(dev6, subnet6, IPv6Network(args["network6"]))
    net = VXLANNetwork(lease, dev, device6=dev6, direct_routing=cfg.direct_routing,
                       retry_attempts=2)
    events = []
    for kind, subnet, public_ip, data, *v6 in args.get("events", []):
        subnet6, public_ip6, data6 = v6 or (None, None, "")
        peer = Lease(
            IPv4Network(subnet),
            LeaseAttrs(IPv4Address(public_ip), public_ip6 and IPv6Address(public_ip6),
                       backend_type="vxlan", backend_data=data.encode(),
                       backend_v6_data=data6.encode()),
            subnet6 and IPv6Network(subnet6),
        )
        events.append(LeaseEvent(LeaseEventType(kind), peer))
    if events:
        await net.apply(events)
    print(json.dumps({"mac": dev.mac, "name": dev.name, "mtu": dev.mtu,
                      "attrs": attrs.to_json().decode(),
                      "mac6": dev6.mac if dev6 else "", "mtu6": dev6.mtu if dev6 else 0}))

asyncio.run(main())
"""


def drive(ns: str, **args: Any) -> tuple[dict[str, Any], str]:
    """Run the backend in ns; returns its JSON report and its log (stderr)."""
    args.setdefault("iface", "u0")
    args.setdefault("network", NETWORK)
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout), proc.stderr


def vtep_data(mac: str, vni: int = 1) -> str:
    return json.dumps({"VNI": vni, "VtepMAC": mac}, separators=(",", ":"))


def sh(ns: str, *cmd: str) -> str:
    return run(["ip", "-n", ns, *cmd])


def lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def flannel_routes(ns: str) -> list[str]:
    return [r for r in lines(sh(ns, "route", "show")) if r.startswith("10.5.")]


def fdb(ns: str, dev: str = "flannel.1") -> list[str]:
    out = run(["bridge", "-n", ns, "fdb", "show", "dev", dev])
    # The kernel adds its own all-zero default entry only with learning; keep ours only.
    return [line for line in lines(out) if not line.startswith("00:00:00:00:00:00")]


# --------------------------------------------------------------------------------------------
# Pure parts


def test_registered() -> None:
    assert BACKENDS["vxlan"] is VXLANBackend


def test_config_defaults_and_case_insensitive_keys() -> None:
    assert parse_vxlan_config(BackendConfig("vxlan")) == VXLANConfig()
    cfg = parse_vxlan_config(
        BackendConfig(
            "vxlan",
            {
                "vni": 4,
                "PORT": 4789,
                "mtu": 1400,
                "gbp": True,
                "learning": True,
                "directrouting": True,
            },
        )
    )
    assert cfg == VXLANConfig(4, 4789, 1400, True, True, True)
    assert cfg.device_name == "flannel.4"
    assert cfg.log_line() == (
        "VXLAN config: VNI=4 Port=4789 GBP=true Learning=true DirectRouting=true"
    )
    assert VXLANConfig().log_line() == (
        "VXLAN config: VNI=1 Port=0 GBP=false Learning=false DirectRouting=false"
    )


@pytest.mark.parametrize("options", [{"VNI": "1"}, {"VNI": 1.5}, {"Port": True}, {"GBP": 1}])
def test_config_bad_types_refused(options: dict[str, Any]) -> None:
    with pytest.raises(BackendError, match="error decoding VXLAN backend config"):
        parse_vxlan_config(BackendConfig("vxlan", options))


def test_parse_mac_forms() -> None:
    assert parse_mac("0E:AA:bb:00:01:02") == "0e:aa:bb:00:01:02"
    assert parse_mac("0e-aa-bb-00-01-02") == "0e:aa:bb:00:01:02"
    assert parse_mac("0eaa.bb00.0102") == "0e:aa:bb:00:01:02"
    for bad in ("", "zz:aa:bb:00:01:02", "0e:aa:bb:00:01", "0e:aa-bb:00:01:02"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def test_accepts_only_vxlan() -> None:
    own = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), None, "vxlan"))
    net = VXLANNetwork(own, VtepDevice("flannel.1", 5, "0e:00:00:00:00:01", 1450))
    assert net.mtu == 1450
    assert net.accepts(own)
    for other in ("host-gw", "", "udp", "VXLAN"):
        lease = Lease(own.subnet, LeaseAttrs(own.attrs.public_ip, None, other))
        assert not net.accepts(lease)


# --------------------------------------------------------------------------------------------
# Peer programming without a kernel: the messages, and the order they go in

DEVICE = VtepDevice("flannel.1", 7, "0e:00:00:00:00:01", 1450)
PEER = PeerVtep(IPv4Network("10.129.3.0/24"), IPv4Address("198.19.0.3"), "0e:fb:00:00:00:03")


async def pyroute2_message(call: Callable[[Any], Awaitable[Any]]) -> NlRequest:
    """What pyroute2 would send for call(ipr): its batch mode collects the encoded message
    instead of sending it (the mechanism behind IPBatch)."""
    async with AsyncIPRoute() as ipr:
        ipr.batch = b""
        await call(ipr)
        data: bytes = ipr.batch
    length, kind, flags, _seq, _pid = struct.unpack_from("=IHHII", data)
    assert length == len(data)
    return NlRequest(kind, flags, data[16:])


async def test_requests_are_what_pyroute2_sends() -> None:
    """The packed messages are byte for byte pyroute2's, so the kernel state is the same."""
    net = VXLANNetwork(
        Lease(IPv4Network("10.129.1.0/24"), LeaseAttrs(IPv4Address("1.1.1.1"))), DEVICE
    )
    neigh = {"ifindex": 7, "dst": "10.129.3.0", "lladdr": PEER.mac, "state": 0x80}
    fdb = {"ifindex": 7, "lladdr": PEER.mac, "dst": "198.19.0.3", "state": 0xC0, "flags": 2}
    route = {"dst": "10.129.3.0/24", "gateway": "10.129.3.0", "oif": 7, "flags": 4, "table": 254}
    direct = {"dst": "10.129.3.0/24", "gateway": "198.19.0.3", "table": 254}
    cases: list[tuple[NlRequest, Callable[[Any], Awaitable[Any]]]] = [
        (net._neigh(PEER, True), lambda ipr: ipr.neigh("replace", **neigh)),
        (net._neigh(PEER, False), lambda ipr: ipr.neigh("del", **neigh)),
        (net._fdb(PEER, True), lambda ipr: ipr.fdb("replace", **fdb)),
        (net._fdb(PEER, False), lambda ipr: ipr.fdb("del", **fdb)),
        (net._route(PEER, True), lambda ipr: ipr.route("replace", proto=3, **route)),
        (net._route(PEER, False), lambda ipr: ipr.route("del", **route)),
        (net._direct_route(PEER, True), lambda ipr: ipr.route("replace", proto=3, **direct)),
        (net._direct_route(PEER, False), lambda ipr: ipr.route("del", **direct)),
        (route_get_request(PEER.public_ip), lambda ipr: ipr.route("get", dst="198.19.0.3")),
    ]
    for ours, call in cases:
        assert ours == await pyroute2_message(call)
    # The module-level builders are what the methods use.
    assert neigh_request(True, 7, IPv4Address("10.129.3.0"), PEER.mac) == net._neigh(PEER, True)
    assert fdb_request(False, 7, PEER.mac, PEER.public_ip) == net._fdb(PEER, False)
    assert route_request(True, PEER.subnet, PEER.public_ip) == net._direct_route(PEER, True)


def peer_event(kind: str, subnet: str, mac: str, public_ip: str = "198.19.0.1") -> LeaseEvent:
    attrs = LeaseAttrs(
        IPv4Address(public_ip), backend_type="vxlan", backend_data=vtep_data(mac).encode()
    )
    return LeaseEvent(LeaseEventType(kind), Lease(IPv4Network(subnet), attrs))


def test_rounds_split_only_where_entries_are_shared() -> None:
    def rounds(*events: LeaseEvent) -> list[list[str]]:
        split = _rounds([(e, peer_vtep(e.lease)) for e in events])
        return [[f"{e.type.value} {e.lease.subnet}" for e, _ in r] for r in split]

    a = peer_event("added", "10.129.1.0/24", "0e:00:00:00:00:01")
    b = peer_event("added", "10.129.2.0/24", "0e:00:00:00:00:02")
    assert rounds(a, b) == [["added 10.129.1.0/24", "added 10.129.2.0/24"]]
    # A node re-leased with a new subnet keeps its VtepMAC: the old lease's FDB delete must not
    # overtake the new lease's FDB replace.
    moved_away = peer_event("removed", "10.129.1.0/24", "0e:00:00:00:00:01")
    moved_to = peer_event("added", "10.129.9.0/24", "0e:00:00:00:00:01")
    assert rounds(moved_away, b, moved_to) == [
        ["removed 10.129.1.0/24", "added 10.129.2.0/24"],
        ["added 10.129.9.0/24"],
    ]
    # The same subnet again (a re-add, or add then remove) waits for the earlier event.
    gone = peer_event("removed", "10.129.2.0/24", "0e:00:00:00:00:02")
    assert rounds(a, b, gone, a) == [
        ["added 10.129.1.0/24", "added 10.129.2.0/24"],
        ["removed 10.129.2.0/24", "added 10.129.1.0/24"],
    ]


class ScriptedRtnl(RtnlBatch):
    """Records each run() (one send phase) and answers from a script instead of a kernel."""

    def __init__(self, script: dict[NlRequest, list[int]]) -> None:  # no socket
        self.script = script
        self.calls: list[list[NlRequest]] = []

    async def run(
        self, requests: Sequence[NlRequest], reply_buffer: int = ACK_BUFFER
    ) -> list[NlReply]:
        self.calls.append(list(requests))
        replies = []
        for request in requests:
            reply = NlReply()
            codes = self.script.get(request)
            reply.error = codes.pop(0) if codes else 0
            replies.append(reply)
        return replies


async def test_add_phases_retries_and_partial_cleanup(caplog: pytest.LogCaptureFixture) -> None:
    own = Lease(IPv4Network("10.129.0.0/24"), LeaseAttrs(IPv4Address("198.19.0.250")))
    net = VXLANNetwork(own, DEVICE, retry_attempts=2, retry_delay=0)
    peers = [
        PeerVtep(
            IPv4Network(f"10.129.{i}.0/24"), IPv4Address(f"198.19.0.{i}"), f"0e:00:00:00:00:0{i}"
        )
        for i in range(1, 6)
    ]
    ok, busy, no_arp, no_fdb, no_route = peers
    nl = ScriptedRtnl(
        {
            net._neigh(busy, True): [errno.EBUSY],  # transient: retried, then fine
            net._neigh(no_arp, True): [errno.EINVAL, errno.EINVAL],
            net._fdb(no_fdb, True): [errno.EINVAL, errno.EINVAL],
            net._route(no_route, True): [errno.ENETDOWN, errno.ENETDOWN],
            net._fdb(no_route, False): [errno.ENOENT],  # already gone: not an error
        }
    )
    batch = [(peer_event("added", str(p.subnet), p.mac, str(p.public_ip)), p) for p in peers]
    with caplog.at_level(logging.DEBUG, logger="flannel_bpf"):
        remotes = await net._program_round(nl, batch, snapshot=True)

    assert nl.calls == [
        [net._neigh(p, True) for p in peers],
        [net._neigh(busy, True), net._neigh(no_arp, True)],  # the retry
        [net._fdb(p, True) for p in (ok, busy, no_fdb, no_route)],
        [net._fdb(no_fdb, True)],
        [net._neigh(no_fdb, False)],
        # Routes only now, for the peers whose neighbour and FDB entry were acknowledged.
        [net._route(p, True) for p in (ok, busy, no_route)],
        [net._route(no_route, True)],
        [net._neigh(no_route, False), net._fdb(no_route, False)],
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [
        "AddARP failed: (22, 'Invalid argument')",
        "AddFDB failed: (22, 'Invalid argument')",
        "failed to add vxlanRoute (10.129.5.0/24 -> 10.129.5.0): (100, 'Network is down')",
    ]
    assert "DelFDB: already gone" in caplog.messages
    # fb_remotes gets every added peer, as before: the BPF path may still serve it.
    assert [r.subnet for r in remotes] == [p.subnet for p in peers]


async def test_removals_go_in_flanneld_order_and_never_raise() -> None:
    own = Lease(IPv4Network("10.129.0.0/24"), LeaseAttrs(IPv4Address("198.19.0.250")))
    net = VXLANNetwork(own, DEVICE, retry_attempts=3, retry_delay=0)
    nl = ScriptedRtnl({net._neigh(PEER, False): [errno.ENOENT]})
    batch = [(peer_event("removed", str(PEER.subnet), PEER.mac, str(PEER.public_ip)), PEER)]
    assert await net._program_round(nl, batch, snapshot=False) == []
    assert nl.calls == [[net._neigh(PEER, False), net._fdb(PEER, False), net._route(PEER, False)]]


async def test_rtnl_batch_survives_a_full_receive_buffer() -> None:
    """Answers the kernel drops for lack of room become ENOBUFS (retried), never a hang."""
    noop = NlRequest(1, 0x05, b"")  # NLMSG_NOOP with NLM_F_ACK: acknowledged, no effect
    async with RtnlBatch() as nl:
        assert all(r.error == 0 for r in await nl.run([noop] * 3000))
    async with RtnlBatch() as nl:
        nl._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # room for a few acks
        nl._rcvbuf = 1 << 20  # ...but sized as if it had 1 MiB: windows of MAX_WINDOW
        replies = await nl.run([noop] * 600)
        codes = {r.error for r in replies}
        assert codes == {0, errno.ENOBUFS}
        assert replies[0].error == 0
        # The socket stays usable.
        nl._rcvbuf = 4096
        assert all(r.error == 0 for r in await nl.run([noop] * 10))


# --------------------------------------------------------------------------------------------
# Real kernel


@requires_root
def test_nexthop_requests_make_what_iproute2_makes(netns: Callable[[str], str]) -> None:
    """The nexthop builders the control-plane benchmark times: the same kernel state as
    `ip nexthop add ... onlink proto boot` plus `ip route add ... nhid N proto boot`."""
    ours, theirs = netns("nh"), netns("nh")
    for ns in (ours, theirs):
        run(["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        for end in ("v0", "v1"):  # a nexthop needs a device with carrier
            run(["ip", "-n", ns, "link", "set", end, "up"])
    oif = int(run(["ip", "netns", "exec", ours, "cat", "/sys/class/net/v0/ifindex"]))

    async def program() -> list[int]:
        async with RtnlBatch() as nl:
            replies = await nl.run(
                [
                    nexthop_request(7, IPv4Address("10.129.3.0"), oif),
                    route_by_nexthop_request(IPv4Network("10.129.3.0/24"), 7),
                ]
            )
        return [reply.error for reply in replies]

    with entered(ours):
        assert asyncio.run(program()) == [0, 0]
    run(["ip", "-n", theirs, "nexthop", "add", "id", "7", "via", "10.129.3.0", "dev", "v0",
         "onlink", "proto", "boot"])  # fmt: skip
    run(["ip", "-n", theirs, "route", "add", "10.129.3.0/24", "nhid", "7", "proto", "boot"])
    for what in (["nexthop", "show"], ["route", "show", "10.129.3.0/24"]):
        made = [json.loads(run(["ip", "-d", "-j", "-n", ns, *what])) for ns in (ours, theirs)]
        assert made[0] == made[1] and made[0], what


@requires_root
def test_device_and_lease_value(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    report, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24")
    mac = report["mac"]
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)
    first = int(mac[:2], 16)
    assert first & 0x02 and not first & 0x01  # locally administered unicast
    assert report["attrs"] == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}'
    )
    assert "VXLAN config: VNI=1 Port=0 GBP=false Learning=false DirectRouting=false" in log

    link = sh(ns, "-d", "link", "show", "flannel.1")
    assert "mtu 1450" in link
    assert f"link/ether {mac}" in link
    assert "UP" in link.split(">")[0]
    assert re.search(r"vxlan id 1 local 198\.18\.0\.1 dev u0 .*dstport 8472 nolearning", link)
    assert "gbp" not in link
    addrs = lines(sh(ns, "-4", "-o", "addr", "show", "dev", "flannel.1"))
    assert len(addrs) == 1 and "inet 10.5.1.0/32" in addrs[0]
    accept_ra = run(
        ["ip", "netns", "exec", ns, "cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]
    )
    assert accept_ra.strip() == "0"
    # No route for the whole Network, nor for our own subnet.
    assert flannel_routes(ns) == []


@requires_root
def test_dual_stack_device_lease_and_peers(netns: Callable[[str], str]) -> None:
    """EnableIPv6: flannel-v6.<VNI> as flanneld builds it (local6 = PublicIPv6, MTU - 50 as the
    kernel clamps it for an IPv6 underlay, <subnet>::/128), PublicIPv6 and BackendV6Data in the
    lease; a dual-stack peer gets its neighbour, FDB entry (to its PublicIPv6) and onlink route
    there too, a single-stack peer only its IPv4 entries, a malformed v6 half only a warning."""
    ns = host(netns, "vx")
    sh(ns, "-6", "addr", "add", "fd00:198:18::1/64", "dev", "u0", "nodad")
    peer4 = ["added", "10.5.2.0/24", "198.18.0.2", '{"VNI":1,"VtepMAC":"0a:00:00:00:00:02"}']
    dual = [
        "added",
        "10.5.3.0/24",
        "198.18.0.3",
        '{"VNI":1,"VtepMAC":"0a:00:00:00:00:03"}',
        "fd10:5:0:3::/64",
        "fd00:198:18::3",
        '{"VNI":1,"VtepMAC":"0a:00:00:00:06:03"}',
    ]
    bad6 = ["added", "10.5.4.0/24", "198.18.0.4", '{"VNI":1,"VtepMAC":"0a:00:00:00:00:04"}',
            "fd10:5:0:4::/64", "fd00:198:18::4", '{"VNI":1}']  # fmt: skip
    report, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", addr6="fd00:198:18::1",
                        subnet6="fd10:5:0:1::/64", network6="fd10:5::/56",
                        events=[peer4, dual, bad6])  # fmt: skip
    mac, mac6 = report["mac"], report["mac6"]
    assert mac6 and mac6 != mac
    assert report["attrs"] == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":"fd00:198:18::1","BackendType":"vxlan",'
        f'"BackendData":{{"VNI":1,"VtepMAC":"{mac}"}},'
        f'"BackendV6Data":{{"VNI":1,"VtepMAC":"{mac6}"}}}}'
    )
    link = sh(ns, "-d", "link", "show", "flannel-v6.1")
    assert re.search(r"vxlan id 1 local fd00:198:18::1 dev u0 .*dstport 8472 nolearning", link)
    assert report["mtu6"] == 1430  # vxlan.ko clamps 1450 to the IPv6 underlay's headroom
    addrs = lines(sh(ns, "-6", "-o", "addr", "show", "dev", "flannel-v6.1", "scope", "global"))
    assert len(addrs) == 1 and "inet6 fd10:5:0:1::/128" in addrs[0]

    assert lines(sh(ns, "-6", "neigh", "show", "dev", "flannel-v6.1")) == [
        "fd10:5:0:3:: lladdr 0a:00:00:00:06:03 PERMANENT"
    ]
    fdb = run(["ip", "netns", "exec", ns, "bridge", "fdb", "show", "dev", "flannel-v6.1"])
    assert "0a:00:00:00:06:03 dst fd00:198:18::3 self permanent" in fdb
    routes = sh(ns, "-6", "route", "show", "dev", "flannel-v6.1")
    assert re.search(r"fd10:5:0:3::/64 via fd10:5:0:3:: metric \d+ onlink", routes)
    assert "fd10:5:0:4::" not in routes and "fd10:5:0:2::" not in routes
    assert "error decoding subnet lease v6 JSON for 10.5.4.0/24: BackendV6Data" in log
    # Every peer keeps its IPv4 entries.
    assert len(lines(sh(ns, "-4", "neigh", "show", "dev", "flannel.1"))) == 3


@requires_root
def test_ipv6_only_peers_programmed(netns: Callable[[str], str]) -> None:
    """An IPv6-only network (EnableIPv4 false: no flannel.<VNI>, leases 0.0.0.0/0 told apart by
    their IPv6 subnet): a peer's entries go on flannel-v6.<VNI>, and it counts as programmed
    (flannel_peers_programmed) by its IPv6 subnet, the only one it has."""
    ns = host(netns, "vx")
    sh(ns, "-6", "addr", "add", "fd00:198:18::1/64", "dev", "u0", "nodad")
    none4, mac6 = IPv4Network("0.0.0.0/0"), "0e:00:00:00:06:02"

    async def program() -> VXLANNetwork:
        addr6 = IPv6Address("fd00:198:18::1")
        iface = ExternalInterface("u0", socket.if_nametoindex("u0"), 1500, None, None, addr6,
                                  addr6)  # fmt: skip
        cfg = parse_vxlan_config(BackendConfig("vxlan", {}))
        dev6 = await ensure_vxlan_device(cfg, iface, v6=True)
        own = Lease(
            none4, vxlan_lease_attrs(cfg, iface, None, dev6), IPv6Network("fd10:5:0:1::/64")
        )
        await configure_vxlan_device(
            dev6, IPv6Network("fd10:5:0:1::/64"), IPv6Network("fd10:5::/56")
        )
        net = VXLANNetwork(own, None, device6=dev6, retry_attempts=2)
        attrs = LeaseAttrs(IPv4Address(0), IPv6Address("fd00:198:18::2"), backend_type="vxlan",
                           backend_v6_data=vtep_data(mac6).encode())  # fmt: skip
        peer = Lease(none4, attrs, IPv6Network("fd10:5:0:2::/64"))
        await net.apply([LeaseEvent(LeaseEventType.ADDED, peer)])
        return net

    with entered(ns):
        net = asyncio.run(program())
    assert lines(sh(ns, "-6", "neigh", "show", "dev", "flannel-v6.1")) == [
        f"fd10:5:0:2:: lladdr {mac6} PERMANENT"
    ]
    assert net.programmed_peers() == 1


@requires_root
def test_device_options(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    backend = {"VNI": 7, "Port": 4789, "MTU": 1400, "GBP": True, "Learning": True}
    report, _ = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", backend=backend)
    assert report["name"] == "flannel.7" and report["mtu"] == 1350
    assert '"BackendData":{"VNI":7,' in report["attrs"]
    link = sh(ns, "-d", "link", "show", "flannel.7")
    assert "mtu 1350" in link
    assert re.search(r"vxlan id 7 local 198\.18\.0\.1 dev u0 .*dstport 4789 (?!nolearning)", link)
    assert " gbp" in link


@requires_root
def test_reuse_keeps_mac_and_fixes_addresses(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    first, _ = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24")
    # A previous lease's address goes; an address outside the Network is not ours to touch.
    add_address(ns, "flannel.1", "10.5.9.0/32")
    add_address(ns, "flannel.1", "10.99.0.1/32")
    second, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24")
    assert second["mac"] == first["mac"]
    assert "recreating" not in log
    addrs = " ".join(lines(sh(ns, "-4", "-o", "addr", "show", "dev", "flannel.1")))
    assert "10.5.1.0/32" in addrs and "10.99.0.1/32" in addrs and "10.5.9.0" not in addrs
    # MTU is not compared: a changed MTU does not touch the reused device.
    third, _ = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", backend={"MTU": 1400})
    assert third["mac"] == first["mac"]
    assert "mtu 1450" in sh(ns, "link", "show", "flannel.1")


@requires_root
def test_incompatible_device_is_recreated(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    sh(ns, "link", "add", "flannel.1", "address", "0e:11:11:11:11:11", "type", "vxlan", "id", "2",
       "dev", "u0", "dstport", "8472")  # fmt: skip
    report, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24")
    assert "incompatible configuration: vni: 1 vs 2; recreating device" in log
    assert report["mac"] != "0e:11:11:11:11:11"
    link = sh(ns, "-d", "link", "show", "flannel.1")
    assert "vxlan id 1 local 198.18.0.1" in link and report["mac"] in link


@requires_root
def test_peers_programmed_idempotent_and_removed(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    mac2, mac3 = "0e:00:00:00:00:02", "0e:00:00:00:00:03"
    add2 = ["added", "10.5.2.0/24", "198.18.0.2", vtep_data(mac2)]
    add3 = ["added", "10.5.3.0/24", "198.18.0.3", vtep_data(mac3)]
    # Own subnet in the batch is skipped; the repeat of add2 is a harmless replace.
    own = ["added", "10.5.1.0/24", "198.18.0.1", vtep_data("0e:00:00:00:00:01")]
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[add2, add3, add2, own])

    neigh = lines(sh(ns, "neigh", "show", "dev", "flannel.1"))
    assert sorted(neigh) == [
        f"10.5.2.0 lladdr {mac2} PERMANENT",
        f"10.5.3.0 lladdr {mac3} PERMANENT",
    ]
    assert sorted(fdb(ns)) == [
        f"{mac2} dst 198.18.0.2 self permanent",
        f"{mac3} dst 198.18.0.3 self permanent",
    ]
    assert flannel_routes(ns) == [
        "10.5.2.0/24 via 10.5.2.0 dev flannel.1 onlink",
        "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
    ]

    # A changed PublicIP for the same MAC replaces the FDB destination.
    moved = ["added", "10.5.3.0/24", "198.18.0.33", vtep_data(mac3)]
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[moved])
    assert f"{mac3} dst 198.18.0.33 self permanent" in fdb(ns)
    assert len(fdb(ns)) == 2

    remove2 = ["removed", "10.5.2.0/24", "198.18.0.2", vtep_data(mac2)]
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[remove2])
    assert lines(sh(ns, "neigh", "show", "dev", "flannel.1")) == [
        f"10.5.3.0 lladdr {mac3} PERMANENT"
    ]
    assert fdb(ns) == [f"{mac3} dst 198.18.0.33 self permanent"]
    assert flannel_routes(ns) == ["10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink"]

    # Removing again, with one entry already deleted by hand: the others still go, no error.
    sh(ns, "neigh", "del", "10.5.3.0", "dev", "flannel.1")
    remove3 = ["removed", "10.5.3.0/24", "198.18.0.33", vtep_data(mac3)]
    _, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[remove3, remove3])
    assert "ERROR" not in log
    assert lines(sh(ns, "neigh", "show", "dev", "flannel.1")) == []
    assert fdb(ns) == []
    assert flannel_routes(ns) == []


@requires_root
def test_lease_moving_subnet_in_one_batch(netns: Callable[[str], str]) -> None:
    """A node re-leased with a new subnet keeps its VtepMAC: in one batch the old lease goes
    and the new one comes, and the FDB entry ends up pointing at the new PublicIP."""
    ns = host(netns, "vx")
    mac = "0e:00:00:00:00:02"
    old = ["added", "10.5.2.0/24", "198.18.0.2", vtep_data(mac)]
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[old])
    new = ["added", "10.5.9.0/24", "198.18.0.9", vtep_data(mac)]
    for batch in ([["removed", *old[1:]], new], [new, ["removed", *old[1:]]]):
        drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[old])
        _, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=batch)
        assert "ERROR" not in log
        assert fdb(ns) == [f"{mac} dst 198.18.0.9 self permanent"]
        assert lines(sh(ns, "neigh", "show", "dev", "flannel.1")) == [
            f"10.5.9.0 lladdr {mac} PERMANENT"
        ]
        assert flannel_routes(ns) == ["10.5.9.0/24 via 10.5.9.0 dev flannel.1 onlink"]


@requires_root
def test_batch_larger_than_a_window(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    count = 600  # more than MAX_WINDOW requests per phase
    peers = [
        (
            f"10.5.{128 + i // 256}.{i % 256}/32",
            f"198.18.1.{i % 250 + 1}",
            f"0e:00:00:00:{i >> 8:02x}:{i & 255:02x}",
        )
        for i in range(count)
    ]
    added = [["added", subnet, ip, vtep_data(mac)] for subnet, ip, mac in peers]
    _, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=added)
    assert "ERROR" not in log
    assert len(flannel_routes(ns)) == count
    assert len(lines(sh(ns, "neigh", "show", "dev", "flannel.1"))) == count
    assert len(fdb(ns)) == count
    assert "10.5.130.87 via 10.5.130.87 dev flannel.1 onlink" in flannel_routes(ns)
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[["removed", *a[1:]] for a in added])
    assert flannel_routes(ns) == []
    assert fdb(ns) == []


@requires_root
def test_bad_backend_data_skipped_with_warning(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    good = ["added", "10.5.5.0/24", "198.18.0.5", vtep_data("0e:00:00:00:00:05")]
    bad = [
        ["added", "10.5.2.0/24", "198.18.0.2", vtep_data("zz:00:00:00:00:02")],
        ["added", "10.5.3.0/24", "198.18.0.3", '{"VNI":1}'],
        ["added", "10.5.4.0/24", "198.18.0.4", "[1,2]"],
        ["added", "10.5.6.0/24", "198.18.0.6", ""],
    ]
    _, log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[*bad, good])
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 4, log
    assert any("10.5.2.0/24" in w and "invalid MAC" in w for w in warnings)
    assert any("10.5.3.0/24" in w and "VtepMAC is missing" in w for w in warnings)
    assert flannel_routes(ns) == ["10.5.5.0/24 via 10.5.5.0 dev flannel.1 onlink"]
    assert fdb(ns) == ["0e:00:00:00:00:05 dst 198.18.0.5 self permanent"]


@requires_root
def test_direct_routing(netns: Callable[[str], str]) -> None:
    ns = host(netns, "vx")
    # 198.18.50.0/24 sits behind a gateway, so a peer there still needs the tunnel.
    sh(ns, "route", "add", "198.18.50.0/24", "via", "198.18.0.254")
    near = ["added", "10.5.2.0/24", "198.18.0.2", vtep_data("0e:00:00:00:00:02")]
    far = ["added", "10.5.3.0/24", "198.18.50.3", vtep_data("0e:00:00:00:00:03")]
    backend = {"DirectRouting": True}
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", backend=backend, events=[near, far])
    assert flannel_routes(ns) == [
        "10.5.2.0/24 via 198.18.0.2 dev u0",
        "10.5.3.0/24 via 10.5.3.0 dev flannel.1 onlink",
    ]
    assert fdb(ns) == ["0e:00:00:00:00:03 dst 198.18.50.3 self permanent"]
    assert lines(sh(ns, "neigh", "show", "dev", "flannel.1")) == [
        "10.5.3.0 lladdr 0e:00:00:00:00:03 PERMANENT"
    ]
    removed = [["removed", *near[1:]], ["removed", *far[1:]]]
    drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", backend=backend, events=removed)
    assert flannel_routes(ns) == []
    assert fdb(ns) == []


@requires_root
def test_ping_across_overlay(host_pair: tuple[str, str]) -> None:
    a, b = host_pair

    # Each host needs the other's MAC, so set both devices up first, then program the peers.
    mac_a = drive(a, addr="198.18.0.1", subnet="10.5.1.0/24")[0]["mac"]
    mac_b = drive(b, addr="198.18.0.2", subnet="10.5.2.0/24")[0]["mac"]
    peer_b = ["added", "10.5.2.0/24", "198.18.0.2", vtep_data(mac_b)]
    peer_a = ["added", "10.5.1.0/24", "198.18.0.1", vtep_data(mac_a)]
    assert drive(a, addr="198.18.0.1", subnet="10.5.1.0/24", events=[peer_b])[0]["mac"] == mac_a
    assert drive(b, addr="198.18.0.2", subnet="10.5.2.0/24", events=[peer_a])[0]["mac"] == mac_b

    run(["ip", "netns", "exec", a, "ping", "-c", "2", "-W", "2", "-I", "10.5.1.1", "10.5.2.1"])
    run(["ip", "netns", "exec", b, "ping", "-c", "2", "-W", "2", "-I", "10.5.2.1", "10.5.1.1"])
    # The traffic really went through the VTEPs, not some other path.
    stats = sh(a, "-s", "link", "show", "flannel.1")
    tx_packets = int(stats.split("TX:")[1].split("\n")[1].split()[1])
    assert tx_packets >= 2


# The whole backend (register_network) with a stand-in lease manager: etcd is not the point here.
REGISTER = r"""
import asyncio, socket, sys
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from flannel_bpf.backends import ExternalContext, make_backend
from flannel_bpf.subnet.config import BackendConfig
from flannel_bpf.cli.flags import AgentOptions
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.lease import Lease, LeaseAttrs
from flannel_bpf.subnet.subnet_env import PreviousSubnets

class Manager:
    async def acquire_lease(self, config: Any, attrs: LeaseAttrs, *_: Any) -> Lease:
        return Lease(IPv4Network("10.5.7.0/24"), attrs)

    async def stored_vtep_mac(self, v6: bool = False) -> str:
        return sys.argv[2]  # what kube mode reads back from the Node (etcd mode: "")

class Config:
    network = IPv4Network("10.5.0.0/16")
    backend = BackendConfig("vxlan", {"VNI": 3})
    enable_ipv6 = False

async def main() -> None:
    addr = IPv4Address("198.18.0.1")
    iface = ExternalInterface("u0", socket.if_nametoindex("u0"), 1500, addr, addr)
    previous = PreviousSubnets()
    options = AgentOptions(datapath=sys.argv[1])
    ctx = ExternalContext(iface, options, Manager(), Config(), previous)  # type: ignore[arg-type]
    net = await make_backend("vxlan", ctx).register_network()
    print(net.mtu, net.lease.subnet, net.lease.attrs.to_json().decode(), net.datapath)
    await net.close()

asyncio.run(main())
"""


@requires_root
@pytest.mark.parametrize(
    ("datapath", "stored_mac"),
    [("kernel", ""), ("bpf", ""), ("kernel", "0A-58-0A-05-07-01"), ("bpf", "not-a-mac")],
)
def test_register_network(netns: Callable[[str], str], datapath: str, stored_mac: str) -> None:
    ns = host(netns, "vx")
    out = run(["ip", "netns", "exec", ns, sys.executable, "-c", REGISTER, datapath, stored_mac])
    mtu, subnet, value, chosen = out.split()
    link = sh(ns, "-d", "link", "show", "flannel.3")
    mac = link.split("link/ether ")[1].split()[0]
    # A stored VtepMAC (any form Go's ParseMAC takes) names the new device; a bad one does not.
    if stored_mac == "0A-58-0A-05-07-01":
        assert mac == "0a:58:0a:05:07:01"
    else:
        assert int(mac[:2], 16) & 0x03 == 0x02  # random: locally administered, unicast
    assert (mtu, subnet, chosen) == ("1450", "10.5.7.0/24", datapath)
    assert value == (
        '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"vxlan",'
        f'"BackendData":{{"VNI":3,"VtepMAC":"{mac}"}}}}'
    )
    encap = run(["tc", "-n", ns, "filter", "show", "dev", "flannel.3", "egress"])
    assert ("fb_tc_encap" in encap) == (datapath == "bpf")
    if datapath == "bpf":  # the data path outlives the process that set it up
        run(["ip", "netns", "exec", ns, sys.executable, "-m", "flannel_bpf", "cleanup"])
        assert "fb_tc_encap" not in run(
            ["tc", "-n", ns, "filter", "show", "dev", "flannel.3", "egress"]
        )
    assert "inet 10.5.7.0/32" in sh(ns, "-4", "-o", "addr", "show", "dev", "flannel.3")
