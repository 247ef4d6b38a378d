"""The interface every backend implements, modelled on flannel's Backend and Network."""

from __future__ import annotations

import abc
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, ClassVar

from flannel_bpf.cli.flags import AgentOptions
from flannel_bpf.datapath.iface import ExternalInterface
from flannel_bpf.subnet.config import NetworkConfig
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent
from flannel_bpf.subnet.manager import Manager
from flannel_bpf.subnet.subnet_env import PreviousSubnets


class BackendError(Exception):
    """A backend cannot be built or set up; the message is for the operator."""


@dataclass(frozen=True)
class ExternalContext:
    """What every backend gets: the uplink, the flags, and the subnet manager (any store)."""

    iface: ExternalInterface
    options: AgentOptions
    manager: Manager
    config: NetworkConfig
    previous: PreviousSubnets


class Network(abc.ABC):
    """A registered network: our lease plus the data path that serves it."""

    lease: Lease
    mtu: int
    # What carries the packets ("bpf", "kernel", "userspace", "none") and, when that is not the
    # first choice, why: shown in the log, `flannel-bpf status` and `flannel-bpf lab status`.
    datapath: str = "kernel"
    fallbacks: tuple[str, ...] = ()

    def datapath_status(self) -> dict[str, Any]:
        """Data path details for the status file (e.g. BPF pins and hooks)."""
        return {}

    def programmed_peers(self) -> int | None:
        """Peers the data path holds entries for (None: it keeps none); for the metrics."""
        return None

    def plane_counters(self) -> dict[str, int] | None:
        """A userspace plane's packet counters (None: the kernel forwards); for the metrics."""
        return None

    def accepts(self, lease: Lease) -> bool:
        """Whether a peer's lease is one this data path can reach (flanneld: same type)."""
        return True

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """What the data path keeps doing while the agent runs (run as tasks beside the lease
        watch), e.g. host routing's check for new pods."""
        return []

    @property
    def wants_peers(self) -> bool:
        """False for backends with no per-peer state (alloc): no lease watch is run."""
        return True

    async def apply(self, events: list[LeaseEvent]) -> None:  # noqa: B027 - optional hook
        """Program a batch of peer changes; must be idempotent (renewals re-send Added)."""

    async def apply_snapshot(self, events: list[LeaseEvent]) -> None:
        """The first batch after start: every peer lease there is, as Added (maybe none).

        Data paths whose state outlives the agent (pinned BPF maps) reconcile against it here.
        """
        await self.apply(events)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work. The data path itself stays in place (flanneld leaves it)."""


class Backend(abc.ABC):
    type: ClassVar[str]
    # The --datapath values this backend can honour besides "auto".
    datapaths: ClassVar[tuple[str, ...]] = ("kernel",)

    def __init__(self, ctx: ExternalContext) -> None:
        self.ctx = ctx

    @abc.abstractmethod
    async def register_network(self) -> Network:
        """Acquire the lease and build the data path for it."""

    async def acquire(self, attrs: LeaseAttrs) -> Lease:
        ctx = self.ctx
        return await ctx.manager.acquire_lease(
            ctx.config, attrs, ctx.previous.subnet, ctx.previous.ipv6_subnet
        )
