"""The processor's Prometheus metrics, shared by every actor process on a node.

prometheus-client runs in multiprocess mode: each process (front, shards, the payments
actor, provider actors, the risk actor) writes its samples to files in
``PROMETHEUS_MULTIPROC_DIR``, which the runtime sets for every Ray worker of the job, and
the node's metrics server (``actors/ops/metrics_server.py``) adds them up on each scrape. So
one endpoint per node shows every actor on it. The variable must be set before
prometheus_client is imported; this module is only imported by actor code, after Ray has
started the worker with it.

Names follow Prometheus conventions: the ``txproc_`` prefix, base units (seconds, bytes),
``_total`` for counters. Labels are low-cardinality: shard numbers, provider names,
operations and closed result codes; never ids, amounts or tokens.
"""

from __future__ import annotations

import os

# Every process of the job writes here (the runtime sets it for Ray's workers); a node that
# joined the cluster later may not have the directory yet.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "AUTHORIZATION_SECONDS",
    "BREAKER_STATE",
    "EDGE_CONNECTIONS_CLOSED",
    "HISTORY_INDEXER_LAG_SECONDS",
    "HISTORY_INDEXER_TRANSFERS",
    "IDEMPOTENCY_FENCED",
    "LATENCY_BUCKETS_S",
    "LEDGER_CHECKPOINT_SECONDS",
    "LEDGER_COMMIT_SECONDS",
    "LEDGER_COMMIT_TRANSFERS",
    "LEDGER_WRITE_FAILURES",
    "OVERLOAD_REJECTIONS",
    "PAYMENT_OPERATIONS",
    "PAYMENT_STEPS_IN_REVIEW",
    "PROVIDER_CALLS",
    "PROVIDER_CALL_SECONDS",
    "PROVIDER_RETRIES",
    "RECONCILIATION_LAG_SECONDS",
    "RECONCILIATION_OPEN_EXCEPTIONS",
    "RECONCILIATION_OPEN_EXCEPTION_AMOUNT",
    "RECONCILIATION_RUNS",
    "RECONCILIATION_RUN_SECONDS",
    "SHARD_CALLS_IN_FLIGHT",
    "SHARD_QUEUE_ITEMS",
    "TRANSFERS",
    "TRANSFER_REQUEST_SECONDS",
]

# Resolves p95/p99 between 0.5 ms and 5 s: roughly three buckets per decade, denser where
# the objectives sit (10-250 ms).
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
    0.1, 0.15, 0.25, 0.4, 0.6, 1.0, 1.5, 2.5, 4.0, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                 32768, 65536)

# -- the money path at the front ------------------------------------------------------------
AUTHORIZATION_SECONDS = Histogram(
    "txproc_authorization_duration_seconds",
    "Payment authorizations, end to end at the front (request in to answer out), by outcome.",
    ["outcome"], buckets=LATENCY_BUCKETS_S)
TRANSFER_REQUEST_SECONDS = Histogram(
    "txproc_transfer_request_duration_seconds",
    "Create-transfer requests, end to end at the front, by API (http or rpc).",
    ["api"], buckets=LATENCY_BUCKETS_S)
TRANSFERS = Counter(
    "txproc_transfers_total",
    "Transfers answered by the ledger, by result code (ok and exists are stored).",
    ["result"])
PAYMENT_STEPS_IN_REVIEW = Gauge(
    "txproc_payment_steps_in_review",
    "Payment and payout steps set aside for an operator: unfinished past review_after_s, "
    "no longer rechecked (docs/runbooks/requires-review.md).",
    multiprocess_mode="livemax")
# Settlement reconciliation (actors/payments/reconciliation.py, docs/reconciliation.md).
RECONCILIATION_LAG_SECONDS = Gauge(
    "txproc_reconciliation_lag_seconds",
    "Per provider: how long the oldest settled day not yet reconciled has been over (0 when "
    "every day up to yesterday has a succeeded run).",
    ["provider"], multiprocess_mode="livemax")
RECONCILIATION_OPEN_EXCEPTIONS = Gauge(
    "txproc_reconciliation_open_exceptions",
    "Reconciliation exceptions not resolved, by provider and kind.",
    ["provider", "kind"], multiprocess_mode="livemax")
