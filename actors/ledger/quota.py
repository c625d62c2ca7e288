"""Per-tenant quotas on accounts: ``txproc serve --max-accounts-per-tenant N``.

A tenant may hold at most N accounts (the processor's own, tenant slot 0, are never
counted). The count lives in PostgreSQL (``tenant_accounts``, migration 0016) so that it is
one number for every front and survives restarts. Creating accounts *reserves* their number
first, in one conditional UPDATE that fails when the reservation would pass the quota;
after the shards answer, the reservations of accounts that were not created (``exists``, a
refused field, another tenant's id) are given back. So two fronts racing for a tenant's
last slots cannot both win, and an account is counted before it can exist.

Known limits (docs/security.md, "Quotas"):

* A request that fails as a whole after some shard may have created part of it (a shard
  and the database both unreachable) keeps its reservations: the count can run high,
  never low. A front starting with the quota on recounts every tenant from ``accounts``,
  which heals it.
* At the quota, a retry of accounts that already exist is checked against what it would
  add: ids that exist are looked up and not reserved again, so the retry is answered
  ``exists`` rather than refused.

With the quota off (0, the default) nothing here runs: account creation costs no query.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from actors.database import keep_session
from processor.codes import AccountResult
from processor.errors import QuotaExceeded
from processor.types import Account

__all__ = ["AccountQuota", "new_accounts_by_tenant"]

# Reserve ``n`` for one tenant: insert its row, or add to it, unless the total would pass
# the quota. No row back means refused.
_RESERVE = """
INSERT INTO tenant_accounts AS t (tenant, accounts) VALUES ($1, $2)
ON CONFLICT (tenant) DO UPDATE SET accounts = t.accounts + EXCLUDED.accounts
    WHERE t.accounts + EXCLUDED.accounts <= $3
RETURNING accounts
"""
_RELEASE = "UPDATE tenant_accounts SET accounts = GREATEST(accounts - $2, 0) WHERE tenant = $1"
_RECOUNT = """
WITH counted AS (SELECT tenant, count(*) AS accounts FROM accounts WHERE tenant <> 0
                 GROUP BY tenant)
INSERT INTO tenant_accounts (tenant, accounts) SELECT tenant, accounts FROM counted
ON CONFLICT (tenant) DO UPDATE SET accounts = EXCLUDED.accounts
"""
_FORGET_EMPTY = """
UPDATE tenant_accounts AS t SET accounts = 0
WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.tenant = t.tenant)
"""

Lookup = Callable[[list[int]], Awaitable[list[Account | None]]]


def new_accounts_by_tenant(accounts: Sequence[Account]) -> dict[int, int]:
    """How many of ``accounts`` each tenant would add, the processor's (slot 0) left out."""
    return dict(collections.Counter(a.tenant for a in accounts if a.tenant != 0))


class AccountQuota:
    """Reserves and gives back per-tenant account counts; one per front."""

    def __init__(self, pool: asyncpg.Pool, accounts_max: int) -> None:
        if accounts_max <= 0:
            raise ValueError("a quota is at least one account; 0 means no quota object")
        self._pool = pool
        self.accounts_max = accounts_max

    @classmethod
    async def connect(cls, url: str, accounts_max: int, *, connect_timeout_s: float,
                      command_timeout_s: float) -> AccountQuota:
        """A quota on a small pool of its own, recounted from the accounts that exist."""
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2,
                                         timeout=connect_timeout_s,
                                         command_timeout=command_timeout_s,
                                         reset=keep_session)
        quota = cls(pool, accounts_max)
        await quota.recount()
        return quota

    async def close(self) -> None:
        await self._pool.close()

    async def recount(self) -> None:
        """Set every tenant's count from the accounts that exist (at a front's start)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(_FORGET_EMPTY)
            await conn.execute(_RECOUNT)

    async def reserve(self, accounts: Sequence[Account], lookup: Lookup) -> dict[int, int]:
        """Reserve the accounts of every tenant in ``accounts``; return what was reserved.

        Raises ``QuotaExceeded`` (nothing reserved) when a tenant would pass the quota even
        after leaving out the ids that already exist.
        """
        wanted = new_accounts_by_tenant(accounts)
        taken: dict[int, int] = {}
        try:
            for tenant, n in wanted.items():
                if not await self._reserve(tenant, n):
                    n = await self._not_yet_stored(tenant, accounts, lookup)
                    if n and not await self._reserve(tenant, n):
                        raise QuotaExceeded(
                            f"the tenant's quota of {self.accounts_max} accounts would be "
                            "passed; nothing was created")
                taken[tenant] = n
        except BaseException:
            await self.release(taken)
            raise
        return taken

    async def settle(self, reserved: dict[int, int], accounts: Sequence[Account],
                     results: Sequence[AccountResult]) -> None:
        """Give back the reservations of accounts that were not created."""
        unused = dict(reserved)
        for account, result in zip(accounts, results, strict=True):
            if account.tenant in unused and result is AccountResult.ok:
                unused[account.tenant] -= 1
        await self.release({t: n for t, n in unused.items() if n > 0})

    async def release(self, counts: dict[int, int]) -> None:
        """Give back ``counts`` (per tenant)."""
        if not counts:
            return
        async with self._pool.acquire() as conn:
            await conn.executemany(_RELEASE, list(counts.items()))

    async def _reserve(self, tenant: int, n: int) -> bool:
        if n > self.accounts_max:
            return False  # and a tenant's first row is never inserted above the quota
        async with self._pool.acquire() as conn:
            row = await conn.fetchval(_RESERVE, tenant, n, self.accounts_max)
        return row is not None

    async def _not_yet_stored(self, tenant: int, accounts: Sequence[Account],
                              lookup: Lookup) -> int:
        """How many of the tenant's accounts in the request do not exist yet."""
        ids = [a.id for a in accounts if a.tenant == tenant]
        found = await lookup(ids)
        return sum(1 for account in found if account is None)
