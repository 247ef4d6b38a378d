"""host-gw: one kernel route per peer, via the peer's PublicIP (flannel-compat.md section 5.3).
With IPv6 (EnableIPv6), a second one per peer: its IPv6 subnet via its PublicIPv6.

flanneld's pkg/backend/hostgw on top of route_network.go. :class:`HostGWNetwork` needs no lease
manager, so tests can drive it in a network namespace without etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.backends.base import Backend, BackendError, ExternalContext, Network
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

log = logging.getLogger(__name__)

BACKEND_TYPE = "host-gw"
RT_TABLE_MAIN = 254
RTM_F_CLONED = 0x200
# vishvananda/netlink's default, so `ip route` shows our routes exactly as flanneld's.
RTPROT_BOOT = 3
CHECK_INTERVAL = 10.0  # flanneld's routeCheckRetries loop period


@dataclass(frozen=True)
class Route:
    """flanneld compares routes on exactly these three fields (routeEqual)."""

    dst: IPv4Network | IPv6Network
    gw: IPv4Address | IPv6Address
    oif: int

    def spec(self) -> dict[str, Any]:
        return {
            "dst": str(self.dst),
            "gateway": str(self.gw),
            "oif": self.oif,
            "table": RT_TABLE_MAIN,
        }

    def __str__(self) -> str:
        return f"{self.dst} via {self.gw} dev index {self.oif}"


async def _main_routes(ipr: Any, family: int = socket.AF_INET) -> list[Route]:
    """The main table's unicast routes of a family with a destination and a gateway."""
    routes: list[Route] = []
    async for msg in await ipr.route("dump", family=family):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if int(table) != RT_TABLE_MAIN or int(msg["flags"]) & RTM_F_CLONED:
            continue
        dst = msg.get_attr("RTA_DST")
        gw = msg.get_attr("RTA_GATEWAY")
        if not dst or not gw:
            continue
        routes.append(
            Route(
                ip_network(f"{dst}/{msg['dst_len']}"),
                ip_address(str(gw)),
                int(msg.get_attr("RTA_OIF") or 0),
            )
        )
    return routes


