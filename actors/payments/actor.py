"""The payments actor: the saga engine, its recovery worker and the outbox relay, in a
process of their own.

Payments used to run inside the ledger's front, on the event loop that serves every ledger
request, so a slow saga step, a large payments body or a crash in payments code reached
the ledger too. Here they are a failure domain of their own:

* The front's HTTP and RPC listeners stay the one address gateways use. They check the
  token and the scope, then forward a payments request with one hop over the data-plane
  channel (``actors.channel``): principal, operation, key, raw body in; status, body and
  headers out (``PaymentsEndpoint``). While this actor is down the front answers 503 with
  ``Retry-After``; ledger routes never wait on it.
* The engine reaches the ledger as any gateway does: ``processor.client.Client`` over the
  front's RPC port, so its postings join the same micro-batching lanes (``RpcLedger``).
  A front restart looks to payments like any gateway's outage: the postings fail with a
  retryable error, the step is parked, and the recovery worker finishes it.
* The actor starts itself: everything it needs is in its arguments, and the first call
  after a (re)start (the front asking where it listens, the supervisor's ping, a drill)
  starts the engine, the recovery worker and the relay. Ray restarts it when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.channel import ChannelServer
from actors.lease import Fence, Work, hold
from actors.names import NAMESPACE
from actors.ops import telemetry
from actors.payments import outbox
from actors.payments.endpoints import Idempotent, Payments, PaymentsEndpoint
from actors.payments.engine import PaymentsEngine
from actors.payments.provider import ProviderConfig, ProviderLink
from actors.payments.reconciliation import Reconciler, RunView
from actors.payments.store import PaymentStore
from actors.priority import lower_priority
from actors.risk import RISK_ACTOR_NAME, RiskLink
from actors.subjects import master_key_of
from processor.client import Client, ClientError, client_tls_context
from processor.codes import AccountResult, TransferResult
from processor.config import Config
from processor.errors import Unavailable
from processor.identity import (
    SYSTEM_SCOPES,
    KeyFileError,
    KeyRingFile,
    issue_token,
)
from processor.lease import LeaseConfig
from processor.types import Account, Transfer

__all__ = ["LEASE", "LEASE_RECONCILIATION", "LEASE_RECOVERY", "LEASE_RELAY",
           "PAYMENTS_ACTOR_NAME", "PaymentsActor", "RpcLedger", "make_payments"]

log = logging.getLogger("txproc.payments.actor")

PAYMENTS_ACTOR_NAME = "txproc-payments"

# What the front may call over the channel.
CHANNEL_METHODS = ("call", "webhook")
# The engine's own token for the ledger's RPC: what a payment moves and reads, and the
# processor's own id range (clearing accounts, step transfers: processor/reserved.py).
LEDGER_SCOPES = ("accounts:read", "accounts:write", "transfers:read", "transfers:write",
                 *SYSTEM_SCOPES)
TOKEN_TTL_S = 3600
# A saga step waits at most this long for one ledger call before it is parked for the
# recovery worker (a front restart takes a few seconds).
LEDGER_CALL_TIMEOUT_S = 30.0
PROVIDER_RETRY_DEADLINE_S = 5.0
# How often the key file is looked at for a rotation (the front's pace too).
KEYS_REFRESH_INTERVAL_S = 0.5
# The leases of the work that runs in one place (actors.lease, migration 0030): renewed every
# second, taken over within about four seconds of their holder's death.
LEASE = LeaseConfig(ttl_s=4.0, renew_interval_s=1.0, margin_s=1.0)
LEASE_RECOVERY = "payments-recovery"
LEASE_RELAY = "outbox-relay"
LEASE_RECONCILIATION = "reconciliation-schedule"
# Refusals after which the next call signs a new token with the current active key.
_TOKEN_REFUSALS = frozenset({"token_invalid", "token_expired", "token_revoked"})


class RpcLedger:
    """The ledger for the payments engine: the front's RPC through ``Client``.

    Implements the part of ``LedgerService`` the engine uses. The token is issued here with
    the key ring's active key and renewed at half its life, as soon as another key becomes
    active (``txproc keys rotate``), and after the token was refused. A refusal of the
    connection or of a request (``ClientError``) is raised as ``Unavailable``: nothing was
    written, the step is parked and tried again.
    """

    def __init__(self, fronts: list[tuple[str, int]], keys: KeyRingFile, *,
                 clock_s: Callable[[], float] = time.time,
                 monotonic_s: Callable[[], float] = time.monotonic,
                 tls: ssl.SSLContext | None = None) -> None:
        self._keys = keys
        self._clock_s = clock_s
        self._monotonic_s = monotonic_s
        self._renew_at_s = 0.0
        self._signed_kid = ""
        # Every front's RPC: a broken connection fails over to another (processor.failover).
        addresses = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in fronts]
        self._client = Client(addresses=addresses, token=self._token(),
                              timeout_s=LEDGER_CALL_TIMEOUT_S, retries_max=2,
                              connect_attempts_max=2, ssl=tls)

    def _token(self) -> str:
        now_s = int(self._clock_s())
        self._renew_at_s = now_s + TOKEN_TTL_S / 2
        active = self._keys.ring.active
        self._signed_kid = active.kid
        return issue_token(active.secret, LEDGER_SCOPES, ttl_s=TOKEN_TTL_S, now_s=now_s,
                           subject="txproc-payments")

    def _key_rotated(self) -> bool:
        """Whether another key is active than the one the token was signed with."""
        try:
            self._keys.refresh(monotonic_s=self._monotonic_s())
        except (KeyFileError, OSError) as exc:
            log.error("the key file changed but is refused; signing with the key read "
                      "before: %s", exc)
        return self._keys.ring.active.kid != self._signed_kid

    @contextlib.asynccontextmanager
    async def _client_now(self) -> AsyncIterator[Client]:
        """The client, its token renewed when due; a ``ClientError`` inside is raised as
        ``Unavailable``."""
        try:
            if self._clock_s() >= self._renew_at_s or self._key_rotated():
                await self._client.set_token(self._token())
            yield self._client
        except ClientError as exc:
            if exc.code in _TOKEN_REFUSALS:
                self._renew_at_s = 0.0  # its key was retired, or it was revoked
            raise Unavailable(f"the ledger refused the request: {exc.code}") from exc

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        async with self._client_now() as client:
            return await client.create_accounts(accounts)

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        async with self._client_now() as client:
            return await client.create_transfers(transfers)

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        async with self._client_now() as client:
            return await client.lookup_accounts(ids)

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        async with self._client_now() as client:
            return await client.lookup_transfers(ids)

    async def close(self) -> None:
        await self._client.close()


class PaymentsActor:
    """Hosts the payments engine; see the module docstring."""

    def __init__(self, config: Config, channel_key: bytes, *,
                 providers: list[ProviderConfig], outbox_secret: bytes,
                 front_rpc: list[tuple[str, int]]) -> None:
        telemetry.setup(config.observability, "payments")
        lower_priority(config.payments.cpu_nice)
        self.config = config
        self._channel_key = channel_key
        self._providers = providers
        self._outbox_secret = outbox_secret
        self._front_rpc = front_rpc
        self._endpoint: PaymentsEndpoint | None = None
        self._ledger: RpcLedger | None = None
        self._links: dict[str, ProviderLink] = {}
        self._channel: ChannelServer | None = None
        self._address: tuple[str, int] | None = None
        self._starting: asyncio.Task[tuple[str, int]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        # This incarnation's name as a lease holder: a restarted actor is another holder.
        self._holder = f"payments@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    async def start(self) -> tuple[str, int]:
        """Start (once per incarnation; concurrent callers share the attempt) and answer
        where the channel listens. A failed attempt (the database or the front away) is
        raised, and the next call tries again."""
        if self._address is not None:
            return self._address
        task = self._starting
        if task is None or task.done():
            task = self._starting = asyncio.get_running_loop().create_task(self._start())
        return await asyncio.shield(task)

    async def endpoint(self) -> tuple[str, int]:
        """Where the channel listens, starting first if need be (the front resolves its
        ``ChannelClient`` with this)."""
        return await self.start()

    async def _start(self) -> tuple[str, int]:
        from adapters.registry import ADAPTERS

        cfg = self.config.payments
        # Threads started since the constructor (the event loop's among them) too.
        lower_priority(cfg.cpu_nice)
        shard_cfg = self.config.shard
        keys = KeyRingFile(self.config.keys_path, now_s=int(time.time()),
                           interval_s=KEYS_REFRESH_INTERVAL_S)
        ledger = RpcLedger(self._front_rpc, keys, tls=_front_tls(self.config))
        store = await PaymentStore.connect(
            shard_cfg.database_url, pool_size_max=cfg.pool_size_max,
            connect_timeout_s=shard_cfg.connect_timeout_s,
            command_timeout_s=cfg.statement_timeout_s, session_nice=cfg.cpu_nice,
            acquire_timeout_s=cfg.pool_acquire_timeout_s,
            master=master_key_of(self.config.keys_path,
                                 shared=bool(self.config.front.key_path)))
        links = {p.name: ProviderLink(p.name, self._channel_key) for p in self._providers}
        try:
            # The clearing layout is the ledger's, not this process's: a ledger whose holds
            # already name one clearing account per currency keeps it (migration 0034).
            rules = msgspec.structs.replace(
                cfg.rules, clearing_per_partition=await store.clearing_per_partition())
            if not rules.clearing_per_partition:
                log.info("payments post against one clearing account per provider and "
                         "currency: this ledger held payments before migration 0034 "
                         "(docs/operations.md, \"Payments' clearing accounts per placement\")")
            adapters = {p.name: ADAPTERS[p.name].from_secrets_file(p.secrets_file)
                        for p in self._providers}
            try:
                ray.get_actor(RISK_ACTOR_NAME, namespace=NAMESPACE)
                risk: RiskLink | None = RiskLink(self._channel_key)
            except ValueError:
                risk = None
            engine = PaymentsEngine(
                store=store, ledger=ledger, providers=links,
                currencies={name: frozenset(a.currencies) for name, a in adapters.items()},
                capabilities={name: frozenset(a.capabilities) for name, a in adapters.items()},
                provider_deadline_s={name: PROVIDER_RETRY_DEADLINE_S + a.timeout_s
                                     for name, a in adapters.items()},
                risk=risk, risk_config=cfg.risk, config=rules)
            await engine.open_clearing_accounts()
            reconciler = Reconciler(
                pool=store.pool, ledger=ledger, adapters=adapters,
                base_urls={p.name: p.base_url for p in self._providers}, config=rules)
            await reconciler.open_fee_accounts()
            idempotent = Idempotent(engine, clock_s=time.time,
                                    retention_s=cfg.idempotency_retention_s,
                                    claim_ttl_s=rules.claim_ttl_s)
            await outbox.set_subscribers(store.pool, dict(cfg.event_subscribers))
            channel = ChannelServer(self, CHANNEL_METHODS, self._channel_key, name="payments")
            address = await channel.start(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]
        except BaseException:
            for link in links.values():
                link.close()
            await store.close()
            await ledger.close()
            raise
        self._links = links
        self._ledger = ledger
        self._endpoint = PaymentsEndpoint(
            Payments(engine=engine, idempotent=idempotent, adapters=adapters,
                     reconciler=reconciler),
            clock_s=time.time)
        self._channel = channel
        self._start_leased_work(store, engine, reconciler)
        self._address = address
        log.info("payments serving over %s on %s:%d", ", ".join(sorted(adapters)), *address)
        return address

    def _start_leased_work(self, store: PaymentStore, engine: PaymentsEngine,
                           reconciler: Reconciler) -> None:
        """The recovery worker, the outbox relay and the reconciliation scheduler, each
        under its lease (``actors.lease``): wherever several payments actors run (or a
        restarted one overlaps its predecessor), each job runs in one of them, and moves
        within ``LEASE.ttl_s`` when that one dies.

        Where a stale holder could do harm: the recovery worker's steps and the relay's
        deliveries are claimed row by row, and their writes fenced on the claim (a step's
        version, a delivery's attempt), so a stale worker only repeats an attempt; the
        reconciliation run checks the lease's fence where it stores the run.
        """
        cfg = self.config.payments
        loop = asyncio.get_running_loop()
        relay = outbox.OutboxRelay(store.pool, signing_secret=self._outbox_secret,
                                   limits=outbox.RelayLimits())

        async def recovery(_: Fence) -> None:
            await engine.run_recovery(cfg.recovery_interval_s)

        async def relaying(_: Fence) -> None:
            await relay.run(self._stopping)

        async def reconciling(fence: Fence) -> None:
            await reconciler.run_schedule(cfg.recon_every_s, self._stopping, fence)

        jobs: list[tuple[str, Work]] = [(LEASE_RECOVERY, recovery), (LEASE_RELAY, relaying)]
        if cfg.recon_every_s > 0:
            jobs.append((LEASE_RECONCILIATION, reconciling))
        for name, work in jobs:
            self._tasks.append(loop.create_task(
                hold(store.pool, name, self._holder, LEASE, work)))

    def is_started(self) -> bool:
        return self._address is not None

    def pid(self) -> int:
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this incarnation runs on."""
        return str(ray.get_runtime_context().get_node_id())

    def lease_holder(self) -> str:
        """This incarnation's name as a lease holder (the ``leases`` table's ``holder``)."""
        return self._holder

    # -- what the front forwards (actors.channel) ---------------------------------------------

    async def call(self, principal: str, operation: str, key: str, subject_id: str,
                   body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        return await self._require().call(principal, operation, key, subject_id, body,
                                          headers)

    async def webhook(self, provider: str, headers: dict[str, str],
                      body: bytes) -> tuple[int, bytes, dict[str, str]]:
        return await self._require().webhook(provider, headers, body)

    def _require(self) -> PaymentsEndpoint:
        if self._endpoint is None:
            raise Unavailable("payments are starting", retry_after_s=1.0)
        return self._endpoint

    # -- control (Ray) ------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        if self._endpoint is None:
            return {}
        return dict(self._endpoint.payments.engine.stats)

    async def recover_once(self) -> int:
        """Run one recovery round now (tests and drills); returns the steps looked at."""
        await self.start()
        assert self._endpoint is not None  # noqa: S101 - narrows the type; start() sets it or raises
        return await self._endpoint.payments.engine.recover_once()

    async def reconcile(self, provider: str, date: str, requested_by: str = "drill") -> RunView:
        """Run one reconciliation now (tests and drills; the API's route does the same)."""
        await self.start()
        assert self._endpoint is not None  # noqa: S101 - narrows the type; start() sets it or raises
        reconciler = self._endpoint.payments.reconciler
        assert reconciler is not None  # noqa: S101 - start() always makes one
        return await reconciler.run(provider, date, requested_by=requested_by)

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            self._channel.close()
        if self._endpoint is not None:
            await self._endpoint.payments.engine.store.close()
        if self._ledger is not None:
            await self._ledger.close()
        for link in self._links.values():
            link.close()


def _front_tls(config: Config) -> ssl.SSLContext | None:
    """The client context for the front's RPC when it serves TLS (docs/security.md, "TLS"):
    its certificate verified against the server CA, and under mutual TLS the processor's
    internal client certificate presented."""
    front = config.front
    if not front.tls:
        return None
    return client_tls_context(front.tls_server_ca_path, front.tls_internal_cert_path,
                              front.tls_internal_key_path)


def make_payments(config: Config, channel_key: bytes, *, providers: list[ProviderConfig],
                  outbox_secret: bytes, front_rpc: list[tuple[str, int]],
                  node_id: str | None = None) -> Any:
    """Start the payments actor (the one place it is made remote); Ray restarts it if it
    dies, and it starts itself on the next call. ``channel_key`` authenticates the front's
    forwarded requests; ``front_rpc`` is where the fronts' RPC listens (host, port), this
    node's first.

    ``node_id``: start it on that node, softly: when the node is lost, Ray restarts it on
    a surviving one (where its run-once jobs' leases follow it: docs/design.md §12). None:
    Ray's default placement (the caller's node while it has room)."""
    actor_class = ray.remote(  # type: ignore[call-overload]
        num_cpus=0, max_restarts=-1, max_task_retries=0, max_concurrency=100_000
    )(PaymentsActor)
    options: dict[str, Any] = {"name": PAYMENTS_ACTOR_NAME, "namespace": NAMESPACE}
    if node_id is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=True)
    return actor_class.options(**options).remote(
        config, channel_key, providers=providers, outbox_secret=outbox_secret,
        front_rpc=front_rpc)

