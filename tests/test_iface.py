"""find_external_interface against the real kernel, each test in a throwaway network namespace.

Every test builds veth pairs with addresses in 10.x / 198.18.0.0/15 inside its own namespace
and runs the lookup in a child process entered into that namespace with `ip netns exec`, so
nothing in the root namespace is ever touched. The namespace is deleted in the fixture's
finalizer whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flannel_bpf.datapath.iface import NO_DEFAULT_MATCH

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

REPO = Path(__file__).resolve().parents[1]

# Runs inside the namespace: parse flanneld-style flags, look the interface up, print JSON.
_CHILD = r"""
import asyncio, json, logging, sys
from flannel_bpf.cli.flags import parse_run_args
from flannel_bpf.datapath.iface import InterfaceError, find_external_interface

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
stack, args = sys.argv[1], sys.argv[2:]  # "v4", "dual" or "v6": the network's stack
opts = parse_run_args(args, {})
try:
    ext = asyncio.run(find_external_interface(opts, ipv4=stack != "v6", ipv6=stack != "v4"))
except InterfaceError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({
        "name": ext.name, "index": ext.index, "mtu": ext.mtu,
        "iface_addr": str(ext.iface_addr), "ext_addr": str(ext.ext_addr),
        **({"iface_v6_addr": str(ext.iface_v6_addr), "ext_v6_addr": str(ext.ext_v6_addr)}
           if stack != "v4" else {}),
    }))
"""


@dataclass
class NetNS:
    """A named network namespace that test code may only change through `ip -n`."""

    name: str
    _peers: int = field(default=0)

    def ip(self, *args: str) -> str:
        result = subprocess.run(
            ["ip", "-n", self.name, *args], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"ip -n {self.name} {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def veth(self, name: str, *addrs: str, mtu: int = 1500) -> None:
        """A veth whose peer (named peerN, so name regexes can avoid it) stays in the namespace;
        both ends up so the link has carrier and routes through it are usable."""
        self._peers += 1
        peer = f"peer{self._peers}"
        self.ip("link", "add", name, "mtu", str(mtu), "type", "veth", "peer", "name", peer)
        self.ip("link", "set", peer, "up")
        self.ip("link", "set", name, "up")
        for addr in addrs:
            self.ip("addr", "add", addr, "dev", name)

    def link(self, name: str) -> dict[str, Any]:
        info: list[dict[str, Any]] = json.loads(self.ip("-j", "link", "show", "dev", name))
        return info[0]

    def find(self, *flags: str, stack: str = "v4") -> dict[str, Any]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env = {k: v for k, v in env.items() if not k.startswith("FLANNELD_")}
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", _CHILD, stack, *flags],
            capture_output=True,
            text=True,
            check=False,
            cwd=REPO,
            env=env,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer


@pytest.fixture
def ns(netns: Callable[[str], str]) -> NetNS:
    """A fresh namespace from the shared factory (deleted by it, also on failure)."""
    made = NetNS(netns("if"))
    return made


def _ok(answer: dict[str, Any]) -> dict[str, Any]:
    assert "error" not in answer, answer["error"]
    return answer


def _err(answer: dict[str, Any]) -> str:
    assert "error" in answer, f"expected an error, got {answer}"
    message = answer["error"]
    assert isinstance(message, str)
    assert "\n" not in message
    return message


# --- rule 1: no interface option ------------------------------------------------------------


def test_default_route_interface(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24", mtu=1400)
    ns.ip("route", "add", "default", "via", "10.30.0.1", "dev", "b0")

    found = _ok(ns.find())

    assert found == {
        "name": "b0",
        "index": ns.link("b0")["ifindex"],
        "mtu": 1400,
        "iface_addr": "10.30.0.5",
        "ext_addr": "10.30.0.5",
    }


def test_first_default_route_of_main_table_wins(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0", "table", "100")
    ns.ip("route", "add", "default", "via", "10.30.0.1", "dev", "b0", "metric", "200")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0", "metric", "300")

    assert _ok(ns.find())["name"] == "b0"


def test_no_default_route_is_an_error(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")

    message = _err(ns.find())

    assert message.startswith(NO_DEFAULT_MATCH)
    assert "unable to find default route" in message


def test_default_route_interface_without_address_is_an_error(ns: NetNS) -> None:
    ns.veth("a0")
    ns.ip("route", "add", "default", "dev", "a0")

    message = _err(ns.find())

    assert message.startswith(NO_DEFAULT_MATCH)
    assert "failed to find IPv4 address for interface a0" in message


def test_public_ip_owned_picks_its_interface_not_the_default_route(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24", "198.18.0.7/24")
    ns.veth("b0", "10.30.0.5/24")
    ns.ip("route", "add", "default", "via", "10.30.0.1", "dev", "b0")

    found = _ok(ns.find("--public-ip=198.18.0.7"))

    assert (found["name"], found["iface_addr"], found["ext_addr"]) == (
        "a0",
        "198.18.0.7",
        "198.18.0.7",
    )


def test_public_ip_not_owned_without_iface_is_an_error(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")

    message = _err(ns.find("-public-ip", "198.18.9.9"))

    assert message.startswith(NO_DEFAULT_MATCH)
    assert "198.18.9.9" in message


def test_public_ipv6_without_ipv6_in_the_network_is_ignored(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")

    found = _ok(ns.find("--public-ipv6=fd00::1"))
    assert (found["name"], found["ext_addr"]) == ("a0", "10.20.0.5")


# --- dual stack (EnableIPv6 beside IPv4) ------------------------------------------------------


def _v6(ns: NetNS, dev: str, *addrs: str) -> None:
    for addr in addrs:
        ns.ip("-6", "addr", "add", addr, "dev", dev, "nodad")


def test_dual_stack_default_routes_on_one_interface(ns: NetNS) -> None:
    """Both families' defaults lead out of a0: its global IPv6 address (a ULA counts as global,
    as Go's IsGlobalUnicast) is preferred to its link-local one, and is the PublicIPv6."""
    ns.veth("a0", "10.20.0.5/24")
    _v6(ns, "a0", "fd00:20::5/64")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")
    ns.ip("-6", "route", "add", "default", "via", "fd00:20::1", "dev", "a0")

    found = _ok(ns.find(stack="dual"))
    assert found["name"] == "a0"
    assert (found["iface_addr"], found["iface_v6_addr"]) == ("10.20.0.5", "fd00:20::5")
    assert found["ext_v6_addr"] == "fd00:20::5"

    found = _ok(ns.find("--public-ipv6=2001:db8::7", "--iface=a0", stack="dual"))
    assert (found["iface_v6_addr"], found["ext_v6_addr"]) == ("fd00:20::5", "2001:db8::7")


