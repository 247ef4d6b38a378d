"""The host-gw backend against a real kernel, inside throwaway network namespaces.

The backend code runs in a child Python started with `ip netns exec`, so its netlink calls land
in the test's namespace; nothing touches the root namespace.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any, cast

import pytest

from flannel_bpf.backends import BACKENDS, BackendError, ExternalContext, make_backend
from flannel_bpf.backends.hostgw import HostGWBackend, HostGWNetwork
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.lab.netns import entered, run
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

from .conftest import host, requires_root

# Builds a HostGWNetwork for `subnet` over `iface`, applies the peer events as one batch, and,
# with "wait", keeps the route checker running until a line arrives on stdin.
DRIVER = r"""
import asyncio, json, logging, socket, sys
from ipaddress import IPv4Address, IPv4Network
from flannel_bpf.backends.hostgw import HostGWNetwork
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s")
logging.getLogger("flannel_bpf").setLevel(logging.DEBUG)
args = json.loads(sys.argv[1])

async def main() -> None:
    own = Lease(IPv4Network(args["subnet"]), LeaseAttrs(IPv4Address(args["addr"]), None, "host-gw"))
    net = HostGWNetwork(own, socket.if_nametoindex(args["iface"]), 1500,
                        check_interval=args.get("interval", 10.0))
    net.start()
    events = [
        LeaseEvent(LeaseEventType(kind), Lease(IPv4Network(subnet),
                   LeaseAttrs(IPv4Address(public_ip), None, "host-gw")))
        for kind, subnet, public_ip in args.get("events", [])
    ]
    if events:
        await net.apply(events)
    if args.get("wait"):
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await net.close()
    print("closed", flush=True)

