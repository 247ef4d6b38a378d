"""The agent: flanneld's start-up order (flannel-compat.md section 6, end) and its run loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from typing import TypeVar

from .backends import BackendError, ExternalContext, Network, make_backend
from .config import NetworkConfig
from .flags import AgentOptions
from .iface import InterfaceError, find_external_interface
from .lease import Lease, LeaseEventType
from .lease_manager import Backoff, LeaseManager, LeaseRevoked, OutOfSubnets
from .status import AgentStatus
from .store import EtcdSettings, EtcdStore, StoreAuthError, StoreError, StoreUnavailable
from .subnet_file import (
    PreviousSubnets,
    SubnetFile,
    read_previous_subnets,
    write_subnet_file,
)
from .traffic_rules import (
    IptablesRules,
    RulesError,
    apply_nftables,
    forward_rules,
    masquerade_rules,
    nftables_ruleset,
    remove_nftables,
    supports_random_fully,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


class AgentError(Exception):
    """A start-up failure that ends the agent with exit status 1 and this one message."""


@dataclass
class Agent:
    options: AgentOptions
    _status: AgentStatus | None = field(default=None, init=False)

    async def run(self) -> int:
        """Run until SIGTERM (returns 0), lease revocation (0) or a fatal error (AgentError)."""
        opts = self.options
        previous = read_previous_subnets(opts.subnet_file)
        if previous.subnet is not None:
            log.info("previous subnet %s read from %s", previous.subnet, opts.subnet_file)
        settings = EtcdSettings(
            endpoints=opts.etcd_endpoints,
            cafile=opts.etcd_cafile,
            certfile=opts.etcd_certfile,
            keyfile=opts.etcd_keyfile,
            username=opts.etcd_username,
            password=opts.etcd_password,
        )
        try:
            store = EtcdStore(settings)
            await store.connect()
        except StoreError as exc:
            raise AgentError(str(exc)) from None
        try:
            return await self._run(store, previous)
        finally:
            await store.close()

    async def _run(self, store: EtcdStore, previous: PreviousSubnets) -> int:
        opts = self.options
        manager = LeaseManager(store, opts.etcd_prefix)
        log.info("using etcd at %s, prefix %s", store.endpoint_list, manager.prefix)
        config = await manager.wait_for_network_config()
        if config.enable_ipv6:
            raise AgentError("EnableIPv6 is set in the network config: IPv6 is not supported yet")

        try:
            iface = await find_external_interface(opts)
        except InterfaceError as exc:
            raise AgentError(str(exc)) from None
        log.info(
            "using interface %s (index %d, mtu %d), address %s, public ip %s",
            iface.name,
            iface.index,
            iface.mtu,
            iface.iface_addr,
            iface.ext_addr,
        )

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
        except (BackendError, StoreAuthError, StoreError) as exc:
            raise AgentError(f"Error registering network: {exc}") from None

        try:
            keepers = await asyncio.to_thread(self._install_rules, config, network, previous)
        except RulesError as exc:
            raise AgentError(f"failed to install traffic rules: {exc}") from None

        contents = SubnetFile(
            network=config.network,
            subnet=network.lease.subnet,
            ipv6_network=None,
            ipv6_subnet=None,
            mtu=network.mtu,
            ip_masq=opts.ip_masq,
        )
        try:
            write_subnet_file(opts.subnet_file, contents)
            log.info("Wrote subnet file to %s", opts.subnet_file)
        except OSError as exc:
            # flanneld carries on without readiness; so do we, loudly.
            log.error("failed to write subnet file %s: %s", opts.subnet_file, exc)
        for reason in network.fallbacks:
            log.warning("data path fallback: %s", reason)
        detail = " ".join(f"{k}={v}" for k, v in network.datapath_status().items() if v != "")
        log.info("datapath=%s backend=%s %s", network.datapath, backend.type, detail)
        self._status = AgentStatus(
            path=Path(opts.status_file),
            backend=backend.type,
            iface=iface.name,
            public_ip=str(iface.ext_addr),
        )
        self._status.write(network)
        log.info("flannel is ready: lease %s, mtu %d", network.lease.subnet, network.mtu)

        try:
            await self._serve(manager, network, keepers)
        except LeaseRevoked:
            log.info("Lease has been revoked. Shutting down daemon.")
        finally:
            await network.close()
        return 0

    def _install_rules(
        self, config: NetworkConfig, network: Network, previous: PreviousSubnets
    ) -> list[IptablesRules]:
        """flanneld's traffic manager: masquerade (--ip-masq) and forward rules."""
        opts = self.options
        assert config.network is not None
        subnet = network.lease.subnet
        fully_random = not opts.ip_masq_fully_random_disable
        if config.enable_nftables:
            ruleset = nftables_ruleset(
                config.network,
                subnet,
                opts.ip_masq,
                opts.iptables_forward_rules,
                fully_random,
            )
            if opts.ip_masq or opts.iptables_forward_rules:
                apply_nftables(ruleset)
            return []
        remove_nftables()  # the unused mode's leftovers, as flanneld does
        keepers = []
        if opts.ip_masq:
            fully_random = fully_random and supports_random_fully()
            old_net, old_sub = previous.network, previous.subnet
            if old_net and old_sub and (old_net, old_sub) != (config.network, subnet):
                log.info("removing masquerade rules of the old network %s/%s", old_net, old_sub)
                for random in (True, False):
                    IptablesRules(masquerade_rules(old_net, old_sub, random), "old masq").delete()
            keepers.append(
                IptablesRules(masquerade_rules(config.network, subnet, fully_random), "masq")
            )
        if opts.iptables_forward_rules:
            keepers.append(IptablesRules(forward_rules(config.network), "forward"))
        for rules in keepers:
            rules.apply()
        return keepers

    async def _serve(
        self, manager: LeaseManager, network: Network, keepers: list[IptablesRules]
    ) -> None:
        margin = self.options.subnet_lease_renew_margin * 60.0

        def on_lease_change(lease: Lease) -> None:
            network.lease = lease

        keeper = asyncio.create_task(
            manager.keep_lease(network.lease, margin, on_lease_change), name="keep-lease"
        )
        tasks = {keeper}
        for rules in keepers:
            tasks.add(asyncio.create_task(rules.keep(float(self.options.iptables_resync))))
        if network.wants_peers:
            tasks.add(asyncio.create_task(self._follow_peers(manager, network), name="peers"))
        log.info("Running backend.")
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow_peers(self, manager: LeaseManager, network: Network) -> None:
        first = True
        peers: set[IPv4Network] = set()
        async for events in manager.watch_leases(network.lease.subnet, network.accepts):
            if first:
                await network.apply_snapshot(events)
                first = False
            elif events:
                await network.apply(events)
            else:
                continue
            for event in events:
                if event.type is LeaseEventType.ADDED:
                    peers.add(event.lease.subnet)
                else:
                    peers.discard(event.lease.subnet)
            if self._status is not None:
                self._status.peers = len(peers)
                self._status.write(network)


async def _retry_unavailable(what: str, operation: Callable[[], Awaitable[T]]) -> T:
    """Retry while etcd is unreachable: an outage at start-up is waited out, not fatal."""
    backoff = Backoff(initial=0.5, maximum=10.0)
    while True:
        try:
            return await operation()
        except StoreUnavailable as exc:
            delay = backoff.next_delay()
            log.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)
