"""What `flannel-bpf leases`, `peers` and `stats` show: etcd's leases and the pinned BPF maps.

None of them needs a running agent: leases read etcd with the agent's flags, peers and stats read
the pins, which outlive the agent. Each returns a JSON-ready document whose shape is stable and
versioned by its "schema" field (docs/cli.md); the text output is derived from the same document.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

from flannel_bpf.cli.flags import AgentOptions
from flannel_bpf.datapath.bpf_maps import (
    FB_REMOTE_IPV6_UNDERLAY,
    FB_REMOTE_SKIP,
    LayoutMismatch,
    NextHop,
    PinnedMaps,
    Remote,
)
from flannel_bpf.subnet.etcd.manager import EtcdManager
from flannel_bpf.subnet.etcd.store import EtcdSettings, EtcdStore, StoreError
from flannel_bpf.subnet.lease import LeaseAttrs, LeaseFormatError, parse_subnet_key

LEASES_SCHEMA = "flannel-bpf/leases/v1"
PEERS_SCHEMA = "flannel-bpf/peers/v1"
STATS_SCHEMA = "flannel-bpf/stats/v1"


class InspectionError(Exception):
    """What is missing, for the operator (exit status 1)."""


# --------------------------------------------------------------------------------------------
# leases


async def leases_document(opts: AgentOptions, now: float | None = None) -> dict[str, Any]:
    """Every entry under <prefix>/subnets/: valid leases, and the entries no agent would use."""
    try:
        async with EtcdStore(EtcdSettings.from_options(opts)) as store:
            manager = EtcdManager(store, opts.etcd_prefix)  # flanneld's prefix normalisation
            prefix, subnets_prefix = manager.prefix, manager.subnets_prefix
            kvs, revision = await store.list_prefix(subnets_prefix)
            ids = sorted({kv.lease_id for kv in kvs if kv.lease_id})
            ttls = dict(zip(ids, await asyncio.gather(*map(store.time_to_live, ids)), strict=True))
    except StoreError as exc:
        raise InspectionError(str(exc)) from None
    now = time.time() if now is None else now
    leases: list[dict[str, Any]] = []
    invalid: list[dict[str, str]] = []
    for kv in kvs:
        try:
            key = parse_subnet_key(kv.key[len(subnets_prefix) :])
            attrs = LeaseAttrs.from_json(kv.value)
        except LeaseFormatError as exc:
            invalid.append({"key": kv.key, "error": str(exc)})
            continue
        ttl = ttls.get(kv.lease_id)
        leases.append(
            {
                "subnet": str(key.ipv4),
                "ipv6_subnet": str(key.ipv6) if key.ipv6 else None,
                "public_ip": str(attrs.public_ip),
                "public_ipv6": str(attrs.public_ipv6) if attrs.public_ipv6 else None,
                "backend_type": attrs.backend_type,
                "backend_data": _backend_data(attrs),
                "reservation": kv.lease_id == 0,
                "lease_id": f"{kv.lease_id:x}" if kv.lease_id else None,
                "expiration": now + ttl if ttl is not None and ttl >= 0 else None,
                "ttl_seconds": ttl if ttl is not None and ttl >= 0 else None,
                "mod_revision": kv.mod_revision,
            }
        )
    return {
        "schema": LEASES_SCHEMA,
        "prefix": prefix,
        "endpoints": list(opts.etcd_endpoints),
        "revision": revision,
        "leases": leases,
        "invalid": invalid,
    }


def _backend_data(attrs: LeaseAttrs) -> Any:
    try:
        return attrs.backend_json()
    except ValueError:
        return attrs.backend_data.decode(errors="replace")


def format_leases(doc: dict[str, Any]) -> str:
    rows = [("SUBNET", "PUBLIC IP", "BACKEND", "EXPIRES", "VTEP MAC")]
    for lease in doc["leases"]:
        data = lease["backend_data"]
        mac = data.get("VtepMAC", "") if isinstance(data, dict) else ""
        if lease["reservation"]:
            expires = "reservation"
        else:
            expires = _duration(lease["ttl_seconds"]) if lease["ttl_seconds"] is not None else "?"
        rows.append((lease["subnet"], lease["public_ip"], lease["backend_type"], expires, mac))
    lines = _table(rows)
    lines.append(
        f"{len(doc['leases'])} leases under {doc['prefix']}/subnets/ at revision {doc['revision']}"
    )
    for entry in doc["invalid"]:
        lines.append(f"invalid: {entry['key']}: {entry['error']}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


# --------------------------------------------------------------------------------------------
# pinned maps: peers and stats


@dataclass(frozen=True)
class Instance:
    """One agent instance's pins: <bpffs>/<netns>/<device>/v<layout>."""

    pin_dir: Path

    @property
    def device(self) -> str:
        return self.pin_dir.parent.name


