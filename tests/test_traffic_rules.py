"""Masquerade and forward rules in a namespace's real iptables/nftables, against flanneld's golden
text (e2e/rules.go)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from .conftest import requires_root

pytestmark = [pytest.mark.root, requires_root]

APPLY = """
import sys
from ipaddress import IPv4Network
from flannel_bpf.datapath import traffic_rules as t
net, sub = IPv4Network("10.42.0.0/16"), IPv4Network("10.42.3.0/24")
mode = sys.argv[1]
if mode == "iptables":
    t.IptablesRules(t.masquerade_rules(net, sub, t.supports_random_fully()), "masq").apply()
    t.IptablesRules(t.forward_rules(net), "forward").apply()
elif mode == "again":  # a restart: nothing doubled
    t.IptablesRules(t.masquerade_rules(net, sub, True), "masq").apply()
    t.IptablesRules(t.forward_rules(net), "forward").apply()
elif mode == "present":
    print(t.IptablesRules(t.masquerade_rules(net, sub, True), "masq").present())
elif mode == "old":
    t.IptablesRules(t.masquerade_rules(net, sub, True), "masq").delete()
elif mode == "nft":
    t.apply_nftables(t.nftables_ruleset(net, sub, True, True, True))
"""

GOLDEN_NAT = """\
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-N FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.3.0/24 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 -d 10.42.3.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.3.0/24 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.42.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"""  # noqa: E501

GOLDEN_FWD = """\
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-N FLANNEL-FWD
-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
"""


def in_ns(ns: str, *cmd: str) -> str:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def flannel_lines(ns: str, table: str, chain: str, own: str) -> str:
    base = [
        x for x in in_ns(ns, "iptables", "-t", table, "-S", chain).splitlines() if "FLANNEL" in x
    ]
    return "\n".join(base + in_ns(ns, "iptables", "-t", table, "-S", own).splitlines()) + "\n"


def test_iptables_rules_match_flanneld_golden_text(netns: Callable[[str], str]) -> None:
    ns = netns("ipt")
    in_ns(ns, sys.executable, "-c", APPLY, "iptables")
    assert flannel_lines(ns, "nat", "POSTROUTING", "FLANNEL-POSTRTG") == GOLDEN_NAT
    assert flannel_lines(ns, "filter", "FORWARD", "FLANNEL-FWD") == GOLDEN_FWD
    in_ns(ns, sys.executable, "-c", APPLY, "again")
    assert flannel_lines(ns, "nat", "POSTROUTING", "FLANNEL-POSTRTG") == GOLDEN_NAT
    assert in_ns(ns, sys.executable, "-c", APPLY, "present").strip() == "True"
    in_ns(
        ns,
        "iptables",
        "-t",
        "nat",
        "-D",
        "FLANNEL-POSTRTG",
        "-m",
        "mark",
        "--mark",
        "0x4000/0x4000",
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    )
    assert in_ns(ns, sys.executable, "-c", APPLY, "present").strip() == "False"
    in_ns(ns, sys.executable, "-c", APPLY, "old")
    assert "flanneld masq" not in in_ns(ns, "iptables", "-t", "nat", "-S")


def test_nftables_tables_match_flanneld(netns: Callable[[str], str]) -> None:
    ns = netns("nft")
    in_ns(ns, sys.executable, "-c", APPLY, "nft")
    in_ns(ns, sys.executable, "-c", APPLY, "nft")  # idempotent
    postrtg = in_ns(ns, "nft", "list", "chain", "ip", "flannel-ipv4", "postrtg")
    assert "meta mark 0x00004000 return" in postrtg
    assert "ip saddr != 10.42.3.0/24 ip daddr 10.42.0.0/16 return" in postrtg
    assert "ip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random" in postrtg
    assert 'comment "chain to manage traffic masquerading by flannel"' in postrtg
    forward = in_ns(ns, "nft", "list", "chain", "ip", "flannel-ipv4", "forward")
    assert "ip saddr 10.42.0.0/16 accept" in forward and "policy accept" in forward
    assert in_ns(ns, "nft", "list", "tables").count("flannel-ipv4") == 1
