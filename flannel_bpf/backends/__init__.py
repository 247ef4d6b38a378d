"""Backends: one module each, behind the small interface in base.py (flannel's pkg/backend)."""

from __future__ import annotations

from flannel_bpf.backends.alloc import AllocBackend
from flannel_bpf.backends.base import Backend, BackendError, ExternalContext, Network
from flannel_bpf.backends.hostgw import HostGWBackend
from flannel_bpf.backends.udp import UDPBackend
from flannel_bpf.backends.vxlan import VXLANBackend

# Types flanneld knows; those not built here fail with a clear message rather than "unknown".
FLANNELD_BACKEND_TYPES = (
    "vxlan",
    "udp",
    "host-gw",
    "ipip",
    "ipsec",
    "wireguard",
    "alloc",
    "extension",
    "tencent-vpc",
)

BACKENDS: dict[str, type[Backend]] = {
    AllocBackend.type: AllocBackend,
    HostGWBackend.type: HostGWBackend,
    UDPBackend.type: UDPBackend,
    VXLANBackend.type: VXLANBackend,
}


def make_backend(backend_type: str, ctx: ExternalContext) -> Backend:
    cls = BACKENDS.get(backend_type)
    if cls is None:
        if backend_type in FLANNELD_BACKEND_TYPES:
            raise BackendError(
                f"backend type {backend_type!r} is not available in this flannel-bpf build "
                f"(available: {', '.join(sorted(BACKENDS))})"
            )
        raise BackendError(f"unknown backend type: {backend_type}")
    return cls(ctx)


__all__ = ["BACKENDS", "Backend", "BackendError", "ExternalContext", "Network", "make_backend"]
