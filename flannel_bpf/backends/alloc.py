"""alloc: acquire a subnet and nothing else (flanneld's pkg/backend/alloc)."""

from __future__ import annotations

from flannel_bpf.backends.base import Backend, Network
from flannel_bpf.subnet.lease import Lease, LeaseAttrs


class AllocNetwork(Network):
    datapath = "none"

    def __init__(self, lease: Lease, mtu: int) -> None:
        self.lease = lease
        self.mtu = mtu

    @property
    def wants_peers(self) -> bool:
        return False


class AllocBackend(Backend):
    type = "alloc"
    datapaths = ("kernel", "userspace", "bpf")  # there is no data path to choose

    async def register_network(self) -> Network:
        # flanneld's alloc writes PublicIP only: no BackendType, no BackendData.
        lease = await self.acquire(LeaseAttrs(public_ip=self.ctx.iface.public_ip))
        return AllocNetwork(lease, self.ctx.iface.mtu)
