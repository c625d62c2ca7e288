"""One frozen configuration tree, built once by the CLI and passed down.

No code below the CLI reads the environment. Every limit is spelled out with its unit, and
``Config.check`` verifies the limits against each other at startup.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from processor.payments import PaymentsConfig
from processor.risk import RiskConfig
from processor.service import BATCH_ITEMS_MAX

__all__ = [
    "Config",
    "FrontConfig",
    "ObservabilityConfig",
    "PaymentsSection",
    "ProviderEndpoint",
    "ShardConfig",
]


class ShardConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What every LedgerShard actor is started with."""

    database_url: str
    shards: int
    recent_ids_max: int = 200_000
    # Items (accounts or transfers) accepted but not yet answered; beyond it, overloaded.
    items_in_flight_max: int = 8 * BATCH_ITEMS_MAX * 4
    # Evaluated batches written by one transaction (group commit).
    commit_batches_max: int = 64
    pool_size_max: int = 4
    connect_timeout_s: float = 10.0
    command_timeout_s: float = 30.0
    peer_call_timeout_s: float = 30.0
    orphan_sweep_interval_s: float = 1.0
    # How long a starting shard waits for the database before it gives up and restarts.
    recovery_deadline_s: float = 60.0
    expiry_interval_s: float = 0.5
    # When a shard folds what it and other shards committed on its accounts into their
    # balance rows (a checkpoint); commits between checkpoints only append rows, and
    # recovery and readers add what is not folded yet (docs/design.md §7). At most every
    # checkpoint_interval_s once checkpoint_rows transfers wait to be folded (heavy
    # ingest: readers replay little), else every checkpoint_interval_max_s (light
    # traffic: each checkpoint's work competes with the commits of single requests).
    checkpoint_interval_s: float = 1.0
    checkpoint_interval_max_s: float = 5.0
    checkpoint_rows: int = 20_000
    # How often a shard reads the greatest transfer id stored or burned by any shard; ids
    # above it and above its own are new without a database read (docs/design.md §8).
    ids_refresh_interval_s: float = 1.0


class FrontConfig(msgspec.Struct, frozen=True, kw_only=True):
    """The front actor: listeners, micro-batching and retry limits."""

    host: str = "127.0.0.1"
    http_port: int = 8080
    rpc_port: int = 7070
    key_path: str = ""
    # Items waiting in one shard's micro-batch queue; beyond it callers get overloaded.
    queue_items_max: int = 4 * BATCH_ITEMS_MAX
    # Items per actor call; a call carries whole requests so it may exceed this by one.
    call_items_max: int = BATCH_ITEMS_MAX
    # Actor calls in flight to one shard; more requests wait and join the next call.
    calls_in_flight_max: int = 1
    # A shard call that failed because the shard died is retried this many times within
    # the deadline, then answered with a retryable ``unavailable``.
    retry_attempts_max: int = 3
    retry_deadline_s: float = 20.0
    body_bytes_max: int = 4 * 1024 * 1024
    # Transfers the front remembers from their create, so that the HTTP API can answer a
    # create with the stored transfer without reading it back from the database.
    stored_transfers_max: int = 100_000


class ProviderEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """One payment provider. An empty ``base_url`` starts its simulated server locally
    (``adapters/sim``); an empty ``secrets_file`` means ``<data-dir>/providers/<name>.json``."""

    name: str
    base_url: str = ""
    secrets_file: str = ""


class PaymentsSection(msgspec.Struct, frozen=True, kw_only=True):
    enabled: bool = True
    providers: tuple[ProviderEndpoint, ...] = (
        ProviderEndpoint(name="acme"), ProviderEndpoint(name="globex"))
    rules: PaymentsConfig = PaymentsConfig()
    # A Ray call takes about a millisecond at rest but tens under load on two cores; the
    # risk check gets a quarter second before the fallback policy decides.
    risk: RiskConfig = RiskConfig(timeout_s=0.25)
    # How long a completed Idempotency-Key replays its answer (the draft's retention).
    idempotency_retention_s: float = 24 * 3600.0
    # The recovery worker looks for due steps this often (and once at start-up).
    recovery_interval_s: float = 1.0
    # Downstream consumers of payment events (name -> URL), delivered at least once.
    event_subscribers: dict[str, str] = {}
    pool_size_max: int = 8


class ObservabilityConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Metrics, cost accounting and traces."""

    # One scrape endpoint per node (0: any free port, as the tests and the demo use).
    metrics_port: int = 9464
    # What a vCPU-hour costs, to price a transfer: about an on-demand general-purpose cloud
    # vCPU in 2026 (c. USD 0.04); set your own.
    vcpu_hour_price: float = 0.04
    price_currency: str = "USD"
    cost_window_s: float = 60.0
    # Traces: off (the default, no cost on the hot path), console, or otlp (to the endpoint).
    trace_exporter: str = "off"
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0


class Config(msgspec.Struct, frozen=True, kw_only=True):
    shard: ShardConfig
    front: FrontConfig
    data_dir: str
    ray_address: str | None = None
    payments: PaymentsSection = PaymentsSection()
    observability: ObservabilityConfig = ObservabilityConfig()

    def check(self) -> None:
        """Limits agree with each other; raises ValueError naming the first that does not."""
        s, f = self.shard, self.front
        checks = [
            (1 <= s.shards <= 64, "1 <= shards <= 64"),
            (0 < f.call_items_max <= f.queue_items_max, "0 < call_items_max <= queue_items_max"),
            (f.queue_items_max <= s.items_in_flight_max,
             "front queue_items_max <= shard items_in_flight_max"),
            (f.calls_in_flight_max >= 1, "calls_in_flight_max >= 1"),
            (f.retry_attempts_max >= 1, "retry_attempts_max >= 1"),
            (s.pool_size_max >= 2, "pool_size_max >= 2"),
            (s.commit_batches_max >= 1, "commit_batches_max >= 1"),
            (s.recent_ids_max >= BATCH_ITEMS_MAX, "recent_ids_max >= one batch"),
            (s.ids_refresh_interval_s > 0, "ids_refresh_interval_s > 0"),
            (0 < s.checkpoint_interval_s <= s.checkpoint_interval_max_s,
             "0 < checkpoint_interval_s <= checkpoint_interval_max_s"),
            (s.checkpoint_rows >= 0, "checkpoint_rows >= 0"),
            (self.payments.idempotency_retention_s >= self.payments.rules.claim_ttl_s,
             "idempotency_retention_s >= claim_ttl_s"),
            (self.payments.recovery_interval_s > 0, "recovery_interval_s > 0"),
            (0 <= self.observability.metrics_port <= 65535, "0 <= metrics_port <= 65535"),
            (self.observability.vcpu_hour_price >= 0, "vcpu_hour_price >= 0"),
            (self.observability.trace_exporter in ("off", "console", "otlp"),
             "trace_exporter is off, console or otlp"),
            (0.0 <= self.observability.trace_sample_ratio <= 1.0,
             "0 <= trace_sample_ratio <= 1"),
            ({p.name for p in self.payments.providers} <= set(self.payments.rules.provider_order),
             "every provider is in provider_order"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"configuration: {what}")
        self.payments.rules.check()
        self.payments.risk.check()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)
