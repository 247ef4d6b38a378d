"""The etcd subnet manager: flanneld's etcd subnet manager (registry.go and local_manager.go).

Reads the network config, acquires this host's lease, renews it, watches our own key for
revocation and every other host's lease for changes. Exactly flanneld's protocol on the wire
(flannel-compat.md sections 1 and 3); where flanneld is fragile, this one is sturdier:
- a lost creation race is retried with a fresh pick instead of exiting;
- a malformed key or value under subnets/ is logged once and skipped, never turning into a
  removal of every other peer;
- a reservation (a key with no etcd lease) stays a reservation when its owner starts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network

from flannel_bpf.subnet.config import ConfigError, NetworkConfig, parse_network_config
from flannel_bpf.subnet.etcd.store import (
    EtcdStore,
    KeyValue,
    StoreError,
    StoreUnavailable,
    WatchCompacted,
)
from flannel_bpf.subnet.lease import (
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseEventType,
    LeaseFormatError,
    make_subnet_key,
    parse_subnet_key,
)
from flannel_bpf.subnet.manager import Backoff, LeaseRevoked, OutOfSubnets, WatchStats
from flannel_bpf.subnet.watcher import LeaseWatcher

log = logging.getLogger(__name__)

LEASE_TTL = 24 * 3600
RENEW_RETRY_SECONDS = 60.0
MAX_FREE_CANDIDATES = 100
CREATE_RACE_RETRIES = 10
# Far larger than any lease flanneld writes; a bigger value is somebody else's data.
MAX_LEASE_VALUE_BYTES = 64 * 1024


class ConfigNotFound(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(
            f"flannel config not found in etcd store at {key}. "
            "Did you create your config using etcdv3 API?"
        )


@dataclass
class EtcdManager:
    store: EtcdStore
    prefix: str = "/coreos.com/network"
    rng: random.Random = field(default_factory=random.Random)
    clock: Callable[[], float] = time.time
    stats: WatchStats = field(default_factory=WatchStats)
    _warned: set[tuple[str, int]] = field(default_factory=set)
    # The start-up listing (see prefetch_leases): read once, used by the first acquire and then
    # by the first watch snapshot.
    _prefetch: asyncio.Task[tuple[list[Lease], int]] | None = field(default=None, repr=False)
    _startup_listing: tuple[list[Lease], int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # Go's path.Join drops trailing slashes, so "/x/" and "/x" are the same prefix.
        self.prefix = "/" + self.prefix.strip("/") if self.prefix.strip("/") else ""

    @property
    def config_key(self) -> str:
        return f"{self.prefix}/config"

    @property
    def subnets_prefix(self) -> str:
        # With the slash: flanneld lists "<prefix>/subnets" and so also sees "subnetsX/..." keys,
        # which are not leases.
        return f"{self.prefix}/subnets/"

    def lease_key(self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None = None) -> str:
        return self.subnets_prefix + make_subnet_key(subnet, ipv6_subnet)

    # -- config ------------------------------------------------------------------------------

    async def get_network_config(self) -> NetworkConfig:
        """Raises ConfigNotFound, ConfigError or StoreError."""
        kv, _ = await self.store.get(self.config_key)
        if kv is None:
            raise ConfigNotFound(self.config_key)
        return parse_network_config(kv.value)

    async def wait_for_network_config(self, poll_interval: float = 1.0) -> NetworkConfig:
        """Poll until a valid config exists, like flanneld; each new problem is logged once.

        An IPv6-only network (EnableIPv4 false) is not valid here: etcd leases are keyed and
        allocated by their IPv4 subnet, and flanneld's etcd mode cannot run one either (every
        such lease is 0.0.0.0-0&..., PublicIP 0.0.0.0). Kubernetes mode can."""
        last_problem = ""
        while True:
            try:
                config = await self.get_network_config()
                if not config.enable_ipv4:
                    raise ConfigError(
                        "EnableIPv4 is false: IPv6-only networks need --kube-subnet-mgr "
                        "(etcd leases are keyed by their IPv4 subnet, as flanneld's)"
                    )
            except (ConfigNotFound, ConfigError, StoreError) as exc:
                problem = f"Couldn't fetch network config: {exc}"
                if problem != last_problem:
                    log.warning("%s (retrying every %gs)", problem, poll_interval)
                    last_problem = problem
                await asyncio.sleep(poll_interval)
                continue
            if last_problem:
                log.info("network config at %s is now valid", self.config_key)
            return config

    # -- reading leases ----------------------------------------------------------------------

    def parse_lease(self, kv: KeyValue) -> Lease | None:
        """A lease from a key under subnets/, or None (warned about once per revision)."""
        name = kv.key[len(self.subnets_prefix) :]
        try:
            if not kv.key.startswith(self.subnets_prefix):
                raise LeaseFormatError("not under the subnets prefix")
            if len(kv.value) > MAX_LEASE_VALUE_BYTES:
                raise LeaseFormatError(f"value of {len(kv.value)} bytes is too large for a lease")
            key = parse_subnet_key(name)
            attrs = LeaseAttrs.from_json(kv.value)
        except LeaseFormatError as exc:
            self._skip(kv, str(exc))
            return None
        return Lease(
            subnet=key.ipv4,
            ipv6_subnet=key.ipv6,
            attrs=attrs,
            lease_id=kv.lease_id,
            mod_revision=kv.mod_revision,
        )

    def _skip(self, kv: KeyValue, reason: str) -> None:
        self.stats.skipped_entries += 1
        marker = (kv.key, kv.mod_revision)
        if marker not in self._warned:
            self._warned.add(marker)
            log.warning("ignoring bad subnet entry %s: %s", kv.key, reason)

    async def list_leases(self, with_expiration: bool = False) -> tuple[list[Lease], int]:
        """Every parseable lease in key order, and the revision of the listing.

        Expiration costs one request per lease, so only callers that show it ask for it; the
        data path needs only keys and attributes (5,000 peers must not mean 5,000 round trips).
        """
        kvs, revision = await self.store.list_prefix(self.subnets_prefix)
        leases = [lease for kv in kvs if (lease := self.parse_lease(kv)) is not None]
        if with_expiration:
            leases = list(await asyncio.gather(*(self._with_expiration(x) for x in leases)))
        return leases, revision

    def prefetch_leases(self) -> None:
        """Start listing the leases now, in the background, while the interface and backend
        are set up. acquire_lease takes this listing for its first attempt and hands it on to
        the first watch snapshot, so at start-up thousands of leases are read and parsed once,
        not twice, and not while the data path waits for them."""
        if self._prefetch is None and self._startup_listing is None:
            self._prefetch = asyncio.create_task(self.list_leases(), name="prefetch-leases")

    def drop_startup_listing(self) -> None:
        """For an agent that will not watch peers: nothing is left holding the listing."""
        task, self._prefetch, self._startup_listing = self._prefetch, None, None
        if task is not None:
            task.cancel()
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: a failed prefetch is not worth a warning

    async def _first_listing(self) -> tuple[list[Lease], int]:
        """The prefetched listing when there is one (kept for the first watch), else a fresh
        one. A prefetch that failed is simply redone, with its error reported as usual."""
        task, self._prefetch = self._prefetch, None
        if task is not None:
            try:
                listing = await task
            except StoreError as exc:
                log.debug("prefetched lease listing failed (%s); listing again", exc)
            else:
                self._startup_listing = listing
                return listing
        return await self.list_leases()

    async def _with_expiration(self, lease: Lease) -> Lease:
        if lease.lease_id == 0:
            return lease
        ttl = await self.store.time_to_live(lease.lease_id)
        return _replace_expiration(lease, self.clock() + ttl if ttl >= 0 else self.clock() - 1)

    # -- acquiring ---------------------------------------------------------------------------

    async def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous_subnet: IPv4Network | None = None,
        previous_ipv6_subnet: IPv6Network | None = None,
    ) -> Lease:
        """flanneld's order: reuse by PublicIP, then subnet.env's subnet, then a random pick."""
        for attempt in range(1, CREATE_RACE_RETRIES + 1):
            # The first listing may be the prefetched one, then also the first watch snapshot:
            # the removal of an incompatible lease of ours below shows there too, as it should.
            leases, _ = await (self._first_listing() if attempt == 1 else self.list_leases())

            mine = next((x for x in leases if x.attrs.public_ip == attrs.public_ip), None)
            if mine is not None:
                if _is_compatible(config, mine.subnet, mine.ipv6_subnet):
                    log.info(
                        "Found lease (ip: %s ipv6: %s) for current IP (%s), reusing",
                        mine.subnet,
                        mine.ipv6_subnet,
                        attrs.public_ip,
                    )
                    # A reservation keeps having no TTL; anything else gets a fresh 24 h.
                    return await self._put_lease(
                        mine.subnet, mine.ipv6_subnet, attrs, keep_reservation=mine.lease_id == 0
                    )
                log.info(
                    "Found lease (ip: %s ipv6: %s) for current IP (%s) but not compatible with "
                    "current config, deleting",
                    mine.subnet,
                    mine.ipv6_subnet,
                    attrs.public_ip,
                )
                await self.store.delete(self.lease_key(mine.subnet, mine.ipv6_subnet))
                leases.remove(mine)

            if previous_subnet is not None:
                lease = await self._try_previous(
                    config, attrs, leases, previous_subnet, previous_ipv6_subnet
                )
                if lease is not None:
                    return lease
                if any(x.subnet == previous_subnet for x in leases):
                    previous_subnet = None  # taken by someone else: do not try it again

            subnet, ipv6_subnet = self.pick_free_subnet(config, leases)
            lease = await self._create_lease(subnet, ipv6_subnet, attrs)
            if lease is not None:
                log.info(
                    "Allocated lease (ip: %s ipv6: %s) to current node (%s)",
                    subnet,
                    ipv6_subnet,
                    attrs.public_ip,
                )
                return lease
            log.warning(
                "subnet %s was taken by another host at the same moment; picking again "
                "(attempt %d of %d)",
                subnet,
                attempt,
                CREATE_RACE_RETRIES,
            )
            await asyncio.sleep(self.rng.uniform(0.01, 0.1) * attempt)
        raise StoreError(f"lost the race for a free subnet {CREATE_RACE_RETRIES} times in a row")

    async def _try_previous(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        leases: list[Lease],
        subnet: IPv4Network,
        ipv6_subnet: IPv6Network | None,
    ) -> Lease | None:
        if not config.enable_ipv6:
            ipv6_subnet = None
        if not _is_compatible(config, subnet, ipv6_subnet):
            log.error(
                "Found previously leased subnet (%s) in subnet file, but it is not compatible "
                "with the current config; ignoring it",
                subnet,
            )
            return None
        if any(x.subnet == subnet for x in leases):
            log.info("previously leased subnet %s is now held by another host", subnet)
            return None
        lease = await self._create_lease(subnet, ipv6_subnet, attrs)
        if lease is not None:
            log.info("Found previously leased subnet (%s), reusing", subnet)
        return lease

    def pick_free_subnet(
        self, config: NetworkConfig, leases: list[Lease]
    ) -> tuple[IPv4Network, IPv6Network | None]:
        """A uniformly random pick among the first 100 free subnets, as flanneld does."""
        log.info("Picking subnet in range %s ... %s", config.subnet_min, config.subnet_max)
        assert config.subnet_min is not None and config.subnet_max is not None
        free_v4 = free_subnets(
            int(config.subnet_min),
            int(config.subnet_max),
            config.subnet_len,
            32,
            [x.subnet for x in leases],
        )
        if not free_v4:
            raise OutOfSubnets(config)
        subnet = IPv4Network((self.rng.choice(free_v4), config.subnet_len))
        ipv6_subnet = None
        if config.enable_ipv6:
            assert config.ipv6_subnet_min is not None and config.ipv6_subnet_max is not None
            free_v6 = free_subnets(
                int(config.ipv6_subnet_min),
                int(config.ipv6_subnet_max),
                config.ipv6_subnet_len,
                128,
                [x.ipv6_subnet for x in leases if x.ipv6_subnet is not None],
            )
            if not free_v6:
                raise OutOfSubnets(config)
            ipv6_subnet = IPv6Network((self.rng.choice(free_v6), config.ipv6_subnet_len))
        return subnet, ipv6_subnet

    async def _create_lease(
        self, subnet: IPv4Network, ipv6_subnet: IPv6Network | None, attrs: LeaseAttrs
    ) -> Lease | None:
        """The create-if-absent transaction; None when another host holds the key."""
        lease_id, ttl = await self.store.grant(LEASE_TTL)
        key = self.lease_key(subnet, ipv6_subnet)
        try:
            created = await self.store.create(key, attrs.to_json(), lease_id)
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        if not created:
            await self._revoke_quietly(lease_id)
            return None
        return Lease(subnet, attrs, ipv6_subnet, self.clock() + ttl, lease_id)

    async def _put_lease(
        self,
        subnet: IPv4Network,
        ipv6_subnet: IPv6Network | None,
        attrs: LeaseAttrs,
        keep_reservation: bool = False,
    ) -> Lease:
        """flanneld's updateSubnet: a fresh etcd lease and an unconditional Put."""
        key = self.lease_key(subnet, ipv6_subnet)
        if keep_reservation:
            await self.store.put(key, attrs.to_json())
            return Lease(subnet, attrs, ipv6_subnet, None, 0)
        lease_id, ttl = await self.store.grant(LEASE_TTL)
        try:
            await self.store.put(key, attrs.to_json(), lease_id)
        except BaseException:
            await self._revoke_quietly(lease_id)
            raise
        return Lease(subnet, attrs, ipv6_subnet, self.clock() + ttl, lease_id)

    async def _revoke_quietly(self, lease_id: int) -> None:
        try:
            await self.store.revoke(lease_id)
        except StoreError as exc:
            # The lease has no key and expires by itself; nothing is lost.
            log.debug("could not revoke unused etcd lease %x: %s", lease_id, exc)

    async def public_ip_override(self, v6: bool = False) -> str:
        """etcd keeps no per-host public IP besides the leases themselves."""
        return ""

    async def stored_vtep_mac(self, v6: bool = False) -> str:
        """Nothing: a lease that ends with its host's restart is not read back (flanneld's
        LocalManager returns "" too); peers follow the new lease's VtepMAC."""
        return ""

    async def complete_lease(self, lease: Lease) -> None:
        """Nothing to announce in etcd once ready: the lease is the announcement."""

    async def renew_lease(self, lease: Lease) -> Lease:
        renewed = await self._put_lease(lease.subnet, lease.ipv6_subnet, lease.attrs)
        log.info("Lease renewed, new expiration: %s", _format_time(renewed.expiration))
        return renewed

    # -- keeping our own lease ---------------------------------------------------------------

    async def keep_lease(
        self,
        lease: Lease,
        renew_margin: float,
        on_change: Callable[[Lease], None] = lambda lease: None,
    ) -> None:
        """Renew at expiry minus the margin (retry every minute) and watch our own key.

        Returns never; raises LeaseRevoked when the key is deleted.
        """
        state = _OwnLease(lease)
        renewer = asyncio.create_task(self._renew_loop(state, renew_margin, on_change))
        watcher = asyncio.create_task(self._watch_own(state, on_change))
        try:
            done, _ = await asyncio.wait({renewer, watcher}, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            raise AssertionError("lease keeper tasks ended without an error")
        finally:
            for task in (renewer, watcher):
                task.cancel()
            await asyncio.gather(renewer, watcher, return_exceptions=True)

    async def _renew_loop(
        self, state: _OwnLease, margin: float, on_change: Callable[[Lease], None]
    ) -> None:
        while True:
            expiration = state.lease.expiration
            if expiration is None:
                await state.changed.wait()  # a reservation: nothing to renew until it changes
                state.changed.clear()
                continue
            delay = expiration - margin - self.clock()
            if delay > 0:
                state.changed.clear()
                try:
                    await asyncio.wait_for(state.changed.wait(), timeout=delay)
                    continue  # expiration moved (our own renewal seen, or someone else's put)
                except TimeoutError:
                    pass
            try:
                state.lease = await self.renew_lease(state.lease)
                self.stats.renewals += 1
                on_change(state.lease)
            except StoreError as exc:
                self.stats.renewal_errors += 1
                log.error("Error renewing lease (trying again in 1 min): %s", exc)
                await asyncio.sleep(RENEW_RETRY_SECONDS)

    async def _watch_own(self, state: _OwnLease, on_change: Callable[[Lease], None]) -> None:
        key = self.lease_key(state.lease.subnet, state.lease.ipv6_subnet)
        backoff = Backoff()
        revision: int | None = None
        while True:
            try:
                if revision is None:
                    kv, revision = await self.store.get(key)
                    if kv is None:
                        raise LeaseRevoked()
                    await self._own_put(state, kv, on_change)
                async for batch in self.store.watch(key, revision + 1, prefix=False):
                    if batch.created:
                        if backoff.current:
                            log.info("own lease watch re-established from revision %d", revision)
                        backoff.reset()
                        continue
                    for event in batch.events:
                        if event.type == "delete":
                            raise LeaseRevoked()
                        await self._own_put(state, event.kv, on_change)
                    revision = batch.revision
            except WatchCompacted as exc:
                self.stats.compactions += 1
                log.warning("own lease watch fell behind etcd compaction (%s); re-reading", exc)
                revision = None
            except StoreError as exc:
                self.stats.watch_restarts += 1
                delay = backoff.next_delay()
                log.warning("own lease watch interrupted (%s); resuming in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    async def _own_put(
        self, state: _OwnLease, kv: KeyValue, on_change: Callable[[Lease], None]
    ) -> None:
        lease = self.parse_lease(kv)
        if lease is None:
            return
        if lease.attrs != state.lease.attrs:
            log.warning(
                "our lease %s was changed in etcd: public ip %s, backend %s (was %s, %s)",
                lease.subnet,
                lease.attrs.public_ip,
                lease.attrs.backend_type or "-",
                state.lease.attrs.public_ip,
                state.lease.attrs.backend_type or "-",
            )
        expiration: float | None = None
        if kv.lease_id:
            try:
                ttl = await self.store.time_to_live(kv.lease_id)
            except StoreUnavailable:
                ttl = int((state.lease.expiration or self.clock()) - self.clock())
            expiration = self.clock() + ttl if ttl >= 0 else self.clock() - 1
        state.lease = Lease(
            lease.subnet,
            lease.attrs,
            lease.ipv6_subnet,
            expiration,
            kv.lease_id,
            kv.mod_revision,
        )
        state.changed.set()
        on_change(state.lease)

    # -- watching everyone else --------------------------------------------------------------

    async def watch_leases(
        self,
        own_subnet: IPv4Network | IPv6Network,
        accepts: Callable[[Lease], bool] = lambda lease: True,
    ) -> AsyncIterator[list[LeaseEvent]]:
        """Peer events forever: a snapshot first (always yielded, even empty), then changes.

        Survives any etcd trouble: reconnects with backoff from the last revision seen, and
        re-lists and diffs when that revision was compacted away.
        """
        watcher = LeaseWatcher(own_subnet, accepts)
        backoff = Backoff()
        revision: int | None = None
        while True:
            try:
                if revision is None:
                    # Whatever changed since the start-up listing, the watch from its revision
                    # on delivers, our own lease's creation included.
                    listing, self._startup_listing = self._startup_listing, None
                    leases, revision = listing or await self.list_leases()
                    self.stats.snapshots += 1
                    self.stats.revision = revision
                    events = watcher.reset(leases)
                    self._count(events)
                    yield events
                async for batch in self.store.watch(self.subnets_prefix, revision + 1, prefix=True):
                    if batch.created:
                        if backoff.current:
                            log.info("lease watch re-established from revision %d", revision)
                        backoff.reset()
                        continue
                    self.stats.revision = batch.revision
                    events = []
                    for event in batch.events:
                        events.extend(self._apply(watcher, event.type, event.kv))
                    revision = batch.revision
                    if events:
                        self._count(events)
                        yield events
            except WatchCompacted as exc:
                self.stats.compactions += 1
                log.warning("lease watch fell behind etcd compaction (%s); re-listing", exc)
                revision = None
            except StoreError as exc:
                self.stats.watch_restarts += 1
                delay = backoff.next_delay()
                log.warning("lease watch interrupted (%s); resuming in %.1fs", exc, delay)
                await asyncio.sleep(delay)

    def _apply(self, watcher: LeaseWatcher, kind: str, kv: KeyValue) -> list[LeaseEvent]:
        if kind == "delete":
            name = kv.key[len(self.subnets_prefix) :]
            try:
                subnet = parse_subnet_key(name).ipv4
            except LeaseFormatError:
                return []  # a foreign key went away; it was never a peer
            return watcher.removed(subnet)
        lease = self.parse_lease(kv)
        return [] if lease is None else watcher.added(lease)

    def _count(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if event.type is LeaseEventType.ADDED:
                self.stats.events_added += 1
            else:
                self.stats.events_removed += 1


@dataclass
class _OwnLease:
    lease: Lease
    changed: asyncio.Event = field(default_factory=asyncio.Event)


def free_subnets(
    first: int, last: int, prefixlen: int, bits: int, taken: list[IPv4Network] | list[IPv6Network]
) -> list[int]:
    """The first free aligned subnets from first to last, skipping any that overlap taken.

    A sweep over the sorted taken ranges rather than a check of every lease per candidate, so
    5,000 leases cost milliseconds, not seconds.
    """
    size = 1 << (bits - prefixlen)
    ranges = sorted((int(n.network_address), int(n.broadcast_address)) for n in taken)
    free: list[int] = []
    candidate, i = first, 0
    while candidate <= last and len(free) < MAX_FREE_CANDIDATES:
        end = candidate + size - 1
        while i < len(ranges) and ranges[i][1] < candidate:
            i += 1
        past = 0
        for start, stop in ranges[i:]:
            if start > end:
                break
            past = max(past, stop + 1)
        if past > candidate:
            candidate += -(-(past - candidate) // size) * size
            continue
        free.append(candidate)
        candidate += size
    return free


def _is_compatible(
    config: NetworkConfig, subnet: IPv4Network, ipv6_subnet: IPv6Network | None
) -> bool:
    return config.is_compatible_v4(subnet) and config.is_compatible_v6(ipv6_subnet)


def _replace_expiration(lease: Lease, expiration: float | None) -> Lease:
    return Lease(
        lease.subnet,
        lease.attrs,
        lease.ipv6_subnet,
        expiration,
        lease.lease_id,
        lease.mod_revision,
    )


def _format_time(timestamp: float | None) -> str:
    if timestamp is None:
        return "never (reservation)"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


__all__ = [
    "ConfigNotFound",
    "EtcdManager",
    "LeaseRevoked",
    "OutOfSubnets",
    "free_subnets",
]