def test_dual_stack_default_routes_on_two_interfaces_are_refused(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    _v6(ns, "b0", "fd00:30::5/64")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")
    ns.ip("-6", "route", "add", "default", "via", "fd00:30::1", "dev", "b0")

    message = _err(ns.find(stack="dual"))
    assert "v6 default route interface b0 must be the same with v4 default route interface a0" in (
        message
    )


def test_dual_stack_interface_by_its_ipv6_address(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    _v6(ns, "b0", "fd00:30::5/64")

    found = _ok(ns.find("--iface=fd00:30::5", stack="dual"))
    assert (found["name"], found["iface_addr"], found["iface_v6_addr"]) == (
        "b0", "10.30.0.5", "fd00:30::5"
    )  # fmt: skip


def test_dual_stack_link_local_only_is_taken_and_no_ipv6_is_an_error(ns: NetNS) -> None:
    """flanneld's GetInterfaceIP6Addrs takes a link-local address when there is no global one;
    an interface without IPv6 at all is skipped with the reason logged."""
    ns.veth("a0", "10.20.0.5/24")
    _v6(ns, "a0", "fe80::5/64")
    ns.veth("b0", "10.30.0.5/24")
    ns.ip("link", "set", "b0", "down")
    subprocess.run(["ip", "netns", "exec", ns.name, "sysctl", "-qw",
                    "net.ipv6.conf.b0.disable_ipv6=1"], check=True)  # fmt: skip
    ns.ip("link", "set", "b0", "up")

    assert _ok(ns.find("--iface=a0", stack="dual"))["iface_v6_addr"].startswith("fe80::")
    message = _err(ns.find("--iface=b0", stack="dual"))
    assert "failed to find IPv6 address for interface b0" in message


def test_ipv6_only_takes_the_ipv6_default_route_and_no_ipv4(ns: NetNS) -> None:
    """EnableIPv4 false (ipv6Stack): the IPv6 default route's interface, its IPv6 address as
    PublicIPv6, no IPv4 address at all even where the interface has one (the lease's PublicIP
    stays 0.0.0.0); an IPv4 default elsewhere does not matter."""
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    _v6(ns, "b0", "fd00:30::5/64")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")
    ns.ip("-6", "route", "add", "default", "via", "fd00:30::1", "dev", "b0")

    found = _ok(ns.find(stack="v6"))
    assert (found["name"], found["iface_v6_addr"], found["ext_v6_addr"]) == (
        "b0", "fd00:30::5", "fd00:30::5"
    )  # fmt: skip
    assert (found["iface_addr"], found["ext_addr"]) == ("None", "None")


def test_ipv6_only_selectors(ns: NetNS) -> None:
    """--iface by name or IPv6 address (an IPv4 one is refused with the reason), --iface-regex
    against IPv6 addresses, --iface-can-reach an IPv6 target, --public-ipv6."""
    ns.veth("a0", "10.20.0.5/24")
    _v6(ns, "a0", "fd00:20::5/64")
    ns.veth("b0")
    _v6(ns, "b0", "fd00:30::5/64")

    assert _ok(ns.find("--iface=b0", stack="v6"))["iface_v6_addr"] == "fd00:30::5"
    assert _ok(ns.find("--iface=fd00:20::5", stack="v6"))["name"] == "a0"
    assert "EnableIPv4 is false" in _err(ns.find("--iface=10.20.0.5", stack="v6"))
    assert _ok(ns.find("--iface-regex=^fd00:30:", stack="v6"))["name"] == "b0"
    assert _ok(ns.find("--iface-can-reach=fd00:30::99", stack="v6"))["name"] == "b0"
    found = _ok(ns.find("--iface=a0", "--public-ipv6=fd00:99::1", stack="v6"))
    assert (found["iface_v6_addr"], found["ext_v6_addr"]) == ("fd00:20::5", "fd00:99::1")
    # No IPv6 default route here (the IPv4 stack's default does not count).
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")
    assert "unable to find default route" in _err(ns.find(stack="v6"))
