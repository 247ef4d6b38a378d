"""The etcd v3 store: a small async interface over etcd3aio (why that client: docs/decisions.md).

The rest of the agent sees only this module's types and errors. Everything that can go wrong on
the wire becomes a StoreError subclass, so callers decide about retries and nothing leaks a gRPC
traceback into the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import grpc
import grpc.aio
from etcd3aio import (
    EtcdConnectionError,
    EtcdError,
    EtcdPermissionDeniedError,
    EtcdTransientError,
    EtcdUnauthenticatedError,
    prefix_range_end,
)
from etcd3aio._protobuf import WatchCreateRequest, WatchRequest, WatchStub
from etcd3aio.auth import AuthService
from etcd3aio.kv import KVService
from etcd3aio.lease import LeaseService

from flannel_bpf.subnet.manager import ManagerUnavailable

if TYPE_CHECKING:
    from flannel_bpf.cli.flags import AgentOptions

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_ENDPOINTS = ("http://127.0.0.1:4001", "http://127.0.0.1:2379")


class StoreObserver(Protocol):
    """Where request outcomes go (the metrics); the store itself knows no metrics library."""

    def etcd_request(self, operation: str, outcome: str, seconds: float) -> None: ...

    def etcd_reachable(self, reachable: bool) -> None: ...


class NullObserver:
    def etcd_request(self, operation: str, outcome: str, seconds: float) -> None:
        pass

    def etcd_reachable(self, reachable: bool) -> None:
        pass


# Request kinds and outcomes, as the observer sees them (the metrics pre-create every pair).
OPERATIONS = (
    "get",
    "list",
    "put",
    "create",
    "delete",
    "lease_grant",
    "lease_revoke",
    "lease_ttl",
    "compact",
)
OUTCOMES = ("success", "unavailable", "auth_error", "error")


def _outcome(exc: StoreError) -> str:
    if isinstance(exc, StoreUnavailable):
        return "unavailable"
    if isinstance(exc, StoreAuthError):
        return "auth_error"
    return "error"


class StoreError(Exception):
    """Any failure talking to etcd; the message names the endpoints and the cause."""


class StoreUnavailable(StoreError, ManagerUnavailable):
    """etcd could not be reached or did not answer in time: worth retrying later."""


class StoreAuthError(StoreError):
    """Credentials or certificates were refused: retrying will not help by itself."""


class WatchCompacted(StoreError):
    """The revision a watch wanted to resume from has been compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"watch revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: Sequence[str] = DEFAULT_ENDPOINTS
    cafile: str = ""
    certfile: str = ""
    keyfile: str = ""
    username: str = ""
    password: str = ""
    # Per-request deadline: an etcd that accepts connections but does not answer (lost quorum)
    # must not hang the agent.
    request_timeout: float = 5.0

    @classmethod
    def from_options(cls, opts: AgentOptions) -> EtcdSettings:
        """flanneld's --etcd-* flags (the agent's, and `flannel-bpf leases`')."""
        return cls(
            endpoints=opts.etcd_endpoints,
            cafile=opts.etcd_cafile,
            certfile=opts.etcd_certfile,
            keyfile=opts.etcd_keyfile,
            username=opts.etcd_username,
            password=opts.etcd_password,
        )


@dataclass(frozen=True)
class Endpoint:
    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    """Accept flanneld's URL form (http://host:port) and the bare host:port form."""
    raw = text.strip()
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "https"):
        raise StoreError(f"etcd endpoint {text!r}: scheme must be http or https")
    try:
        port = parts.port or 2379
    except ValueError:
        raise StoreError(f"etcd endpoint {text!r}: bad port") from None
    if not parts.hostname:
        raise StoreError(f"etcd endpoint {text!r}: no host")
    return Endpoint(parts.scheme, parts.hostname, port)


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease_id: int


