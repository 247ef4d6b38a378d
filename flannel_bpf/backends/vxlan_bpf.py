"""The BPF fast path under a kernel vxlan network: loading it and mapping peers to fb_remotes.

flannel.<VNI> stays exactly as flanneld sets it up (it is the fallback for anything the programs
pass on, and the receiver for vxlan.ko peers); the programs only take over encapsulation and
decapsulation of the traffic they recognise. See flannel_bpf/loader.py for the life cycle.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..bpf_maps import DatapathConfig
from ..iface import ExternalInterface
from ..loader import (
    BPFDatapath,
    Device,
    LoaderError,
    default_ttl,
    local_port_range,
    pin_dir_for,
)
from .base import BackendError

log = logging.getLogger(__name__)


def datapath_config(
    iface: ExternalInterface, vni: int, port: int, uplink_mac: str, vtep: Device
) -> DatapathConfig:
    low, high = local_port_range()
    return DatapathConfig(
        local_ip=iface.ext_addr,
        vni=vni,
        port=port,
        uplink_ifindex=iface.index,
        uplink_mac=uplink_mac,
        vtep_ifindex=vtep.index,
        vtep_mac=vtep.mac,
        sport_min=low,
        sport_max=high,
        ttl=default_ttl(),
    )


async def load_bpf_datapath(
    iface: ExternalInterface,
    vtep: Device,
    *,
    vni: int,
    port: int,
    gbp: bool,
    bpffs: Path,
    decap_mode: str,
) -> BPFDatapath:
    """Compile, load and attach (in a thread: compiling takes about a second)."""
    if gbp:
        raise LoaderError("GBP is set: the BPF programs do not speak the group policy extension")
    uplink_mac = await asyncio.to_thread(_mac_of, iface.index)
    datapath = BPFDatapath(
        vtep=vtep,
        uplink=Device(iface.name, iface.index, uplink_mac),
        config=datapath_config(iface, vni, port, uplink_mac, vtep),
        pin_dir=pin_dir_for(vtep.name, bpffs),
        bpffs_root=bpffs,
        decap_mode=decap_mode,
    )
    try:
        state = await asyncio.to_thread(datapath.load)
    except OSError as exc:
        raise LoaderError(str(exc)) from None
    for what in state.replaced:
        log.info("replaced the running BPF program on %s in place", what)
    return datapath


def _mac_of(index: int) -> str:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        links = ipr.link("get", index=index)
    mac = links[0].get_attr("IFLA_ADDRESS") if links else None
    if not mac:
        raise BackendError(f"interface {index} has no MAC address")
    return str(mac).lower()