asyncio.run(main())
"""


def command(ns: str, args: dict[str, Any]) -> list[str]:
    args.setdefault("iface", "u0")
    return ["ip", "netns", "exec", ns, sys.executable, "-c", DRIVER, json.dumps(args)]


def drive(ns: str, **args: Any) -> str:
    """Run the backend in ns to completion; returns its log."""
    proc = subprocess.run(command(ns, args), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "closed"
    return proc.stderr


def flannel_routes(ns: str) -> list[str]:
    out = run(["ip", "-n", ns, "route", "show"])
    return [line.strip() for line in out.splitlines() if line.startswith("10.5.")]


def context(iface_addr: str, ext_addr: str) -> ExternalContext:
    iface = ExternalInterface("u0", 2, 1500, IPv4Address(iface_addr), IPv4Address(ext_addr))
    # The other members are not consulted by the constructor.
    none = cast(Any, None)
    return ExternalContext(iface, none, none, none, none)


def test_registered() -> None:
    assert BACKENDS["host-gw"] is HostGWBackend
    assert isinstance(make_backend("host-gw", context("198.18.0.1", "198.18.0.1")), HostGWBackend)


def test_refuses_public_ip_other_than_interface_ip() -> None:
    with pytest.raises(BackendError) as info:
        HostGWBackend(context("198.18.0.1", "198.18.9.9"))
    assert str(info.value) == (
        "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
        "which is not supported by host-gw backend"
    )


def test_accepts_only_host_gw() -> None:
    own = Lease(IPv4Network("10.5.1.0/24"), LeaseAttrs(IPv4Address("198.18.0.1"), None, "host-gw"))
    net = HostGWNetwork(own, 2, 1500)
    assert net.mtu == 1500
    assert net.accepts(own)
    for other in ("vxlan", "", "udp", "Host-GW"):
        assert not net.accepts(Lease(own.subnet, LeaseAttrs(own.attrs.public_ip, None, other)))


@requires_root
def test_routes_added_replaced_and_removed(netns: Callable[[str], str]) -> None:
    ns = host(netns, "hg")
    # A stale route for a peer's subnet with another gateway must be replaced, not kept.
    run(["ip", "-n", ns, "route", "add", "10.5.3.0/24", "via", "198.18.0.99", "dev", "u0"])
    events = [
        ["added", "10.5.2.0/24", "198.18.0.2"],
        ["added", "10.5.3.0/24", "198.18.0.3"],
        ["added", "10.5.2.0/24", "198.18.0.2"],  # a renewal: already there, skipped
        ["added", "10.5.1.0/24", "198.18.0.1"],  # our own subnet: never routed
    ]
    log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=events)
    assert "Replacing existing route to 10.5.3.0/24 via 198.18.0.99" in log
    assert flannel_routes(ns) == [
        "10.5.2.0/24 via 198.18.0.2 dev u0",
        "10.5.3.0/24 via 198.18.0.3 dev u0",
    ]
    # A peer that moved to another PublicIP: the route follows.
    drive(
        ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=[["added", "10.5.3.0/24", "198.18.0.4"]]
    )
    assert flannel_routes(ns) == [
        "10.5.2.0/24 via 198.18.0.2 dev u0",
        "10.5.3.0/24 via 198.18.0.4 dev u0",
    ]
    removed = [["removed", "10.5.2.0/24", "198.18.0.2"], ["removed", "10.5.9.0/24", "198.18.0.9"]]
    log = drive(ns, addr="198.18.0.1", subnet="10.5.1.0/24", events=removed)
    assert "ERROR" not in log
    assert flannel_routes(ns) == ["10.5.3.0/24 via 198.18.0.4 dev u0"]


@requires_root
def test_ipv6_only_peers_programmed(netns: Callable[[str], str]) -> None:
    """An IPv6-only network (our lease's IPv4 subnet 0.0.0.0/0, as flanneld's): a peer gets its
    IPv6 route via its PublicIPv6 and counts as programmed (flannel_peers_programmed) by it,
    its only route."""
    ns = host(netns, "hg")
    run(["ip", "-n", ns, "-6", "addr", "add", "fd00:198:18::1/64", "dev", "u0", "nodad"])
    none4 = IPv4Network("0.0.0.0/0")

    async def program() -> HostGWNetwork:
        own = Lease(none4, LeaseAttrs(IPv4Address(0), IPv6Address("fd00:198:18::1"), "host-gw"),
                    IPv6Network("fd10:5:0:1::/64"))  # fmt: skip
        net = HostGWNetwork(own, socket.if_nametoindex("u0"), 1500, ipv6=True)
        peer = Lease(none4, LeaseAttrs(IPv4Address(0), IPv6Address("fd00:198:18::2"), "host-gw"),
                     IPv6Network("fd10:5:0:2::/64"))  # fmt: skip
        await net.apply([LeaseEvent(LeaseEventType.ADDED, peer)])
        return net

    with entered(ns):
        net = asyncio.run(program())
    routes = run(["ip", "-n", ns, "-6", "route", "show", "fd10:5:0:2::/64"])
    assert "via fd00:198:18::2 dev u0" in routes
    assert net.programmed_peers() == 1


@requires_root
def test_deleted_route_is_restored(netns: Callable[[str], str]) -> None:
    ns = host(netns, "hg")
    args = {
        "addr": "198.18.0.1",
        "subnet": "10.5.1.0/24",
        "interval": 1.0,
        "wait": True,
        "events": [["added", "10.5.2.0/24", "198.18.0.2"], ["added", "10.5.3.0/24", "198.18.0.3"]],
    }
    proc = subprocess.Popen(
        command(ns, args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "ready"
        run(["ip", "-n", ns, "route", "del", "10.5.2.0/24"])
        assert "10.5.2.0/24 via 198.18.0.2 dev u0" not in flannel_routes(ns)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if "10.5.2.0/24 via 198.18.0.2 dev u0" in flannel_routes(ns):
                break
            time.sleep(0.2)
        assert flannel_routes(ns) == [
            "10.5.2.0/24 via 198.18.0.2 dev u0",
            "10.5.3.0/24 via 198.18.0.3 dev u0",
        ]
        stdout, stderr = proc.communicate("stop\n", timeout=10)
        assert proc.returncode == 0, stderr
        assert stdout.strip() == "closed"
        assert "Route recovered 10.5.2.0/24 : 198.18.0.2" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@requires_root
def test_ping_via_routes(host_pair: tuple[str, str]) -> None:
    a, b = host_pair
    drive(
        a, addr="198.18.0.1", subnet="10.5.1.0/24", events=[["added", "10.5.2.0/24", "198.18.0.2"]]
    )
    drive(
        b, addr="198.18.0.2", subnet="10.5.2.0/24", events=[["added", "10.5.1.0/24", "198.18.0.1"]]
    )
    run(["ip", "netns", "exec", a, "ping", "-c", "2", "-W", "2", "-I", "10.5.1.1", "10.5.2.1"])
    run(["ip", "netns", "exec", b, "ping", "-c", "2", "-W", "2", "-I", "10.5.2.1", "10.5.1.1"])


# The whole backend (register_network, close) with a stand-in lease manager.
REGISTER = r"""
import asyncio, socket
from ipaddress import IPv4Address, IPv4Network
from typing import Any
from flannel_bpf.backends import ExternalContext, make_backend
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.lease import Lease, LeaseAttrs
from flannel_bpf.subnet.subnet_env import PreviousSubnets

class Manager:
    async def acquire_lease(self, config: Any, attrs: LeaseAttrs, *_: Any) -> Lease:
        return Lease(IPv4Network("10.5.7.0/24"), attrs)

class Config:
    enable_ipv6 = False

async def main() -> None:
    addr = IPv4Address("198.18.0.1")
    iface = ExternalInterface("u0", socket.if_nametoindex("u0"), 1480, addr, addr)
    config, previous = Config(), PreviousSubnets()
    ctx = ExternalContext(iface, None, Manager(), config, previous)  # type: ignore[arg-type]
    net = await make_backend("host-gw", ctx).register_network()
    checker = [t for t in asyncio.all_tasks() if t.get_name() == "host-gw-route-check"]
    print(net.mtu, net.lease.attrs.to_json().decode(), len(checker))
    await net.close()
    print(len([t for t in asyncio.all_tasks() if t.get_name() == "host-gw-route-check"]))

asyncio.run(main())
"""


@requires_root
def test_register_network(netns: Callable[[str], str]) -> None:
    ns = host(netns, "hg")
    out = run(["ip", "netns", "exec", ns, sys.executable, "-c", REGISTER]).split()
    assert out == [
        "1480",
        '{"PublicIP":"198.18.0.1","PublicIPv6":null,"BackendType":"host-gw"}',
        "1",
        "0",
    ]
    assert flannel_routes(ns) == []