@dataclass(frozen=True)
class WatchEvent:
    type: Literal["put", "delete"]
    kv: KeyValue


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: its events, and the revision to resume after.

    ``created`` marks the stream's first response (no events, and no revision to resume from).
    """

    revision: int
    events: list[WatchEvent] = field(default_factory=list)
    created: bool = False


def _key_value(kv: Any) -> KeyValue:
    return KeyValue(
        key=kv.key.decode("utf-8", errors="replace"),
        value=bytes(kv.value),
        mod_revision=kv.mod_revision,
        create_revision=kv.create_revision,
        lease_id=kv.lease,
    )


def _read_file(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read etcd {what} {path}: {exc.strerror or exc}") from None


class EtcdStore:
    """One connection (a gRPC channel balanced over every endpoint) to the etcd cluster."""

    def __init__(self, settings: EtcdSettings, observer: StoreObserver | None = None) -> None:
        self.settings = settings
        self.endpoints = [parse_endpoint(e) for e in settings.endpoints if e.strip()]
        if not self.endpoints:
            raise StoreError("no etcd endpoints given")
        self._channel: grpc.aio.Channel | None = None
        self._kv: KVService | None = None
        self._lease: LeaseService | None = None
        self._auth: AuthService | None = None
        self._watch: WatchStub | None = None
        self._token: str | None = None
        self._auth_lock = asyncio.Lock()
        self.uses_tls = False
        self.observer: StoreObserver = observer or NullObserver()
        # None until the first request: then whether the last one reached etcd.
        self.reachable: bool | None = None

    @property
    def endpoint_list(self) -> str:
        return ",".join(str(e) for e in self.endpoints)

    async def __aenter__(self) -> EtcdStore:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Build the channel. Connections are made lazily, so this succeeds while etcd is down."""
        target, server_name = await self._resolve_target()
        options: list[tuple[str, Any]] = [
            # A connection that stops answering is found by keepalives within seconds, and the
            # balancer moves new requests and watches to the other endpoints.
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 5_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ]
        s = self.settings
        wants_tls = bool(s.certfile and s.keyfile) or any(
            e.scheme == "https" for e in self.endpoints
        )
        if wants_tls:
            # flanneld turns TLS on only with both a certificate and a key; an https:// endpoint
            # without them still gets server-verified TLS here instead of a plain-text attempt.
            if bool(s.certfile) != bool(s.keyfile):
                raise StoreError("etcd TLS needs both --etcd-certfile and --etcd-keyfile")
            root = _read_file(s.cafile, "CA file") if s.cafile else _system_roots()
            key = _read_file(s.keyfile, "key file") if s.keyfile else None
            chain = _read_file(s.certfile, "certificate file") if s.certfile else None
            creds = grpc.ssl_channel_credentials(root, key, chain)
            options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
            self.uses_tls = True
        else:
            if s.cafile:
                log.warning("--etcd-cafile is ignored without --etcd-certfile and --etcd-keyfile")
            log.info("no certificate provided: connecting to etcd with http. This is insecure")
            self._channel = grpc.aio.insecure_channel(target, options=options)
        # Retries are ours (lease manager, watch loop); one attempt per call keeps timing honest.
        self._kv = KVService(self._channel, max_attempts=1)
        self._lease = LeaseService(self._channel, max_attempts=1)
        self._auth = AuthService(self._channel, max_attempts=1)
        self._watch = WatchStub(self._channel)

    async def _resolve_target(self) -> tuple[str, str]:
        """An ipv4: target listing every endpoint, for gRPC's round-robin balancer."""
        loop = asyncio.get_running_loop()
        addresses: list[str] = []
        for endpoint in self.endpoints:
            try:
                infos = await loop.getaddrinfo(
                    endpoint.host, endpoint.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise StoreError(f"etcd endpoint {endpoint}: cannot resolve host: {exc}") from None
            for info in infos:
                address = f"{info[4][0]}:{endpoint.port}"
                if address not in addresses:
                    addresses.append(address)
        return "ipv4:" + ",".join(addresses), self.endpoints[0].host

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, operation: str, detail: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one request, timed and counted by ``operation``; every failure becomes a
        StoreError that names the endpoints."""
        if self._kv is None:
            raise StoreError("etcd store is not connected")
        started = time.monotonic()
        try:
            result = await self._attempt(operation, detail, fn)
        except StoreError as exc:
            self._observe(operation, _outcome(exc), time.monotonic() - started, exc)
            raise
        self._observe(operation, "success", time.monotonic() - started, None)
        return result

    def _observe(
        self, operation: str, outcome: str, seconds: float, error: StoreError | None
    ) -> None:
        """Feed the observer; log etcd going away and coming back, once each way."""
        self.observer.etcd_request(operation, outcome, seconds)
        self._set_reachable(outcome != "unavailable", error)

    def _set_reachable(self, reachable: bool, error: StoreError | None = None) -> None:
        if reachable == self.reachable:
            return
        if not reachable:
            log.warning("etcd unreachable: %s", error)
        elif self.reachable is False:
            log.info("etcd reachable again at %s", self.endpoint_list)
        self.reachable = reachable
        self.observer.etcd_reachable(reachable)

    async def _attempt(self, operation: str, detail: str, fn: Callable[[], Awaitable[T]]) -> T:
        what = f"{operation.replace('_', ' ')} {detail}".rstrip()
        if self.settings.username and self._token is None:
            await self._authenticate()
        for attempt in (1, 2):
            try:
                return await fn()
            except EtcdUnauthenticatedError as exc:
                # Simple tokens expire; one fresh token, then give up.
                if attempt == 1 and self.settings.username:
                    self._token = None
                    await self._authenticate()
                    continue
                raise StoreAuthError(f"etcd {what} at {self.endpoint_list}: {exc}") from None
            except EtcdPermissionDeniedError as exc:
                raise StoreAuthError(f"etcd {what} at {self.endpoint_list}: {exc}") from None
            except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
                raise StoreUnavailable(self._unavailable_message(what, exc)) from None
            except EtcdError as exc:
                raise StoreError(f"etcd {what} at {self.endpoint_list}: {exc}") from None
            except grpc.aio.AioRpcError as exc:
                raise StoreError(
                    f"etcd {what} at {self.endpoint_list}: {exc.code().name}: {exc.details()}"
                ) from None
        raise AssertionError("unreachable")

    def _unavailable_message(self, what: str, exc: BaseException) -> str:
        detail = str(exc) or "timed out"
        lowered = detail.lower()
        if any(mark in lowered for mark in _TLS_FAILURE_MARKS):
            hint = self._tls_hint(lowered)
            return f"etcd {what} at {self.endpoint_list}: TLS failed ({hint}): {detail}"
        return f"etcd {what} at {self.endpoint_list} unavailable: {detail}"

    def _tls_hint(self, detail: str) -> str:
        """gRPC's TLS errors name the symptom (TSI_DATA_CORRUPTED), not the cause: guess it."""
        s = self.settings
        if not self.uses_tls:
            return "the server speaks TLS: use an https:// endpoint"
        if "verify_failed" in detail or "issuer" in detail:
            where = s.cafile or "the system roots"
            return f"the server's certificate is not signed by {where}: check --etcd-cafile"
        if not s.certfile:
            return (
                "the server rejected the handshake; it probably requires a client certificate: "
                "pass --etcd-certfile and --etcd-keyfile"
            )
        return "certificate or CA mismatch between --etcd-cafile/--etcd-certfile and the server"

    async def _authenticate(self) -> None:
        async with self._auth_lock:
            if self._token is not None:
                return
            assert self._auth is not None
            s = self.settings
            try:
                resp = await self._auth.authenticate(
                    s.username, s.password, timeout=s.request_timeout
                )
            except (EtcdUnauthenticatedError, EtcdPermissionDeniedError) as exc:
                raise StoreAuthError(
                    f"etcd authentication as {s.username!r} at {self.endpoint_list} failed: {exc}"
                ) from None
            except (EtcdConnectionError, EtcdTransientError, TimeoutError) as exc:
                raise StoreUnavailable(self._unavailable_message("authenticate", exc)) from None
            except (EtcdError, grpc.aio.AioRpcError) as exc:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                raise StoreAuthError(
                    f"etcd authentication as {s.username!r} at {self.endpoint_list} failed: "
                    f"{detail}"
                ) from None
            self._token = resp.token
            for service in (self._kv, self._lease, self._auth):
                assert service is not None
                service.set_token(self._token)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        # Require a leader: a watch on a member cut off from quorum is cancelled instead of
        # silently delivering nothing, so the watch loop moves to a healthy member.
        meta: tuple[tuple[str, str], ...] = (("hasleader", "true"),)
        if self._token:
            meta += (("token", self._token),)
        return meta

    @property
    def _timeout(self) -> float:
        return self.settings.request_timeout

    async def get(self, key: str) -> tuple[KeyValue | None, int]:
        """The key (or None) and the store revision it was read at."""
        resp = await self._call("get", key, lambda: self._kv_svc().get(key, timeout=self._timeout))
        value = _key_value(resp.kvs[0]) if resp.kvs else None
        return value, resp.header.revision

    async def list_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under prefix, in key order, and the revision of that snapshot."""
        resp = await self._call(
            "list",
            prefix,
            lambda: self._kv_svc().get(prefix, prefix_range_end(prefix), timeout=self._timeout * 4),
        )
        return [_key_value(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        resp = await self._call(
            "put", key, lambda: self._kv_svc().put(key, value, lease_id, timeout=self._timeout)
        )
        return int(resp.header.revision)

    async def create(self, key: str, value: bytes, lease_id: int = 0) -> bool:
        """Put only if the key does not exist (flanneld's If Version(key)==0 Then Put)."""
        kv = self._kv_svc()
        resp = await self._call(
            "create",
            key,
            lambda: kv.txn(
                [kv.txn_compare_version(key, 0)],
                [kv.txn_op_put(key, value, lease=lease_id)],
                timeout=self._timeout,
            ),
        )
        return bool(resp.succeeded)

    async def delete(self, key: str) -> bool:
        resp = await self._call(
            "delete", key, lambda: self._kv_svc().delete(key, timeout=self._timeout)
        )
        return bool(resp.deleted)

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new etcd lease: (id, granted TTL in seconds)."""
        resp = await self._call(
            "lease_grant", "", lambda: self._lease_svc().grant(ttl, timeout=self._timeout)
        )
        return int(resp.ID), int(resp.TTL)

    async def revoke(self, lease_id: int) -> None:
        await self._call(
            "lease_revoke", "", lambda: self._lease_svc().revoke(lease_id, timeout=self._timeout)
        )

    async def time_to_live(self, lease_id: int) -> int:
        """Seconds left on an etcd lease; -1 when it does not exist (etcd's own convention)."""
        if lease_id == 0:
            return -1
        resp = await self._call(
            "lease_ttl", "", lambda: self._lease_svc().time_to_live(lease_id, timeout=self._timeout)
        )
        return int(resp.TTL)

    async def compact(self, revision: int) -> None:
        await self._call(
            "compact", "", lambda: self._kv_svc().compact(revision, physical=True, timeout=30)
        )

    def _kv_svc(self) -> KVService:
        if self._kv is None:
            raise StoreError("etcd store is not connected")
        return self._kv

    def _lease_svc(self) -> LeaseService:
        if self._lease is None:
            raise StoreError("etcd store is not connected")
        return self._lease

    # -- watch -------------------------------------------------------------------------------

    async def watch(
        self, key: str, start_revision: int, *, prefix: bool
    ) -> AsyncIterator[WatchBatch]:
        """Stream events from start_revision on; ends only by raising a StoreError.

        The caller owns reconnecting (with the last revision it saw) and compaction recovery.
        """
        if self._watch is None:
            raise StoreError("etcd store is not connected")
        if self.settings.username and self._token is None:
            await self._authenticate()
        create = WatchCreateRequest(
            key=key.encode(),
            range_end=prefix_range_end(key) if prefix else b"",
            start_revision=start_revision,
            progress_notify=True,
        )

        # Written, not fed from a request generator: gRPC closes such a generator from another
        # task when the call ends, which fails ("aclose(): asynchronous generator is already
        # running") every time the server cancels a watch, e.g. on losing its leader.
        call = self._watch.Watch(metadata=self._metadata())
        streaming = False
        try:
            await call.write(WatchRequest(create_request=create))
            async for resp in call:
                streaming = True
                if resp.compact_revision:
                    raise WatchCompacted(resp.compact_revision)
                if resp.canceled:
                    reason = resp.cancel_reason or "cancelled by the server"
                    if "token" in reason or "auth" in reason:
                        self._token = None
                    raise StoreUnavailable(f"etcd watch on {key} at {self.endpoint_list}: {reason}")
                if resp.created and not resp.events:
                    self._set_reachable(True)
                    # Not a revision to resume from: events before it may still be on their way.
                    yield WatchBatch(revision=resp.header.revision, events=[], created=True)
                    continue
                events = [
                    WatchEvent("delete" if ev.type == 1 else "put", _key_value(ev.kv))
                    for ev in resp.events
                ]
                yield WatchBatch(revision=resp.header.revision, events=events)
            raise StoreUnavailable(f"etcd watch on {key} at {self.endpoint_list}: stream ended")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                self._token = None
            error = StoreUnavailable(
                f"etcd watch on {key} at {self.endpoint_list}: {exc.code().name}: {exc.details()}"
            )
            # A stream that ran and broke is one member going away: the caller's next watch
            # goes to another. etcd is unreachable when a watch cannot even be set up.
            unavailable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            if exc.code() in unavailable and not streaming:
                self._set_reachable(False, error)
            raise error from None
        finally:
            call.cancel()


# Substrings of gRPC errors that mean the TLS layer failed, not the network.
_TLS_FAILURE_MARKS = ("handshake", "ssl", "certificate", "tsi_", "unwrap failed", "tls")


def _system_roots() -> bytes | None:
    """The system CA bundle, for https endpoints given without --etcd-cafile."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_bytes()
    return None
