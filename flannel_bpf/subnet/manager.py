"""The subnet manager interface: flanneld's subnet.Manager (pkg/subnet/subnet.go).

One interface, one implementation per store: etcd (subnet/etcd/, flanneld's default) and the
Kubernetes API (--kube-subnet-mgr). The agent and the backends depend on this module only; which
store is behind it is the agent's choice at start-up. Data flows one way: the manager hands out
our lease and streams peer lease events, the agent feeds them to the backend, the backend to the
data path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network
from typing import Protocol

from flannel_bpf.subnet.config import NetworkConfig
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent


class ManagerError(Exception):
    """A store failure the agent cannot work around; the message is for the operator."""


class ManagerUnavailable(Exception):
    """The store did not answer (etcd, or the Kubernetes API): worth retrying later."""


class Manager(Protocol):
    """What a subnet manager does for the agent, in the order the agent asks."""

    # Where leases live, for logs and the status file (etcd: the key prefix).
    prefix: str
    stats: WatchStats

    async def wait_for_network_config(self) -> NetworkConfig:
        """The network config, waited for (logged) until it exists and parses."""

    def prefetch_leases(self) -> None:
        """Start reading every lease while the interface and backend are set up (optional)."""

    def drop_startup_listing(self) -> None:
        """Forget a prefetched listing nobody took."""

    async def public_ip_override(self, v6: bool = False) -> str:
        """A public IP (v6: IPv6) the store holds for this host (kube: node-public-ip,
        node-public-ipv6), else ""."""

    async def stored_vtep_mac(self, v6: bool = False) -> str:
        """The VtepMAC the store remembers for this host's flannel.<VNI> (v6: flannel-v6's;
        kube: our backend-data / backend-v6-data), else ""."""

    async def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous_subnet: IPv4Network | None = None,
        previous_ipv6_subnet: IPv6Network | None = None,
    ) -> Lease:
        """This host's lease, with the backend's attributes published for the peers."""

    async def complete_lease(self, lease: Lease) -> None:
        """Once the subnet file is written (kube: NetworkUnavailable=False on our Node)."""

    async def keep_lease(
        self,
        lease: Lease,
        renew_margin: float,
        on_change: Callable[[Lease], None] = ...,
    ) -> None:
        """Renew and watch our own lease forever; raises LeaseRevoked when it is taken away."""

    def watch_leases(
        self, own_subnet: IPv4Network | IPv6Network, accepts: Callable[[Lease], bool] = ...
    ) -> AsyncIterator[list[LeaseEvent]]:
        """Peer lease events forever: a snapshot first (even empty), then changes. own_subnet
        is our lease's identity (Lease.identity)."""


class OutOfSubnets(Exception):
    def __init__(self, config: NetworkConfig) -> None:
        super().__init__(
            f"out of subnets: every /{config.subnet_len} from {config.subnet_min} to "
            f"{config.subnet_max} is leased"
        )


class LeaseRevoked(Exception):
    """Our own lease key was deleted: flanneld's signal to shut down cleanly."""


@dataclass
class Backoff:
    """Exponential backoff, flanneld's watch timing: 100 ms doubling up to 5 s."""

    initial: float = 0.1
    maximum: float = 5.0
    current: float = 0.0

    def next_delay(self) -> float:
        self.current = self.initial if self.current == 0 else min(self.current * 2, self.maximum)
        return self.current

    def reset(self) -> None:
        self.current = 0.0


@dataclass
class WatchStats:
    """Counters the metrics endpoint exposes; plain integers, no metrics library in here."""

    snapshots: int = 0
    watch_restarts: int = 0
    compactions: int = 0
    skipped_entries: int = 0
    events_added: int = 0
    events_removed: int = 0
    renewals: int = 0
    renewal_errors: int = 0
    revision: int = 0  # the last etcd revision the lease watch applied
