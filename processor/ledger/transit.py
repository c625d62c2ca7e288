"""A transfer between two databases as a two-step saga through transit accounts
(docs/design.md §12, "Between databases"): the ids it uses and what each step's answer
leads to. Pure: the actors (actors/ledger/crossdb.py) hold the SQL and the calls.

Step 1, in the debit account's database D1: ``debit -> transit_out(D1->D2)`` under the
transfer's id. Step 2, in the credit account's database D2: ``transit_in(D2<-D1) ->
credit`` under the same id (ids are unique per database). If step 2 is refused, the
compensation, in D1: ``transit_out(D1->D2) -> debit`` under an id derived from the
transfer's. Transit accounts are the tenant's own (a tenant's transfers touch only its
accounts), one pair per tenant, database pair and currency, with ids in a reserved range.
"""

from __future__ import annotations

import hashlib
from typing import Literal

from processor.ledger.partition import PartitionMap

__all__ = ["COMPENSATION_ID_BASE", "TRANSIT_ID_BASE", "Next", "SagaState",
           "compensation_id", "next_step", "transit_account_id"]

# Reserved ids (the processor's range starts at 2**62, payments' sequences near its start
# and at 2**62 + 2**61): transit accounts and compensations each take a 2**59 slice.
TRANSIT_ID_BASE = 2**62 + 2**60
COMPENSATION_ID_BASE = 2**62 + 2**60 + 2**59
_SLICE = 2**59
_PROBES_MAX = 4096

SagaState = Literal["started", "debited", "credited", "refused", "compensating",
                    "compensated"]
# What to do next: a step to send, or nothing (the saga is over).
Next = Literal["debit", "credit", "compensate", "done"]


def _hash(*parts: object) -> int:
    text = "\x1f".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def transit_account_id(partitions: PartitionMap, *, tenant: int, debit_database: str,
                       credit_database: str, currency: str, side: Literal["out", "in"],
                       skip: int = 0) -> int:
    """The id of the transit account of ``tenant`` for money moving from ``debit_database``
    to ``credit_database`` in ``currency``: ``out`` lives in the debit's database, ``in``
    in the credit's. Derived, so every front agrees without asking; probed forward until
    it lands in the right database; ``skip`` takes a later candidate (an id another
    tenant holds). Raises ValueError if none is found (not with a real map)."""
    home = debit_database if side == "out" else credit_database
    start = _hash("transit", tenant, debit_database, credit_database, currency, side)
    found = 0
    for k in range(_PROBES_MAX):
        candidate = TRANSIT_ID_BASE + (start + k) % _SLICE
        if partitions.database_of(candidate) == home:
            if found == skip:
                return candidate
            found += 1
    raise ValueError(f"no transit account id lands in database {home}")


def compensation_id(transfer_id: int) -> int:
    """The id of the transfer that gives a refused step 2's amount back to the debit."""
    return COMPENSATION_ID_BASE + _hash("compensation", transfer_id) % _SLICE


def next_step(state: SagaState) -> Next:
    """The step a saga in ``state`` sends next (each is idempotent by its id, so sending
    it again after a crash is harmless)."""
    return _NEXT[state]


_NEXT: dict[str, Next] = {"started": "debit", "debited": "credit", "credited": "done",
                          "refused": "done", "compensating": "compensate",
                          "compensated": "done"}
