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


def test_ipv6_only_leases_are_told_apart_by_their_ipv6_subnet() -> None:
    """IPv6-only leases all have 0.0.0.0/0 as IPv4 part (flanneld's empty IP4Net): each is
    its own peer, ours is never reported, and one going takes only itself along."""
    from ipaddress import IPv6Network

    def v6_only(subnet6: str) -> Lease:
        return Lease(
            subnet=IPv4Network("0.0.0.0/0"),
            ipv6_subnet=IPv6Network(subnet6),
            attrs=LeaseAttrs(public_ip=IPv4Address(0), backend_type="vxlan"),
        )

    own, a, b = (v6_only(f"fd10:244:0:{i}::/64") for i in (1, 2, 3))
    watcher = LeaseWatcher(own.identity)
    assert [e.lease for e in watcher.reset([own, a, b])] == [a, b]
    assert [e.lease for e in watcher.removed(b.identity)] == [b]
    assert list(watcher.known) == [a.identity]
