"""host-gw: one kernel route per peer, via the peer's PublicIP (flannel-compat.md section 5.3).

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
from ipaddress import IPv4Address, IPv4Network
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

    dst: IPv4Network
    gw: IPv4Address
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


async def _main_routes(ipr: Any) -> list[Route]:
    """The main table's IPv4 unicast routes with a destination and a gateway."""
    routes: list[Route] = []
    async for msg in await ipr.route("dump", family=socket.AF_INET):
        table = msg.get_attr("RTA_TABLE") or msg["table"]
        if int(table) != RT_TABLE_MAIN or int(msg["flags"]) & RTM_F_CLONED:
            continue
        dst = msg.get_attr("RTA_DST")
        gw = msg.get_attr("RTA_GATEWAY")
        if not dst or not gw:
            continue
        routes.append(
            Route(
                IPv4Network(f"{dst}/{msg['dst_len']}"),
                IPv4Address(str(gw)),
                int(msg.get_attr("RTA_OIF") or 0),
            )
        )
    return routes


class HostGWNetwork(Network):
    """Our lease plus the per-peer routes; a background task restores routes that vanish."""

    def __init__(
        self, lease: Lease, link_index: int, mtu: int, *, check_interval: float = CHECK_INTERVAL
    ) -> None:
        self.lease = lease
        self.mtu = mtu
        self.link_index = link_index
        self.check_interval = check_interval
        self.routes: dict[IPv4Network, Route] = {}
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
        return len(self.routes)

    async def close(self) -> None:
        task, self._checker = self._checker, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def route_for(self, lease: Lease) -> Route:
        return Route(lease.subnet, lease.attrs.public_ip, self.link_index)

    async def apply(self, events: list[LeaseEvent]) -> None:
        async with AsyncIPRoute() as ipr:
            # One dump per batch instead of flanneld's per-peer filtered listing.
            existing: dict[IPv4Network, list[Route]] = {}
            for route in await _main_routes(ipr):
                existing.setdefault(route.dst, []).append(route)
            for event in events:
                lease = event.lease
                if lease.subnet == self.lease.subnet:
                    continue
                route = self.route_for(lease)
                if event.type is LeaseEventType.ADDED:
                    log.info("Subnet added: %s via %s", lease.subnet, lease.attrs.public_ip)
                    await self._add(ipr, route, existing)
                else:
                    log.info("Subnet removed: %s", lease.subnet)
                    self.routes.pop(route.dst, None)
                    try:
                        await ipr.route("del", **route.spec())
                    except NetlinkError as exc:
                        if exc.code not in (errno.ESRCH, errno.ENOENT):
                            log.error("Error deleting route to %s: %s", lease.subnet, exc)
                    existing.pop(route.dst, None)

    async def _add(self, ipr: Any, route: Route, existing: dict[IPv4Network, list[Route]]) -> None:
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
            present = set(await _main_routes(ipr))
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
        lease = await self.acquire(LeaseAttrs(public_ip=iface.ext_addr, backend_type=BACKEND_TYPE))
        network = HostGWNetwork(lease, iface.index, iface.mtu)
        network.start()
        return network
