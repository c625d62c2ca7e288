"""The front actor: the RPC and HTTP listeners, and the router to the shards.

Gateways' requests arrive one at a time; a Ray actor call costs about a millisecond, so
the front never makes one call per request. Each shard has a lane: requests join the lane's
queue, and whenever fewer than ``calls_in_flight_max`` calls are running, everything queued
(up to ``call_items_max`` items) leaves in one call (micro-batching without a timer: under
load the batches grow by themselves, at rest a request leaves at once).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import msgspec
import numpy as np
import ray
import uvicorn
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.channel import ChannelBroken, ChannelClient
from actors.edge import (
    AuditWriter,
    Credentials,
    CredentialsWatch,
    HttpLimits,
    ListenError,
    PaymentsLink,
    PersonalUserData,
    RequestSignatures,
    build_app,
    http_listener,
    http_server,
    server_context,
    start_rpc_server,
)
from actors.lease import Fence, hold
from actors.ledger.crossdb import LEASE_CROSSDB_RELAY, CrossDatabase
from actors.ledger.history import HistoryStore, query_across
from actors.ledger.indexer import HistoryIndexer
from actors.ledger.quota import AccountQuota
from actors.ledger.shard import endpoint_of, settle_garbage_collector, shard_actor_name
from actors.ledger.store import LedgerStore
from actors.ledger.stream import MultiStreamReader
from actors.names import NAMESPACE
from actors.ops import metrics, telemetry
from actors.payments import ORIGIN_HEADER
from processor.batch import TransferBatch, encode_batch
from processor.codes import AccountResult, TransferResult
from processor.config import Config, FrontConfig
from processor.errors import LedgerError, Overloaded, Unavailable
from processor.history import (
    AccountBalancesAt,
    AccountTransfersFilter,
    TransfersPage,
    TransfersQuery,
)
from processor.lease import LeaseConfig
from processor.ledger import (
    MAIN_DATABASE,
    PartitionMap,
    compare_existing,
    crossing_mask,
    refused_across_databases,
)
from processor.ratelimit import RateLimiter
from processor.request_audit import AUDIT_HEADER
from processor.stream import StreamPage
from processor.types import Account, Transfer, TransferFlags

__all__ = ["Front", "front_actor_name", "make_front"]

log = logging.getLogger("txproc.front")
ENCODER = msgspec.msgpack.Encoder()
CODES = msgspec.msgpack.Decoder(list[int])
RESULTS = msgspec.msgpack.Decoder(list[tuple[int, int]])
OK_OR_EXISTS = frozenset({int(TransferResult.ok), int(TransferResult.exists)})
LINKED = int(TransferFlags.LINKED)
# Transfers between databases of one request carried at once (each a few round trips).
SAGAS_AT_ONCE_MAX = 64
RESULTS_BY_VALUE = {int(c): c for c in TransferResult}
NOT_APPLIED = int(TransferResult.not_applied)
# Requests up to this size have their stored transfers remembered (HTTP answers a create
# with the stored transfer); below PLAIN_ROUTING_ITEMS_MIN a request is routed item by item.
REMEMBER_REQUEST_ITEMS_MAX = 64
PLAIN_ROUTING_ITEMS_MIN = 64
# What a database outage looks like to a reader: answered as a retryable ``unavailable``.
# Connections of the front's history reads (actors/ledger/history.py), apart from the
# lookups' pool so a deep history read never delays a lookup after a create.
HISTORY_POOL_SIZE_MAX = 2
# The history indexer runs on one front at a time, under this lease (actors/lease.py).
LEASE_HISTORY_INDEXER = "history-indexer"
INDEXER_LEASE = LeaseConfig(ttl_s=4.0, renew_interval_s=1.0, margin_s=1.0)
# The history indexer waits while a write was routed this recently (actors/ledger/indexer.py).
INDEXER_YIELD_S = 0.25
DATABASE_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass(slots=True)
class _Entry:
    group: list[Any]
    future: asyncio.Future[list[Any]]
    trace: dict[str, str] | None = None  # the request's span, linked from the shard's batch


class _Lane:
    """The micro-batching queue of one shard for one operation."""

    def __init__(self, front: Front, shard: int, method: str) -> None:
        self._front = front
        self._shard = shard
        self._method = method
        self._queue: list[_Entry] = []
        self._queued_items = 0
        self._calls = 0
        self._queue_gauge = metrics.SHARD_QUEUE_ITEMS.labels(str(shard))
        self._in_flight_gauge = metrics.SHARD_CALLS_IN_FLIGHT.labels(str(shard))

    def check_room(self, items: int) -> None:
        """Raise ``Overloaded`` if ``items`` more would not fit in the queue."""
        if self._queued_items + items > self._front.config.front.queue_items_max:
            metrics.OVERLOAD_REJECTIONS.labels("shard_queue").inc()
            raise Overloaded(f"shard {self._shard} queue is full", retry_after_s=0.1)

    def submit(self, group: Any) -> asyncio.Future[list[Any]]:
        """Queue ``group`` (a list of items, or a ``TransferBatch`` on the columns lane)."""
        self.check_room(len(group))
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Entry(group, future, telemetry.carrier()))
        self._front.last_write_s = time.monotonic()
        self._queued_items += len(group)
        self._kick()
        self._queue_gauge.set(self._queued_items)
        return future

    def _kick(self) -> None:
        cfg = self._front.config.front
        while self._queue and self._calls < cfg.calls_in_flight_max:
            entries: list[_Entry] = []
            items = 0
            while self._queue and (not entries or items + len(self._queue[0].group)
                                   <= cfg.call_items_max):
                entry = self._queue.pop(0)
                entries.append(entry)
                items += len(entry.group)
            self._queued_items -= items
            self._calls += 1
            self._in_flight_gauge.inc()
            self._queue_gauge.set(self._queued_items)
            asyncio.get_running_loop().create_task(self._call(entries))

    async def _call(self, entries: list[_Entry]) -> None:
        try:
            raw = _encode_groups(self._method, [e.group for e in entries])
            links = [e.trace for e in entries if e.trace]
            codes = _decode_results(self._method, await self._front.call_shard(
                self._shard, self._method, raw, **({"links": links} if links else {})))
            offset = 0
            for e in entries:
                if not e.future.done():
                    e.future.set_result(codes[offset: offset + len(e.group)])
                offset += len(e.group)
        except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
            error = exc if isinstance(exc, LedgerError) else Unavailable(
                f"shard {self._shard} failed: {type(exc).__name__}")
            if not isinstance(exc, LedgerError):
                log.warning("shard %d call failed: %r", self._shard, exc)
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(error)
        finally:
            self._calls -= 1
            self._in_flight_gauge.dec()
            self._kick()


_TRANSFERS_BY_RESULT: dict[TransferResult, Any] = {}


def _transfers_counter(result: TransferResult) -> Any:
    """The transfers counter of one result code, its labelled child looked up once."""
    counter = _TRANSFERS_BY_RESULT.get(result)
    if counter is None:
        counter = _TRANSFERS_BY_RESULT[result] = metrics.TRANSFERS.labels(result.name)
    return counter


def _http_limits(f: FrontConfig) -> HttpLimits:
    return HttpLimits(
        header_timeout_s=f.http_header_timeout_s, header_bytes_max=f.http_header_bytes_max,
        body_timeout_s=f.http_body_timeout_s, keep_alive_timeout_s=f.http_keep_alive_timeout_s,
        write_timeout_s=f.http_write_timeout_s, connections_max=f.http_connections_max,
        connections_per_peer_max=f.http_connections_per_peer_max)


def _server_context(f: FrontConfig) -> ssl.SSLContext | None:
    if not f.tls:
        return None
    return server_context(f.tls_cert_path, f.tls_key_path, f.tls_client_ca_path,
                          f.tls_require_client_cert)


def _tls_mode(f: FrontConfig) -> str:
    if not f.tls:
        return "off"
    if f.tls_require_client_cert:
        return "on, client certificates required"
    return "on, client certificates verified if presented" if f.tls_client_ca_path else "on"


def _encode_groups(method: str, groups: list[Any]) -> bytes:
    if method == "create_transfer_columns":
        return encode_batch(TransferBatch.concat(groups))
    return ENCODER.encode(groups)


def _decode_results(method: str, raw: bytes) -> Any:
    """One result per item: (code, timestamp) for create_transfers, codes otherwise (a
    uint8 array for create_transfer_columns)."""
    if method == "create_transfer_columns":
        return np.frombuffer(raw, dtype=np.uint8)
    return (RESULTS if method == "create_transfers" else CODES).decode(raw)


class Front:
    """Implements the LedgerService by routing to shards; serves RPC and HTTP."""

    def __init__(self, config: Config, channel_key: bytes) -> None:
        telemetry.setup(config.observability, "front")
        self.config = config
        self._partitions = config.shard.partition_map()
        self._shards: list[Any] = []
        self._channel_key = channel_key
        # One data-plane connection per shard (actors.channel); Ray calls for the rest.
        self._channels: list[ChannelClient] = []
        self._lanes: dict[tuple[int, str], _Lane] = {}
        self._store: LedgerStore | None = None  # the main database's
        # Every database's store and history reads, by key (main's are _store and
        # _history): a shard's rows are read from its own database (docs/design.md §12).
        self._stores: dict[str, LedgerStore] = {}
        self._histories: dict[str, HistoryStore] = {}
        self._stream: MultiStreamReader | None = None
        # Transfers between databases (actors/ledger/crossdb.py), with several databases.
        self._crossdb: CrossDatabase | None = None
        self._relay_tasks: list[asyncio.Task[None]] = []
        # History, queries and balances at an instant: a pool of their own (history.py).
        self._history: HistoryStore | None = None
        # Appends account_history below the horizon, off the commit path (indexer.py): on
        # the one front that holds the lease ``history-indexer`` (several would only queue
        # on the position row's lock; docs/design.md §16).
        self._indexers: list[HistoryIndexer] = []
        self._indexer_tasks: list[asyncio.Task[None]] = []
        # When a lane last took a write: the indexer yields to ingest (indexer.py).
        self.last_write_s = 0.0
        self._audit: AuditWriter | None = None
        # Per-tenant account counts, with --max-accounts-per-tenant (actors/ledger/quota.py).
        self._quota: AccountQuota | None = None
        self._ready = False
        self._http: uvicorn.Server | None = None
        self._http_task: asyncio.Task[None] | None = None
        self._rpc: asyncio.AbstractServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        # Keeps the key ring and the revocations current (actors.edge.credentials).
        self._credentials: CredentialsWatch | None = None
        self._credentials_task: asyncio.Task[None] | None = None
        # Checks signed HTTP requests; keeps the client keys current (actors.edge.signatures).
        self._signatures: RequestSignatures | None = None
        # The service both listeners are given: this front's, with the user_data of tenants
        # marked personal kept as pseudonyms (actors.edge.personal).
        self._personal: PersonalUserData | None = None
        self._personal_task: asyncio.Task[None] | None = None
        self._stored: OrderedDict[int, Transfer] = OrderedDict()  # oldest first
        # Payments run in their own actor; the edge forwards to it (actors.edge.payments_link).
        payments = config.payments
        self._payments = (PaymentsLink(channel_key)
                          if payments.enabled and payments.providers else None)

    async def start(self, http_port: int | None = None, rpc_port: int | None = None
                    ) -> dict[str, Any]:
        """Wait for the shards, then listen. Returns the bound ports.

        The ports default to the configured ones; a restarted front is given the ports its
        predecessor bound, so gateways reconnect to the same address.
        """
        cfg = self.config
        for db in self._partitions.databases:
            url = cfg.shard.database_url_of(db)
            self._stores[db] = await LedgerStore.connect(
                url, pool_size_max=4, connect_timeout_s=cfg.shard.connect_timeout_s,
                command_timeout_s=cfg.shard.command_timeout_s,
            )
            self._histories[db] = await HistoryStore.connect(
                url, pool_size_max=HISTORY_POOL_SIZE_MAX,
                connect_timeout_s=cfg.shard.connect_timeout_s,
                command_timeout_s=cfg.shard.command_timeout_s)
        self._store = self._stores[MAIN_DATABASE]
        self._history = self._histories[MAIN_DATABASE]
        if not self._partitions.single_database:
            self._crossdb = CrossDatabase(
                self._partitions, {db: store.pool for db, store in self._stores.items()},
                submit=lambda ts: self._create_transfers(ts, [0] * len(ts)),
                create_accounts=self._create_accounts)
            self._stream = MultiStreamReader(
                [(self._histories[db].pool, self._partitions.shards_of_database(db))
                 for db in self._partitions.databases], shards=self._partitions.shards)
        self._audit = await AuditWriter.connect(
            cfg.shard.database_url, connect_timeout_s=cfg.shard.connect_timeout_s,
            command_timeout_s=cfg.shard.command_timeout_s, clock_s=time.time)
        if cfg.front.accounts_per_tenant_max > 0:
            self._quota = await AccountQuota.connect(
                cfg.shard.database_url, cfg.front.accounts_per_tenant_max,
                connect_timeout_s=cfg.shard.connect_timeout_s,
                command_timeout_s=cfg.shard.command_timeout_s)
        self._shards = [ray.get_actor(shard_actor_name(s), namespace=NAMESPACE)
                        for s in range(cfg.shard.shards)]
        await asyncio.gather(*[s.ready.remote() for s in self._shards])
        self._channels = [ChannelClient(endpoint_of(handle), self._channel_key)
                          for handle in self._shards]
        # The key ring and the revocations in force before the first request is taken; a
        # refused key file (a symlink, another owner, readable by others) fails the start.
        key = Credentials.of_directory(cfg.keys_path, now_s=int(time.time()))
        self._credentials = CredentialsWatch(
            key, cfg.shard.database_url, connect_timeout_s=cfg.shard.connect_timeout_s,
            command_timeout_s=cfg.shard.command_timeout_s)
        await self._credentials.poll()
        self._signatures = await RequestSignatures.connect(
            cfg.shard.database_url, required=cfg.front.require_signed_requests,
            connect_timeout_s=cfg.shard.connect_timeout_s,
            command_timeout_s=cfg.shard.command_timeout_s)
        self._personal = await PersonalUserData.connect(
            self, cfg.shard.database_url, cfg.keys_path, shared_keys=bool(cfg.front.key_path),
            connect_timeout_s=cfg.shard.connect_timeout_s,
            command_timeout_s=cfg.shard.command_timeout_s)
        # One budget per principal across both listeners of this front.
        limiter = RateLimiter(cfg.front.rate_limit_rps, cfg.front.rate_limit_burst)
        app = build_app(self._personal, key, clock_s=time.time, ready=self.is_ready,
                        body_bytes_max=cfg.front.body_bytes_max,
                        payments=self._payments,
                        reserved_id_min=cfg.payments.rules.system_id_base,
                        rate_limiter=limiter, audit=self._audit,
                        signatures=self._signatures)
        # One context for both listeners; a missing or unreadable file fails the start.
        tls = _server_context(cfg.front)
        # Bound here, so a taken port fails the start with an OSError (http_listener).
        listener = http_listener(cfg.front.host,
                                 cfg.front.http_port if http_port is None else http_port)
        server = http_server(app, host=cfg.front.host, port=listener.getsockname()[1],
                             limits=_http_limits(cfg.front), ssl_context=tls)
        self._http = server
        self._http_task = asyncio.get_running_loop().create_task(
            server.serve(sockets=[listener]))
        for _ in range(200):
            if server.started:
                break
            if self._http_task.done():
                self._http_task.result()
            await asyncio.sleep(0.025)
        f = cfg.front
        rpc_port = f.rpc_port if rpc_port is None else rpc_port
        try:
            self._rpc = await start_rpc_server(
                self._personal, key, host=f.host, port=rpc_port, clock_s=time.time,
                reserved_id_min=cfg.payments.rules.system_id_base,
                connections_max=f.rpc_connections_max,
                connections_per_peer_max=f.rpc_connections_per_peer_max,
                hello_timeout_s=f.rpc_hello_timeout_s, hello_bytes_max=f.rpc_hello_bytes_max,
                idle_timeout_s=f.rpc_idle_timeout_s, frame_timeout_s=f.rpc_frame_timeout_s,
                write_timeout_s=f.rpc_write_timeout_s, token_grace_s=f.rpc_token_grace_s,
                rate_limiter=limiter, audit=self._audit, ssl_context=tls)
        except OSError as exc:
            raise ListenError(f"rpc {f.host}:{rpc_port}: {exc.strerror or exc}") from exc
        http_port = server.servers[0].sockets[0].getsockname()[1]
        rpc_port = self._rpc.sockets[0].getsockname()[1]
        self._ready = True
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_shards())
        self._credentials_task = asyncio.get_running_loop().create_task(
            self._credentials.run())
        self._personal_task = asyncio.get_running_loop().create_task(self._personal.run())
        holder = f"front@{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        # One indexer per database, under a lease kept in that database.
        for db, store in self._stores.items():
            indexer = HistoryIndexer(
                cfg.shard.database_url_of(db), connect_timeout_s=cfg.shard.connect_timeout_s,
                command_timeout_s=cfg.shard.command_timeout_s,
                busy=lambda: time.monotonic() - self.last_write_s < INDEXER_YIELD_S)
            self._indexers.append(indexer)
            self._indexer_tasks.append(asyncio.get_running_loop().create_task(hold(
                store.pool, LEASE_HISTORY_INDEXER, holder, INDEXER_LEASE,
                _indexing(indexer))))
            if self._crossdb is not None:  # the sagas of this debit database left behind
                self._relay_tasks.append(asyncio.get_running_loop().create_task(hold(
                    store.pool, LEASE_CROSSDB_RELAY, holder, INDEXER_LEASE,
                    _relaying(self._crossdb, db))))
        settle_garbage_collector()
        # Ray runs async actors on uvloop when it is installed (it is a dependency).
        loop_name = type(asyncio.get_running_loop()).__module__
        log.info("front listening: http %s:%d rpc %s:%d (event loop: %s, tls: %s)",
                 cfg.front.host, http_port, cfg.front.host, rpc_port, loop_name,
                 _tls_mode(cfg.front))
        return {"http_port": http_port, "rpc_port": rpc_port, "loop": loop_name}

    async def payments_call(self, principal: str, operation: str, key: str, subject_id: str,
                            body: bytes, origin: int = 0, audit: str = ""
                            ) -> tuple[int, bytes, bool]:
        """A payments operation arriving over RPC, forwarded to the payments actor: the
        HTTP API's status and JSON body, and whether the answer was replayed. ``origin``
        is the request's audit record (actors/edge/audit.py); ``audit``, when not empty,
        that record encoded for the payments actor to write (processor/request_audit.py)."""
        if self._payments is None:
            raise Unavailable("payments are not enabled on this server", retry_after_s=60.0)
        headers = {ORIGIN_HEADER: str(origin)}
        if audit:
            headers[AUDIT_HEADER] = audit
        status, answer, headers = await self._payments.call(
            principal, operation, key, subject_id, body, headers)
        return status, answer, "Idempotent-Replayed" in headers

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, close."""
        self._ready = False
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self._credentials_task is not None:
            self._credentials_task.cancel()
        if self._personal_task is not None:
            self._personal_task.cancel()
        for task in [*self._indexer_tasks, *self._relay_tasks]:
            task.cancel()
        if self._indexer_tasks or self._relay_tasks:
            await asyncio.wait([*self._indexer_tasks, *self._relay_tasks], timeout=5)
        if self._rpc is not None:
            self._rpc.close()
        if self._http is not None:
            self._http.should_exit = True
            if self._http_task is not None:
                await asyncio.wait([self._http_task], timeout=5)
        for _ in range(100):
            if not any(lane._calls for lane in self._lanes.values()):
                break
            await asyncio.sleep(0.05)
        for channel in self._channels:
            channel.close()
        if self._payments is not None:
            self._payments.close()
        for store in self._stores.values():
            await store.close()
        for history in self._histories.values():
            await history.close()
        for indexer in self._indexers:
            await indexer.close()
        if self._audit is not None:
            await self._audit.close()
        if self._quota is not None:
            await self._quota.close()
        if self._personal is not None:
            await self._personal.close()
        if self._credentials is not None:
            await self._credentials.close()
        if self._signatures is not None:
            await self._signatures.close()

    async def _watch_shards(self) -> None:
        """Call every shard often, so a restarted one recovers at once (its recovery takes a
        new epoch, which lets peers release what its predecessor held) and /readyz tells
        the truth."""
        while True:
            await asyncio.sleep(0.5)
            results = await asyncio.gather(
                *[asyncio.wait_for(s.ready.remote(), timeout=5) for s in self._shards],
                return_exceptions=True,
            )
            healthy = all(not isinstance(r, BaseException) for r in results)
            if self._rpc is not None and self._rpc.is_serving():
                self._ready = healthy

    def is_ready(self) -> bool:
        """Shards recovered and listeners up: the ledger can take requests (payments are
        another actor's readiness)."""
        return self._ready

    def is_listening(self) -> bool:
        """True once ``start`` has bound both listeners in this incarnation."""
        return self._rpc is not None

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this front runs on (it is pinned there: actors.app.runtime)."""
        return str(ray.get_runtime_context().get_node_id())

    async def call_shard(self, shard: int, method: str, raw: bytes,
                         links: list[dict[str, str]] | None = None) -> bytes:
        """One call over the shard's channel, retried (bounded) while the shard restarts
        after a crash.

        Retrying is safe: ids are idempotent, so a batch that did commit before the crash
        answers ``exists`` the second time.
        """
        cfg = self.config.front
        handle = self._shards[shard]
        channel = self._channels[shard]
        deadline = time.monotonic() + cfg.retry_deadline_s
        for attempt in range(1, cfg.retry_attempts_max + 1):
            try:
                await channel.connect(max(0.01, deadline - time.monotonic()))
                result: bytes = await channel.call(method, raw, links)
                return result
            except LedgerError:
                raise
            except (ChannelBroken, ray.exceptions.RayActorError,
                    ray.exceptions.ActorUnavailableError) as exc:
                remaining = deadline - time.monotonic()
                if attempt == cfg.retry_attempts_max or remaining <= 0:
                    raise Unavailable(f"shard {shard} is restarting", retry_after_s=1.0) from exc
                log.warning("shard %d died during a call (attempt %d); waiting for it",
                            shard, attempt)
                try:
                    await asyncio.wait_for(handle.ready.remote(), timeout=remaining)
                except Exception:  # noqa: BLE001 - every failure is logged or answered, never lost
                    await asyncio.sleep(min(0.5, max(remaining, 0)))
        raise Unavailable(f"shard {shard} is unavailable", retry_after_s=1.0)

    def _lane(self, shard: int, method: str) -> _Lane:
        lane = self._lanes.get((shard, method))
        if lane is None:
            lane = self._lanes[(shard, method)] = _Lane(self, shard, method)
        return lane

    # -- LedgerService ------------------------------------------------------------------------

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        quota = self._quota
        if quota is None:
            return await self._create_accounts(accounts)
        # Counted before they can exist; what was not created is given back. A request that
        # fails as a whole may have been applied in part, so it keeps its reservations: the
        # count may run high, never low (actors/ledger/quota.py).
        reserved = await quota.reserve(accounts, self.lookup_accounts)
        results = await self._create_accounts(accounts)
        await quota.settle(reserved, accounts, results)
        return results

    async def _create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        groups: dict[int, list[int]] = {}
        for i, a in enumerate(accounts):
            groups.setdefault(self._partitions.shard_of(a.id), []).append(i)
        codes = await self._route(accounts, groups, "create_accounts")
        return [AccountResult(c) for c in codes]

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        if len(transfers) == 1:
            return [await self._create_transfer(transfers[0])]
        if not self._partitions.single_database:
            return await self._create_transfers_across(transfers)
        results = await self._create_transfers(transfers, [0] * len(transfers))
        for code, n in collections.Counter(results).items():
            _transfers_counter(code).inc(n)
        return results

    async def _create_transfers_across(self, transfers: list[Transfer]
                                       ) -> list[TransferResult]:
        """A request with several databases: the chains that span two are answered here
        (``accounts_in_different_databases``, ``linked_event_failed`` for the rest of the
        chain) and the others routed as ever."""
        refused = refused_across_databases(
            self._partitions, [t.debit_account_id for t in transfers],
            [t.credit_account_id for t in transfers], [t.flags for t in transfers],
            crossing=int(TransferResult.accounts_in_different_databases),
            linked_failed=int(TransferResult.linked_event_failed))
        crossing = int(TransferResult.accounts_in_different_databases)
        sagas = [i for i, code in refused.items() if code == crossing and _alone(transfers, i)]
        for start in range(0, len(sagas), SAGAS_AT_ONCE_MAX):
            part = sagas[start:start + SAGAS_AT_ONCE_MAX]
            answers = await asyncio.gather(*[self._between_databases(transfers[i])
                                             for i in part])
            refused.update((i, int(a)) for i, a in zip(part, answers, strict=True))
        rest = [i for i in range(len(transfers)) if i not in refused]
        answered = (await self._create_transfers([transfers[i] for i in rest], [0] * len(rest))
                    if rest else [])
        results = [RESULTS_BY_VALUE[c] for c in refused.values()] + answered
        for code, n in collections.Counter(results).items():
            _transfers_counter(code).inc(n)
        out = dict(zip(rest, answered, strict=True))
        out.update((i, RESULTS_BY_VALUE[c]) for i, c in refused.items())
        return [out[i] for i in range(len(transfers))]

    async def _between_databases(self, transfer: Transfer) -> TransferResult:
        """A transfer whose accounts live in two databases: a plain one goes through the
        saga (actors/ledger/crossdb.py); a pending, post or void one is refused."""
        if self._crossdb is None or transfer.flags or transfer.pending_id:
            return TransferResult.accounts_in_different_databases
        answer = await self._crossdb.transfer(transfer)
        step = self._stored.pop(transfer.id, None)  # a step, remembered by its routing
        if answer in (TransferResult.ok, TransferResult.exists):
            # What the HTTP API answers with: the transfer as sent, not its steps.
            self._remember(msgspec.structs.replace(
                transfer, timestamp=step.timestamp if step is not None else 0))
        return answer

    async def _create_transfer(self, transfer: Transfer) -> TransferResult:
        """One transfer (an HTTP create): a segment of one chain, so straight to the lane of
        the shard of its debit account (``PartitionMap.coordinator_of`` of one transfer),
        and remembered as stored, as ``_create_transfers`` does for a small request."""
        shard = self._partitions.shard_of(transfer.debit_account_id)
        if not self._partitions.single_database and self._partitions.crosses_databases(
                transfer.debit_account_id, transfer.credit_account_id):
            answer = await self._between_databases(transfer)
            _transfers_counter(answer).inc()
            return answer
        try:
            [(code, timestamp)] = await self._lane(shard, "create_transfers").submit([transfer])
        except Unavailable as exc:
            # The shard stayed unreachable: answer what the database holds, so that an
            # error means nothing was stored (docs/api.md, "Partial answers").
            [(code, timestamp)] = await self._resolve_part(shard, [transfer], exc)
            if code == NOT_APPLIED:
                raise
        if code == NOT_APPLIED:  # a peer of its shard was not reached: nothing stored
            raise _nothing_applied()
        if code in OK_OR_EXISTS:
            self._remember(msgspec.structs.replace(transfer, timestamp=timestamp))
        result = RESULTS_BY_VALUE[code]
        _transfers_counter(result).inc()
        return result

    async def _create_transfers(self, transfers: list[Transfer],
                                out: list[int]) -> list[TransferResult]:
        """Route a request's chains to their coordinators, segment by segment.

        If a coordinator stays unreachable while other parts are answered, its part is
        answered from the database (``_resolve_part``) and later segments are not sent
        (they may depend on it): those transfers answer ``not_applied``. If nothing of the
        request was stored, the request fails as a whole instead (docs/api.md).
        """
        # Small requests (HTTP creates) are answered with the stored transfer, looked up
        # right after; a gateway's bulk batch is not, and remembering it would only push
        # those out of the bounded memory.
        remember = len(transfers) <= REMEMBER_REQUEST_ITEMS_MAX
        error: BaseException | None = None
        sent = False
        previous: dict[int, list[int]] = {}
        for segment in self._segments(transfers):
            if error is None and sent and any(
                    out[i] == NOT_APPLIED for ix in previous.values() for i in ix):
                # A shard answered part of the last segment not_applied (a peer of it was
                # not reached): what follows may depend on it, as after an error.
                error = _nothing_applied()
            previous = segment
            if error is not None:
                for indices in segment.values():
                    for i in indices:
                        out[i] = NOT_APPLIED
                continue
            try:
                results, error = await self._route_transfers(transfers, segment)
            except Overloaded as exc:  # refused whole, before any part of it was queued
                if not sent:
                    raise
                results, error = {i: (NOT_APPLIED, 0) for ix in segment.values()
                                  for i in ix}, exc
            sent = True
            for i, (code, timestamp) in results.items():
                out[i] = code
                if remember and code in OK_OR_EXISTS:
                    # ``exists`` means identical fields: with the stored timestamp, this is
                    # the stored transfer.
                    self._remember(msgspec.structs.replace(transfers[i], timestamp=timestamp))
        if all(c == NOT_APPLIED for c in out):
            raise error or _nothing_applied()
        return [RESULTS_BY_VALUE[c] for c in out]

    async def _route_transfers(
        self, transfers: list[Transfer], groups: dict[int, list[int]]
    ) -> tuple[dict[int, tuple[int, int]], BaseException | None]:
        """One segment: (code, timestamp) per request index, and the first error of a part
        that had to be answered from the database instead of its shard (or None)."""
        for shard, indices in groups.items():  # all parts queued, or none
            self._lane(shard, "create_transfers").check_room(len(indices))
        parts = [(shard, indices, self._lane(shard, "create_transfers").submit(
            [transfers[i] for i in indices])) for shard, indices in groups.items()]
        answers = await asyncio.gather(*[f for _, _, f in parts], return_exceptions=True)
        out: dict[int, tuple[int, int]] = {}
        error: BaseException | None = None
        for (shard, indices, _), answer in zip(parts, answers, strict=True):
            if isinstance(answer, BaseException):
                error = error or answer
                answer = await self._resolve_part(shard, [transfers[i] for i in indices],
                                                  answer)
            for i, pair in zip(indices, answer, strict=True):
                out[i] = (int(pair[0]), int(pair[1]))
        return out, error

    async def _resolve_part(
        self, shard: int, transfers: list[Transfer], error: BaseException
    ) -> list[tuple[int, int]]:
        """(code, timestamp) for each transfer of a part whose shard did not answer.

        ``overloaded`` from the shard means it refused the part before evaluating it. A
        shard still unreachable after the front's retries (``unavailable``) may have
        committed the part before it died, so the database is asked, after the shard is
        fenced out (``LedgerStore.fence_and_find``): stored, burned, or ``not_applied``.
        Any other error, or a database that cannot be asked, fails the request: then the
        outcome of this part is unknown, and the caller sends the same request again.
        """
        if isinstance(error, Overloaded):
            return [(NOT_APPLIED, 0)] * len(transfers)
        if not isinstance(error, Unavailable):
            raise error
        self._require_store()
        store = self._stores[self._partitions.database_of_shard[shard]]
        try:
            stored, burned = await store.fence_and_find(shard, [t.id for t in transfers])
        except DATABASE_ERRORS as exc:
            raise Unavailable(
                f"shard {shard} and the database are unreachable; the outcome of some "
                "transfers is unknown: send the same request again", retry_after_s=1.0,
            ) from exc
        log.warning("shard %d unreachable: %d transfers answered from the database",
                    shard, len(transfers))
        out = []
        for t in transfers:
            found = stored.get(t.id)
            if found is not None:
                out.append((int(compare_existing(t, found)), found.timestamp))
            else:
                out.append((burned.get(t.id, NOT_APPLIED), 0))
        return out

    async def create_transfer_batch(self, batch: TransferBatch) -> np.ndarray:
        """Create a batch given as columns; one result code per transfer (uint8, in order).

        A batch of flagless transfers with distinct ids and no pending id travels to the
        shards as columns (split by the debit account's shard); any other batch is made
        objects and takes the general path, with the same answers.
        """
        groups = _plain_groups_of(self._partitions, batch.flags, batch.pending_id, batch.id,
                                  batch.debit_account_id)
        if not self._partitions.single_database and (groups is None or bool(crossing_mask(
                self._partitions, batch.debit_account_id, batch.credit_account_id).any())):
            # Several databases and a batch that may span two: the general path, which
            # answers the spanning chains itself (rare; batches within one stay columnar).
            results = await self._create_transfers_across(batch.transfers())
            return np.array([int(c) for c in results], dtype=np.uint8)
        if groups is None:
            results = await self._create_transfers(batch.transfers(), [0] * len(batch))
            codes = np.array([int(c) for c in results], dtype=np.uint8)
        else:
            for shard, index in groups.items():  # all parts queued, or none
                self._lane(shard, "create_transfer_columns").check_room(len(index))
            routed = [(shard, index, self._lane(shard, "create_transfer_columns").submit(
                batch.take(index))) for shard, index in groups.items()]
            answers = await asyncio.gather(*[future for _, _, future in routed],
                                           return_exceptions=True)
            codes = np.zeros(len(batch), dtype=np.uint8)
            error: BaseException | None = None
            for (shard, index, _), answer in zip(routed, answers, strict=True):
                if isinstance(answer, BaseException):
                    error = error or answer
                    pairs = await self._resolve_part(
                        shard, batch.take(index).transfers(), answer)
                    codes[index] = np.array([code for code, _ in pairs], dtype=np.uint8)
                else:
                    codes[index] = answer
            if len(codes) and bool((codes == NOT_APPLIED).all()):
                raise error or _nothing_applied()
        values, counts = np.unique(codes, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist(), strict=True):
            _transfers_counter(RESULTS_BY_VALUE[value]).inc(count)
        return codes

    def _remember(self, transfer: Transfer) -> None:
        """Keep a stored transfer at hand: the HTTP API answers a create with it."""
        self._stored[transfer.id] = transfer
        if len(self._stored) > self.config.front.stored_transfers_max:
            # OrderedDict: popping the oldest is O(1), where a plain dict's first key gets
            # slower to find with every deletion at its front.
            self._stored.popitem(last=False)

    def _segments(self, transfers: list[Transfer]) -> list[dict[int, list[int]]]:
        """Split a request into segments run one after another, each a coordinator -> item
        indices map run in parallel.

        Each chain goes to its coordinator (PartitionMap.coordinator_of); a coordinator
        keeps the order of its items, while coordinators run concurrently. Through a
        transfer id a later chain depends on an earlier one for its very answer (a post or
        void of a hold created earlier in the request, a repeated id); so when a chain names
        an id that an earlier chain of another coordinator in the current segment named, a
        new segment starts. Balances are not ordered across coordinators (docs/api.md,
        "Order within a request"): a transfer that must see another's funds on another
        shard is linked to it in a chain.
        """
        plain = self._plain_groups(transfers)
        if plain is not None:
            return [plain]
        segments: list[dict[int, list[int]]] = []
        groups: dict[int, list[int]] = {}
        touched: dict[int, int] = {}  # transfer id -> coordinator
        i = 0
        while i < len(transfers):
            j = i
            while j < len(transfers) - 1 and transfers[j].flags & LINKED:
                j += 1
            chain = transfers[i:j + 1]
            coordinator = self._partitions.coordinator_of(
                [t.debit_account_id for t in chain], [t.flags for t in chain])
            keys = [t.id for t in chain] + [t.pending_id for t in chain if t.pending_id]
            if any(touched.get(k, coordinator) != coordinator for k in keys):
                segments.append(groups)
                groups, touched = {}, {}
            for k in keys:
                touched[k] = coordinator
            groups.setdefault(coordinator, []).extend(range(i, j + 1))
            i = j + 1
        segments.append(groups)
        return [g for g in segments if g]

    def _plain_groups(self, transfers: list[Transfer]) -> dict[int, list[int]] | None:
        """The one segment of a request of flagless transfers with distinct ids and no
        pending id (a gateway's bulk batch), routed by debit account over arrays; None for
        any other request."""
        n = len(transfers)
        if n < PLAIN_ROUTING_ITEMS_MIN or any(t.flags or t.pending_id for t in transfers):
            return None
        zeros = np.zeros(n, dtype=np.int64)
        groups = _plain_groups_of(
            self._partitions, zeros, zeros, np.fromiter((t.id for t in transfers), np.int64, n),
            np.fromiter((t.debit_account_id for t in transfers), np.int64, n))
        return None if groups is None else {s: i.tolist() for s, i in groups.items()}

    async def _route(
        self, items: Sequence[Any], groups: dict[int, list[int]], method: str
    ) -> list[Any]:
        futures = [
            (indices, self._lane(shard, method).submit([items[i] for i in indices]))
            for shard, indices in groups.items()
        ]
        out: list[Any] = [0] * len(items)
        results = await asyncio.gather(*[f for _, f in futures])
        # Indices not in ``groups`` stay 0 here; the caller fills only what it routed.
        for (indices, _), codes in zip(futures, results, strict=True):
            for i, code in zip(indices, codes, strict=True):
                out[i] = code
        return out

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        store = self._require_store()
        try:
            if self._partitions.single_database:
                found = await store.lookup_accounts(list(ids))
            else:  # each account from the database of its shard
                by_database: dict[str, list[int]] = {}
                for i in ids:
                    by_database.setdefault(self._partitions.database_of(i), []).append(i)
                found = {}
                for key, part in by_database.items():
                    found.update(await self._stores[key].lookup_accounts(part))
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc
        return [found.get(i) for i in ids]

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        # Stored transfers never change, so one remembered from its create is current.
        found: dict[int, Transfer] = {i: self._stored[i] for i in ids if i in self._stored}
        missing = [i for i in ids if i not in found]
        if missing:
            self._require_store()
            try:
                # A transfer id names no database: each is asked, main first, for what the
                # ones before it did not have (one database: one read, as ever).
                for store in self._stores.values():
                    found.update(await store.lookup_transfers(missing))
                    missing = [i for i in missing if i not in found]
                    if not missing:
                        break
            except DATABASE_ERRORS as exc:
                raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc
        if self._crossdb is not None and len(found) > 0:
            try:
                sent = await self._crossdb.as_sent(found)
            except DATABASE_ERRORS as exc:
                raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc
            return [sent.get(i) for i in ids]
        return [found.get(i) for i in ids]

    # -- history, queries, balances at an instant (processor.history.HistoryService) ----------

    async def get_account_transfers(self, query: AccountTransfersFilter,
                                    tenant: int) -> TransfersPage | None:
        try:
            return await self._history_of(query.account_id).account_transfers(query, tenant)
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc

    async def query_transfers(self, query: TransfersQuery, tenant: int) -> TransfersPage:
        try:
            if self._partitions.single_database:
                return await self._require_history().query_transfers(query, tenant)
            self._require_history()
            return await query_across(list(self._histories.values()), query, tenant)
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc

    async def get_account_balances(self, account_id: int, at_ns: int,
                                   tenant: int) -> AccountBalancesAt | None:
        try:
            return await self._history_of(account_id).balances_at(account_id, at_ns, tenant)
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc

    async def archived_transfer(self, transfer_id: int, tenant: int) -> str | None:
        """The name of the archive in force that holds the transfer, if ``tenant`` may see
        it (a GET of an archived transfer answers ``archived``; docs/api.md). Over several
        databases each keeps its own archived ids: asked in turn, main first, as lookups."""
        try:
            history = self._require_history()
            if self._partitions.single_database:
                return await history.archive_of(transfer_id, tenant)
            for each in self._histories.values():
                if (name := await each.archive_of(transfer_id, tenant)) is not None:
                    return name
            return None
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc

    async def stream_transfers(self, after: str, limit: int, wait_s: float,
                               tenant: int) -> StreamPage:
        """The change stream's next page (processor.stream.StreamService)."""
        try:
            history = self._require_history()
            reader = history.stream if self._stream is None else self._stream
            return await reader.page(after, limit=limit, wait_s=wait_s, tenant=tenant)
        except DATABASE_ERRORS as exc:
            raise Unavailable("the database is unreachable", retry_after_s=1.0) from exc

    def _history_of(self, account_id: int) -> HistoryStore:
        """The history reads of the database that holds the account's rows."""
        history = self._require_history()
        if self._partitions.single_database:
            return history
        return self._histories[self._partitions.database_of(account_id)]

    def _require_history(self) -> HistoryStore:
        if self._history is None:
            raise Unavailable("the front is starting", retry_after_s=1.0)
        return self._history

    def _require_store(self) -> LedgerStore:
        if self._store is None:
            raise Unavailable("the front is starting", retry_after_s=1.0)
        return self._store

    async def shard_stats(self) -> list[dict[str, float]]:
        return list(await asyncio.gather(*[s.stats.remote() for s in self._shards]))


def _alone(transfers: list[Transfer], i: int) -> bool:
    """Whether item ``i`` is a chain of its own (no linked flag on it or before it)."""
    return not transfers[i].flags & LINKED and (i == 0 or not transfers[i - 1].flags & LINKED)


def _relaying(crossdb: CrossDatabase, database: str
              ) -> Callable[[Fence], Coroutine[Any, Any, None]]:
    """The work the relay's lease runs."""
    async def run(_: Fence) -> None:
        await crossdb.relay(database)
    return run


def _indexing(indexer: HistoryIndexer) -> Callable[[Fence], Coroutine[Any, Any, None]]:
    """The work the indexer's lease runs."""
    async def run(_: Fence) -> None:
        await indexer.run()
    return run


def _nothing_applied() -> Unavailable:
    """The error of a request no part of which was applied because a shard could not reach
    a peer its transfers need (docs/api.md, "Partial answers"): retryable, nothing stored."""
    return Unavailable("a shard these transfers need could not be reached; nothing was "
                       "stored: send the same request again", retry_after_s=1.0)


def _plain_groups_of(partitions: PartitionMap, flags: np.ndarray, pending_id: np.ndarray,
                     ids: np.ndarray, debit: np.ndarray) -> dict[int, np.ndarray] | None:
    """Item indexes per coordinator for a batch of flagless transfers with distinct ids and
    no pending id, which form one segment (``Front._segments``); None for any other."""
    if ids.shape[0] == 0 or flags.any() or pending_id.any():
        return None
    if np.unique(ids).shape[0] != ids.shape[0]:
        return None
    shards = partitions.shards_of(debit)
    return {shard: np.flatnonzero(shards == shard) for shard in np.unique(shards).tolist()}


def front_actor_name(index: int) -> str:
    """The Ray name of front ``index`` (processor.placement numbers them)."""
    return f"txproc-front-{index}"


def make_front(config: Config, channel_key: bytes, *, index: int = 0,
               node_id: str | None = None) -> Any:
    """Start front ``index`` as a Ray actor (the one place it is made remote), on node
    ``node_id`` when given (and only there: a front serves its node's address);
    ``channel_key`` authenticates its calls to the shards (actors.channel).

    Several fronts share nothing but the shards and the database: each is its own process
    with its own listeners, lanes, pools, rate limiter and credentials watch."""
    # Restarted by Ray if it dies; it holds nothing durable, and Processor.supervise()
    # starts the new incarnation on the same ports.
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=100_000
    )(Front)
    options: dict[str, Any] = {"name": front_actor_name(index), "namespace": NAMESPACE}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return actor_class.options(**options).remote(config, channel_key)
