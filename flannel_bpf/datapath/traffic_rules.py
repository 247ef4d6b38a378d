"""Masquerade and forward rules exactly as flanneld installs them (flannel-compat.md section 7).

iptables mode: chains FLANNEL-POSTRTG (nat) and FLANNEL-FWD (filter), applied with
`iptables-restore --noflush` (delete old copies, then append, which keeps the order), resynced
periodically and rebuilt whole when anything is missing. nftables mode (`EnableNFTables`): tables
`ip flannel-ipv4` with chains `postrtg` and `forward`. IPv6 (`EnableIPv6`) gets the same set from
ip6tables, or the table `ip6 flannel-ipv6`, built from the IPv6 network and lease.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path

log = logging.getLogger(__name__)

MASQ_COMMENT = "flanneld masq"
FORWARD_COMMENT = "flanneld forward"
KUBE_PROXY_MARK = "0x4000/0x4000"
MULTICAST = "224.0.0.0/4"
MULTICAST_V6 = "ff00::/8"

Net = IPv4Network | IPv6Network


class RulesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    spec: tuple[str, ...]

    def restore_line(self, action: str) -> str:
        return " ".join([action, self.chain, *(_quote(x) for x in self.spec)])


def _quote(arg: str) -> str:
    return f'"{arg}"' if " " in arg else arg


def masquerade_rules(network: Net, subnet: Net, fully_random: bool) -> list[Rule]:
    """The 7 rules of flanneld's masquerade set, in order (MasqRules, or MasqIP6Rules for an
    IPv6 network: the same with ff00::/8 as the multicast range)."""
    c, p = str(network), str(subnet)
    multicast = MULTICAST_V6 if network.version == 6 else MULTICAST
    comment = ("-m", "comment", "--comment", MASQ_COMMENT)
    masq = ("-j", "MASQUERADE", *(("--random-fully",) if fully_random else ()))
    return [
        Rule("nat", "POSTROUTING", (*comment, "-j", "FLANNEL-POSTRTG")),
        Rule(
            "nat",
            "FLANNEL-POSTRTG",
            ("-m", "mark", "--mark", KUBE_PROXY_MARK, *comment, "-j", "RETURN"),
        ),
        Rule("nat", "FLANNEL-POSTRTG", ("-s", p, "-d", c, *comment, "-j", "RETURN")),
        Rule("nat", "FLANNEL-POSTRTG", ("-s", c, "-d", p, *comment, "-j", "RETURN")),
        Rule("nat", "FLANNEL-POSTRTG", ("!", "-s", c, "-d", p, *comment, "-j", "RETURN")),
        Rule("nat", "FLANNEL-POSTRTG", ("-s", c, "!", "-d", multicast, *comment, *masq)),
        Rule("nat", "FLANNEL-POSTRTG", ("!", "-s", c, "-d", c, *comment, *masq)),
    ]


def forward_rules(network: Net) -> list[Rule]:
    comment = ("-m", "comment", "--comment", FORWARD_COMMENT)
    return [
        Rule("filter", "FORWARD", (*comment, "-j", "FLANNEL-FWD")),
        Rule("filter", "FLANNEL-FWD", ("-s", str(network), *comment, "-j", "ACCEPT")),
        Rule("filter", "FLANNEL-FWD", ("-d", str(network), *comment, "-j", "ACCEPT")),
    ]


def _own_chains(rules: Sequence[Rule]) -> dict[str, set[str]]:
    chains: dict[str, set[str]] = {}
    for rule in rules:
        if rule.chain.startswith("FLANNEL-"):
            chains.setdefault(rule.table, set()).add(rule.chain)
    return chains


def restore_payload(rules: Sequence[Rule], action: str) -> str:
    """An iptables-restore --noflush payload that applies action (-A or -D) to each rule."""
    lines: list[str] = []
    # No chain declarations: with --noflush they would flush chains; apply() creates them.
    for table in dict.fromkeys(r.table for r in rules):
        lines.append(f"*{table}")
        lines += [r.restore_line(action) for r in rules if r.table == table]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


class IptablesRules:
    """One rule set kept in place: applied once, then checked every resync period. ipv6: the
    set is ip6tables' (flanneld keeps one IPTables handle per family)."""

    def __init__(self, rules: list[Rule], name: str, ipv6: bool = False) -> None:
        self.rules = rules
        self.name = name
        self.tool = "ip6tables" if ipv6 else "iptables"

    def _run(self, *args: str, payload: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(list(args), input=payload, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise RulesError(f"{' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def present(self) -> bool:
        for rule in self.rules:
            proc = subprocess.run(
                [self.tool, "-w", "-t", rule.table, "-C", rule.chain, *rule.spec],
                capture_output=True,
                timeout=30,
            )
            if proc.returncode != 0:
                return False
        return True

    def delete(self) -> None:
        """Remove every copy of our rules (a rule added twice is deleted twice)."""
        for rule in self.rules:
            for _ in range(16):
                proc = subprocess.run(
                    [self.tool, "-w", "-t", rule.table, "-D", rule.chain, *rule.spec],
                    capture_output=True,
                    timeout=30,
                )
                if proc.returncode != 0:
                    break

    def apply(self) -> None:
        self.delete()
        for table, chains in _own_chains(self.rules).items():
            for chain in sorted(chains):
                # Never flush: a second agent (another network on this host) shares the chain.
                subprocess.run(
                    [self.tool, "-w", "-t", table, "-N", chain], capture_output=True, timeout=30
                )
        restore = f"{self.tool}-restore"
        self._run(restore, "-w", "--noflush", payload=restore_payload(self.rules, "-A"))
        log.info("installed %s rules (%d)", self.name, len(self.rules))

    async def keep(self, interval: float) -> None:
        """flanneld's resync: every interval, rebuild the whole set if any rule is missing."""
        while True:
            await asyncio.sleep(interval)
            try:
                if not await asyncio.to_thread(self.present):
                    log.warning("%s rules were changed by someone else; reinstalling", self.name)
                    await asyncio.to_thread(self.apply)
            except (RulesError, OSError, subprocess.SubprocessError) as exc:
                log.error("checking %s rules failed: %s", self.name, exc)


HOST_ROUTING_COMMENT = "flannel-bpf host routing"
HOST_ROUTING_CHAIN = "FLANNEL-BPF-HOSTRT"
BE_LIBERAL = Path("/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal")


def host_routing_rules(vtep: str, bridge: str, mark: int) -> list[Rule]:
    """Host routing's validation (flannel_bpf.h "Host routing"): packets leaving the host stack
    for a remote pod (out of the VTEP) or a local one (out of the pods' bridge) get the validated
    mark when conntrack knows their connection and no NAT rewrites it: established, or, for
    anything but TCP (whose handshake must complete), confirmed, i.e. past its first packet,
    which is where NAT is decided (mangle POSTROUTING runs before nat's: a first packet's NAT
    is not known yet here). So a one-way UDP stream goes short from its second packet on."""
    comment = ("-m", "comment", "--comment", HOST_ROUTING_COMMENT)
    not_nated = ("-m", "conntrack", "!", "--ctstate", "SNAT,DNAT")
    mark_it = (*comment, "-j", "MARK", "--or-mark", hex(mark))
    established = ("-m", "conntrack", "--ctstate", "ESTABLISHED", *not_nated, *mark_it)
    confirmed = ("!", "-p", "tcp", "-m", "conntrack", "--ctstate", "NEW", "--ctstatus",
                 "CONFIRMED", *not_nated, *mark_it)  # fmt: skip
    return [
        Rule("mangle", "POSTROUTING", (*comment, "-j", HOST_ROUTING_CHAIN)),
        Rule("mangle", HOST_ROUTING_CHAIN, ("-o", vtep, *established)),
        Rule("mangle", HOST_ROUTING_CHAIN, ("-o", vtep, *confirmed)),
        Rule("mangle", HOST_ROUTING_CHAIN, ("-o", bridge, *established)),
        Rule("mangle", HOST_ROUTING_CHAIN, ("-o", bridge, *confirmed)),
    ]


def remove_host_routing_rules() -> bool:
    """Host routing off: its jump and chain go, whatever devices they named. True when there
    was a chain to remove."""
    jump = ("-m", "comment", "--comment", HOST_ROUTING_COMMENT, "-j", HOST_ROUTING_CHAIN)
    try:
        for _ in range(16):
            proc = subprocess.run(["iptables", "-w", "-t", "mangle", "-D", "POSTROUTING", *jump],
                                  capture_output=True, timeout=30)  # fmt: skip
            if proc.returncode != 0:
                break
        removed = False
        for action in ("-F", "-X"):
            proc = subprocess.run(["iptables", "-w", "-t", "mangle", action, HOST_ROUTING_CHAIN],
                                  capture_output=True, timeout=30)  # fmt: skip
            removed = proc.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False  # no iptables here: nothing of ours either
    return removed


def conntrack_be_liberal() -> bool:
    """Have conntrack accept TCP segments outside the window it last saw (once per namespace;
    True when it was changed). Host routing carries most of a validated flow past conntrack, so
    the segment that next takes the long way is far ahead of the window conntrack remembers, and
    without this it would be INVALID (which kube-proxy drops)."""
    try:
        if BE_LIBERAL.read_text().strip() == "1":
            return False
        BE_LIBERAL.write_text("1")
    except OSError as exc:
        raise RulesError(f"cannot set {BE_LIBERAL}: {exc}") from None
    return True


def supports_random_fully() -> bool:
    """iptables >= 1.6.2 knows --random-fully (flanneld checks the version the same way)."""
    try:
        out = subprocess.run(
            ["iptables", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    version = out.split()[1].lstrip("v") if len(out.split()) > 1 else "0"
    parts = tuple(int(x) for x in version.split(".")[:3] if x.isdigit())
    return parts >= (1, 6, 2)


def nftables_ruleset(
    network: Net,
    subnet: Net,
    masquerade: bool,
    forward: bool,
    fully_random: bool,
) -> str:
    """flanneld's `ip flannel-ipv4` table, or `ip6 flannel-ipv6` for an IPv6 network (its rule
    4 differs from iptables' rule 5: kept)."""
    c, p = str(network), str(subnet)
    random = " fully-random" if fully_random else ""
    v6 = network.version == 6
    family, name, ip = ("ip6", "flannel-ipv6", "ip6") if v6 else ("ip", "flannel-ipv4", "ip")
    multicast = MULTICAST_V6 if v6 else MULTICAST
    lines = [
        # Create-then-delete makes the replacement atomic whether or not the table exists.
        f"table {family} {name}",
        f"delete table {family} {name}",
        f"table {family} {name} {{",
        f'  comment "rules for {name}"',
    ]
    if masquerade:
        lines += [
            "  chain postrtg {",
            '    comment "chain to manage traffic masquerading by flannel"',
            "    type nat hook postrouting priority srcnat; policy accept;",
            "    meta mark 0x4000 return",
            f"    {ip} saddr {p} {ip} daddr {c} return",
            f"    {ip} saddr {c} {ip} daddr {p} return",
            f"    {ip} saddr != {p} {ip} daddr {c} return",
            f"    {ip} saddr {c} {ip} daddr != {multicast} masquerade{random}",
            f"    {ip} saddr != {c} {ip} daddr {c} masquerade{random}",
            "  }",
        ]
    if forward:
        lines += [
            "  chain forward {",
            '    comment "chain to accept flannel traffic"',
            "    type filter hook forward priority filter; policy accept;",
            f"    {ip} saddr {c} accept",
            f"    {ip} daddr {c} accept",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_nftables(ruleset: str) -> None:
    proc = subprocess.run(
        ["nft", "-f", "-"], input=ruleset, capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        raise RulesError(f"nft -f: {proc.stderr.strip()}")


def remove_nftables() -> None:
    """Both of flanneld's tables, as its iptables mode removes them at start."""
    for family, name in (("ip", "flannel-ipv4"), ("ip6", "flannel-ipv6")):
        subprocess.run(["nft", "delete", "table", family, name], capture_output=True, timeout=30)
