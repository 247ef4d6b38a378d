"""The Kubernetes subnet manager: flanneld's --kube-subnet-mgr (pkg/subnet/kube/kube.go).

The network config is a file (the kube-flannel ConfigMap's net-conf.json). Our lease is our Node's
spec.podCIDR, which kube-controller-manager's node IPAM assigns; we publish the backend's
attributes as Node annotations, byte for byte as flanneld writes them, with one strategic merge
patch of nodes/NAME/status (the only write flanneld's RBAC allows). Peers are every other Node
with flannel's annotations, from a paged list and a watch resumed from its resourceVersion.

Where flanneld is fragile this one is sturdier, as the etcd manager is:
- a Node without a podCIDR yet is waited for with a log line, instead of exiting;
- a Node with missing or malformed annotations is skipped with one warning, never dropping others;
- our own annotations, edited or removed by someone else, are written back;
- a watch that breaks is resumed from its resourceVersion with backoff, a 410 Gone re-lists and
  diffs, so an API server restart costs no peer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Any, TypeVar

from flannel_bpf.subnet.config import ConfigError, NetworkConfig, parse_network_config
from flannel_bpf.subnet.kube.annotations import Annotations
from flannel_bpf.subnet.kube.client import (
    KubeClient,
    KubeError,
    KubeUnavailable,
    ResourceExpired,
    WatchEvent,
)
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType, compact_json
from flannel_bpf.subnet.manager import Backoff, ManagerError, WatchStats
from flannel_bpf.subnet.watcher import LeaseWatcher

log = logging.getLogger(__name__)
T = TypeVar("T")
Identity = IPv4Network | IPv6Network  # Lease.identity
NO_IPV4_SUBNET = IPv4Network("0.0.0.0/0")  # an IPv6-only lease's IPv4 part, as flanneld's

# How long one watch request may stay open (client-go's reflector: 5 to 10 minutes).
WATCH_SECONDS = 300
PODCIDR_POLL_SECONDS = 1.0
PODCIDR_REMINDER_SECONDS = 30.0
# What flanneld sets when it is up (kube.go CompleteLease).
NETWORK_UNAVAILABLE = "NetworkUnavailable"
CONDITION_REASON = "FlannelIsUp"
CONDITION_MESSAGE = "Flannel is running on this node"


class KubeManagerError(ManagerError):
    """A kube-mode failure the agent cannot work around; the message is for the operator."""


class NodeLeaseError(ValueError):
    """A Node's flannel annotations or podCIDR do not make a lease."""


def node_name_of(node: Mapping[str, Any]) -> str:
    return str((node.get("metadata") or {}).get("name") or "")


