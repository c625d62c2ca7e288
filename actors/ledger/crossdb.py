"""Transfers between two databases (docs/design.md §12, "Between databases"): the saga's
durable log (``crossdb_transfers``, migration 0032, in the debit account's database), the
driver that moves a transfer through its steps, and the relay that finishes what a dead
front left (processor/ledger/transit.py has the ids and the state machine).

Every step is an ordinary ledger transfer in one database, sent through the front's own
routing, so it is checked, committed and fenced as any other and is idempotent by its id;
the log's state moves forward by compare-and-set, so a front and the relay driving one
transfer at once agree on one outcome.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import msgspec

from processor.codes import AccountResult, TransferResult
from processor.errors import Unavailable
from processor.ledger import PartitionMap, compare_existing
from processor.ledger.transit import (
    COMPENSATION_ID_BASE,
    TRANSIT_ID_BASE,
    SagaState,
    compensation_id,
    next_step,
    transit_account_id,
)
from processor.types import Account, Transfer

__all__ = ["LEASE_CROSSDB_RELAY", "CrossDatabase"]

log = logging.getLogger("txproc.crossdb")

LEASE_CROSSDB_RELAY = "crossdb-relay"
# The relay takes a transfer over once its row has not moved for this long (a front
# driving it moves it within a commit or two).
RELAY_AFTER_S = 2.0
RELAY_INTERVAL_S = 0.5
RELAY_ROWS_MAX = 256
_OK = (int(TransferResult.ok), int(TransferResult.exists))
_NOT_APPLIED = int(TransferResult.not_applied)

_COLUMNS = ("id, tenant, debit_account_id, credit_account_id, amount, currency, code, "
            "user_data, debit_database, credit_database, state, result")
_INSERT_SQL = f"""
INSERT INTO crossdb_transfers ({_COLUMNS})
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 'started', NULL)
ON CONFLICT (id) DO NOTHING RETURNING {_COLUMNS}
"""  # noqa: S608 - built from this module's constants only
_READ_SQL = f"SELECT {_COLUMNS} FROM crossdb_transfers WHERE id = $1"  # noqa: S608 - constants
_ADVANCE_SQL = f"""
UPDATE crossdb_transfers SET state = $3, result = coalesce($4, result), updated_at = now()
WHERE id = $1 AND state = $2 RETURNING {_COLUMNS}
"""  # noqa: S608 - built from this module's constants only
_STALE_SQL = f"""
SELECT {_COLUMNS} FROM crossdb_transfers
WHERE state IN ('started', 'debited', 'compensating')
  AND updated_at < now() - make_interval(secs => $1)
