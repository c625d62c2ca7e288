"""One frozen configuration tree, built once by the CLI and passed down.

Each part lives with what it configures, so a domain's code imports only its own: the
ledger's shards and front in ``processor.ledger.config``, metrics and traces in
``processor.ops_config``, payments and risk here and in their packages. ``Config`` gathers
them (re-exported here, as before).

No code below the CLI reads the environment. Every limit is spelled out with its unit, and
``Config.check`` verifies the limits against each other at startup.
"""

from __future__ import annotations

import re
from pathlib import Path

import msgspec

from processor.archive import RetentionConfig
from processor.ledger import MAIN_DATABASE, FrontConfig, ShardConfig
from processor.ops_config import ObservabilityConfig
from processor.payments import PaymentsConfig
from processor.placement import FRONTS_MAX
from processor.risk import RiskConfig
from processor.service import BATCH_ITEMS_MAX
from processor.wire import FRAME_BYTES_MAX, HELLO_BYTES_MAX

__all__ = [
    "Config",
    "FrontConfig",
    "ObservabilityConfig",
    "PaymentsSection",
    "ProviderEndpoint",
    "RetentionConfig",
    "ShardConfig",
]


_DATABASE_KEY = re.compile(r"[a-z][a-z0-9_]{0,31}")


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
    # Settlement reconciliation runs every this many seconds (and once at start), for
    # each provider's days up to yesterday not yet reconciled; 0: not on a schedule.
    recon_every_s: float = 86_400.0
    # Downstream consumers of payment events (name -> URL), delivered at least once.
    event_subscribers: dict[str, str] = {}
    pool_size_max: int = 8
    # How long a payments request waits for a free database connection, and for one
    # statement, before it is answered 503 with Retry-After (the database is away or
    # hung): a bound on every payments route, and on what piles up meanwhile.
    pool_acquire_timeout_s: float = 2.0
    statement_timeout_s: float = 10.0
    # The nice value of the payments actor, the provider actors and the risk actor: on a
    # node shared with the ledger they yield the CPU to it (actors/priority.py); 0: no.
    cpu_nice: int = 19


class Config(msgspec.Struct, frozen=True, kw_only=True):
    shard: ShardConfig
    front: FrontConfig
    data_dir: str
    ray_address: str | None = None
    payments: PaymentsSection = PaymentsSection()
    observability: ObservabilityConfig = ObservabilityConfig()
    # Fronts (processor/placement.py): 0 starts one per alive Ray node; N > 0 starts N on
    # this node, on consecutive ports (tests and development on one machine).
    fronts: int = 0
    # Closed months archived on a schedule (processor/archive.py; off by default).
    retention: RetentionConfig = RetentionConfig()

    def check(self) -> None:
        """Limits agree with each other; raises ValueError naming the first that does not."""
        s, f = self.shard, self.front
        checks = [
            (1 <= s.shards <= 64, "1 <= shards <= 64"),
            (len(s.database_keys) <= s.shards,
             "at most one database per shard (each database needs a shard)"),
            (all(_DATABASE_KEY.fullmatch(k) and k != MAIN_DATABASE for k in s.databases),
             "further database keys are 1-32 of a-z, 0-9, _ starting with a letter, "
             "not main"),
            (all(s.databases.values()), "every further database has a URL"),
            (not s.layout or (len(s.layout) == s.shards
                              and set(s.layout) == set(s.database_keys)),
             "a recorded layout names a database of the ones given for every shard, and "
             "every database given holds a shard"),
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
            (0 <= self.payments.cpu_nice <= 19, "0 <= payments cpu_nice <= 19"),
            (self.payments.pool_acquire_timeout_s > 0, "payments pool_acquire_timeout_s > 0"),
            (self.payments.statement_timeout_s > 0, "payments statement_timeout_s > 0"),
            (0 <= self.observability.metrics_port <= 65535, "0 <= metrics_port <= 65535"),
            (0 <= self.fronts <= FRONTS_MAX, f"0 <= fronts <= {FRONTS_MAX}"),
            (self.observability.vcpu_hour_price >= 0, "vcpu_hour_price >= 0"),
            (self.observability.trace_exporter in ("off", "console", "otlp"),
             "trace_exporter is off, console or otlp"),
            (0.0 <= self.observability.trace_sample_ratio <= 1.0,
             "0 <= trace_sample_ratio <= 1"),
            ({p.name for p in self.payments.providers} <= set(self.payments.rules.provider_order),
             "every provider is in provider_order"),
            *_edge_checks(f),
            # Under mutual TLS the payments actor (RPC) and the simulated providers
            # (webhooks) must present a certificate too (docs/security.md, "TLS").
            (not (f.tls_require_client_cert and self.payments.enabled
                  and self.payments.providers and not f.tls_internal_cert_path),
             "--require-client-cert with payments needs --internal-client-cert and "
             "--internal-client-key (the payments actor's and providers' certificate)"),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"configuration: {what}")
        self.payments.rules.check()
        self.payments.risk.check()

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    @property
    def keys_path(self) -> Path:
        """The directory of the token keys (``jwt.keys``, processor/identity/keyring.py):
        that of ``front.key_path`` when it is set, else the data directory."""
        return Path(self.front.key_path).parent if self.front.key_path else self.data_path


# The listeners' limits (docs/security.md, "Edge limits"); zero never means unbounded.
_EDGE_LIMITS_POSITIVE = (
    "http_header_timeout_s", "http_header_bytes_max", "http_body_timeout_s",
    "http_keep_alive_timeout_s", "http_write_timeout_s", "http_connections_max",
    "http_connections_per_peer_max", "rpc_connections_max", "rpc_connections_per_peer_max",
    "rpc_hello_timeout_s", "rpc_idle_timeout_s", "rpc_frame_timeout_s",
    "rpc_write_timeout_s", "rpc_token_grace_s",
)


def _edge_checks(f: FrontConfig) -> list[tuple[bool, str]]:
    checks = [(getattr(f, name) > 0, f"front {name} > 0") for name in _EDGE_LIMITS_POSITIVE]
    checks.append((f.rate_limit_rps >= 0 and (f.rate_limit_rps == 0 or f.rate_limit_burst >= 1),
                   "front rate_limit_rps >= 0, with rate_limit_burst >= 1 when it is set"))
    checks.append((f.accounts_per_tenant_max >= 0, "front accounts_per_tenant_max >= 0"))
    checks.append((HELLO_BYTES_MAX <= f.rpc_hello_bytes_max <= FRAME_BYTES_MAX,
                   f"{HELLO_BYTES_MAX} (the largest Hello) <= rpc_hello_bytes_max "
                   f"<= {FRAME_BYTES_MAX}"))
    checks += [
        (bool(f.tls_cert_path) == bool(f.tls_key_path),
         "front tls_cert_path and tls_key_path both set, or neither"),
        (not f.tls_client_ca_path or f.tls, "front tls_client_ca_path needs tls_cert_path"),
        (not f.tls_require_client_cert or bool(f.tls_client_ca_path),
         "front tls_require_client_cert needs tls_client_ca_path"),
        (bool(f.tls_internal_cert_path) == bool(f.tls_internal_key_path),
         "front tls_internal_cert_path and tls_internal_key_path both set, or neither"),
        (f.tls or not (f.tls_server_ca_path or f.tls_internal_cert_path),
         "front tls_server_ca_path and tls_internal_cert_path need tls_cert_path"),
    ]
    return checks