def _annotations(node: Mapping[str, Any]) -> dict[str, str]:
    found = (node.get("metadata") or {}).get("annotations") or {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def pod_cidrs(node: Mapping[str, Any]) -> list[str]:
    spec = node.get("spec") or {}
    cidrs = spec.get("podCIDRs") or []
    if isinstance(cidrs, list) and cidrs:
        return [str(c) for c in cidrs]
    single = spec.get("podCIDR")
    return [str(single)] if single else []


def own_cidrs(node: Mapping[str, Any]) -> tuple[IPv4Network | None, IPv6Network | None]:
    """Our lease: flanneld classes each entry of podCIDRs (or podCIDR alone) by family, a later
    entry of a family replacing an earlier one; more than two entries are an error."""
    cidrs = pod_cidrs(node)
    if len(cidrs) > 2:
        raise NodeLeaseError("pod cidrs should be IPv4/IPv6 only or dualstack")
    v4: IPv4Network | None = None
    v6: IPv6Network | None = None
    for net in _networks(node):
        if isinstance(net, IPv4Network):
            v4 = net
        else:
            v6 = net
    return v4, v6


def _raw_json(notes: Mapping[str, str], key: str) -> bytes:
    raw = notes.get(key, "")
    data = b"" if raw in ("", "null") else compact_json(raw.encode())
    if data:
        try:
            json.loads(data)
        except ValueError:
            raise NodeLeaseError(f"{key} is not JSON: {raw[:64]!r}") from None
    return data


def stored_public_ip(node: Mapping[str, Any], keys: Annotations, v6: bool = False) -> str:
    """Our Node's node-public-ip (v6: node-public-ipv6) annotation, "" when it has none."""
    return _annotations(node).get(keys.node_public_ipv6 if v6 else keys.node_public_ip, "")


def node_to_lease(
    node: Mapping[str, Any], keys: Annotations, ipv6: bool = False, ipv4: bool = True
) -> Lease | None:
    """A peer's lease from its Node (flanneld's nodeToLease): None when the Node is not
    flannel's (no kube-subnet-manager=true), NodeLeaseError when flannel's annotations or its
    podCIDR are unusable. ipv6 (EnableIPv6): the Node must also carry public-ipv6 and an IPv6
    podCIDR (flanneld drops it whole otherwise), and backend-v6-data is read. Without ipv4
    (IPv6-only), the IPv4 half is not read at all: subnet 0.0.0.0/0, PublicIP 0.0.0.0."""
    notes = _annotations(node)
    if notes.get(keys.subnet_kube_managed) != "true":
        return None
    if not ipv4:
        return _node_to_lease6(node, keys, notes, NO_IPV4_SUBNET, IPv4Address(0), b"")
    try:
        public_ip = IPv4Address(notes.get(keys.public_ip, ""))
    except ValueError:
        raise NodeLeaseError(
            f"invalid IP address format in {keys.public_ip}: {notes.get(keys.public_ip, '')[:64]!r}"
        ) from None
    # The first IPv4 entry, as flanneld: entries after it are not parsed.
    subnet = next((net for net in _networks(node) if isinstance(net, IPv4Network)), None)
    if subnet is None:
        raise NodeLeaseError("missing IPv4 address on n.Spec.PodCIDRs")
    data = _raw_json(notes, keys.backend_data)
    if not ipv6:
        backend_type = notes.get(keys.backend_type, "")
        attrs = LeaseAttrs(public_ip=public_ip, backend_type=backend_type, backend_data=data)
        return Lease(subnet=subnet, attrs=attrs)
    return _node_to_lease6(node, keys, notes, subnet, public_ip, data)


def _node_to_lease6(
    node: Mapping[str, Any],
    keys: Annotations,
    notes: Mapping[str, str],
    subnet: IPv4Network,
    public_ip: IPv4Address,
    data: bytes,
) -> Lease:
    """nodeToLease's IPv6 half, after the IPv4 one (subnet, public_ip, data) if any."""
    text6 = notes.get(keys.public_ipv6, "")
    try:
        public_ipv6 = IPv6Address(text6)
    except ValueError:
        raise NodeLeaseError(
            f"invalid IP address format in {keys.public_ipv6}: {text6[:64]!r}"
        ) from None
    subnet6 = next(
        (net for net in _networks(node) if isinstance(net, IPv6Network)), None
    )  # the first IPv6 entry, as flanneld
    if subnet6 is None:
        raise NodeLeaseError("missing IPv6 address on n.Spec.PodCIDRs")
    attrs = LeaseAttrs(
        public_ip=public_ip,
        public_ipv6=public_ipv6,
        backend_type=notes.get(keys.backend_type, ""),
        backend_data=data,
        backend_v6_data=_raw_json(notes, keys.backend_v6_data),
    )
    return Lease(subnet=subnet, attrs=attrs, ipv6_subnet=subnet6)


def _networks(node: Mapping[str, Any]) -> Iterator[IPv4Network | IPv6Network]:
    """The Node's podCIDRs (or podCIDR) parsed one by one, as far as the caller reads."""
    for text in pod_cidrs(node):
        try:
            yield ip_network(text, strict=False)
        except ValueError:
            raise NodeLeaseError(f"invalid CIDR address: {text[:64]}") from None


def wanted_annotations(
    attrs: LeaseAttrs, keys: Annotations, current: Mapping[str, str]
) -> dict[str, str]:
    """What flanneld writes for these attributes (kube.go AcquireLease): backend type and
    data (``null`` for none), public IP (the public-ip-overwrite annotation's value verbatim when
    one is set) and kube-subnet-manager=true. vxlan without IPv4 (no BackendData) writes neither
    backend-data nor public-ip, as flanneld; the other backends write them anyway (0.0.0.0)."""
    wanted = {keys.backend_type: attrs.backend_type, keys.subnet_kube_managed: "true"}
    if attrs.backend_type != "vxlan" or attrs.backend_data:
        overwrite = current.get(keys.public_ip_overwrite, "")
        data = attrs.backend_data.decode() if attrs.backend_data else "null"
        wanted[keys.backend_data] = data
        wanted[keys.public_ip] = overwrite or str(attrs.public_ip)
    # With IPv6: flanneld writes the v6 pair for vxlan when it has v6 backend data, and for
    # the other backends when there is a PublicIPv6.
    v6 = attrs.backend_v6_data if attrs.backend_type == "vxlan" else attrs.public_ipv6
    if attrs.public_ipv6 is not None and v6:
        overwrite6 = current.get(keys.public_ipv6_overwrite, "")
        data6 = attrs.backend_v6_data.decode() if attrs.backend_v6_data else "null"
        wanted[keys.backend_v6_data] = data6
        wanted[keys.public_ipv6] = overwrite6 or attrs.public_ipv6.compressed
    return wanted


def annotation_patch(changes: Mapping[str, str]) -> bytes:
    """The strategic merge patch Go's CreateTwoWayMergePatch makes for annotation changes:
    keys sorted, no spaces, <, > and & escaped as Go's encoder does."""
    body = json.dumps(
        {"metadata": {"annotations": dict(sorted(changes.items()))}},
        separators=(",", ":"),
        ensure_ascii=False,
    )
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        body = body.replace(char, escaped)
    body = body.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return body.encode()


def network_available_patch(now: datetime) -> bytes:
    """flanneld's CompleteLease body, byte for byte (times in UTC, to the second)."""
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    condition = {
        "type": NETWORK_UNAVAILABLE,
        "status": "False",
        "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp,
        "reason": CONDITION_REASON,
        "message": CONDITION_MESSAGE,
    }
    return (
        '{"status":{"conditions":' + json.dumps([condition], separators=(",", ":")) + "}}"
    ).encode()


@dataclass
class KubeManager:
    """The subnet.Manager of kube mode. One per agent: it knows our node by name."""

    client: KubeClient
    node_name: str
    keys: Annotations
    net_config_path: Path
    set_node_network_unavailable: bool = True
    stats: WatchStats = field(default_factory=WatchStats)
    clock: Callable[[], float] = time.time
    # Nodes whose annotations or podCIDR we warned about, with what was wrong: one warning each.
    _warned: dict[str, str] = field(default_factory=dict)
    _written: dict[str, str] = field(default_factory=dict)  # our annotations as last written
    # Our Node as read once at start: what flanneld reads back from it (a public IP, the VTEP
    # MAC), and the lease itself when the podCIDR is already there.
    _node_at_start: dict[str, Any] | None = field(default=None, init=False)
    prefix: str = field(default="", init=False)
    ipv6: bool = field(default=False, init=False)  # EnableIPv6 in net-conf.json
    ipv4: bool = field(default=True, init=False)  # EnableIPv4 in net-conf.json

    def __post_init__(self) -> None:
        self.prefix = self.keys.prefix  # where leases live, for logs and the status file

    # -- config ------------------------------------------------------------------------------

    async def wait_for_network_config(self) -> NetworkConfig:
        """net-conf.json (a ConfigMap's file): read once, as flanneld; an error is fatal."""
        try:
            data = await asyncio.to_thread(self.net_config_path.read_bytes)
        except OSError as exc:
            raise KubeManagerError(
                f"failed to read net conf: open {self.net_config_path}: {exc.strerror or exc}"
            ) from None
        try:
            config = parse_network_config(data)
        except ConfigError as exc:
            raise KubeManagerError(f"error parsing subnet config: {exc}") from None
        # Peers are read with the halves of the network's families from now on.
        self.ipv4, self.ipv6 = config.enable_ipv4, config.enable_ipv6
        return config

    def prefetch_leases(self) -> None:
        """Peers come from the node list of watch_leases."""

    def drop_startup_listing(self) -> None:
        """Nothing prefetched."""

    async def _own_node_at_start(self) -> Mapping[str, Any] | None:
        """Our Node, read once (None, logged, when it cannot be read: flanneld goes on then)."""
        if self._node_at_start is None:
            try:
                self._node_at_start = await self.client.get_node(self.node_name)
            except KubeError as exc:
                log.warning("Failed to get node for backend data: %s", exc)
                return None
        return self._node_at_start

    async def public_ip_override(self, v6: bool = False) -> str:
        """flanneld's GetStoredPublicIP: a node-public-ip annotation replaces --public-ip, and
        node-public-ipv6 replaces --public-ipv6."""
        node = await self._own_node_at_start()
        return stored_public_ip(node, self.keys, v6) if node else ""

    async def stored_vtep_mac(self, v6: bool = False) -> str:
        """flanneld's GetStoredMacAddresses: the VtepMAC our Node's backend-data (v6:
        backend-v6-data) annotation holds, so that a VXLAN device made anew (after a reboot)
        keeps the MAC every peer has programmed. Read under the configured prefix (flanneld
        reads PREFIX/backend-data, the wrong key for prefixes with a slash); anything but a JSON
        object with a string VtepMAC is ignored with a warning."""
        node = await self._own_node_at_start()
        key = self.keys.backend_v6_data if v6 else self.keys.backend_data
        raw = _annotations(node).get(key, "") if node else ""
        if raw in ("", "null"):
            return ""
        try:
            mac = json.loads(raw).get("VtepMAC", "")
        except (ValueError, AttributeError):
            mac = None
        if not isinstance(mac, str):
            log.warning("ignoring %s of node %s: %.64r holds no VtepMAC", key, self.node_name,
                        raw)  # fmt: skip
            return ""
        return mac

    # -- our lease ---------------------------------------------------------------------------

    async def acquire_lease(
        self,
        config: NetworkConfig,
        attrs: LeaseAttrs,
        previous_subnet: IPv4Network | None = None,
        previous_ipv6_subnet: IPv6Network | None = None,
    ) -> Lease:
        """Our Node's podCIDR (waited for), with our attributes published as annotations."""
        node = await self._node_with_pod_cidr()
        try:
            subnet, subnet6 = own_cidrs(node)
        except NodeLeaseError as exc:
            raise KubeManagerError(f"node {self.node_name!r}: {exc}") from None
        await self._annotate(node, attrs)
        if config.enable_ipv6:
            network6 = config.ipv6_network
            if subnet6 is None:
                raise KubeManagerError(
                    f"node {self.node_name!r} has no IPv6 pod CIDR ({', '.join(pod_cidrs(node))})"
                )
            if network6 is None or not (
                network6.prefixlen <= subnet6.prefixlen and subnet6.network_address in network6
            ):
                raise KubeManagerError(
                    f'subnet "{network6}" specified in the flannel net config doesn\'t contain '
                    f'"{subnet6}" IPv6 PodCIDR of the "{self.node_name}" node'
                )
        else:
            subnet6 = None
        if not config.enable_ipv4:
            subnet = NO_IPV4_SUBNET  # flanneld's empty IP4Net; its podCIDR, if any, unused
        elif subnet is None:
            raise KubeManagerError(
                f"node {self.node_name!r} has no IPv4 pod CIDR ({', '.join(pod_cidrs(node))})"
            )
        network = config.network
        if config.enable_ipv4 and (
            network is None
            or not (network.prefixlen <= subnet.prefixlen and subnet.network_address in network)
        ):
            raise KubeManagerError(
                f'subnet "{network}" specified in the flannel net config doesn\'t contain '
                f'"{subnet}" PodCIDR of the "{self.node_name}" node'
            )
        if previous_subnet is not None and previous_subnet != subnet:
            log.info(
                "podCIDR %s replaces the subnet %s of the subnet file", subnet, previous_subnet
            )
        log.info("Allocated lease (ip: %s ipv6: %s) to current node (%s) from its podCIDR",
                 subnet, subnet6, self.node_name)  # fmt: skip
        # No TTL in kube mode: the lease lives as long as the Node object.
        return Lease(subnet=subnet, attrs=attrs, ipv6_subnet=subnet6, expiration=None)

    async def _node_with_pod_cidr(self) -> Mapping[str, Any]:
        if self._node_at_start and pod_cidrs(self._node_at_start):
            return self._node_at_start  # read moments ago, for the public IP: not read again
        backoff = Backoff(initial=0.5, maximum=5.0)
        waiting_since = 0.0
        reminded = 0.0
        while True:
            try:
                node = await self.client.get_node(self.node_name)
            except KubeUnavailable as exc:
                delay = backoff.next_delay()
                log.warning("kube API unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            except KubeError as exc:
                if exc.status == 404:
                    node = {}
                else:
                    raise KubeManagerError(f"cannot read node {self.node_name!r}: {exc}") from None
            backoff.reset()
            if node and pod_cidrs(node):
                if waiting_since:
                    log.info(
                        "node %s got podCIDR %s after %.1f s",
                        self.node_name,
                        ",".join(pod_cidrs(node)),
                        time.monotonic() - waiting_since,
                    )
                return node
            now = time.monotonic()
            if not waiting_since:
                waiting_since = now
            if now - reminded >= PODCIDR_REMINDER_SECONDS:
                reminded = now
                if not node:
                    log.warning("node %s does not exist yet; waiting for it", self.node_name)
                else:
                    log.warning(
                        "waiting for node %s to get a podCIDR: the node IPAM controller assigns "
                        "it (kube-controller-manager --allocate-node-cidrs --cluster-cidr)",
                        self.node_name,
                    )
            await asyncio.sleep(PODCIDR_POLL_SECONDS)

    async def _annotate(self, node: Mapping[str, Any], attrs: LeaseAttrs) -> None:
        current = _annotations(node)
        wanted = wanted_annotations(attrs, self.keys, current)
        overwrite = current.get(self.keys.public_ip_overwrite, "")
        if overwrite and current.get(self.keys.public_ip) != overwrite:
            log.info(
                "Overriding public ip with '%s' from node annotation '%s'",
                overwrite,
                self.keys.public_ip_overwrite,
            )
        changes = {k: v for k, v in wanted.items() if current.get(k) != v}
        self._written = wanted
        if not changes:
            log.info("node %s already carries our annotations", self.node_name)
            return
        await self._patch(annotation_patch(changes), "annotations")
        log.info("annotated node %s: %s", self.node_name, ", ".join(sorted(changes)))

    async def _patch(self, body: bytes, what: str) -> None:
        """nodes/NAME/status, retried while the API is unreachable (flanneld: 30 s, then exit)."""
        backoff = Backoff(initial=0.5, maximum=5.0)
        while True:
            try:
                await self.client.patch_node_status(self.node_name, body)
                return
            except KubeUnavailable as exc:
                delay = backoff.next_delay()
                log.warning(
                    "patching %s of node %s: %s; retrying in %.1fs",
                    what,
                    self.node_name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            except KubeError as exc:
                raise KubeManagerError(
                    f"failed to patch node {self.node_name!r} ({what}): {exc}"
                ) from None

    async def complete_lease(self, lease: Lease) -> None:
        """Once ready: NetworkUnavailable=False on our Node (--set-node-network-unavailable)."""
        if not self.set_node_network_unavailable:
            return
        now = datetime.fromtimestamp(self.clock(), UTC)
        try:
            await self.client.patch_node_status(self.node_name, network_available_patch(now))
        except KubeError as exc:
            # flanneld logs this and carries on; the condition is only advisory for schedulers.
            log.error("CompleteLease execute error err: %s", exc)
            return
        log.info("node %s: condition NetworkUnavailable=False (FlannelIsUp)", self.node_name)

    async def keep_lease(
        self,
        lease: Lease,
        renew_margin: float,
        on_change: Callable[[Lease], None] = lambda lease: None,
    ) -> None:
        """Nothing to renew (no TTL); watch our own Node and write our annotations back when
        somebody else changes or removes them (flanneld only writes them at start)."""
        own = f"metadata.name={self.node_name}"
        async for items, event in self._list_and_watch(lambda node: node, own):
            for node in items:
                await self._reassert(node)
            if event is None:
                continue
            if event.type in ("ADDED", "MODIFIED"):
                await self._reassert(event.object)
            elif event.type == "DELETED":
                log.warning("our node %s was deleted; annotations are written again when it is "
                            "registered again", self.node_name)  # fmt: skip

    async def _reassert(self, node: Mapping[str, Any]) -> None:
        if not self._written:
            return
        current = _annotations(node)
        changes = {k: v for k, v in self._written.items() if current.get(k) != v}
        overwrite = current.get(self.keys.public_ip_overwrite, "")
        if overwrite:
            # public-ip-overwrite set (or changed) later: peers are to use it.
            changes.pop(self.keys.public_ip, None)
            if current.get(self.keys.public_ip) != overwrite:
                changes[self.keys.public_ip] = overwrite
                self._written[self.keys.public_ip] = overwrite
        if not changes:
            return
        log.warning(
            "annotations of node %s changed by someone else (%s); writing ours back",
            self.node_name,
            ", ".join(sorted(changes)),
        )
        try:
            await self.client.patch_node_status(self.node_name, annotation_patch(changes))
        except KubeError as exc:
            log.warning("could not write annotations of node %s back: %s", self.node_name, exc)

    # -- peers -------------------------------------------------------------------------------

    async def watch_leases(
        self,
        own_subnet: IPv4Network | IPv6Network,
        accepts: Callable[[Lease], bool] = lambda lease: True,
    ) -> AsyncIterator[list[LeaseEvent]]:
        """Peer events forever: a snapshot first (always, even empty), then changes. A broken
        watch resumes from its resourceVersion; 410 Gone re-lists and diffs."""
        watcher = LeaseWatcher(own_subnet, accepts)
        subnets: dict[str, Identity] = {}  # node name -> lease identity, for changes and deletes
        async for named, event in self._list_and_watch(self._named_lease):
            if event is None:  # a listing: the whole set of peers, diffed against the last
                subnets = {name: lease.identity for name, lease in named}
                self.stats.snapshots += 1
                events = watcher.reset([lease for _, lease in named])
            else:
                events = self._apply(watcher, subnets, event)
            if events or event is None:
                self._count(events)
                yield events

    def _named_lease(self, node: dict[str, Any]) -> tuple[str, Lease] | None:
        lease = self._lease_of(node)
        return None if lease is None else (node_name_of(node), lease)

    async def _list_and_watch(
        self, keep: Callable[[dict[str, Any]], T | None], field_selector: str = ""
    ) -> AsyncIterator[tuple[list[T], WatchEvent | None]]:
        """client-go's reflector for Nodes: (what keep made of every Node, None) after each
        listing, then ([], event) per watch event. The listing is paged and each page is turned
        by keep as it arrives, so 5,000 Node objects are never held at once. A watch resumes
        from the last resourceVersion seen, with backoff while the API server is away; 410 Gone
        lists again. Counted in stats for the peer watch (no field selector)."""
        peers = not field_selector
        backoff = Backoff()
        version = ""
        while True:
            try:
                if not version:
                    items, version = await self._list_nodes(keep, field_selector)
                    backoff.reset()
                    yield items, None
                async for event in self.client.watch_nodes(version, WATCH_SECONDS,
                                                           field_selector):  # fmt: skip
                    version = _version_of(event.object) or version
                    backoff.reset()
                    if event.type != "BOOKMARK":
                        yield [], event
            except ResourceExpired as exc:
                self.stats.compactions += peers
                log.warning("watch of %s expired (%s); listing again", _what(field_selector),
                            exc.message)  # fmt: skip
                version = ""
            except KubeError as exc:
                self.stats.watch_restarts += peers
                delay = backoff.next_delay()
                log.warning("watch of %s interrupted (%s); resuming in %.1fs",
                            _what(field_selector), exc, delay)  # fmt: skip
                await asyncio.sleep(delay)

    async def _list_nodes(
        self, keep: Callable[[dict[str, Any]], T | None], field_selector: str
    ) -> tuple[list[T], str]:
        items: list[T] = []
        token, version = "", ""
        while True:
            page = await self.client.list_nodes(token, field_selector=field_selector)
            version = page.resource_version or version
            items += [kept for node in page.items if (kept := keep(node)) is not None]
            token = page.next
            if not token:
                return items, version

    def _apply(
        self, watcher: LeaseWatcher, subnets: dict[str, Identity], event: WatchEvent
    ) -> list[LeaseEvent]:
        name = node_name_of(event.object)
        old = subnets.get(name)
        lease = None if event.type == "DELETED" else self._lease_of(event.object)
        events: list[LeaseEvent] = []
        if old is not None and (lease is None or lease.identity != old):
            del subnets[name]
            events += watcher.removed(old)  # deleted, no longer flannel's, or a new podCIDR
        if lease is not None:
            subnets[name] = lease.identity
            events += watcher.added(lease)
        return events

    def _lease_of(self, node: Mapping[str, Any]) -> Lease | None:
        name = node_name_of(node)
        try:
            lease = node_to_lease(node, self.keys, self.ipv6, self.ipv4)
        except NodeLeaseError as exc:
            if self._warned.get(name) != str(exc):
                self._warned[name] = str(exc)
                self.stats.skipped_entries += 1
                log.warning("Error turning node %r to lease: %s; skipped", name, exc)
            return None
        self._warned.pop(name, None)
        return lease

    def _count(self, events: list[LeaseEvent]) -> None:
        for event in events:
            if event.type is LeaseEventType.ADDED:
                self.stats.events_added += 1
            else:
                self.stats.events_removed += 1


def _what(field_selector: str) -> str:
    return f"node {field_selector.split('=', 1)[1]}" if field_selector else "nodes"


def _version_of(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


async def find_node_name(client: KubeClient, environ: Mapping[str, str]) -> str:
    """NODE_NAME, else the node of the Pod POD_NAMESPACE/POD_NAME runs on (flanneld's rule)."""
    if environ.get("NODE_NAME"):
        return environ["NODE_NAME"]
    pod, namespace = environ.get("POD_NAME", ""), environ.get("POD_NAMESPACE", "")
    if not pod or not namespace:
        raise KubeManagerError(
            "env variables POD_NAME and POD_NAMESPACE must be set (or NODE_NAME)"
        )
    try:
        doc = await client.get_pod(namespace, pod)
    except KubeError as exc:
        raise KubeManagerError(
            f"error retrieving pod spec for '{namespace}/{pod}': {exc}"
        ) from None
    name = str((doc.get("spec") or {}).get("nodeName") or "")
    if not name:
        raise KubeManagerError(f"node name not present in pod spec '{namespace}/{pod}'")
    return name


async def connect(
    api_url: str,
    kubeconfig: str,
    annotation_prefix: str,
    net_config_path: str,
    set_node_network_unavailable: bool,
    environ: Mapping[str, str],
) -> KubeManager:
    """The kube manager for this agent: API access as flanneld resolves it, then our node."""
    from flannel_bpf.subnet.kube.client import KubeConfigError, resolve_access

    try:
        access = resolve_access(api_url, kubeconfig, environ)
        client = KubeClient(access)
    except KubeConfigError as exc:
        raise KubeManagerError(f"fail to create kubernetes config: {exc}") from None
    try:
        node = await find_node_name(client, environ)
    except BaseException:
        await client.close()
        raise
    log.info("Created subnet manager: Kubernetes Subnet Manager - %s (API %s, %s)",
             node, access.server, access.source)  # fmt: skip
    return KubeManager(
        client,
        node,
        Annotations.from_flag(annotation_prefix),
        Path(net_config_path),
        set_node_network_unavailable,
    )
