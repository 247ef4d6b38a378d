"""The lease manager against a real etcd: ports of flanneld's registry and subnet tests."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.lab.etcd import EtcdCluster
from flannel_bpf.subnet.config import parse_network_config
from flannel_bpf.subnet.etcd.manager import (
    LEASE_TTL,
    EtcdManager,
    LeaseRevoked,
    OutOfSubnets,
    free_subnets,
)
from flannel_bpf.subnet.etcd.store import EtcdSettings, EtcdStore, KeyValue, StoreUnavailable
from flannel_bpf.subnet.lease import Lease, LeaseAttrs, LeaseEvent, LeaseEventType

ADDED, REMOVED = LeaseEventType.ADDED, LeaseEventType.REMOVED
CONFIG_10_3 = b'{ "Network": "10.3.0.0/16", "SubnetMin": "10.3.1.0", "SubnetMax": "10.3.25.0" }'


def attrs(ip: str, backend: str = "", data: bytes = b"") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type=backend, backend_data=data)


async def put_lease(
    store: EtcdStore, mgr: EtcdManager, subnet: str, value: LeaseAttrs, ttl: int | None = LEASE_TTL
) -> None:
    lease_id = (await store.grant(ttl))[0] if ttl else 0
    await store.put(mgr.lease_key(IPv4Network(subnet)), value.to_json(), lease_id)


@pytest.fixture
def mgr(store: EtcdStore, prefix: str) -> EtcdManager:
    return EtcdManager(store, prefix, rng=random.Random(7))


async def test_config_round_trip_and_missing_config(mgr: EtcdManager, store: EtcdStore) -> None:
    with pytest.raises(Exception, match="flannel config not found in etcd store"):
        await mgr.get_network_config()
    await store.put(mgr.config_key, CONFIG_10_3)
    config = await mgr.get_network_config()
    assert config.network == IPv4Network("10.3.0.0/16") and config.subnet_len == 24


async def test_an_ipv6_only_config_waits_for_a_valid_one_with_the_reason(
    mgr: EtcdManager, store: EtcdStore, caplog: pytest.LogCaptureFixture
) -> None:
    """EnableIPv4 false is not a config etcd mode can run (leases keyed by IPv4 subnet, as
    flanneld's): the agent keeps waiting, saying why, and goes on once the config is fixed."""
    v6_only = b'{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd10::/56"}'
    await store.put(mgr.config_key, v6_only)
    waiting = asyncio.ensure_future(mgr.wait_for_network_config(poll_interval=0.05))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    assert "IPv6-only networks need --kube-subnet-mgr" in caplog.text
    await store.put(mgr.config_key, CONFIG_10_3)
    config = await asyncio.wait_for(waiting, 5)
    assert config.network == IPv4Network("10.3.0.0/16")


async def test_created_lease_is_flanneld_byte_exact_with_a_24h_ttl(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    config = parse_network_config(b'{"Network":"10.1.0.0/16"}')
    lease = await mgr.acquire_lease(config, attrs("1.2.3.4"))
    kv, _ = await store.get(mgr.lease_key(lease.subnet))
    assert kv is not None
    assert kv.key == f"{mgr.prefix}/subnets/{lease.subnet.network_address}-24"
    assert kv.value == b'{"PublicIP":"1.2.3.4","PublicIPv6":null}'
    ttl = await store.time_to_live(kv.lease_id)
    assert LEASE_TTL - 10 <= ttl <= LEASE_TTL
    assert lease.expiration is not None and abs(lease.expiration - (time.time() + LEASE_TTL)) < 10
    assert IPv4Network("10.1.1.0/24").network_address <= lease.subnet.network_address


async def test_leases_written_by_flanneld_are_read(mgr: EtcdManager, store: EtcdStore) -> None:
    flanneld_value = (
        b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan",'
        b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
    )
    await store.put(f"{mgr.prefix}/subnets/10.5.72.0-24", flanneld_value)
    leases, _ = await mgr.list_leases(with_expiration=True)
    assert len(leases) == 1
    lease = leases[0]
    assert lease.subnet == IPv4Network("10.5.72.0/24")
    assert lease.attrs.backend_type == "vxlan"
    assert lease.attrs.backend_json() == {"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}
    assert lease.attrs.to_json() == flanneld_value
    assert lease.lease_id == 0  # a reservation


async def test_acquire_in_range_reuse_and_previous_subnet(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    # flanneld's TestAcquireLease fixture: leases 10.3.1/2/4/5 and an out-of-range 10.3.31
    config = parse_network_config(CONFIG_10_3)
    for third in (1, 2, 4, 5, 31):
        await put_lease(store, mgr, f"10.3.{third}.0/24", attrs("1.1.1.1"))
    lease = await mgr.acquire_lease(config, attrs("1.2.3.4"))
    assert config.is_compatible_v4(lease.subnet)
    assert lease.subnet.network_address.packed[2] not in (1, 2, 4, 5, 31)
    again = await mgr.acquire_lease(config, attrs("1.2.3.4"))
    assert again.subnet == lease.subnet  # reuse by PublicIP

    other = EtcdManager(store, mgr.prefix)
    prev = await other.acquire_lease(
        config, attrs("1.2.3.5"), previous_subnet=IPv4Network("10.3.6.0/24")
    )
    assert prev.subnet == IPv4Network("10.3.6.0/24")
    outside = await other.acquire_lease(
        config, attrs("1.2.3.6"), previous_subnet=IPv4Network("10.4.1.0/24")
    )
    assert outside.subnet != IPv4Network("10.4.1.0/24") and config.is_compatible_v4(outside.subnet)
    taken = await other.acquire_lease(
        config, attrs("1.2.3.7"), previous_subnet=IPv4Network("10.3.6.0/24")
    )
    assert taken.subnet != IPv4Network("10.3.6.0/24")


async def test_reuse_rewrites_attrs_and_config_change_gives_new_subnet(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    old_config = parse_network_config(CONFIG_10_3)
    first = await mgr.acquire_lease(
        old_config, attrs("1.2.3.4", "vxlan", b'{"VNI":1,"VtepMAC":"aa:aa:aa:aa:aa:aa"}')
    )
    new_attrs = attrs("1.2.3.4", "vxlan", b'{"VNI":1,"VtepMAC":"bb:bb:bb:bb:bb:bb"}')
    second = await mgr.acquire_lease(old_config, new_attrs)
    assert second.subnet == first.subnet
    kv, _ = await store.get(mgr.lease_key(first.subnet))
    assert kv is not None and kv.value == new_attrs.to_json()

    new_config = parse_network_config(b'{"Network": "10.4.0.0/16"}')
    moved = await mgr.acquire_lease(new_config, new_attrs)
    assert new_config.is_compatible_v4(moved.subnet)
    assert (await store.get(mgr.lease_key(first.subnet)))[0] is None  # incompatible: deleted


async def test_out_of_subnets(mgr: EtcdManager) -> None:
    config = parse_network_config(b'{"Network": "10.9.0.0/28"}')  # /30s, three allocatable
    got = {(await mgr.acquire_lease(config, attrs(f"1.1.1.{i}"))).subnet for i in range(3)}
    assert len(got) == 3
    with pytest.raises(OutOfSubnets, match="out of subnets"):
        await mgr.acquire_lease(config, attrs("1.1.1.99"))


def test_free_subnets_are_the_first_hundred_free_and_skip_overlaps() -> None:
    taken = [IPv4Network("10.0.2.0/24"), IPv4Network("10.0.4.0/23"), IPv4Network("10.0.200.0/22")]
    free = free_subnets(int(IPv4Address("10.0.1.0")), int(IPv4Address("10.0.255.0")), 24, 32, taken)
    thirds = [IPv4Address(x).packed[2] for x in free]
    assert len(thirds) == 100
    assert thirds[:4] == [1, 3, 6, 7]
    assert not set(thirds) & {2, 4, 5}
    many = [IPv4Network((int(IPv4Address("10.0.0.0")) + (i << 8), 24)) for i in range(1, 200)]
    assert [
        IPv4Address(x).packed[2]
        for x in free_subnets(
            int(IPv4Address("10.0.1.0")), int(IPv4Address("10.0.255.0")), 24, 32, many
        )
    ] == list(range(200, 256))


async def test_twenty_agents_racing_get_twenty_distinct_subnets(
    etcd_factory: Callable[..., EtcdCluster], prefix: str
) -> None:
    member = etcd_factory().members[0]
    # 31 allocatable /29s for 20 hosts: random picks collide, so creation races are lost and
    # must be retried (flanneld exits 1 there).
    config = parse_network_config(b'{"Network": "10.7.0.0/24", "SubnetLen": 29}')
    stores = [EtcdStore(EtcdSettings(endpoints=[member.endpoint])) for _ in range(20)]
    for s in stores:
        await s.connect()
    try:
        managers = [EtcdManager(s, prefix, rng=random.Random(i % 3)) for i, s in enumerate(stores)]
        leases = await asyncio.gather(
            *(m.acquire_lease(config, attrs(f"198.18.0.{i + 1}")) for i, m in enumerate(managers))
        )
    finally:
        for s in stores:
            await s.close()
    assert len({lease.subnet for lease in leases}) == 20
    check = EtcdStore(EtcdSettings(endpoints=[member.endpoint]))
    await check.connect()
    kvs, _ = await check.list_prefix(prefix + "/subnets/")
    await check.close()
    assert len(kvs) == 20


async def test_renewal_puts_a_fresh_24h_lease_with_the_same_attrs(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    config = parse_network_config(CONFIG_10_3)
    original = attrs("1.2.3.4", "vxlan", b'{"Dummy":"test string"}')
    lease = await mgr.acquire_lease(config, original)
    renewed = await mgr.renew_lease(lease)
    assert renewed.lease_id != lease.lease_id
    kv, _ = await store.get(mgr.lease_key(lease.subnet))
    assert kv is not None and kv.lease_id == renewed.lease_id
    assert LeaseAttrs.from_json(kv.value) == original
    assert LEASE_TTL - 10 <= await store.time_to_live(kv.lease_id) <= LEASE_TTL


async def test_keep_lease_renews_before_expiry_and_stops_on_deletion(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    # A real 4 s etcd lease: keep_lease reads its TTL back from etcd, renews at 4 s - 2 s.
    await put_lease(store, mgr, "10.3.7.0/24", attrs("1.2.3.4"), ttl=4)
    (lease,), _ = await mgr.list_leases(with_expiration=True)
    assert lease.expiration is not None and lease.expiration - time.time() < 5
    seen: list[Lease] = []
    keeper = asyncio.create_task(mgr.keep_lease(lease, 2.0, seen.append))
    deadline = time.time() + 8
    while not any(x.lease_id != lease.lease_id for x in seen):
        assert time.time() < deadline, "lease was not renewed"
        await asyncio.sleep(0.1)
    await asyncio.sleep(4)  # past the old lease's end: the key must still be there
    kv, _ = await store.get(mgr.lease_key(lease.subnet))
    assert kv is not None and await store.time_to_live(kv.lease_id) > LEASE_TTL - 30
    await store.delete(mgr.lease_key(lease.subnet))
    with pytest.raises(LeaseRevoked):
        await asyncio.wait_for(keeper, 10)


async def _next(gen: AsyncIterator[list[LeaseEvent]], within: float = 10) -> list[LeaseEvent]:
    return await asyncio.wait_for(anext(gen), within)


def summary(events: list[LeaseEvent]) -> list[tuple[str, str]]:
    return sorted((e.type.value, str(e.lease.subnet)) for e in events)


async def test_watch_add_remove_skips_own_and_other_backends(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    vx = b'{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:01"}'
    await put_lease(store, mgr, "10.3.1.0/24", attrs("1.1.1.1", "vxlan", vx))
    await put_lease(store, mgr, "10.3.9.0/24", attrs("1.1.1.9", "vxlan", vx))  # our own
    await put_lease(store, mgr, "10.3.2.0/24", attrs("1.1.1.2", "host-gw"))
    gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"), lambda x: x.attrs.backend_type == "vxlan")
    assert summary(await _next(gen)) == [("added", "10.3.1.0/24")]

    # flanneld's TestWatchLeaseAdded: a TTL-0 lease (etcd clamps to its minimum) appears...
    await put_lease(store, mgr, "10.3.30.0/24", attrs("1.1.1.30", "vxlan", vx))
    assert summary(await _next(gen)) == [("added", "10.3.30.0/24")]
    # ...our own key changing is never reported, another type is ignored
    await put_lease(store, mgr, "10.3.9.0/24", attrs("1.1.1.9", "vxlan", vx))
    await put_lease(store, mgr, "10.3.3.0/24", attrs("1.1.1.3", "host-gw"))
    await store.delete(mgr.lease_key(IPv4Network("10.3.1.0/24")))
    removed = await _next(gen)
    assert summary(removed) == [("removed", "10.3.1.0/24")]
    assert removed[0].lease.attrs.public_ip == IPv4Address("1.1.1.1")  # last-known attrs
    await gen.aclose()


async def test_the_start_up_listing_is_read_once_and_the_watch_misses_nothing(
    mgr: EtcdManager, store: EtcdStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """prefetch_leases: the first acquire and the first watch snapshot share one listing, and
    whatever changed between that listing and the watch still arrives, through the watch."""
    listings = 0
    list_prefix = store.list_prefix

    async def counted(prefix: str) -> tuple[list[KeyValue], int]:
        nonlocal listings
        listings += 1
        return await list_prefix(prefix)

    monkeypatch.setattr(store, "list_prefix", counted)
    config = parse_network_config(CONFIG_10_3)
    await put_lease(store, mgr, "10.3.1.0/24", attrs("1.1.1.1"))
    await put_lease(store, mgr, "10.3.2.0/24", attrs("1.1.1.2"))
    # An old lease of ours outside SubnetMax: acquire deletes it, so it is never a peer.
    await put_lease(store, mgr, "10.3.31.0/24", attrs("1.2.3.4"))

    mgr.prefetch_leases()
    own = await mgr.acquire_lease(config, attrs("1.2.3.4"))
    assert own.subnet != IPv4Network("10.3.31.0/24")
    await put_lease(store, mgr, "10.3.3.0/24", attrs("1.1.1.3"))
    await store.delete(mgr.lease_key(IPv4Network("10.3.2.0/24")))

    gen = mgr.watch_leases(own.subnet)
    assert summary(await _next(gen)) == [("added", "10.3.1.0/24"), ("added", "10.3.2.0/24")]
    assert listings == 1  # the snapshot was the prefetched listing
    later: list[LeaseEvent] = []
    while len(later) < 2:
        later += await _next(gen)
    assert summary(later) == [("added", "10.3.3.0/24"), ("removed", "10.3.2.0/24")]
    await gen.aclose()


async def test_a_dropped_start_up_listing_is_not_used(mgr: EtcdManager, store: EtcdStore) -> None:
    mgr.prefetch_leases()
    await asyncio.sleep(0.5)  # the listing is done
    mgr.drop_startup_listing()
    await put_lease(store, mgr, "10.3.1.0/24", attrs("1.1.1.1"))
    gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"))
    assert summary(await _next(gen)) == [("added", "10.3.1.0/24")]
    await gen.aclose()


async def test_short_ttl_lease_expires_into_a_removal(mgr: EtcdManager, store: EtcdStore) -> None:
    gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"))
    assert await _next(gen) == []
    await put_lease(store, mgr, "10.3.31.0/24", attrs("1.1.1.31"), ttl=3)
    assert summary(await _next(gen)) == [("added", "10.3.31.0/24")]
    assert summary(await _next(gen, 15)) == [("removed", "10.3.31.0/24")]
    await gen.aclose()


async def test_malformed_entries_are_skipped_without_touching_peers(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    await put_lease(store, mgr, "10.3.1.0/24", attrs("1.1.1.1"))
    await store.put(f"{mgr.prefix}/subnets/garbage", b"x")
    gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"))
    assert summary(await _next(gen)) == [("added", "10.3.1.0/24")]
    for key, value in [
        ("subnets/10.3.7.0-24", b"{not json"),
        ("subnets/10.3.8.0-24", b'{"PublicIP": 12}'),
        ("subnets/10.3.1.0-24", b"[]"),  # a peer's value replaced by junk: peer kept as is
        ("subnets/foreign", b'{"PublicIP":"1.1.1.1"}'),
        ("subnets/10.3.10.0-24", b"x" * 100_000),
    ]:
        await store.put(f"{mgr.prefix}/{key}", value)
    await store.delete(f"{mgr.prefix}/subnets/garbage")
    await put_lease(store, mgr, "10.3.11.0/24", attrs("1.1.1.11"))
    # The only event after all that junk is the one good lease: nobody was removed.
    assert summary(await _next(gen)) == [("added", "10.3.11.0/24")]
    assert mgr.stats.skipped_entries >= 5
    await gen.aclose()


async def test_watch_recovers_from_compaction_by_relisting(
    etcd_factory: Callable[..., EtcdCluster], prefix: str
) -> None:
    member = etcd_factory().members[0]
    async with EtcdStore(EtcdSettings(endpoints=[member.endpoint])) as store:
        mgr = EtcdManager(store, prefix)
        await put_lease(store, mgr, "10.3.1.0/24", attrs("1.1.1.1"))
        await put_lease(store, mgr, "10.3.2.0/24", attrs("1.1.1.2"))
        gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"))
        assert summary(await _next(gen)) == [("added", "10.3.1.0/24"), ("added", "10.3.2.0/24")]
        # The generator is parked before its watch starts: everything below happens "while
        # disconnected", and the revision it wants to resume from is then compacted away.
        await put_lease(store, mgr, "10.3.3.0/24", attrs("1.1.1.3"))
        await store.delete(mgr.lease_key(IPv4Network("10.3.1.0/24")))
        last = 0
        for i in range(5):
            last = await store.put(f"{prefix}/_bump", str(i).encode())
        await store.compact(last)
        events = await _next(gen)
        assert summary(events) == [("added", "10.3.3.0/24"), ("removed", "10.3.1.0/24")]
        assert mgr.stats.compactions == 1
        await put_lease(store, mgr, "10.3.4.0/24", attrs("1.1.1.4"))
        assert summary(await _next(gen)) == [("added", "10.3.4.0/24")]
        await gen.aclose()


async def test_reservation_stays_a_reservation_for_its_owner(
    mgr: EtcdManager, store: EtcdStore
) -> None:
    config = parse_network_config(CONFIG_10_3)
    await put_lease(store, mgr, "10.3.20.0/24", attrs("1.2.3.4"), ttl=None)
    lease = await mgr.acquire_lease(config, attrs("1.2.3.4", "host-gw"))
    assert lease.subnet == IPv4Network("10.3.20.0/24")
    assert lease.expiration is None and lease.lease_id == 0
    kv, _ = await store.get(mgr.lease_key(lease.subnet))
    assert kv is not None and kv.lease_id == 0 and b"host-gw" in kv.value
    # and a reserved subnet is never handed to anybody else
    others = {
        (
            await EtcdManager(store, mgr.prefix, rng=random.Random(i)).acquire_lease(
                config, attrs(f"1.2.4.{i}")
            )
        ).subnet
        for i in range(24)
    }
    assert IPv4Network("10.3.20.0/24") not in others


async def test_watch_survives_an_etcd_restart(
    etcd_factory: Callable[..., EtcdCluster], prefix: str
) -> None:
    member = etcd_factory().members[0]
    async with EtcdStore(EtcdSettings(endpoints=[member.endpoint])) as store:
        mgr = EtcdManager(store, prefix)
        gen = mgr.watch_leases(IPv4Network("10.3.9.0/24"))
        assert await _next(gen) == []
        # Park the watch inside etcd, then take etcd away under it and bring it back.
        pending = asyncio.ensure_future(_next(gen, 60))
        await asyncio.sleep(0.5)
        member.stop()
        await asyncio.sleep(2)
        member.start()
        member.wait_ready()
        # Our channel may still be in gRPC's reconnect backoff: retry as the agent's paths do.
        for _ in range(50):
            try:
                await put_lease(store, mgr, "10.3.5.0/24", attrs("1.1.1.5"))
                break
            except StoreUnavailable:
                await asyncio.sleep(0.2)
        assert summary(await pending) == [("added", "10.3.5.0/24")]
        assert mgr.stats.watch_restarts >= 1
        await gen.aclose()
