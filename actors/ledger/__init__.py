"""The ledger's actors: the shards that own the balances and the front that routes to them.

Public interface (what the composition root starts and the tools read):

* ``make_shard``, ``shard_actor_name``, ``endpoint_of``: a ``LedgerShard`` per partition
  group, named, restartable, listening on the data-plane channel (``actors.channel``);
* ``make_front``: the ``Front``, which implements ``LedgerService`` by routing to the
  shards through micro-batching lanes and serves the edge (``actors.edge``) on it;
* ``LedgerStore``: the ledger's PostgreSQL persistence (commits, checkpoints, audit);
* ``verify`` and ``LEDGER_CHECKS``: ``txproc verify``'s reader, which runs a list of
  checks (``Check``, given a ``VerifyContext``) over one snapshot of the database.

Nothing here imports payments' engine, providers or risk (import contract
``ledger-alone``); the front reaches payments only through the edge's ``PaymentsLink``.

The front's and the shard's names are imported when first read (``processor.lazy``): a
shard's worker process, which Ray starts by importing ``actors.ledger.shard``, does not
load the front, the HTTP API or the payments routes the front serves (measured: 1.2-1.4 s
of CPU to import where it took about 2.1, paid at every start and restart of a shard).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

# Imported at once: a name that is also a submodule's (``verify``) must be bound here,
# or the first ``import actors.ledger.verify`` anywhere would leave the package's
# ``verify`` naming the module, past the lazy lookup below.
from actors.ledger.store import LedgerStore
from actors.ledger.verify import LEDGER_CHECKS, Check, VerifyContext, VerifyResult, verify
from processor.lazy import lazy_exports

if TYPE_CHECKING:
    from actors.ledger.front import Front, make_front
    from actors.ledger.shard import LedgerShard, endpoint_of, make_shard, shard_actor_name

__all__ = [
    "LEDGER_CHECKS",
    "Check",
    "Front",
    "LedgerShard",
    "LedgerStore",
    "VerifyContext",
    "VerifyResult",
    "endpoint_of",
    "make_front",
    "make_shard",
    "shard_actor_name",
    "verify",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "actors.ledger.front": ("Front", "make_front"),
        "actors.ledger.shard": ("LedgerShard", "endpoint_of", "make_shard", "shard_actor_name"),
    })