RECONCILIATION_OPEN_EXCEPTION_AMOUNT = Gauge(
    "txproc_reconciliation_open_exception_amount",
    "Minor units at stake in open reconciliation exceptions, by provider, kind and currency.",
    ["provider", "kind", "currency"], multiprocess_mode="livemax")
RECONCILIATION_RUN_SECONDS = Histogram(
    "txproc_reconciliation_run_seconds",
    "How long a reconciliation run took (fetching the report, matching, posting fees, "
    "storing), by provider and status.",
    ["provider", "status"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
RECONCILIATION_RUNS = Counter(
    "txproc_reconciliation_runs_total",
    "Reconciliation runs, by provider and status (succeeded, failed).",
    ["provider", "status"])
PAYMENT_OPERATIONS = Counter(
    "txproc_payment_operations_total",
    "Payment saga steps that reached a final phase, by kind and result.",
    ["kind", "result"])
IDEMPOTENCY_FENCED = Counter(
    "txproc_idempotency_fenced_total",
    "Idempotency-Key answers not stored, or claims not released, because the request's "
    "claim had lapsed and another request held the key, by action (complete, release).",
    ["action"])
OVERLOAD_REJECTIONS = Counter(
    "txproc_overload_rejections_total",
    "Requests refused because a queue or bulkhead was full, by where.",
    ["where"])
EDGE_CONNECTIONS_CLOSED = Counter(
    "txproc_edge_connections_closed_total",
    "Client connections the HTTP or RPC listener closed or refused to protect itself (a "
    "deadline passed, a limit was hit), by listener and reason (docs/security.md).",
    ["listener", "reason"])

# -- the ledger -----------------------------------------------------------------------------
LEDGER_COMMIT_TRANSFERS = Histogram(
    "txproc_ledger_commit_transfers",
    "Transfers written by one group commit of a shard.",
    ["shard"], buckets=BATCH_BUCKETS)
HISTORY_INDEXER_LAG_SECONDS = Gauge(
    "txproc_history_indexer_lag_seconds",
    "How far account_history's position is behind the wall clock: movements newer than "
    "this are read from transfers by history reads (design.md §16). Includes the history "
    "horizon's own delay (up to 5 s on an idle shard).",
    multiprocess_mode="livemax")
HISTORY_INDEXER_TRANSFERS = Counter(
    "txproc_history_indexer_transfers_total",
    "Movements (transfers and expiries) the history indexer copied into account_history.")
LEDGER_CHECKPOINT_SECONDS = Histogram(
    "txproc_ledger_checkpoint_duration_seconds",
    "Duration of one balance checkpoint of a shard (folding its unfolded effects into the "
    "balance rows).",
    ["shard"], buckets=LATENCY_BUCKETS_S)
LEDGER_COMMIT_SECONDS = Histogram(
    "txproc_ledger_commit_duration_seconds",
    "Duration of one group commit (the database transaction) of a shard.",
    ["shard"], buckets=LATENCY_BUCKETS_S)
LEDGER_WRITE_FAILURES = Counter(
    "txproc_ledger_write_failures_total",
    "Group commits that failed (the shard restarts; nothing in them was acknowledged).",
    ["shard"])
SHARD_QUEUE_ITEMS = Gauge(
    "txproc_shard_queue_items",
    "Items waiting in the front's micro-batching queue of a shard.",
    ["shard"], multiprocess_mode="livesum")
SHARD_CALLS_IN_FLIGHT = Gauge(
    "txproc_shard_calls_in_flight",
    "Actor calls from the front to a shard that have not answered yet.",
    ["shard"], multiprocess_mode="livesum")

# -- providers ------------------------------------------------------------------------------
PROVIDER_CALLS = Counter(
    "txproc_provider_calls_total",
    "Provider call attempts, by provider, operation and normalised outcome.",
    ["provider", "operation", "outcome"])
PROVIDER_CALL_SECONDS = Histogram(
    "txproc_provider_call_duration_seconds",
    "Provider call attempts, by provider and operation.",
    ["provider", "operation"], buckets=LATENCY_BUCKETS_S)
PROVIDER_RETRIES = Counter(
    "txproc_provider_retries_total",
    "Provider calls sent again after a retryable failure, by provider.",
    ["provider"])
BREAKER_STATE = Gauge(
    "txproc_provider_breaker_state",
    "Circuit breaker of a provider: 0 closed, 1 half open, 2 open.",
    ["provider"], multiprocess_mode="livemax")