ORDER BY updated_at LIMIT $2
"""  # noqa: S608 - built from this module's constants only

Submit = Callable[[list[Transfer]], Awaitable[list[TransferResult]]]
CreateAccounts = Callable[[list[Account]], Awaitable[list[AccountResult]]]


def _is_transit(account_id: int) -> bool:
    return TRANSIT_ID_BASE <= account_id < COMPENSATION_ID_BASE


def _as_transfer(row: Any) -> Transfer:
    return Transfer(id=row["id"], debit_account_id=row["debit_account_id"],
                    credit_account_id=row["credit_account_id"], amount=row["amount"],
                    currency=row["currency"], code=row["code"], user_data=row["user_data"],
                    tenant=row["tenant"])


class CrossDatabase:
    """The sagas of one front: ``transfer`` for a new one, ``relay`` for the stale ones of
    a database. ``submit`` routes one database's transfers as the front routes any."""

    def __init__(self, partitions: PartitionMap, pools: dict[str, asyncpg.Pool],
                 submit: Submit, create_accounts: CreateAccounts) -> None:
        self._partitions = partitions
        self._pools = pools
        self._submit = submit
        self._create_accounts = create_accounts
        # (tenant, debit db, credit db, currency) -> (out id, in id), once created.
        self._transit: dict[tuple[int, str, str, str], tuple[int, int]] = {}

    async def transfer(self, t: Transfer) -> TransferResult:
        """Carry a plain transfer whose accounts live in two databases: its answer, as a
        transfer in one database would get it (``ok``, then ``exists`` for a repeat; the
        refusing step's code; ``exists_with_different_*`` for another transfer's id).
        Raises ``Unavailable`` when a step could not be sent: the relay finishes it."""
        d1 = self._partitions.database_of(t.debit_account_id)
        d2 = self._partitions.database_of(t.credit_account_id)
        async with self._pools[d1].acquire() as conn:
            row = await conn.fetchrow(_INSERT_SQL, t.id, t.tenant, t.debit_account_id,
                                      t.credit_account_id, t.amount, t.currency, t.code,
                                      t.user_data, d1, d2)
            fresh = row is not None
            if row is None:
                row = await conn.fetchrow(_READ_SQL, t.id)
        if not fresh:
            differs = compare_existing(t, msgspec.structs.replace(
                _as_transfer(row), timestamp=t.timestamp))
            if differs != TransferResult.exists:
                return differs
        row = await self.drive(row)
        if row["state"] == "credited":
            return TransferResult.ok if fresh else TransferResult.exists
        return TransferResult(row["result"])

    async def drive(self, row: Any) -> Any:
        """Send the steps a row still needs, each recorded before the next; its final row.
        Raises ``Unavailable`` if a step's shard could not answer."""
        while (step := next_step(row["state"])) != "done":
            t = _as_transfer(row)
            d1, d2 = row["debit_database"], row["credit_database"]
            out_id, in_id = await self._transit_accounts(t, d1, d2)
            if step == "debit":
                code = await self._one(msgspec.structs.replace(t, credit_account_id=out_id))
                after: tuple[SagaState, int | None] = (
                    ("debited", None) if code in _OK else ("refused", code))
            elif step == "credit":
                code = await self._one(msgspec.structs.replace(t, debit_account_id=in_id))
                after = ("credited", 0) if code in _OK else ("compensating", code)
            else:
                code = await self._one(msgspec.structs.replace(
                    t, id=compensation_id(t.id), debit_account_id=out_id,
                    credit_account_id=t.debit_account_id))
                if code not in _OK:
                    # Only the transit account and the debit account are touched, and the
                    # debit account was debited this amount: a bug if refused.
                    raise RuntimeError(f"compensation of transfer {t.id} refused: {code}")
                after = ("compensated", None)
            row = await self._advance(d1, row, *after)
        return row

    async def _one(self, t: Transfer) -> int:
        [code] = await self._submit([t])
        if int(code) == _NOT_APPLIED:
            raise Unavailable("a step of a transfer between databases was not applied; "
                              "it is finished later", retry_after_s=1.0)
        return int(code)

    async def _advance(self, database: str, row: Any, state: SagaState,
                       result: int | None) -> Any:
        async with self._pools[database].acquire() as conn:
            moved = await conn.fetchrow(_ADVANCE_SQL, row["id"], row["state"], state, result)
            if moved is None:  # another driver moved it first: go on from where it is
                moved = await conn.fetchrow(_READ_SQL, row["id"])
        return moved

    async def _transit_accounts(self, t: Transfer, d1: str, d2: str) -> tuple[int, int]:
        """The tenant's transit accounts of this database pair and currency, created on
        first use (``exists`` is as good); an id another tenant holds is skipped."""
        key = (t.tenant, d1, d2, t.currency)
        found = self._transit.get(key)
        if found is not None:
            return found
        ids = []
        for side in ("out", "in"):
            for skip in range(8):
                account_id = transit_account_id(
                    self._partitions, tenant=t.tenant, debit_database=d1,
                    credit_database=d2, currency=t.currency, side=side, skip=skip)
                [code] = await self._create_accounts(
                    [Account(id=account_id, currency=t.currency, tenant=t.tenant)])
                if code in (AccountResult.ok, AccountResult.exists):
                    ids.append(account_id)
                    break
            else:
                raise RuntimeError(f"no transit account for tenant {t.tenant} {d1}->{d2}")
        self._transit[key] = (ids[0], ids[1])
        return ids[0], ids[1]

    async def as_sent(self, found: dict[int, Transfer]) -> dict[int, Transfer | None]:
        """``found`` (id -> a stored row) with each step of a transfer between databases
        replaced by the transfer as sent (the timestamp its step has), or by None while it
        is not credited (in flight, refused or compensated: not a transfer of the ledger)."""
        steps = [i for i, t in found.items() if _is_transit(t.debit_account_id)
                 or _is_transit(t.credit_account_id)]
        if not steps:
            return dict(found)
        rows: dict[int, Any] = {}
        for pool in self._pools.values():
            async with pool.acquire() as conn:
                for r in await conn.fetch(
                        f"SELECT {_COLUMNS} FROM crossdb_transfers "  # noqa: S608 - constants
                        "WHERE id = ANY($1::bigint[])", steps):
                    rows[r["id"]] = r
        out: dict[int, Transfer | None] = dict(found)
        for i in steps:
            row = rows.get(i)
            if row is None:
                continue  # a transit account's id another way (not a saga's step)
            out[i] = (msgspec.structs.replace(_as_transfer(row), timestamp=found[i].timestamp)
                      if row["state"] == "credited" else None)
        return out

    async def relay(self, database: str) -> None:
        """Run until cancelled: drive the transfers of ``database`` whose rows stood still
        for ``RELAY_AFTER_S`` (their front died, or a step was unavailable)."""
        while True:
            try:
                async with self._pools[database].acquire() as conn:
                    rows = await conn.fetch(_STALE_SQL, RELAY_AFTER_S, RELAY_ROWS_MAX)
                for row in rows:
                    await self.drive(row)
                    log.info("relayed transfer %d between databases", row["id"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("cross-database relay of %s: %r", database, exc)
            await asyncio.sleep(RELAY_INTERVAL_S)
