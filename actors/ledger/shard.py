"""LedgerShard: the Ray actor that serializes one group of ledger partitions.

A thin shell: decode, call the pure rules in processor.ledger.rules, persist through the store,
encode. It acknowledges nothing before the database commit, and on any failure of the write
path it exits: Ray restarts it and recovery rebuilds the book from PostgreSQL (crash-only).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import asyncpg
import msgspec
import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.channel import ChannelBroken, ChannelClient, ChannelServer
from actors.ledger.store import LedgerStore, OwnEffects
from actors.names import NAMESPACE
from actors.ops import metrics, telemetry
from processor.backoff import backoff_s
from processor.batch import TransferBatch, decode_batch
from processor.codes import TransferResult
from processor.errors import Overloaded
from processor.ledger import (
    ArrayBook,
    CommitBatch,
    EventKind,
    Leg,
    PlainLegs,
    Plan,
    ShardConfig,
    decode_legs,
    decode_reserve_answer,
    encode_legs,
    encode_reserve_answer,
    warm_up_kernels,
)
from processor.ops_config import ObservabilityConfig
from processor.types import Account, Transfer, require

__all__ = ["LedgerShard", "make_shard"]

log = logging.getLogger("txproc.shard")

ACCOUNT_REQUESTS = msgspec.msgpack.Decoder(list[list[Account]])
TRANSFER_REQUESTS = msgspec.msgpack.Decoder(list[list[Transfer]])
LEGS = msgspec.msgpack.Decoder(list[Leg])
OUTCOMES = msgspec.msgpack.Decoder(list[tuple[int, bool]])
BLOCK_OUTCOMES = msgspec.msgpack.Decoder(list[tuple[int, bytes]])
RESERVE_ANSWER = msgspec.msgpack.Decoder(tuple[int, list[tuple[int, int]]])
RESULTS = msgspec.msgpack.Decoder(list[tuple[int, int]])
ENCODER = msgspec.msgpack.Encoder()
NOT_APPLIED = int(TransferResult.not_applied)
# How long a shard keeps trying to cancel, on a peer that did not answer, a reservation it
# gave up on before it restarts instead (LedgerShard._cancel): longer than a peer takes to
# restart and recover, so that a peer's restart does not restart its coordinators too.
CANCEL_DEADLINE_S = 120.0
# What the front and the peers call over the channel (the data plane); everything else
# (ready, endpoint, stats, stop) stays a Ray call.
CHANNEL_METHODS = (
    "create_accounts", "create_transfers", "create_transfer_columns",
    "reserve", "settle", "reserve_plain", "settle_plain", "cancel_reservation",
)


class Peer(Protocol):
    """Another shard, as this one calls it: ``await peer.call(method, *args)``."""

    def call(self, method: str, *args: Any) -> Awaitable[Any]: ...


@dataclass(slots=True)
class _Pending:
    """An evaluated batch waiting for its commit."""

    batch: CommitBatch
    done: asyncio.Future[None]
    is_accounts: bool = False
    trace: dict[str, str] | None = None  # the batch span, linked from its commit's span


@dataclass(slots=True)
class _Stats:
    batches_committed: int = 0
    transfers_committed: int = 0
    commits: int = 0
    commit_seconds: float = 0.0
    checkpoints: int = 0
    checkpoint_seconds: float = 0.0
    queue_depth_max_seen: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    # How long this incarnation's recovery took, by step (connect, the first checkpoint
    # from the rows, the load, all of it).
    recovery: dict[str, float] = field(default_factory=dict)


class LedgerShard:
    """One shard. Built plainly in unit tests; made a Ray actor by ``make_shard``."""

    def __init__(
        self,
        shard: int,
        config: ShardConfig,
        peers: Callable[[int], Peer] | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
        observability: ObservabilityConfig | None = None,
        crash: Callable[[], None] | None = None,
        channel_key: bytes | None = None,
    ) -> None:
        if observability is not None:
            telemetry.setup(observability, f"shard-{shard}")
        self._shard = shard
        # What a failure of the write path does: end the process (crash-only). A shard run
        # inside a test process is given one that lets the failure surface there instead.
        self._crash = crash or _crash
        self._label = str(shard)
        # Series exist at zero from the start, so rate() and increase() see the first one.
        metrics.LEDGER_WRITE_FAILURES.labels(self._label)
        self._config = config
        self._partitions = config.partition_map()
        # The database this shard's rows live in (several databases: docs/design.md §12).
        self._database = self._partitions.database_of_shard[shard]
        self._own_partitions = self._partitions.partitions_of_shard(shard)
        self._clock_ns = clock_ns
        # The data plane (actors.channel): peers are called over it, and with a key this
        # shard serves it once recovered. Built plainly (tests), peers are given.
        self._channel_key = channel_key
        self._channel: ChannelServer | None = None
        self._address: tuple[str, int] | None = None
        self._peers = peers or self._channel_peer
        self._peer_clients: dict[int, ChannelClient] = {}
        self._started: asyncio.Task[None] | None = None
        self._store: LedgerStore | None = None
        self._book: ArrayBook | None = None
        self._epoch = 0
        self._evaluate_lock = asyncio.Lock()
        self._queue: list[_Pending] = []
        self._queue_ready = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stats = _Stats()
        self._in_flight = 0
        # Every transfer id at or below this may be in the database (stored or burned by
        # any shard, as last read, or planned here); ids above it are new without a read.
        self._ids_high = 0
        self._ids_read_at = 0.0
        # What this incarnation's commits did to its own accounts since its last
        # checkpoint (recovery checkpoints first, from the rows).
        self._unfolded: list[OwnEffects] = []
        self._unfolded_rows = 0  # transfers committed since the last checkpoint
        self._committing = False
        self._checkpointing: asyncio.Task[None] | None = None
        # Reservation calls of this incarnation, numbered so that one given up on can be
        # cancelled on its peer (_reserve_remote); the cancels still being delivered.
        self._reservation_seq = 0
        self._cancels: set[asyncio.Task[None]] = set()
        self._rng = random.Random()  # noqa: S311 - the jitter of those cancels, not a secret

    # -- lifecycle --------------------------------------------------------------------------

    async def ready(self) -> int:
        """Wait until recovery is done; returns this incarnation's epoch."""
        await self._ensure_started()
        return self._epoch

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._recover())
        await asyncio.shield(self._started)

    async def _recover(self) -> None:
        try:
            await self._recover_once_reachable()
        except Exception:
            # Recovery that cannot finish leaves nothing to serve: end the process and let
            # Ray start a fresh incarnation, which tries again.
            log.exception("shard %d: recovery failed; restarting", self._shard)
            self._crash()
            raise

    async def _recover_once_reachable(self) -> None:
        cfg = self._config
        started = time.perf_counter()
        deadline = time.monotonic() + cfg.recovery_deadline_s
        delay_s = 0.1
        while True:
            try:
                self._store = await LedgerStore.connect(
                    cfg.database_url_of(self._database),
                    pool_size_max=cfg.pool_size_max,
                    connect_timeout_s=cfg.connect_timeout_s,
                    command_timeout_s=cfg.command_timeout_s,
                )
                break
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() + delay_s > deadline:
                    raise
                log.warning("shard %d: database not reachable yet (%r)", self._shard, exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 2.0)
        self._epoch = await self._store.take_epoch(self._shard)
        await self._refresh_ids_high()
        connected = time.perf_counter()
        # Fold what predecessors committed since their last checkpoint, computed from the
        # rows, before anything of this incarnation is written (later checkpoints fold
        # what its own commits answer), and before loading, so the load replays little.
        position = await self._store.checkpoint(self._shard, self._epoch,
                                                self._own_partitions)
        folded = time.perf_counter()
        accounts, pending = await self._store.load_shard(self._shard, self._own_partitions)
        loaded = time.perf_counter()
        # Compiled once per machine, then loaded from its cache: never on a batch's time.
        warm_up_kernels()
        book = ArrayBook(self._shard, self._partitions, recent_ids_max=cfg.recent_ids_max)
        for a in accounts:
            book.load_account(a)
        for t in pending:
            book.load_pending(t)
        # Timestamps order this shard's rows for its checkpoints: every one it assigns from
        # now on exceeds every one its predecessors wrote.
        book.last_timestamp = max(book.last_timestamp, position)
        self._stats.recovery = {
            "connect_seconds": round(connected - started, 3),
            "checkpoint_seconds": round(folded - connected, 3),
            "load_seconds": round(loaded - folded, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        self._unfolded = []
        self._unfolded_rows = 0
        self._book = book
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._committer()),
            loop.create_task(self._orphan_sweeper()),
            loop.create_task(self._expiry_ticker()),
            loop.create_task(self._anchor_ticker()),
        ]
        if self._channel_key is not None:
            self._channel = ChannelServer(self, CHANNEL_METHODS, self._channel_key,
                                          name=f"shard-{self._shard}")
            self._address = await self._channel.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        settle_garbage_collector()
        log.info(
            "shard %d recovered at epoch %d: %d accounts, %d open holds",
            self._shard, self._epoch, len(accounts), len(pending),
        )

    async def endpoint(self) -> tuple[str, int]:
        """Where this incarnation's channel listens, once it has recovered (the front and
        the peers ask again after every restart)."""
        await self._ensure_started()
        if self._address is None:
            raise RuntimeError("this shard serves no channel (it was given no key)")
        return self._address

    def _channel_peer(self, shard: int) -> Peer:
        client = self._peer_clients.get(shard)
        if client is None:
            require(self._channel_key is not None, "a shard without a key needs peers")
            assert self._channel_key is not None  # noqa: S101 - narrows the type
            client = self._peer_clients[shard] = ChannelClient(
                endpoint_of(_peer_by_name(shard)), self._channel_key)
        return client

    async def stop(self) -> None:
        """Let queued commits finish, then close the pool (clean shutdown)."""
        for _ in range(100):
            if not self._queue and self._in_flight == 0:
                break
            await asyncio.sleep(0.05)
        for task in [*self._tasks, *self._cancels]:
            task.cancel()
        if self._store is not None and self._book is not None:
            try:
                await self._store.anchor("shutdown")
            except Exception:  # the database may be gone; the last periodic anchor stands
                log.warning("shard %d: the shutdown anchor failed", self._shard, exc_info=True)
        if self._channel is not None:
            self._channel.close()
        for client in self._peer_clients.values():
            client.close()
        if self._checkpointing is not None:
            self._checkpointing.cancel()
        if self._store is not None:
            await self._store.close()

    def node_id(self) -> str:
        """The Ray node this incarnation runs on (a shard restarted after its node was lost
        runs on another: its pin is soft)."""
        return str(ray.get_runtime_context().get_node_id())

    def pid(self) -> int:
        """This incarnation's process id (what a fault test kills)."""
        return os.getpid()

    async def stats(self) -> dict[str, float]:
        await self._ensure_started()
        s = self._stats
        book = self._book
        return {
            "shard": self._shard,
            "epoch": self._epoch,
            "batches_committed": s.batches_committed,
            "transfers_committed": s.transfers_committed,
            "commits": s.commits,
            "commit_seconds": s.commit_seconds,
            "checkpoints": s.checkpoints,
            "checkpoint_seconds": s.checkpoint_seconds,
            **{f"recovery_{k}": v for k, v in s.recovery.items()},
            "accounts": len(book.accounts) if book else 0,
            "open_holds": len(book.pending) if book else 0,
            "holds_granted": len(book.holds) if book else 0,
            "hold_blocks_granted": len(book.blocks) if book else 0,
            "plain_batches": book.plain_batches if book else 0,
            "recent_ids": len(book.recent) if book else 0,
            "pid": os.getpid(),
        }

    # -- accounts ---------------------------------------------------------------------------

    async def create_accounts(self, raw: bytes,
                              links: list[dict[str, str]] | None = None) -> bytes:
        """Create accounts this shard owns; returns one code per account, flat, in order."""
        await self._ensure_started()
        requests = ACCOUNT_REQUESTS.decode(raw)
        self._admit(sum(len(r) for r in requests))
        try:
            async with self._evaluate_lock:
                book = self._require_book()
                codes, batch = book.create_accounts(requests, self._clock_ns())
                pending = self._enqueue(batch, is_accounts=True)
            await pending.done
            return ENCODER.encode([int(c) for request in codes for c in request])
        finally:
            self._in_flight -= sum(len(r) for r in requests)

    # -- transfers --------------------------------------------------------------------------

    async def create_transfers(self, raw: bytes,
                               links: list[dict[str, str]] | None = None) -> bytes:
        """Evaluate, commit and answer transfers this shard coordinates.

        Returns one (code, timestamp of the stored transfer or 0) pair per item, flat, in
        request order. Nothing is answered before the batch is durable in PostgreSQL.
        ``links`` are the trace contexts of the requests the batch carries.
        """
        if telemetry.TRACER is None:
            return await self._create_transfers(raw)
        with telemetry.span("shard.batch", links=links,
                            attributes={"txproc.shard": self._shard}):
            return await self._create_transfers(raw)

    async def _create_transfers(self, raw: bytes) -> bytes:
        await self._ensure_started()
        requests = TRANSFER_REQUESTS.decode(raw)
        items = sum(len(r) for r in requests)
        self._admit(items)
        try:
            codes: list[tuple[int, int]] = []
            pendings: list[_Pending] = []
            async with self._evaluate_lock:
                book = self._require_book()
                store = self._require_store()
                remaining = requests
                while True:
                    ids, pending_ids = book.lookups_needed(remaining)
                    known = await store.fetch_known(self._maybe_stored(ids), pending_ids)
                    plan = book.plan_transfers(remaining, self._clock_ns(), known)
                    answers, plain_answers, unreached = await self._reserve_remote(plan)
                    batch = book.finalize(plan, answers, self._clock_ns(), plain_answers)
                    pendings.append(self._enqueue(batch))
                    codes.extend(zip(batch.codes, batch.timestamps, strict=True))
                    # Items that depend on a distributed item of this batch are planned
                    # again once it is final; they commit after it, in order.
                    if not plan.rest:
                        break
                    if unreached:
                        # They may depend on an item a peer's failure left not applied:
                        # they are not evaluated, and are sent again with it.
                        codes.extend((NOT_APPLIED, 0) for r in plan.rest for _ in r)
                        break
                    remaining = plan.rest
                # After the loop: until then this request's ids are in the book's memory,
                # and a higher mark would make the parts planned later read them back.
                self._ids_high = max([self._ids_high, *(t.id for r in requests for t in r)])
            for pending in pendings:
                await pending.done
            return ENCODER.encode(codes)
        finally:
            self._in_flight -= items

    async def create_transfer_columns(self, raw: bytes,
                                      links: list[dict[str, str]] | None = None) -> bytes:
        """Evaluate, commit and answer a batch of transfers given as columns
        (processor.batch); returns one result code per transfer, a byte each, in order.

        A plain batch is planned over its columns (processor.ledger.columnar); any other is made
        objects and evaluated like ``create_transfers``. Nothing is answered before the
        batch is durable.
        """
        if telemetry.TRACER is None:
            return await self._create_transfer_columns(raw)
        with telemetry.span("shard.batch", links=links,
                            attributes={"txproc.shard": self._shard}):
            return await self._create_transfer_columns(raw)

    async def _create_transfer_columns(self, raw: bytes) -> bytes:
        await self._ensure_started()
        batch = decode_batch(raw)
        if len(batch) < self._require_book().plain_batch_min:
            return await self._create_as_objects(batch)
        cols = batch.columns()
        items = len(cols)
        self._admit(items)
        try:
            async with self._evaluate_lock:
                book = self._require_book()
                recent, high = book.recent, self._ids_high
                ids = [i for i in cols.id.tolist() if i and i <= high and i not in recent]
                known = await self._require_store().fetch_known(ids, [])
                plan = book.plan_columns(cols, [items], self._clock_ns(), known)
                if items:
                    self._ids_high = max(high, int(cols.id.max()))
                if plan is not None:
                    answers, plain_answers, _ = await self._reserve_remote(plan)
                    commit = book.finalize(plan, answers, self._clock_ns(), plain_answers)
                    pending = self._enqueue(commit)
            if plan is not None:
                await pending.done
                return np.asarray(commit.codes, dtype=np.uint8).tobytes()
        finally:
            self._in_flight -= items
        # Not plain after all (an id seen before, a hold due to expire): the general rules,
        # over objects.
        return await self._create_as_objects(batch)

    async def _create_as_objects(self, batch: TransferBatch) -> bytes:
        """A columns request evaluated by the general rules, over objects, as one request
        (a batch too short for the columnar path, or one that is not plain)."""
        results = RESULTS.decode(await self._create_transfers(
            ENCODER.encode([batch.transfers()])))
        return bytes(code for code, _ in results)

    def _maybe_stored(self, ids: list[int]) -> list[int]:
        """The ids that may be in the database: at or below the high-water mark."""
        high = self._ids_high
        return [i for i in ids if i <= high]

    async def _refresh_ids_high(self) -> None:
        """Read the greatest id any shard stored or burned. An id another shard took after
        this read is not read back before planning; the commit catches it instead (the
        primary keys, and IdConflict), and this shard restarts and reads it."""
        self._ids_high = max(self._ids_high, await self._require_store().ids_max())
        self._ids_read_at = time.monotonic()

    async def _reserve_remote(
        self, plan: Plan
    ) -> tuple[dict[int, tuple[int, list[tuple[int, int]]]], dict[int, object], bool]:
        """Reserve the plan's remote legs: one call per shard for each kind of leg.

        A peer that does not answer within ``peer_call_timeout_s`` (dead, restarting,
        overloaded) fails only the legs sent to it: they answer ``not_applied`` and the call
        is cancelled on that peer (``_cancel``), so whatever it granted is released; this
        shard goes on. The third value says whether any peer was not reached. Expiry legs
        must be reached (they always commit): their peer's failure still restarts this
        shard, whose successor's epoch releases every hold of this one (orphan sweep)."""
        remote: dict[int, list[tuple[int, Leg]]] = plan.remote
        plain: dict[int, PlainLegs] = plan.remote_plain
        if not remote and not plain:
            return {}, {}, False
        shards = sorted(remote)
        plain_shards = sorted(plain)
        self._reservation_seq += 1
        request = self._reservation_seq
        timeout_s = self._config.peer_call_timeout_s
        calls = [
            asyncio.wait_for(self._peers(s).call(
                "reserve", self._shard, self._epoch,
                ENCODER.encode([leg for _, leg in remote[s]]), request), timeout_s)
            for s in shards
        ] + [
            asyncio.wait_for(self._peers(s).call(
                "reserve_plain", self._shard, self._epoch, encode_legs(plain[s]), request),
                timeout_s)
            for s in plain_shards
        ]
        raws = await asyncio.gather(*calls, return_exceptions=True)
        failures = {s: r for s, r in zip([*shards, *plain_shards], raws, strict=True)
                    if isinstance(r, BaseException)}
        unreached = sorted(failures)
        if any(index < 0 for s in unreached if s in remote for index, _ in remote[s]):
            log.error("shard %d: an expiry's reservation on shard(s) %s failed; restarting",
                      self._shard, unreached)
            self._crash()
            raise ChannelBroken(f"shard(s) {unreached} not reached for an expiry")
        for s in unreached:
            log.warning("shard %d: reservation %d on shard %d failed, its legs answer "
                        "not_applied: %r", self._shard, request, s, failures[s])
            task = asyncio.get_running_loop().create_task(self._cancel(s, request))
            self._cancels.add(task)
            task.add_done_callback(self._cancels.discard)
        answers = {
            s: (RESERVE_ANSWER.decode(r) if not isinstance(r, BaseException)
                else ArrayBook.unreachable_answer(remote[s]))
            for s, r in zip(shards, raws[:len(shards)], strict=True)
        }
        plain_answers: dict[int, object] = {
            s: (decode_reserve_answer(r) if not isinstance(r, BaseException)
                else ArrayBook.unreachable_plain_answer(plain[s]))
            for s, r in zip(plain_shards, raws[len(shards):], strict=True)
        }
        return answers, plain_answers, bool(unreached)

    async def _cancel(self, shard: int, request: int) -> None:
        """Cancel reservation call ``request`` on ``shard`` until the peer confirms it, for
        at most ``CANCEL_DEADLINE_S``. A peer that restarted meanwhile confirms it too
        (its memory held nothing of the call, and a copy arriving late is refused); one
        that cannot be reached for that long may still hold what it granted, so then this
        shard restarts: its successor's epoch makes the peer release every hold of this
        incarnation (orphan sweep)."""
        deadline = time.monotonic() + CANCEL_DEADLINE_S
        for attempt in itertools.count(1):
            try:
                await asyncio.wait_for(self._peers(shard).call(
                    "cancel_reservation", self._shard, self._epoch, request),
                    self._config.peer_call_timeout_s)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: try again, then restart
                pause_s = backoff_s(attempt, base_s=0.1, cap_s=2.0, rng=self._rng)
                if time.monotonic() + pause_s >= deadline:
                    log.error("shard %d: reservation %d could not be cancelled on shard %d "
                              "within %.0f s (%r); restarting", self._shard, request, shard,
                              CANCEL_DEADLINE_S, exc)
                    self._crash()
                    return
            await asyncio.sleep(pause_s)

    # -- holds granted to other coordinators ----------------------------------------------

    async def reserve(self, coordinator: int, epoch: int, raw_legs: bytes,
                      request: int = 0) -> bytes:
        """Check and hold legs of a transfer coordinated by shard ``coordinator``."""
        await self._ensure_started()
        self._require_same_database(coordinator)
        book = self._require_book()
        answers = book.reserve(coordinator, epoch, LEGS.decode(raw_legs), request)
        return ENCODER.encode((self._epoch, answers))

    async def cancel_reservation(self, coordinator: int, epoch: int, request: int) -> int:
        """The coordinator got no answer to its reservation call ``request``: release what
        it holds here, and refuse it should it still arrive (Book.cancel_reservation)."""
        await self._ensure_started()
        released = self._require_book().cancel_reservation(coordinator, epoch, request)
        if released:
            log.info("shard %d: released %d holds of shard %d's cancelled reservation %d",
                     self._shard, released, coordinator, request)
        return released

    def _require_same_database(self, coordinator: int) -> None:
        """A coordinator commits this shard's legs in its own database; in another one
        they would be lost to this shard. The front refuses such transfers
        (``accounts_in_different_databases``), so one reaching here is a bug."""
        require(self._partitions.database_of_shard[coordinator] == self._database,
                "a remote leg comes from a coordinator in this shard's database")

    async def settle(self, coordinator: int, raw_outcomes: bytes) -> None:
        await self._ensure_started()
        self._require_book().settle(coordinator, OUTCOMES.decode(raw_outcomes))

    async def reserve_plain(self, coordinator: int, epoch: int, raw_legs: bytes,
                            request: int = 0) -> bytes:
        """Check and hold plain credit legs (columns) of a batch coordinated elsewhere."""
        await self._ensure_started()
        self._require_same_database(coordinator)
        codes, block_id = self._require_book().reserve_plain(
            coordinator, epoch, decode_legs(raw_legs), request)
        return encode_reserve_answer(self._epoch, block_id, codes)

    async def settle_plain(self, coordinator: int, raw_outcomes: bytes) -> None:
        """Settle hold blocks: one committed-mask (a byte per leg) per block."""
        await self._ensure_started()
        outcomes = [(block_id, np.frombuffer(mask, dtype=np.bool_))
                    for block_id, mask in BLOCK_OUTCOMES.decode(raw_outcomes)]
        self._require_book().settle_plain(coordinator, outcomes)

    # -- the write path ---------------------------------------------------------------------

    def _admit(self, items: int) -> None:
        if self._in_flight + items > self._config.items_in_flight_max:
            raise Overloaded("shard queue full", retry_after_s=0.05)
        self._in_flight += items

    def _enqueue(self, batch: CommitBatch, *, is_accounts: bool = False) -> _Pending:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pending = _Pending(batch, done, is_accounts, telemetry.carrier())
        self._queue.append(pending)
        self._stats.queue_depth_max_seen = max(self._stats.queue_depth_max_seen, len(self._queue))
        self._queue_ready.set()
        return pending

    async def _committer(self) -> None:
        """Commit queued batches in order; while one commit runs the next batches queue up
        and are written together by the next one (group commit). Start a checkpoint beside
        the commits (one at a time) ``checkpoint_interval_s`` after the last once
        ``checkpoint_rows`` transfers wait to be folded, else ``checkpoint_interval_max_s``
        after it."""
        cfg = self._config
        # Shards started together would checkpoint together, and each checkpoint's burst
        # of PostgreSQL work slows the commits running beside it: spread them out.
        last = time.monotonic() - cfg.checkpoint_interval_max_s * self._shard / cfg.shards

        def due() -> float:
            many = self._unfolded_rows >= cfg.checkpoint_rows
            return last + (cfg.checkpoint_interval_s if many else cfg.checkpoint_interval_max_s)

        while True:
            if not self._queue:
                try:
                    await asyncio.wait_for(self._queue_ready.wait(),
                                           max(0.0, due() - time.monotonic()))
                except TimeoutError:
                    pass
            self._queue_ready.clear()
            if self._queue:
                await self._commit_next_group()
            running = self._checkpointing
            if time.monotonic() >= due() and (running is None or running.done()):
                self._checkpointing = asyncio.get_running_loop().create_task(
                    self._checkpoint())
                last = time.monotonic()

    async def _commit_next_group(self) -> None:
        store = self._require_store()
        book = self._require_book()
        group = self._queue[: self._config.commit_batches_max]
        del self._queue[: len(group)]
        fences = {self._shard: self._epoch}
        for p in group:
            fences.update(p.batch.fences)
        started = time.perf_counter()
        self._committing = True
        try:
            with telemetry.span("postgres.commit",
                                links=[p.trace for p in group if p.trace],
                                attributes={"txproc.shard": self._shard,
                                            "txproc.batches": len(group)}):
                effects = await store.commit([p.batch for p in group], fences=fences,
                                             shard=self._shard,
                                             partition_map=self._partitions)
        except asyncio.CancelledError:
            # stop() cancels the committer: the process is going away, and nothing of this
            # group was acknowledged, so there is nothing to recover here.
            raise
        except BaseException:
            log.exception("shard %d: commit failed; restarting to recover", self._shard)
            metrics.LEDGER_WRITE_FAILURES.labels(self._label).inc()
            self._crash()
            raise
        finally:
            self._committing = False
        elapsed_s = time.perf_counter() - started
        self._unfolded.append(effects)
        self._unfolded_rows += sum(p.batch.transfer_count() for p in group)
        self._stats.commits += 1
        self._stats.commit_seconds += elapsed_s
        metrics.LEDGER_COMMIT_SECONDS.labels(self._label).observe(elapsed_s)
        metrics.LEDGER_COMMIT_TRANSFERS.labels(self._label).observe(
            sum(p.batch.transfer_count() for p in group if not p.is_accounts))
        for p in group:
            if p.is_accounts:
                book.accounts_committed(p.batch)
            else:
                book.committed(p.batch)
                self._stats.transfers_committed += p.batch.transfer_count()
            self._stats.batches_committed += 1
        await self._send_settlements(group)
        for p in group:
            if not p.done.done():
                p.done.set_result(None)
        if time.monotonic() - self._ids_read_at > self._config.ids_refresh_interval_s:
            try:
                await self._refresh_ids_high()
            except Exception:  # the database may be restarting; the next one reads
                log.warning("shard %d: reading the id high-water mark failed",
                            self._shard, exc_info=True)

    async def _checkpoint(self) -> None:
        """Fold what this shard's commits answered since the last checkpoint into its
        balance rows (docs/design.md §7).

        Commits go on meanwhile: what they write is after the position taken here, and
        their effects go to the next checkpoint. When no batch is being evaluated, waits
        for its commit or commits, every timestamp assigned so far belongs to a committed
        row, so the position may move up to a fresh one even if nothing was committed (an
        idle shard keeps the rows readers replay few).
        """
        book = self._require_book()
        own = OwnEffects.combine(self._unfolded)
        self._unfolded = []
        self._unfolded_rows = 0
        floor_ns = 0
        if not self._queue and not self._committing and not self._evaluate_lock.locked():
            floor_ns = book.next_timestamp(self._clock_ns())
        started = time.perf_counter()
        try:
            await self._require_store().checkpoint(
                self._shard, self._epoch, self._own_partitions, own=own, floor_ns=floor_ns)
        except asyncio.CancelledError:
            raise
        except BaseException:
            log.exception("shard %d: checkpoint failed; restarting to recover", self._shard)
            metrics.LEDGER_WRITE_FAILURES.labels(self._label).inc()
            self._crash()
            raise
        elapsed_s = time.perf_counter() - started
        self._stats.checkpoints += 1
        self._stats.checkpoint_seconds += elapsed_s
        metrics.LEDGER_CHECKPOINT_SECONDS.labels(self._label).observe(elapsed_s)

    async def _send_settlements(self, group: list[_Pending]) -> None:
        by_shard: dict[int, list[tuple[int, bool]]] = {}
        blocks: dict[int, list[tuple[int, bytes]]] = {}
        for p in group:
            for shard, outcomes in p.batch.settlements.items():
                by_shard.setdefault(shard, []).extend(outcomes)
            for shard, masks in p.batch.plain_settlements.items():
                blocks.setdefault(shard, []).extend(
                    (block_id, np.asarray(mask, dtype=np.bool_).tobytes())
                    for block_id, mask in masks)
        if not by_shard and not blocks:
            return
        calls = [
            self._peers(s).call("settle", self._shard, ENCODER.encode(o))
            for s, o in by_shard.items()
        ] + [
            self._peers(s).call("settle_plain", self._shard, ENCODER.encode(o))
            for s, o in blocks.items()
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for shard, result in zip([*by_shard, *blocks], results, strict=True):
            if isinstance(result, BaseException):
                # The peer died: its successor read these effects from the database.
                log.warning("shard %d: settle on shard %d failed: %r", self._shard, shard, result)

    async def _orphan_sweeper(self) -> None:
        """Resolve holds granted to coordinators that have since restarted.

        Once a coordinator's epoch moved on, its old incarnation can commit nothing more
        (commit fence), so the database is the final word on each of its holds.
        """
        while True:
            await asyncio.sleep(self._config.orphan_sweep_interval_s)
            try:
                await self._sweep_orphans()
            except Exception:  # the database may be restarting; the next sweep retries
                log.warning("shard %d: orphan sweep failed", self._shard, exc_info=True)

    async def _sweep_orphans(self) -> None:
        store = self._require_store()
        book = self._require_book()
        if book.holds or book.blocks:
            epochs = await store.epochs()
            for coordinator in {c for c, _ in book.holds} | {c for c, _ in book.blocks}:
                await self._resolve_orphans(coordinator, epochs.get(coordinator, 0))

    async def _resolve_orphans(self, coordinator: int, epoch: int) -> None:
        store = self._require_store()
        book = self._require_book()
        await self._resolve_orphan_blocks(coordinator, epoch)
        orphans = book.holds_of_old_epochs(coordinator, epoch)
        if not orphans:
            return
        transfer_ids = [h.leg.event_id for _, h in orphans
                        if h.leg.event_kind == EventKind.transfer]
        expiry_ids = [h.leg.event_id for _, h in orphans if h.leg.event_kind == EventKind.expiry]
        committed_t, committed_e = await store.committed_events(transfer_ids, expiry_ids)
        # Settled holds may have gone while the query ran; settle() skips unknown ones.
        outcomes = []
        for hold_id, h in orphans:
            done = committed_t if h.leg.event_kind == EventKind.transfer else committed_e
            outcomes.append((hold_id, h.leg.event_id in done))
        book.settle(coordinator, outcomes)
        log.info("shard %d: resolved %d holds of restarted shard %d",
                 self._shard, len(outcomes), coordinator)

    async def _resolve_orphan_blocks(self, coordinator: int, epoch: int) -> None:
        store = self._require_store()
        book = self._require_book()
        orphans = book.blocks_of_old_epochs(coordinator, epoch)
        if not orphans:
            return
        held = [b.event_ids[b.slots >= 0] for _, b in orphans]
        committed, _ = await store.committed_events(
            np.concatenate(held).tolist(), [])
        done = np.fromiter(committed, dtype=np.int64, count=len(committed))
        book.settle_plain(coordinator, [(block_id, np.isin(b.event_ids, done))
                                        for block_id, b in orphans])
        log.info("shard %d: resolved %d hold blocks of restarted shard %d",
                 self._shard, len(orphans), coordinator)

    async def _anchor_ticker(self) -> None:
        """Record every shard's chain head now and then (docs/design.md §15)."""
        while True:
            await asyncio.sleep(self._config.anchor_interval_s)
            try:
                await self._require_store().anchor("periodic")
            except Exception:  # the database may be restarting; the next one anchors
                log.warning("shard %d: anchoring failed", self._shard, exc_info=True)

    async def _expiry_ticker(self) -> None:
        """Expire due holds even when no transfers arrive to carry the expiry."""
        book = self._require_book()
        while True:
            await asyncio.sleep(self._config.expiry_interval_s)
            now_ns = self._clock_ns()
            if not book.pending.any_due(now_ns):
                continue
            try:
                await self.create_transfers(ENCODER.encode([]))
            except Exception:
                log.warning("shard %d: expiry batch failed", self._shard, exc_info=True)

    def _require_book(self) -> ArrayBook:
        require(self._book is not None, "shard recovered")
        assert self._book is not None  # noqa: S101 - narrows the type; require() above enforces it
        return self._book

    def _require_store(self) -> LedgerStore:
        require(self._store is not None, "shard recovered")
        assert self._store is not None  # noqa: S101 - narrows the type; require() above enforces it
        return self._store


def settle_garbage_collector() -> None:
    """Keep the cyclic garbage collector's pauses off the request path.

    What recovery loaded (accounts, holds, the kernel's code) lives as long as the process:
    frozen, a full collection no longer walks it. Young collections run after 50,000 new
    objects rather than 700, and full ones ten times more rarely, so a batch is not cut
    by collections every few hundred objects it allocates.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def _crash() -> None:
    """End this process now; Ray restarts the actor and recovery rebuilds from PostgreSQL."""
    logging.shutdown()
    os._exit(70)


def shard_actor_name(shard: int) -> str:
    return f"txproc-shard-{shard}"


_PEERS: dict[int, Any] = {}


def _peer_by_name(shard: int) -> Any:
    # A named actor keeps its handle across restarts, so the lookup is done once.
    if shard not in _PEERS:
        _PEERS[shard] = ray.get_actor(shard_actor_name(shard), namespace=NAMESPACE)
    return _PEERS[shard]


def endpoint_of(handle: Any) -> Callable[[], Awaitable[tuple[str, int]]]:
    """Where a shard's channel listens: asked of the shard over Ray, which answers once
    it has recovered (after a restart, the new incarnation's address)."""

    async def resolve() -> tuple[str, int]:
        host, port = await handle.endpoint.remote()
        return host, port

    return resolve


def make_shard(shard: int, config: ShardConfig, channel_key: bytes,
               observability: ObservabilityConfig | None = None, *,
               node_id: str | None = None) -> object:
    """Start shard ``shard`` as a named, restartable Ray actor (the one place it is remote).

    ``channel_key`` authenticates the data-plane channel (actors.channel) between the
    front and the shards; a restarted shard is given the same one. ``node_id``: the node
    to start it on (processor.placement.place_shards), softly, so that Ray restarts it on
    a surviving node when that one is lost; None: Ray's SPREAD."""
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0,
        # Restart forever: a shard is the only way to its partitions, and recovery is the
        # normal path after a crash. In-flight calls are not re-executed; the front retries.
        max_restarts=-1,
        max_task_retries=0,
        max_concurrency=1000,
    )(LedgerShard)
    # SPREAD alone does not spread actors that ask for no CPU (all of a cluster's shards
    # were found on the driver's node): a placed shard is pinned to its node, softly, as a
    # preference that a lost node lifts (docs/design.md §12, "Losing a node").
    strategy: Any = "SPREAD" if node_id is None else NodeAffinitySchedulingStrategy(
        node_id, soft=True)
    return actor_class.options(
        name=shard_actor_name(shard),
        namespace=NAMESPACE,
        scheduling_strategy=strategy,
    ).remote(shard, config, observability=observability, channel_key=channel_key)
