"""The agent: flanneld's start-up order (flannel-compat.md section 6, end) and its run loop."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import TypeVar

from flannel_bpf.backends import BackendError, ExternalContext, Network, make_backend
from flannel_bpf.cli.flags import DEFAULT_METRICS_ADDR, AgentOptions
from flannel_bpf.datapath.iface import ExternalInterface, InterfaceError, find_external_interface
from flannel_bpf.datapath.traffic_rules import (
    IptablesRules,
    Net,
    RulesError,
    apply_nftables,
    forward_rules,
    masquerade_rules,
    nftables_ruleset,
    remove_nftables,
    supports_random_fully,
)
from flannel_bpf.observe.http_endpoint import (
    HEALTHZ_BODY,
    NOT_READY_BODY,
    READY_BODY,
    EndpointError,
    HTTPEndpoint,
    Response,
    parse_listen_address,
    text_response,
)
from flannel_bpf.observe.metrics import CONTENT_TYPE, AgentMetrics
from flannel_bpf.observe.status import AgentStatus
from flannel_bpf.observe.systemd import SystemdNotifier
from flannel_bpf.subnet.config import NetworkConfig
from flannel_bpf.subnet.etcd.manager import EtcdManager
from flannel_bpf.subnet.etcd.store import (
    EtcdSettings,
    EtcdStore,
    StoreAuthError,
    StoreError,
)
from flannel_bpf.subnet.lease import Lease, LeaseEventType
from flannel_bpf.subnet.manager import (
    Backoff,
    LeaseRevoked,
    Manager,
    ManagerError,
    ManagerUnavailable,
    OutOfSubnets,
)
from flannel_bpf.subnet.subnet_env import (
    PreviousSubnets,
    SubnetFile,
    read_previous_subnets,
    write_subnet_file,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class AgentError(Exception):
    """A start-up failure that ends the agent with exit status 1 and this one message."""


@dataclass
class Agent:
    options: AgentOptions
    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    notifier: SystemdNotifier = field(default_factory=SystemdNotifier)  # off outside systemd
    _status: AgentStatus | None = field(default=None, init=False)
    _endpoints: list[HTTPEndpoint] = field(default_factory=list, init=False)

    async def run(self) -> int:
        """Run until SIGTERM (returns 0), lease revocation (0) or a fatal error (AgentError)."""
        # From the start: waiting for etcd is not hanging.
        watchdog = asyncio.create_task(self.notifier.keep_watchdog(), name="watchdog")
        if self.options.kube_subnet_mgr:
            self.notifier.status("starting: connecting to the Kubernetes API")
        else:
            endpoints = ",".join(self.options.etcd_endpoints)
            self.notifier.status(f"starting: connecting to etcd at {endpoints}")
        try:
            await self._start_endpoints()
            return await self._run_with_store()
        finally:
            self.notifier.stopping()
            watchdog.cancel()
            await self._stop_endpoints()

    async def _start_endpoints(self) -> None:
        """Before anything else, as flanneld: /healthz answers while etcd is still awaited."""
        opts = self.options
        state = self.metrics.state

        async def healthz() -> Response:
            return text_response(200, HEALTHZ_BODY)

        async def readyz() -> Response:
            return (
                text_response(200, READY_BODY)
                if state.ready
                else text_response(503, NOT_READY_BODY)
            )

        async def metrics() -> Response:
            return 200, CONTENT_TYPE, await asyncio.to_thread(self.metrics.exposition)

        wanted = []
        if opts.metrics_addr:
            host, port = _listen_address(opts.metrics_addr, "--metrics-addr")
            routes = {"/metrics": metrics, "/healthz": healthz, "/readyz": readyz}
            wanted.append(HTTPEndpoint("metrics", host, port, routes))
        if opts.healthz_port > 0:
            host = opts.healthz_ip or "0.0.0.0"
            wanted.append(
                HTTPEndpoint(
                    "healthz", host, opts.healthz_port, {"/healthz": healthz, "/readyz": readyz}
                )
            )
        for endpoint in wanted:
            try:
                await endpoint.start()
            except EndpointError as exc:
                if endpoint.name == "metrics" and opts.metrics_addr == DEFAULT_METRICS_ADDR:
                    # A second agent on the host (another network, as flanneld's multi-network
                    # setups run) must not die of a default it never asked for.
                    log.error("%s; metrics disabled (choose a port with --metrics-addr)", exc)
                    continue
                raise AgentError(str(exc)) from None
            self._endpoints.append(endpoint)

    async def _stop_endpoints(self) -> None:
        for endpoint in self._endpoints:
            await endpoint.stop()
        self._endpoints.clear()

    async def _run_with_store(self) -> int:
        opts = self.options
        previous = read_previous_subnets(opts.subnet_file)
        if previous.subnet is not None:
            log.info("previous subnet %s read from %s", previous.subnet, opts.subnet_file)
        if opts.kube_subnet_mgr:
            return await self._run_kube(previous)
        try:
            store = EtcdStore(EtcdSettings.from_options(opts), observer=self.metrics)
            await store.connect()
        except StoreError as exc:
            raise AgentError(str(exc)) from None
        try:
            manager = EtcdManager(store, opts.etcd_prefix)
            log.info("using etcd at %s, prefix %s", store.endpoint_list, manager.prefix)
            return await self._run(manager, previous)
        finally:
            await store.close()

    async def _run_kube(self, previous: PreviousSubnets) -> int:
        """--kube-subnet-mgr: the Node's podCIDR and annotations instead of etcd."""
        from flannel_bpf.subnet.kube import manager as kube

        opts = self.options
        try:
            manager = await kube.connect(
                opts.kube_api_url,
                opts.kubeconfig_file,
                opts.kube_annotation_prefix,
                opts.net_config_path,
                opts.set_node_network_unavailable,
                os.environ,
            )
        except ManagerError as exc:
            raise AgentError(str(exc)) from None
        try:
            return await self._run(manager, previous)
        finally:
            await manager.client.close()

    async def _run(self, manager: Manager, previous: PreviousSubnets) -> int:
        self.metrics.state.manager = manager
        try:
            config = await manager.wait_for_network_config()
        except ManagerError as exc:
            raise AgentError(str(exc)) from None
        manager.prefetch_leases()
        try:
            return await self._run_with_config(manager, config, previous)
        finally:
            manager.drop_startup_listing()  # a no-op once the peer watch took it

    async def _run_with_config(
        self, manager: Manager, config: NetworkConfig, previous: PreviousSubnets
    ) -> int:
        opts = self.options
        override = await _retry_unavailable("public IP of the node", manager.public_ip_override)
        if override:
            log.info("public IP %s from the node's annotation replaces --public-ip", override)
            opts = dataclasses.replace(opts, public_ip=override)
        if config.enable_ipv6:
            override6 = await _retry_unavailable(
                "public IPv6 of the node", lambda: manager.public_ip_override(True)
            )
            if override6:
                log.info("public IPv6 %s from the node's annotation replaces --public-ipv6",
                         override6)  # fmt: skip
                opts = dataclasses.replace(opts, public_ipv6=override6)
        try:
            iface = await find_external_interface(
                opts, ipv4=config.enable_ipv4, ipv6=config.enable_ipv6
            )
        except InterfaceError as exc:
            raise AgentError(str(exc)) from None

        ctx = ExternalContext(iface, opts, manager, config, previous)
        try:
            backend = make_backend(config.backend.type, ctx)
        except BackendError as exc:
            raise AgentError(str(exc)) from None
        log.info("backend %s selected", backend.type)
        if opts.datapath != "auto" and opts.datapath not in backend.datapaths:
            raise AgentError(
                f"--datapath={opts.datapath} is not available for the {backend.type} backend "
                f"(it offers: {', '.join(backend.datapaths)})"
            )

        try:
            network = await _retry_unavailable("acquire lease", backend.register_network)
        except OutOfSubnets as exc:
            raise AgentError(f"failed to acquire lease: {exc}") from None
        except (BackendError, StoreAuthError, StoreError, ManagerError) as exc:
            raise AgentError(f"Error registering network: {exc}") from None

        if not network.wants_peers:
            manager.drop_startup_listing()
        try:
            keepers = await asyncio.to_thread(self._install_rules, config, network, previous)
        except RulesError as exc:
            raise AgentError(f"failed to install traffic rules: {exc}") from None

        contents = SubnetFile(
            network=config.network if config.enable_ipv4 else None,
            subnet=network.lease.subnet if config.enable_ipv4 else None,
            ipv6_network=config.ipv6_network if config.enable_ipv6 else None,
            ipv6_subnet=network.lease.ipv6_subnet if config.enable_ipv6 else None,
            mtu=network.mtu,
            ip_masq=opts.ip_masq,
        )
        state = self.metrics.state
        state.backend, state.iface, state.public_ip = backend.type, iface.name, _public(iface)
        state.network = network
        try:
            write_subnet_file(opts.subnet_file, contents)
            log.info("Wrote subnet file to %s", opts.subnet_file)
            self.metrics.subnet_file_writes.labels("success").inc()
            state.ready = True
        except OSError as exc:
            # flanneld carries on without readiness; so do we, loudly.
            self.metrics.subnet_file_writes.labels("error").inc()
            log.error("failed to write subnet file %s: %s", opts.subnet_file, exc)
        for reason in network.fallbacks:
            log.warning("data path fallback: %s", reason)
        if opts.anti_spoofing and network.datapath != "bpf":
            log.warning(
                "--anti-spoofing is enforced by the BPF data path only: the %s data path "
                "decapsulates from any sender",
                network.datapath,
            )
        detail = " ".join(f"{k}={v}" for k, v in network.datapath_status().items() if v != "")
        log.info("datapath=%s backend=%s %s", network.datapath, backend.type, detail)
        self._status = AgentStatus(
            path=Path(opts.status_file),
            backend=backend.type,
            iface=iface.name,
            public_ip=_public(iface),
            etcd={
                "endpoints": [] if opts.kube_subnet_mgr else list(opts.etcd_endpoints),
                "prefix": manager.prefix,
                "cafile": opts.etcd_cafile,
                "certfile": opts.etcd_certfile,
                "keyfile": opts.etcd_keyfile,
                "username": opts.etcd_username,
            },
            subnet_file=opts.subnet_file,
            store=_store_description(manager, opts),
        )
        self._status.write(network)
        log.info("flannel is ready: lease %s, mtu %d", network.lease.key_name, network.mtu)
        self.notifier.ready(self._status_line(network))
        await manager.complete_lease(network.lease)

        try:
            await self._serve(manager, network, keepers)
        except LeaseRevoked:
            log.info("Lease has been revoked. Shutting down daemon.")
        finally:
            # Scrapes read the network's maps from a worker thread: none may outlive it.
            state.ready = False
            await self._stop_endpoints()
            state.network = None
            await network.close()
        return 0

    def _status_line(self, network: Network) -> str:
        """What `systemctl status` shows."""
        peers = self.metrics.state.peers
        return (
            f"lease {network.lease.identity}, datapath {network.datapath}, "
            f"{peers} peer{'' if peers == 1 else 's'}"
        )

    def _install_rules(
        self, config: NetworkConfig, network: Network, previous: PreviousSubnets
    ) -> list[IptablesRules]:
        """flanneld's traffic manager: masquerade (--ip-masq) and forward rules, for each
        family the network has (iptables and ip6tables, or nftables' two tables)."""
        opts = self.options
        lease = network.lease
        fully_random = not opts.ip_masq_fully_random_disable
        families: list[tuple[Net, Net, Net | None, Net | None]] = []
        if config.enable_ipv4 and config.network is not None:
            families.append((config.network, lease.subnet, previous.network, previous.subnet))
        if config.enable_ipv6 and config.ipv6_network is not None and lease.ipv6_subnet:
            families.append(
                (config.ipv6_network, lease.ipv6_subnet, previous.ipv6_network,
                 previous.ipv6_subnet)
            )  # fmt: skip
        if config.enable_nftables:
            if opts.ip_masq or opts.iptables_forward_rules:
                for net, subnet, _, _ in families:
                    apply_nftables(
                        nftables_ruleset(net, subnet, opts.ip_masq, opts.iptables_forward_rules,
                                         fully_random)
                    )  # fmt: skip
            return []
        remove_nftables()  # the unused mode's leftovers, as flanneld does
        keepers = []
        fully_random = fully_random and supports_random_fully()
        for net, subnet, old_net, old_sub in families:
            v6 = net.version == 6
            family = "IPv6 " if v6 else ""
            if opts.ip_masq:
                if old_net and old_sub and (old_net, old_sub) != (net, subnet):
                    log.info("removing %smasquerade rules of the old network %s/%s", family,
                             old_net, old_sub)  # fmt: skip
                    for random in (True, False):
                        old = masquerade_rules(old_net, old_sub, random)
                        IptablesRules(old, "old masq", ipv6=v6).delete()
                masq = masquerade_rules(net, subnet, fully_random)
                keepers.append(IptablesRules(masq, f"{family}masq", ipv6=v6))
            if opts.iptables_forward_rules:
                keepers.append(IptablesRules(forward_rules(net), f"{family}forward", ipv6=v6))
        for rules in keepers:
            rules.apply()
        return keepers

    async def _serve(
        self, manager: Manager, network: Network, keepers: list[IptablesRules]
    ) -> None:
        margin = self.options.subnet_lease_renew_margin * 60.0

        def on_lease_change(lease: Lease) -> None:
            network.lease = lease
            if self._status is not None:
                self._status.write(network)  # the expiry moved

        keeper = asyncio.create_task(
            manager.keep_lease(network.lease, margin, on_lease_change), name="keep-lease"
        )
        tasks = {keeper}
        for rules in keepers:
            tasks.add(asyncio.create_task(rules.keep(float(self.options.iptables_resync))))
        if network.wants_peers:
            tasks.add(asyncio.create_task(self._follow_peers(manager, network), name="peers"))
        for job in network.background():
            tasks.add(asyncio.create_task(job))
        log.info("Running backend.")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_peers(self, manager: Manager, network: Network) -> None:
        first = True
        peers: set[IPv4Network | IPv6Network] = set()
        async for events in manager.watch_leases(network.lease.identity, network.accepts):
            started = time.monotonic()
            if first:
                await network.apply_snapshot(events)
                first = False
            elif events:
                await network.apply(events)
            else:
                continue
            self.metrics.programming.observe(time.monotonic() - started)
            for event in events:
                if event.type is LeaseEventType.ADDED:
                    peers.add(event.lease.identity)
                else:
                    peers.discard(event.lease.identity)
            if self.metrics.state.peers != len(peers):
                self.metrics.state.peers = len(peers)
                self.notifier.status(self._status_line(network))
            if self._status is not None:
                self._status.peers = len(peers)
                self._status.write(network)


def _public(iface: ExternalInterface) -> str:
    """The node's public address for status and metrics: PublicIP, else (IPv6-only) PublicIPv6."""
    return str(iface.ext_addr or iface.ext_v6_addr or "")


async def _retry_unavailable(what: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Retry while etcd is unreachable: an outage at start-up is waited out, not fatal."""
    backoff = Backoff(initial=0.5, maximum=10.0)
    while True:
        try:
            return await operation()
        except ManagerUnavailable as exc:
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


def _store_description(manager: Manager, opts: AgentOptions) -> dict[str, str]:
    """Where leases live, for the status file."""
    if not opts.kube_subnet_mgr:
        return {"kind": "etcd", "prefix": manager.prefix}
    from flannel_bpf.subnet.kube.manager import KubeManager

    assert isinstance(manager, KubeManager)
    return {
        "kind": "kube",
        "server": manager.client.access.server,
        "node": manager.node_name,
        "annotation_prefix": manager.prefix,
    }


def _listen_address(text: str, flag: str) -> tuple[str, int]:
    try:
        return parse_listen_address(text, flag)
    except EndpointError as exc:
        raise AgentError(str(exc)) from None
