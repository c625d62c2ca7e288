"""The ledger: double-entry accounts and transfers, partitioned over shards.

This package is the ledger's public interface; its modules are private to it:

* ``rules`` holds ``Book``, one shard's state and every ledger rule (the reference model),
  and what a shard and its store exchange (plans, legs, commit batches, resolutions);
* ``columnar`` holds ``ArrayBook``, the same rules over a balance matrix with a columnar
  path for batches of plain transfers, held to ``Book`` by a property test, and
  ``kernel`` its compiled (Numba) loops;
* ``partition`` maps account ids to partitions and partitions to shards;
* ``chain`` holds the canonical encoding of ledger rows and the digests of the hash chain
  over a shard's commits, and ``proof`` the checks ``txproc verify`` runs over what it
  reads back (both pure);
* ``config`` holds the shards' and the front's settings.

Other domains reach the ledger through ``processor.service.LedgerService`` and the shared
types (``processor.types``); the ledger's own actors (``actors.ledger``) import what they
run from here.

Its names are imported when first read (``processor.lazy``): a command that reads the
shards' settings does not compile the kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.lazy import lazy_exports

if TYPE_CHECKING:
    from processor.ledger.chain import (
        ACCOUNT_ROW,
        EMPTY_SECTIONS,
        FAILED_ROW,
        GENESIS_DIGEST,
        RESOLUTION_ROW,
        SECTIONS,
        TRANSFER_ROW,
        Link,
        Rows,
        SectionHasher,
        account_rows,
        currency_letters,
        encode_section,
        failed_rows,
        link_digest,
        resolution_rows,
        section_digest,
        transfer_rows,
    )
    from processor.ledger.columnar import (
        ArrayBook,
        PlainLegs,
        TransferColumns,
        currency_code,
        currency_number,
        decode_legs,
        decode_reserve_answer,
        encode_legs,
        encode_reserve_answer,
    )
    from processor.ledger.config import MAIN_DATABASE, FrontConfig, ShardConfig
    from processor.ledger.kernel import warm_up as warm_up_kernels
    from processor.ledger.partition import (
        PARTITIONS,
        PartitionMap,
        crossing_mask,
        partition_of,
        partitions_of,
        refused_across_databases,
    )
    from processor.ledger.proof import BalanceCheck, ChainCheck, PendingCheck, Problem, Report
    from processor.ledger.rules import (
        NS_PER_S,
        Book,
        CommitBatch,
        EventKind,
        Failed,
        Known,
        Leg,
        Plan,
        Resolution,
        ResolutionRow,
        compare_existing,
    )

__all__ = [
    "ACCOUNT_ROW",
    "EMPTY_SECTIONS",
    "FAILED_ROW",
    "GENESIS_DIGEST",
    "MAIN_DATABASE",
    "NS_PER_S",
    "PARTITIONS",
    "RESOLUTION_ROW",
    "SECTIONS",
    "TRANSFER_ROW",
    "ArrayBook",
    "BalanceCheck",
    "Book",
    "ChainCheck",
    "CommitBatch",
    "EventKind",
    "Failed",
    "FrontConfig",
    "Known",
    "Leg",
    "Link",
    "PartitionMap",
    "PendingCheck",
    "PlainLegs",
    "Plan",
    "Problem",
    "Report",
    "Resolution",
    "ResolutionRow",
    "Rows",
    "SectionHasher",
    "ShardConfig",
    "TransferColumns",
    "account_rows",
    "compare_existing",
    "crossing_mask",
    "currency_code",
    "currency_letters",
    "currency_number",
    "decode_legs",
    "decode_reserve_answer",
    "encode_legs",
    "encode_reserve_answer",
    "encode_section",
    "failed_rows",
    "link_digest",
    "partition_of",
    "partitions_of",
    "refused_across_databases",
    "resolution_rows",
    "section_digest",
    "transfer_rows",
    "warm_up_kernels",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "processor.ledger.chain": (
            "ACCOUNT_ROW", "EMPTY_SECTIONS", "FAILED_ROW", "GENESIS_DIGEST", "RESOLUTION_ROW",
            "SECTIONS", "TRANSFER_ROW", "Link", "Rows", "SectionHasher", "account_rows",
            "currency_letters", "encode_section", "failed_rows", "link_digest", "resolution_rows",
            "section_digest", "transfer_rows",
        ),
        "processor.ledger.columnar": (
            "ArrayBook", "PlainLegs", "TransferColumns", "currency_code", "currency_number",
            "decode_legs", "decode_reserve_answer", "encode_legs", "encode_reserve_answer",
        ),
        "processor.ledger.config": ("MAIN_DATABASE", "FrontConfig", "ShardConfig"),
        "processor.ledger.kernel": ("warm_up as warm_up_kernels",),
        "processor.ledger.partition": (
            "PARTITIONS", "PartitionMap", "crossing_mask", "partition_of", "partitions_of",
            "refused_across_databases",
        ),
        "processor.ledger.proof": (
            "BalanceCheck", "ChainCheck", "PendingCheck", "Problem", "Report",
        ),
        "processor.ledger.rules": (
            "NS_PER_S", "Book", "CommitBatch", "EventKind", "Failed", "Known", "Leg", "Plan",
            "Resolution", "ResolutionRow", "compare_existing",
        ),
    })