class HostGWNetwork(Network):
    """Our lease plus the per-peer routes; a background task restores routes that vanish."""

    def __init__(
        self,
        lease: Lease,
        link_index: int,
        mtu: int,
        *,
        ipv6: bool = False,
        check_interval: float = CHECK_INTERVAL,
    ) -> None:
        self.lease = lease
        self.mtu = mtu
        self.link_index = link_index
        self.ipv6 = ipv6
        self.check_interval = check_interval
        self.routes: dict[IPv4Network | IPv6Network, Route] = {}
        self._checker: asyncio.Task[None] | None = None

    def accepts(self, lease: Lease) -> bool:
        if lease.attrs.backend_type != BACKEND_TYPE:
            log.debug("Ignoring non-host-gw subnet: type=%s", lease.attrs.backend_type)
            return False
        return True

    def start(self) -> None:
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_loop(), name="host-gw-route-check")

    def programmed_peers(self) -> int:
        """Peers with their IPv4 route (IPv6 routes are the same peers again); in an IPv6-only
        network (our lease's IPv4 subnet is 0.0.0.0/0, as flanneld's) with their IPv6 route."""
        version = 4 if self.lease.subnet.prefixlen else 6
        return sum(1 for dst in self.routes if dst.version == version)

    async def close(self) -> None:
        task, self._checker = self._checker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def routes_for(self, lease: Lease) -> list[Route]:
        """The peer's IPv4 route, and with IPv6 on both sides its IPv6 route (GetV6Route)."""
        v4 = Route(lease.subnet, lease.attrs.public_ip, self.link_index)
        routes = [v4] if lease.subnet.prefixlen else []
        v6, gw6 = lease.ipv6_subnet, lease.attrs.public_ipv6
        if self.ipv6 and v6 is not None and v6.prefixlen and gw6 is not None:
            routes.append(Route(v6, gw6, self.link_index))
        return routes

    async def _existing(self, ipr: Any) -> dict[IPv4Network | IPv6Network, list[Route]]:
        existing: dict[IPv4Network | IPv6Network, list[Route]] = {}
        families = (socket.AF_INET, socket.AF_INET6) if self.ipv6 else (socket.AF_INET,)
        for family in families:
            for route in await _main_routes(ipr, family):
                existing.setdefault(route.dst, []).append(route)
        return existing

    async def apply(self, events: list[LeaseEvent]) -> None:
        async with AsyncIPRoute() as ipr:
            # One dump per batch instead of flanneld's per-peer filtered listing.
            existing = await self._existing(ipr)
            for event in events:
                lease = event.lease
                if lease.key == self.lease.key:
                    continue
                for route in self.routes_for(lease):
                    if event.type is LeaseEventType.ADDED:
                        log.info("Subnet added: %s via %s", route.dst, route.gw)
                        await self._add(ipr, route, existing)
                        continue
                    log.info("Subnet removed: %s", route.dst)
                    self.routes.pop(route.dst, None)
                    try:
                        await ipr.route("del", **route.spec())
                    except NetlinkError as exc:
                        if exc.code not in (errno.ESRCH, errno.ENOENT):
                            log.error("Error deleting route to %s: %s", route.dst, exc)
                    existing.pop(route.dst, None)

    async def _add(
        self, ipr: Any, route: Route, existing: dict[IPv4Network | IPv6Network, list[Route]]
    ) -> None:
        self.routes[route.dst] = route
        present = existing.get(route.dst, [])
        for other in list(present):
            if other == route:
                continue
            log.warning("Replacing existing route to %s with %s", other, route)
            try:
                await ipr.route("del", **other.spec())
            except NetlinkError as exc:
                if exc.code not in (errno.ESRCH, errno.ENOENT):
                    log.error("Error deleting route to %s: %s", other.dst, exc)
                    return
            present.remove(other)
        if route in present:
            log.info("Route to %s already exists, skipping.", route)
            return
        try:
            await ipr.route("replace", proto=RTPROT_BOOT, **route.spec())
        except NetlinkError as exc:
            log.error("Error adding route to %s: %s", route, exc)
            return
        existing[route.dst] = [route]

    async def check_routes(self) -> None:
        """Re-add every remembered route that is missing from the main table."""
        if not self.routes:
            return
        async with AsyncIPRoute() as ipr:
            present = {route for routes in (await self._existing(ipr)).values() for route in routes}
            for route in list(self.routes.values()):
                if route in present:
                    continue
                try:
                    await ipr.route("replace", proto=RTPROT_BOOT, **route.spec())
                except NetlinkError as exc:
                    log.error("Error recovering route to %s: %s", route.dst, exc)
                else:
                    log.info("Route recovered %s : %s", route.dst, route.gw)

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                await self.check_routes()
            except (NetlinkError, OSError) as exc:
                # A failed round must not end the loop: the next one may well succeed.
                log.error("host-gw route check failed: %s", exc)


class HostGWBackend(Backend):
    type = BACKEND_TYPE

    def __init__(self, ctx: ExternalContext) -> None:
        if ctx.iface.ext_addr != ctx.iface.iface_addr:
            raise BackendError(
                "your PublicIP differs from interface IP, meaning that probably you're on a NAT, "
                "which is not supported by host-gw backend"
            )
        super().__init__(ctx)

    async def register_network(self) -> Network:
        iface = self.ctx.iface
        ipv6 = self.ctx.config.enable_ipv6
        attrs = LeaseAttrs(
            public_ip=iface.public_ip,
            public_ipv6=iface.ext_v6_addr if ipv6 else None,
            backend_type=BACKEND_TYPE,
        )
        lease = await self.acquire(attrs)
        network = HostGWNetwork(lease, iface.index, iface.mtu, ipv6=ipv6)
        network.start()
        return network
