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

from flannel_bpf.datapath.iface import NO_DEFAULT_MATCH, NO_OPTION_MATCH

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
opts = parse_run_args(sys.argv[1:], {})
try:
    ext = asyncio.run(find_external_interface(opts))
except InterfaceError as exc:
    print(json.dumps({"error": str(exc)}))
else:
    print(json.dumps({
        "name": ext.name, "index": ext.index, "mtu": ext.mtu,
        "iface_addr": str(ext.iface_addr), "ext_addr": str(ext.ext_addr),
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

    def find(self, *flags: str) -> dict[str, Any]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env = {k: v for k, v in env.items() if not k.startswith("FLANNELD_")}
        result = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", _CHILD, *flags],
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


def test_public_ipv6_is_refused(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")

    assert "IPv6" in _err(ns.find("--public-ipv6=fd00::1"))


# --- rule 2: --iface --------------------------------------------------------------------------


def test_iface_by_name(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24", mtu=1450)
    ns.ip("route", "add", "default", "via", "10.20.0.1", "dev", "a0")

    found = _ok(ns.find("--iface", "b0"))

    assert found == {
        "name": "b0",
        "index": ns.link("b0")["ifindex"],
        "mtu": 1450,
        "iface_addr": "10.30.0.5",
        "ext_addr": "10.30.0.5",
    }


def test_iface_by_ip_uses_that_ip(ns: NetNS) -> None:
    # 10.20.0.6 is a secondary address: found by name, 10.20.0.5 would be used.
    ns.veth("a0", "10.20.0.5/24", "10.20.0.6/24")

    found = _ok(ns.find("-iface=10.20.0.6"))

    assert (found["name"], found["iface_addr"], found["ext_addr"]) == (
        "a0",
        "10.20.0.6",
        "10.20.0.6",
    )


def test_iface_values_tried_in_order_first_success_wins(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    ns.veth("c0")  # exists but has no IPv4 address, so it fails too

    found = _ok(
        ns.find("--iface=nosuch0", "--iface=10.99.0.1", "--iface=c0", "--iface=b0", "-iface=a0")
    )

    assert (found["name"], found["iface_addr"]) == ("b0", "10.30.0.5")


def test_iface_all_failing_names_what_was_tried(ns: NetNS) -> None:
    ns.veth("c0")

    message = _err(ns.find("--iface=nosuch0", "--iface=10.99.0.1", "--iface=c0"))

    assert message.startswith(NO_OPTION_MATCH)
    for tried in ("--iface=nosuch0", "--iface=10.99.0.1", "--iface=c0"):
        assert tried in message
    assert "failed to find IPv4 address for interface c0" in message


def test_empty_iface_value_means_default_route_like_flanneld(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")
    ns.ip("route", "add", "default", "via", "10.30.0.1", "dev", "b0")

    assert _ok(ns.find("--iface="))["name"] == "b0"


def test_public_ip_not_owned_is_fine_with_iface(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")

    found = _ok(ns.find("--iface=a0", "--public-ip=198.18.5.5"))

    assert (found["name"], found["iface_addr"], found["ext_addr"]) == (
        "a0",
        "10.20.0.5",
        "198.18.5.5",
    )


# --- rule 3: --iface-regex --------------------------------------------------------------------


@pytest.fixture
def two_links(ns: NetNS) -> NetNS:
    # b0 is created first, so it has the lower ifindex.
    ns.veth("b0", "10.30.0.5/24")
    ns.veth("a0", "10.20.0.5/24")
    return ns


def test_iface_regex_matches_addresses_before_names(two_links: NetNS) -> None:
    found = _ok(two_links.find(r"--iface-regex=^b0$|^10\.20\."))

    assert (found["name"], found["iface_addr"]) == ("a0", "10.20.0.5")


def test_iface_regex_address_match_in_ifindex_order(two_links: NetNS) -> None:
    found = _ok(two_links.find(r"--iface-regex=^10\."))

    assert (found["name"], found["iface_addr"]) == ("b0", "10.30.0.5")


def test_iface_regex_falls_back_to_names(two_links: NetNS) -> None:
    found = _ok(two_links.find("--iface-regex=^a0$"))

    assert (found["name"], found["iface_addr"]) == ("a0", "10.20.0.5")


def test_iface_regex_only_after_every_iface_value(two_links: NetNS) -> None:
    found = _ok(
        two_links.find(r"--iface-regex=^10\.30\.", "--iface=nosuch0", r"-iface-regex=^10\.20\.")
    )

    assert found["name"] == "b0"
    found = _ok(two_links.find(r"--iface-regex=^10\.30\.", "--iface=a0"))
    assert found["name"] == "a0"


def test_iface_regex_without_match_is_an_error(two_links: NetNS) -> None:
    message = _err(two_links.find("--iface-regex=^nomatch"))

    assert message.startswith(NO_OPTION_MATCH)
    assert "Could not match pattern ^nomatch" in message
    assert "a0:[10.20.0.5]" in message


# --- rule 4: --iface-can-reach ----------------------------------------------------------------


def test_iface_can_reach_uses_route_interface_and_source(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24", "10.30.0.9/24")
    ns.ip("route", "add", "10.40.0.0/16", "via", "10.30.0.1", "dev", "b0", "src", "10.30.0.9")

    found = _ok(ns.find("--iface-can-reach=10.40.1.1"))

    assert (found["name"], found["iface_addr"], found["ext_addr"]) == (
        "b0",
        "10.30.0.9",
        "10.30.0.9",
    )
    found = _ok(ns.find("--iface-can-reach", "10.20.0.77"))
    assert (found["name"], found["iface_addr"]) == ("a0", "10.20.0.5")


def test_iface_can_reach_is_tried_last(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")
    ns.veth("b0", "10.30.0.5/24")

    found = _ok(ns.find("--iface-can-reach=10.20.0.77", "--iface-regex=^b0$"))

    assert found["name"] == "b0"


def test_iface_can_reach_without_route_is_an_error(ns: NetNS) -> None:
    ns.veth("a0", "10.20.0.5/24")

    message = _err(ns.find("--iface-can-reach=10.77.0.1"))

    assert message.startswith(NO_OPTION_MATCH)
    assert "--iface-can-reach=10.77.0.1" in message
    assert "couldn't lookup route to 10.77.0.1" in message


# --- address choice ---------------------------------------------------------------------------


def test_global_address_preferred_over_link_local(ns: NetNS) -> None:
    ns.veth("a0", "169.254.7.7/16", "10.20.0.5/24")

    assert _ok(ns.find("--iface=a0"))["iface_addr"] == "10.20.0.5"


def test_link_local_used_when_nothing_else(ns: NetNS) -> None:
    ns.veth("a0", "169.254.7.7/16")

    assert _ok(ns.find("--iface=a0"))["iface_addr"] == "169.254.7.7"


def test_permanent_address_preferred_over_dynamic(ns: NetNS) -> None:
    ns.veth("a0")
    ns.ip("addr", "add", "10.20.0.5/24", "dev", "a0", "valid_lft", "3600", "preferred_lft", "3600")
    ns.ip("addr", "add", "10.21.0.5/24", "dev", "a0")

    assert _ok(ns.find("--iface=a0"))["iface_addr"] == "10.21.0.5"


def test_deprecated_address_is_never_used(ns: NetNS) -> None:
    ns.veth("a0")
    ns.ip("addr", "add", "10.20.0.5/24", "dev", "a0", "preferred_lft", "0")
    ns.ip("addr", "add", "169.254.7.7/16", "dev", "a0")

    assert _ok(ns.find("--iface=a0"))["iface_addr"] == "169.254.7.7"

    ns.ip("addr", "del", "169.254.7.7/16", "dev", "a0")
    message = _err(ns.find("--iface=a0"))
    assert "failed to find IPv4 address for interface a0" in message


def test_interface_without_address_is_an_error(ns: NetNS) -> None:
    ns.veth("a0")

    message = _err(ns.find("--iface=a0"))

    assert message.startswith(NO_OPTION_MATCH)
    assert "failed to find IPv4 address for interface a0" in message
