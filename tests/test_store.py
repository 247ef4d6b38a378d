"""The etcd store against a real etcd: requests, watches, compaction, failover, TLS, auth."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flannel_bpf.lab.etcd import EtcdCluster, EtcdMember, free_port
from flannel_bpf.lab.tls import make_pki
from flannel_bpf.subnet.etcd.store import (
    EtcdSettings,
    EtcdStore,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    WatchBatch,
    WatchCompacted,
    parse_endpoint,
)


async def test_basic_requests(store: EtcdStore, prefix: str) -> None:
    key = f"{prefix}/k"
    assert (await store.get(key))[0] is None
    rev = await store.put(key, b"v1")
    kv, read_rev = await store.get(key)
    assert kv is not None and kv.value == b"v1" and kv.mod_revision == rev and read_rev >= rev
    assert not await store.create(key, b"v2")  # exists: the txn's If fails
    lease_id, ttl = await store.grant(86400)
    assert ttl == 86400
    assert await store.create(f"{prefix}/new", b"x", lease_id)
    assert 86390 <= await store.time_to_live(lease_id) <= 86400
    kvs, _ = await store.list_prefix(prefix + "/")
    assert [kv.key for kv in kvs] == [f"{prefix}/k", f"{prefix}/new"]
    await store.revoke(lease_id)
    assert (await store.get(f"{prefix}/new"))[0] is None  # revoking deletes attached keys
    assert await store.time_to_live(lease_id) == -1
    assert await store.delete(key)
    assert not await store.delete(key)


async def _collect(store: EtcdStore, key: str, rev: int, count: int) -> list[WatchBatch]:
    batches: list[WatchBatch] = []
    async for batch in store.watch(key, rev, prefix=True):
        if batch.created:
            continue  # the stream's first response, no events
        batches.append(batch)
        if sum(len(b.events) for b in batches) >= count:
            break
    return batches


async def test_watch_resumes_from_a_revision(store: EtcdStore, prefix: str) -> None:
    first = await store.put(f"{prefix}/a", b"1")
    await store.put(f"{prefix}/b", b"2")
    await store.delete(f"{prefix}/a")
    # Watching from an old revision replays everything after it: nothing missed across a gap.
    batches = await asyncio.wait_for(_collect(store, prefix + "/", first, 3), 10)
    events = [(e.type, e.kv.key) for b in batches for e in b.events]
    assert events == [("put", f"{prefix}/a"), ("put", f"{prefix}/b"), ("delete", f"{prefix}/a")]
    assert batches[-1].revision >= first + 2


async def test_compacted_revision_is_reported(
    etcd_factory: Callable[..., EtcdCluster], prefix: str
) -> None:
    member = etcd_factory().members[0]
    async with EtcdStore(EtcdSettings(endpoints=[member.endpoint])) as store:
        first = await store.put(f"{prefix}/a", b"1")
        last = 0
        for i in range(5):
            last = await store.put(f"{prefix}/_bump", str(i).encode())
        await store.compact(last)
        with pytest.raises(WatchCompacted) as info:
            await asyncio.wait_for(_collect(store, prefix + "/", first, 1), 10)
        assert info.value.compact_revision == last


async def test_unreachable_etcd_is_an_error_not_a_hang() -> None:
    port = free_port()
    settings = EtcdSettings(endpoints=[f"http://127.0.0.1:{port}"], request_timeout=1.0)
    async with EtcdStore(settings) as store:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable) as info:
            await store.get("/x")
        assert time.monotonic() - start < 5
        assert f"127.0.0.1:{port}" in str(info.value)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(_collect(store, "/x", 1, 1), 10)


async def test_failover_to_a_live_endpoint(etcd: EtcdMember, prefix: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with EtcdStore(EtcdSettings(endpoints=[dead, etcd.endpoint])) as store:
        for i in range(10):
            await store.put(f"{prefix}/k", str(i).encode())
        kv, _ = await store.get(f"{prefix}/k")
        assert kv is not None and kv.value == b"9"


async def test_cluster_member_loss_is_survived(
    etcd_factory: Callable[..., EtcdCluster], prefix: str
) -> None:
    cluster = etcd_factory(3)
    async with EtcdStore(EtcdSettings(endpoints=cluster.endpoints)) as store:
        await store.put(f"{prefix}/k", b"before")
        cluster.members[0].kill()
        # Requests in flight on the dead member fail once; the balancer moves to the others.
        deadline = time.monotonic() + 15
        while True:
            try:
                await store.put(f"{prefix}/k", b"after")
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "no failover to the surviving members"
                await asyncio.sleep(0.2)
        for _ in range(10):
            kv, _ = await store.get(f"{prefix}/k")
            assert kv is not None and kv.value == b"after"


def test_endpoint_forms() -> None:
    assert str(parse_endpoint("http://127.0.0.1:4001")) == "http://127.0.0.1:4001"
    assert str(parse_endpoint("10.0.0.1:2379")) == "http://10.0.0.1:2379"
    assert str(parse_endpoint("https://etcd.local")) == "https://etcd.local:2379"
    for bad in ("ftp://x:1", "http://:2379", "http://h:notaport"):
        with pytest.raises(StoreError):
            parse_endpoint(bad)


async def test_mutual_tls(etcd_factory: Callable[..., EtcdCluster], tmp_path: Path) -> None:
    tls = make_pki(tmp_path / "pki", ["127.0.0.1"])
    member = etcd_factory(tls=tls).members[0]
    pki = tmp_path / "pki"
    good = EtcdSettings(
        endpoints=[member.endpoint],
        cafile=str(pki / "ca.pem"),
        certfile=str(pki / "client.pem"),
        keyfile=str(pki / "client-key.pem"),
    )
    async with EtcdStore(good) as store:
        assert store.uses_tls
        await store.put("/tls/k", b"v")
        assert (await store.get("/tls/k"))[0] is not None

    # Without a client certificate the server refuses the handshake: a clear error, no hang.
    no_cert = EtcdSettings(
        endpoints=[member.endpoint], cafile=str(pki / "ca.pem"), request_timeout=2.0
    )
    async with EtcdStore(no_cert) as store:
        with pytest.raises(StoreUnavailable) as info:
            await store.get("/tls/k")
        assert member.endpoint in str(info.value)

    with pytest.raises(StoreError, match="cannot read etcd key file /nonexistent"):
        await EtcdStore(
            EtcdSettings(
                endpoints=[member.endpoint],
                certfile=str(pki / "client.pem"),
                keyfile="/nonexistent",
            )
        ).connect()


async def test_username_and_password(etcd_factory: Callable[..., EtcdCluster], prefix: str) -> None:
    member = etcd_factory().members[0]
    member.etcdctl("user", "add", "root:rootpw")
    member.etcdctl("user", "add", "flannel:secret")
    member.etcdctl("role", "add", "flannel")
    member.etcdctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/")
    member.etcdctl("user", "grant-role", "flannel", "flannel")
    member.etcdctl("auth", "enable")

    settings = EtcdSettings(endpoints=[member.endpoint], username="flannel", password="secret")
    async with EtcdStore(settings) as store:
        await store.put(f"{prefix}/k", b"v")
        lease_id, _ = await store.grant(60)
        assert await store.time_to_live(lease_id) > 0
        batches = await asyncio.wait_for(_collect(store, f"{prefix}/", 1, 1), 10)
        assert batches[0].events[0].kv.value == b"v"

    wrong = EtcdSettings(endpoints=[member.endpoint], username="flannel", password="nope")
    async with EtcdStore(wrong) as store:
        with pytest.raises(StoreAuthError, match="authentication as 'flannel'"):
            await store.get(f"{prefix}/k")
