"""The ledger's settings: its shards and the front that routes to them.

Imported by the ledger's code, which must not reach payments or risk through the whole
configuration tree (``processor.config`` gathers every domain's settings; the import
contract ``ledger-alone`` in pyproject.toml holds this).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import msgspec

from processor.service import BATCH_ITEMS_MAX

if TYPE_CHECKING:
    from processor.ledger.partition import PartitionMap

# The main database's key (processor.ledger.partition exports it), defined here so that
# reading the settings does not import the partition map and with it NumPy (a small
# command starts without it: tests/unit/test_cli_startup.py).
MAIN_DATABASE = "main"

__all__ = ["FrontConfig", "ShardConfig"]


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
    # How often a shard records every shard's chain head in ledger_anchors (it also does
    # when it stops cleanly): a chain's tail removed after an anchor is found missing by
    # `txproc verify`, which reports the newest anchor's age (docs/design.md §15).
    anchor_interval_s: float = 10.0
    # Further databases for the ledger's shards, key -> URL, besides the main one
    # (``database_url``, key "main", which alone holds the control plane: keys, audit log,
    # payments, leases). Shards are dealt round-robin over main and these, in this order
    # (PartitionMap.dealt); empty, the default, is one database as before. A transfer
    # between accounts of two databases is refused (docs/design.md §12).
    databases: dict[str, str] = {}
    # The database key of each shard, as the databases recorded it (PartitionMap.recorded):
    # set by `serve` from the partition map rows once a ledger has them, so that a shard
    # moved to another database (`txproc move-shard`) is found there. Empty: dealt
    # round-robin as above (a ledger's first start).
    layout: tuple[str, ...] = ()

    @property
    def database_keys(self) -> tuple[str, ...]:
        """Every database's key, main first."""
        return (MAIN_DATABASE, *self.databases)

    def database_url_of(self, key: str) -> str:
        """The URL of database ``key``; KeyError if there is none of that key."""
        return self.database_url if key == MAIN_DATABASE else self.databases[key]

    def partition_map(self) -> PartitionMap:
        """The shards' partitions and databases, as every actor derives it."""
        from processor.ledger.partition import PARTITIONS, PartitionMap  # NumPy: where used

        if self.layout:
            return PartitionMap(
                shard_of_partition=tuple(p % self.shards for p in range(PARTITIONS)),
                database_of_shard=self.layout)
        return PartitionMap.dealt(self.shards, self.database_keys)

    def __repr__(self) -> str:
        """Every field, the database URL's password masked: a config may reach a log or a
        traceback, and the service's URL carries its role's password."""
        fields = {name: getattr(self, name) for name in self.__struct_fields__}
        fields["database_url"] = redact_url(self.database_url)
        fields["databases"] = {k: redact_url(v) for k, v in self.databases.items()}
        return "ShardConfig(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def redact_url(url: str) -> str:
    """``url`` with the password of its user part, if any, replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


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
    # The listeners' protections against clients that hold connections without using
    # them (slow senders, silent peers, peers that never read); docs/security.md, "Edge
    # limits", says what each does. The defaults are the listeners' own (actors/edge).
    http_header_timeout_s: float = 10.0
    http_header_bytes_max: int = 64 * 1024
    http_body_timeout_s: float = 30.0
    http_keep_alive_timeout_s: float = 5.0
    http_write_timeout_s: float = 30.0
    http_connections_max: int = 1000
    http_connections_per_peer_max: int = 256
    rpc_connections_max: int = 1024
    rpc_connections_per_peer_max: int = 256
    rpc_hello_timeout_s: float = 10.0
    rpc_hello_bytes_max: int = 64 * 1024
    rpc_idle_timeout_s: float = 300.0
    rpc_frame_timeout_s: float = 30.0
    rpc_write_timeout_s: float = 30.0
    rpc_token_grace_s: float = 30.0
    # Per principal, shared by both listeners of this front (processor/ratelimit.py): a
    # token bucket of rate_limit_burst operations refilled at rate_limit_rps; a batch takes
    # one per item. 0 disables. The defaults stop a runaway client, not a busy one: one
    # gateway's bulk ingest (about 100,000 transfers/s on two cores) fits.
    rate_limit_rps: float = 250_000.0
    rate_limit_burst: int = 500_000
    # The most accounts one tenant may hold (actors/ledger/quota.py); the processor's own
    # are not counted. 0, the default, sets no quota and costs nothing.
    accounts_per_tenant_max: int = 0
    # TLS on both listeners (docs/security.md, "TLS"): the server's certificate chain and
    # key (PEM files), both or neither; empty serves plain TCP. With a client CA, clients
    # may present a certificate it signed; with tls_require_client_cert they must, or the
    # handshake fails (mutual TLS).
    tls_cert_path: str = ""
    tls_key_path: str = ""
    tls_client_ca_path: str = ""
    tls_require_client_cert: bool = False
    # The processor's own clients of these listeners when TLS is on: the payments actor
    # (RPC) and the simulated providers (webhooks over HTTPS). They verify the server's
    # certificate against tls_server_ca_path (empty: the system's trust store) and, for
    # mutual TLS, present tls_internal_cert_path with its key.
    tls_server_ca_path: str = ""
    tls_internal_cert_path: str = ""
    tls_internal_key_path: str = ""
    # Refuse state-changing HTTP requests that are not signed with a client key (RFC 9421;
    # docs/security.md, "Signed requests"). Signed requests are verified either way.
    require_signed_requests: bool = False

    @property
    def tls(self) -> bool:
        """Whether the listeners serve TLS."""
        return bool(self.tls_cert_path)