def find_instances(pin_dir: str | None, bpffs: Path, status_file: Path) -> list[Instance]:
    """--pin-dir if given; else every instance pinned for this network namespace."""
    from flannel_bpf.datapath.loader import instance_dirs

    if pin_dir:
        return [Instance(Path(pin_dir))]
    found = [Instance(d) for d in instance_dirs(bpffs)]
    if not found:
        raise InspectionError(
            f"no BPF data path is pinned under {bpffs} for this network namespace (the agent "
            f"runs another data path, or has not started; its status file is {status_file})"
        )
    return found


def _open(instance: Instance) -> PinnedMaps:
    try:
        return PinnedMaps(instance.pin_dir)
    except FileNotFoundError:
        raise InspectionError(f"{instance.pin_dir}: no pinned maps there") from None
    except (OSError, LayoutMismatch) as exc:
        raise InspectionError(f"{instance.pin_dir}: {exc}") from None


def peers_document(instances: list[Instance]) -> dict[str, Any]:
    """fb_remotes of each instance: peer subnet -> VTEP, like `cilium bpf tunnel list`."""
    out = []
    for instance in instances:
        with _open(instance) as maps:
            remotes = sorted(maps.remotes(), key=lambda r: (r.subnet.version, r.subnet))
            nexthops = maps.nexthops()
        out.append(
            {
                "pin_dir": str(instance.pin_dir),
                "device": instance.device,
                "remotes": [_peer_row(r, nexthops) for r in remotes],
            }
        )
    return {"schema": PEERS_SCHEMA, "instances": out}


def _peer_row(
    r: Remote, nexthops: dict[IPv4Address | IPv6Address, list[NextHop]]
) -> dict[str, Any]:
    """One fb_remotes(6) entry. A peer reached over the IPv6 underlay (no IPv4 VTEP) shows its
    PublicIPv6 as the VTEP address; public_ipv6 is any IPv6 subnet's sender address."""
    vtep = r.vtep_address
    flags = [
        name
        for bit, name in ((FB_REMOTE_SKIP, "skip"), (FB_REMOTE_IPV6_UNDERLAY, "ipv6-underlay"))
        if r.flags & bit
    ]
    return {
        "subnet": str(r.subnet),
        "vtep_ip": str(vtep),
        "vtep_mac": r.vtep_mac,
        **({"public_ipv6": str(r.vtep_ip6)} if r.vtep_ip6 is not None else {}),
        "flags": flags,
        # as cached by the CPUs that sent to it lately (fb_nexthops, fb_nexthops6)
        "next_hops": sorted({hop.dmac for hop in nexthops.get(vtep, [])}),
    }


def format_peers(doc: dict[str, Any]) -> str:
    lines: list[str] = []
    for instance in doc["instances"]:
        lines.append(f"{instance['device']} ({instance['pin_dir']}):")
        rows = [("SUBNET", "VTEP IP", "VTEP MAC", "FLAGS", "NEXT HOP MAC")]
        for r in instance["remotes"]:
            rows.append(
                (
                    r["subnet"],
                    r["vtep_ip"],
                    r["vtep_mac"],
                    ",".join(r["flags"]) or "-",
                    ",".join(r["next_hops"]) or "-",
                )
            )
        lines += ["  " + line for line in _table(rows)]
        lines.append(f"  {len(instance['remotes'])} remotes")
    return "\n".join(lines)


def stats_document(instances: list[Instance]) -> dict[str, Any]:
    """Every (hook, reason) counter of each instance, zeros included, summed over CPUs."""
    out = []
    for instance in instances:
        with _open(instance) as maps:
            counters = maps.counters()
            map_id = maps.stats_map_id
        out.append(
            {
                "pin_dir": str(instance.pin_dir),
                "device": instance.device,
                "stats_map_id": map_id,
                "counters": [
                    {
                        "hook": key.hook.label,
                        "reason": key.reason.label,
                        "code": int(key.reason),
                        "outcome": key.reason.outcome,
                        "packets": packets,
                        "bytes": bytes_,
                    }
                    for key, (packets, bytes_) in counters.items()
                ],
            }
        )
    return {"schema": STATS_SCHEMA, "instances": out}


def format_stats(doc: dict[str, Any], show_zero: bool = False) -> str:
    lines: list[str] = []
    for instance in doc["instances"]:
        lines.append(
            f"{instance['device']} ({instance['pin_dir']}, map id {instance['stats_map_id']}):"
        )
        rows = [("HOOK", "REASON", "CODE", "OUTCOME", "PACKETS", "BYTES")]
        for c in instance["counters"]:
            if c["packets"] or show_zero:
                rows.append(
                    (c["hook"], c["reason"], str(c["code"]), c["outcome"], str(c["packets"]),
                     str(c["bytes"]))
                )  # fmt: skip
        lines += ["  " + line for line in _table(rows)]
    return "\n".join(lines)
