"""The external interface and PublicIP, chosen the way flanneld chooses them (section 6).

Mirrors flanneld's main.go loop over ipmatch.LookupExtIface and pkg/ip's netlink helpers for an
IPv4 stack:

1. No --iface, --iface-regex or --iface-can-reach: the interface owning --public-ip if that is
   set, otherwise the interface of the first default route in the main table. Failure is
   "Failed to find any valid interface to use".
2. Otherwise each --iface in order (an IP: the interface owning it, with that IP; anything else:
   an interface name), then each --iface-regex (first the addresses of every interface in
   ifindex order, then the names), then --iface-can-reach (the route lookup's interface and
   preferred source). A candidate that fails, including for lack of a usable address, is logged
   and the next one is tried. Nothing left is "Failed to find interface to use that matches the
   interfaces and/or regexes provided".

The address of an interface found by name is the first of its IPv4 addresses that is global
unicast or link-local and not deprecated, after a stable sort preferring global over link-local,
permanent over dynamic and non-temporary over temporary. ExtAddr (the lease's PublicIP) is
--public-ip when given, else that address. --public-ip therefore has to be a local address only
when no interface option is given, as in flanneld.

flanneld quirks kept on purpose: an empty --iface or --iface-regex value means "the default route
interface"; an --iface IP may be any IPv4 address on the interface (even loopback or
deprecated); regexes are searched, not anchored.

Dual stack (EnableIPv6 beside IPv4), as ipmatch.LookupExtIface for its dualStack: the interface
is chosen as above, with these differences: a default route must exist for both families on the
same interface; a regex must match an IPv4 and an IPv6 address of one interface (else names);
an --iface IPv6 address picks its interface; --public-ipv6, when the interface is found by an IP,
must be on that same interface. The IPv6 address is then the interface's first usable one
(GetInterfaceIP6Addrs: global, ULA included, before link-local), and ExtV6Addr (the lease's
PublicIPv6) is --public-ipv6 or that address.

IPv6-only (EnableIPv4 false), as its ipv6Stack: the default is the interface of the first IPv6
default route; an --iface IP must be IPv6; a regex matches IPv6 addresses; --iface-can-reach takes
an IPv6 target. There is no IPv4 address (iface_addr and ext_addr are None, the lease's PublicIP
0.0.0.0); a --public-ip given anyway is kept as ext_addr, as flanneld keeps it.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.cli.flags import AgentOptions

log = logging.getLogger(__name__)

# linux/if_addr.h. IFA_F_TEMPORARY has the same value as IFA_F_SECONDARY, so, like flanneld
# (which tests the bit on every family), IPv4 secondary addresses sort after primary ones.
IFA_F_TEMPORARY = 0x01
IFA_F_DEPRECATED = 0x20
IFA_F_PERMANENT = 0x80
# linux/rtnetlink.h
RT_TABLE_MAIN = 254
RTM_F_CLONED = 0x200

NO_DEFAULT_MATCH = "Failed to find any valid interface to use"
NO_OPTION_MATCH = (
    "Failed to find interface to use that matches the interfaces and/or regexes provided"
)


class InterfaceError(RuntimeError):
    """No usable external interface; the message is one operator-facing line."""


@dataclass(frozen=True)
class ExternalInterface:
    name: str
    index: int
    mtu: int
    iface_addr: ipaddress.IPv4Address | None  # the interface's own IPv4 address in use
    ext_addr: ipaddress.IPv4Address | None  # --public-ip or iface_addr: the lease's PublicIP
    # With IPv6 (dual stack or IPv6-only): the interface's IPv6 address, and --public-ipv6
    # or it (PublicIPv6).
    iface_v6_addr: ipaddress.IPv6Address | None = None
    ext_v6_addr: ipaddress.IPv6Address | None = None

    @property
    def public_ip(self) -> ipaddress.IPv4Address:
        """The lease's PublicIP: ext_addr, or 0.0.0.0 in an IPv6-only network (as flanneld
        writes an unset one)."""
        return self.ext_addr or ipaddress.IPv4Address(0)


class _NotFound(Exception):
    """One lookup failed; the message says why (flanneld logs it and tries the next)."""


@dataclass(frozen=True)
class _Link:
    index: int
    name: str
    mtu: int


@dataclass(frozen=True)
class _Addr:
    index: int
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address
    flags: int


@dataclass(frozen=True)
class _Snapshot:
    """Links (ifindex order) and IPv4 addresses (kernel order) read once, so that every rule
    sees the same state even if addresses change while we look."""

    links: tuple[_Link, ...]
    addrs: tuple[_Addr, ...]
    addrs6: tuple[_Addr, ...] = ()

    def by_name(self, name: str) -> _Link:
        for link in self.links:
            if link.name == name:
                return link
        raise _NotFound(f"no interface named {name}")

    def by_index(self, index: int) -> _Link:
        for link in self.links:
            if link.index == index:
                return link
        raise _NotFound(f"no interface with index {index}")

    def owner_of(self, ip: ipaddress.IPv4Address) -> _Link:
        """GetInterfaceByIP: any IPv4 address counts, whatever its scope or flags."""
        for link in self.links:
            if any(a.index == link.index and a.ip == ip for a in self.addrs):
                return link
        raise _NotFound(f"no interface with IP {ip} found")

    def owner_of6(self, ip: ipaddress.IPv6Address) -> _Link:
        """GetInterfaceByIP6: any IPv6 address counts, whatever its scope or flags."""
        for link in self.links:
            if any(a.index == link.index and a.ip == ip for a in self.addrs6):
                return link
        raise _NotFound(f"no interface with IPv6 {ip} found")

    def usable_addrs(self, link: _Link) -> list[ipaddress.IPv4Address]:
        """GetInterfaceIP4Addrs: usable addresses, most preferred first."""
        usable = self._usable(self.addrs, link)
        return [ip for ip in usable if isinstance(ip, ipaddress.IPv4Address)]

    def usable_addrs6(self, link: _Link) -> list[ipaddress.IPv6Address]:
        """GetInterfaceIP6Addrs: the same rules; ULAs count as global (Go's IsGlobalUnicast)."""
        usable = self._usable(self.addrs6, link)
        return [ip for ip in usable if isinstance(ip, ipaddress.IPv6Address)]

    @staticmethod
    def _usable(
        addrs: tuple[_Addr, ...], link: _Link
    ) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        own = [a for a in addrs if a.index == link.index]
        own.sort(key=_preference)  # stable, like flanneld's insertion sort on short lists
        return [
            a.ip
            for a in own
            if (_is_global_unicast(a.ip) or a.ip.is_link_local) and not a.flags & IFA_F_DEPRECATED
        ]


def _is_global_unicast(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    # Go's net.IP.IsGlobalUnicast, which (unlike Python's is_global) includes private ranges.
    return not (
        ip == ipaddress.IPv4Address("255.255.255.255")
        or ip.is_unspecified
        or ip.is_loopback
        or ip.is_multicast
        or ip.is_link_local
    )


def _preference(addr: _Addr) -> tuple[bool, bool, bool]:
    # flanneld's compareAddrs; False sorts first.
    return (
        addr.ip.is_link_local,
        not addr.flags & IFA_F_PERMANENT,
        bool(addr.flags & IFA_F_TEMPORARY),
    )


def _as_ipv4(value: str) -> ipaddress.IPv4Address | None:
    """net.ParseIP(value).To4() in a v4 stack: IPv4, or IPv4-mapped IPv6; None otherwise."""
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return ip.ipv4_mapped
    return ip


async def _read_addrs(ipr: Any, family: int) -> tuple[_Addr, ...]:
    addrs: list[_Addr] = []
    async for msg in await ipr.addr("dump", family=family):
        # IFA_LOCAL is the address itself; IFA_ADDRESS is the peer on point-to-point links.
        text = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
        if not text:
            continue
        # IFA_FLAGS carries the full 32-bit flags; the header byte only the low eight.
        flags = msg.get_attr("IFA_FLAGS")
        addrs.append(
            _Addr(
                index=int(msg["index"]),
                ip=ipaddress.ip_address(str(text).split("%")[0]),
                flags=int(flags if flags is not None else msg["flags"]),
            )
        )
    return tuple(addrs)


async def _read_snapshot(ipr: Any) -> _Snapshot:
    links: list[_Link] = []
    async for msg in await ipr.link("dump"):
        links.append(
            _Link(
                index=int(msg["index"]),
                name=str(msg.get_attr("IFLA_IFNAME") or ""),
                mtu=int(msg.get_attr("IFLA_MTU") or 0),
            )
        )
    links.sort(key=lambda link: link.index)
    addrs = await _read_addrs(ipr, socket.AF_INET)
    return _Snapshot(tuple(links), addrs, await _read_addrs(ipr, socket.AF_INET6))


async def _default_route_link(ipr: Any, snap: _Snapshot, v6: bool = False) -> _Link:
    """GetDefaultGatewayInterface (or GetDefaultV6GatewayInterface): the first default route
    of the main table."""
    log.info("Determining IP address of default interface")
    async for route in await ipr.route("dump", family=socket.AF_INET6 if v6 else socket.AF_INET):
        table = route.get_attr("RTA_TABLE") or route["table"]
        if int(table) != RT_TABLE_MAIN or int(route["flags"]) & RTM_F_CLONED:
            continue
        if int(route["dst_len"]) != 0:
            continue
        oif = route.get_attr("RTA_OIF")
        if not oif:
            # Multipath and blackhole defaults have no single interface; flanneld gives up too.
            raise _NotFound(
                "failed to get default interface: "
                "found default route but could not determine interface"
            )
        try:
            return snap.by_index(int(oif))
        except _NotFound as exc:
            raise _NotFound(f"failed to get default interface: {exc}") from None
    raise _NotFound("failed to get default interface: unable to find default route")


async def _route_get(
    ipr: Any, snap: _Snapshot, target: str, v6: bool = False
) -> tuple[_Link, ipaddress.IPv4Address | None]:
    """GetInterfaceBySpecificIPRouting: `ip route get <target>`'s device and source (the
    source only for an IPv4 target)."""
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = _as_ipv4(target)
    if v6:
        ip = ipaddress.IPv6Address(target) if _looks_like_ip(target) and ":" in target else None
    if ip is None:
        raise _NotFound(
            f"failed to get ifcanreach based interface: {target!r} is not an "
            f"{'IPv6' if v6 else 'IPv4'} address"
        )
    try:
        routes = await ipr.route("get", dst=str(ip))
    except NetlinkError as exc:
        raise _NotFound(
            f"failed to get ifcanreach based interface: couldn't lookup route to {ip}: "
            f"{exc.args[-1] if exc.args else exc}"
        ) from None
    for route in routes:
        try:
            link = snap.by_index(int(route.get_attr("RTA_OIF") or 0))
        except _NotFound as exc:
            raise _NotFound(f"failed to get ifcanreach based interface: {exc}") from None
        src = route.get_attr("RTA_PREFSRC")
        return link, ipaddress.IPv4Address(str(src)) if src and not v6 else None
    raise _NotFound("failed to get ifcanreach based interface: no route found")


def _regex_match(
    snap: _Snapshot, pattern: str, dual: bool = False, v4: bool = True
) -> tuple[_Link, ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    """Addresses first (in dual stack an IPv4 and an IPv6 one of the same interface; IPv6-only
    (not v4) an IPv6 one), then interface names."""
    regex = re.compile(pattern)
    for link in snap.links:
        if not v4:
            for ip6 in snap.usable_addrs6(link):
                if regex.search(str(ip6)):
                    return link, None, ip6
            continue
        for ip in snap.usable_addrs(link):
            if not regex.search(str(ip)):
                continue
            if not dual:
                return link, ip, None
            for ip6 in snap.usable_addrs6(link):
                if regex.search(str(ip6)):
                    return link, ip, ip6
    for link in snap.links:
        if regex.search(link.name):
            return link, None, None
    usable = snap.usable_addrs if v4 else snap.usable_addrs6
    available = ", ".join(
        f"{link.name}:[{' '.join(str(ip) for ip in usable(link))}]" for link in snap.links
    )
    raise _NotFound(
        f"Could not match pattern {pattern} to any of the available network interfaces "
        f"({available})"
    )


async def _lookup(
    ipr: Any,
    snap: _Snapshot,
    public: tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None],
    *,
    dual: bool = False,
    v4: bool = True,
    name: str = "",
    regex: str = "",
    can_reach: str = "",
) -> ExternalInterface:
    """ipmatch.LookupExtIface for an IPv4 stack, a dual stack (dual), or IPv6 only (dual and
    not v4): exactly one selector, or none for the default."""
    public_ip, public_ipv6 = public
    addr: ipaddress.IPv4Address | None = None
    addr6: ipaddress.IPv6Address | None = None
    if not v4:
        link, addr6 = await _lookup6(ipr, snap, name=name, regex=regex, can_reach=can_reach)
    elif name:
        ip = _as_ipv4(name)
        if ip is not None:
            log.info("Searching for interface using %s", ip)
            link = snap.owner_of(ip)
            addr = ip
        elif dual and _looks_like_ip(name):
            log.info("Searching for interface using %s", name)
            addr6 = ipaddress.IPv6Address(name)
            link = snap.owner_of6(addr6)
        elif _looks_like_ip(name):
            raise _NotFound(f"no interface with IP {name} found (IPv6 needs EnableIPv6)")
        else:
            link = snap.by_name(name)
        if dual and _looks_like_ip(name) and public_ipv6 is not None and addr6 is None:
            v6_link = snap.owner_of6(public_ipv6)
            if v6_link.index != link.index:
                raise _NotFound(
                    f"v6 interface {v6_link.name} must be the same with v4 interface {link.name}"
                )
            addr6 = public_ipv6
    elif regex:
        link, addr, addr6 = _regex_match(snap, regex, dual)
    elif can_reach:
        log.info("Determining interface to use based on given ifcanreach: %s", can_reach)
        link, addr = await _route_get(ipr, snap, can_reach)
    else:
        link = await _default_route_link(ipr, snap)
        if dual:
            v6_link = await _default_route_link(ipr, snap, v6=True)
            if v6_link.index != link.index:
                raise _NotFound(
                    f"v6 default route interface {v6_link.name} must be the same with v4 "
                    f"default route interface {link.name}"
                )

    if addr is None and v4:
        usable = snap.usable_addrs(link)
        if not usable:
            raise _NotFound(f"failed to find IPv4 address for interface {link.name}")
        addr = usable[0]
    if dual and addr6 is None:
        usable6 = snap.usable_addrs6(link)
        if not usable6:
            raise _NotFound(f"failed to find IPv6 address for interface {link.name}")
        addr6 = usable6[0]
    if addr is not None:
        log.info("Using interface with name %s and address %s", link.name, addr)
    if addr6 is not None:
        log.info("Using interface with name %s and v6 address %s", link.name, addr6)

    if link.mtu == 0:
        raise _NotFound(f"failed to determine MTU for {addr or addr6} interface")

    ext: ipaddress.IPv4Address | None = None
    if public_ip is not None:
        log.info("Using %s as external address", public_ip)
        ext = public_ip
    else:
        if v4:
            log.info("Defaulting external address to interface address (%s)", addr)
        ext = addr
    ext6 = None
    if dual:
        ext6 = public_ipv6 or addr6
        log.info("Using %s as external IPv6 address", ext6)
    return ExternalInterface(
        name=link.name,
        index=link.index,
        mtu=link.mtu,
        iface_addr=addr,
        ext_addr=ext,
        iface_v6_addr=addr6,
        ext_v6_addr=ext6,
    )


async def _lookup6(
    ipr: Any, snap: _Snapshot, *, name: str, regex: str, can_reach: str
) -> tuple[_Link, ipaddress.IPv6Address | None]:
    """LookupExtIface's ipv6Stack selectors: the interface, and the address when the selector
    names one."""
    if name:
        if not _looks_like_ip(name):
            return snap.by_name(name), None
        if ":" not in name:
            raise _NotFound(f"no interface with IP {name} found (EnableIPv4 is false)")
        log.info("Searching for interface using %s", name)
        addr6 = ipaddress.IPv6Address(name)
        return snap.owner_of6(addr6), addr6
    if regex:
        link, _, matched = _regex_match(snap, regex, v4=False)
        return link, matched
    if can_reach:
        log.info("Determining interface to use based on given ifcanreach: %s", can_reach)
        link, _ = await _route_get(ipr, snap, can_reach, v6=True)
        return link, None
    return await _default_route_link(ipr, snap, v6=True), None


def _looks_like_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _parse_public_ips(
    opts: AgentOptions, ipv6: bool
) -> tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None]:
    public_ip = public_ipv6 = None
    if opts.public_ip:
        try:
            public_ip = ipaddress.IPv4Address(opts.public_ip)
        except ValueError:
            raise InterfaceError(f"invalid public IP address: {opts.public_ip}") from None
    if opts.public_ipv6:
        if not ipv6:
            log.warning("--public-ipv6 %s is ignored: EnableIPv6 is not set", opts.public_ipv6)
        else:
            try:
                public_ipv6 = ipaddress.IPv6Address(opts.public_ipv6)
            except ValueError:
                raise InterfaceError(f"invalid public IPv6 address: {opts.public_ipv6}") from None
    return public_ip, public_ipv6


async def _select(
    ipr: Any,
    opts: AgentOptions,
    public: tuple[ipaddress.IPv4Address | None, ipaddress.IPv6Address | None],
    dual: bool,
    v4: bool = True,
) -> ExternalInterface:
    snap = await _read_snapshot(ipr)

    if not (opts.iface or opts.iface_regex or opts.iface_can_reach):
        # With --public-ip (else --public-ipv6), flanneld looks the IP up exactly like an
        # --iface IP value.
        by_ip = public[0] or public[1]
        try:
            return await _lookup(ipr, snap, public, dual=dual, v4=v4, name=str(by_ip or ""))
        except _NotFound as exc:
            raise InterfaceError(f"{NO_DEFAULT_MATCH}: {exc}") from None

    tried: list[str] = []
    attempts: Sequence[tuple[str, dict[str, str]]] = [
        *((f"--iface={v}", {"name": v}) for v in opts.iface),
        *((f"--iface-regex={v}", {"regex": v}) for v in opts.iface_regex),
        *(
            [(f"--iface-can-reach={opts.iface_can_reach}", {"can_reach": opts.iface_can_reach})]
            if opts.iface_can_reach
            else []
        ),
    ]
    for label, selector in attempts:
        try:
            return await _lookup(ipr, snap, public, dual=dual, v4=v4, **selector)
        except (_NotFound, re.error) as exc:
            log.info("Could not find valid interface matching %s: %s", label, exc)
            tried.append(f"{label}: {exc}")
    raise InterfaceError(f"{NO_OPTION_MATCH} (tried {'; '.join(tried)})")


async def find_external_interface(
    opts: AgentOptions, *, ipv4: bool = True, ipv6: bool = False
) -> ExternalInterface:
    """Pick the interface and addresses flanneld would pick for the network's stack (EnableIPv4,
    EnableIPv6: IPv6-only when ipv4 is false); raises InterfaceError."""
    public = _parse_public_ips(opts, ipv6)
    try:
        async with AsyncIPRoute() as ipr:
            found = await _select(ipr, opts, public, ipv6, ipv4)
    except (NetlinkError, OSError) as exc:
        raise InterfaceError(f"reading interfaces and routes over netlink failed: {exc}") from exc
    log.info(
        "Using interface %s (index %d, mtu %d), address %s, public IP %s%s",
        found.name,
        found.index,
        found.mtu,
        found.iface_addr,
        found.ext_addr,
        f", public IPv6 {found.ext_v6_addr}" if found.ext_v6_addr else "",
    )
    return found
