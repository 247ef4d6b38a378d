"""Turns lease snapshots and watch events into add/remove events for a backend.

Pure logic (flanneld's pkg/lease LeaseWatcher), kept apart from etcd so it can be tested alone:
snapshots are diffed against what is known, our own subnet is never reported, removals carry the
last-known attributes so a backend can delete exactly what it programmed. Leases are told apart
by Lease.identity (the IPv4 subnet, or an IPv6-only lease's IPv6 subnet).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from ipaddress import IPv4Network, IPv6Network

from flannel_bpf.subnet.lease import Lease, LeaseEvent, LeaseEventType

log = logging.getLogger(__name__)

ADDED = LeaseEventType.ADDED
REMOVED = LeaseEventType.REMOVED


class LeaseWatcher:
    def __init__(
        self,
        own_subnet: IPv4Network | IPv6Network,
        accepts: Callable[[Lease], bool] = lambda lease: True,
    ) -> None:
        self.own_subnet = own_subnet
        self._accepts = accepts
        # Every peer lease we know, including those the backend does not accept, so that a
        # lease changing backend type turns into a removal of what was programmed for it.
        self.known: dict[IPv4Network | IPv6Network, Lease] = {}

    def reset(self, snapshot: Iterable[Lease]) -> list[LeaseEvent]:
        """A full listing: Added for new or changed leases, Removed for those gone."""
        fresh = {lease.identity: lease for lease in snapshot if lease.identity != self.own_subnet}
        events: list[LeaseEvent] = []
        for subnet, gone in self.known.items():
            if subnet not in fresh:
                events.extend(self._removed(gone))
        for subnet, lease in fresh.items():
            old = self.known.get(subnet)
            if old is None or old.attrs != lease.attrs or old.ipv6_subnet != lease.ipv6_subnet:
                events.extend(self._changed(old, lease))
        self.known = fresh
        return events

    def added(self, lease: Lease) -> list[LeaseEvent]:
        """A PUT: a new lease, a renewal (same attributes) or changed attributes."""
        if lease.identity == self.own_subnet:
            return []
        old = self.known.get(lease.identity)
        self.known[lease.identity] = lease
        if old is not None and old.attrs == lease.attrs and old.ipv6_subnet == lease.ipv6_subnet:
            # A renewal: the data path already holds exactly this. flanneld re-emits Added here,
            # which rewrites three kernel entries and a map entry per peer every renewal.
            return []
        return self._changed(old, lease)

    def removed(self, subnet: IPv4Network | IPv6Network) -> list[LeaseEvent]:
        """A DELETE (by hand or by TTL expiry): report the lease as we last knew it."""
        if subnet == self.own_subnet:
            return []
        old = self.known.pop(subnet, None)
        if old is None:
            log.debug("removal of unknown lease %s ignored", subnet)
            return []
        return self._removed(old)

    def _changed(self, old: Lease | None, lease: Lease) -> list[LeaseEvent]:
        events: list[LeaseEvent] = []
        if old is not None and self._accepts(old) and not self._accepts(lease):
            events.append(LeaseEvent(REMOVED, old))
        if self._accepts(lease):
            events.append(LeaseEvent(ADDED, lease))
        else:
            log.debug(
                "ignoring lease %s of backend type %r", lease.subnet, lease.attrs.backend_type
            )
        return events

    def _removed(self, old: Lease) -> list[LeaseEvent]:
        return [LeaseEvent(REMOVED, old)] if self._accepts(old) else []
