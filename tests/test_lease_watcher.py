"""LeaseWatcher: watch events into backend events (pure logic)."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network

from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEventType
from flannel_bpf.subnet.watcher import LeaseWatcher

OWN = IPv4Network("10.5.1.0/24")
PEER = IPv4Network("10.5.2.0/24")


def lease(public_ip: str, hours: int = 24) -> Lease:
    return Lease(
        subnet=PEER,
        attrs=LeaseAttrs(public_ip=IPv4Address(public_ip), backend_type="vxlan"),
        expiration=time.time() + hours * 3600,
    )


def test_a_renewal_reprograms_nothing_but_is_remembered() -> None:
    watcher = LeaseWatcher(OWN)
    first = lease("198.18.0.2")
    assert [e.type for e in watcher.added(first)] == [LeaseEventType.ADDED]
    renewed = lease("198.18.0.2", hours=48)
    assert watcher.added(renewed) == []
    assert watcher.known[PEER] is renewed
    # A real change still goes through, and a removal reports what was last known.
    moved = lease("198.18.0.3")
    assert [e.lease for e in watcher.added(moved)] == [moved]
    assert [e.lease for e in watcher.removed(PEER)] == [moved]
