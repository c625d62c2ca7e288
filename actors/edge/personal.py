"""Personal user_data: a tenant's accounts' and transfers' ``user_data`` kept erasable
(docs/design.md §17, "user_data a tenant marks personal"; migration 0036).

A tenant that an operator marked (``txproc tenants personal-user-data``) has every
non-empty ``user_data`` it sends treated as the reference of a data subject. The edge
wraps the front's ledger service in ``PersonalUserData``, which, for such a tenant only:

* on the way in, replaces each value by its subject's pseudonym (``~s`` and the subject
  key's id, processor.privacy), after making sure the subject has a key and the value is
  stored sealed with it (``personal_values``). Both are committed before the ledger sees
  the pseudonym, so no stored row names a value that was not kept. A subject's key is
  cached for writing (actors/subjects.py), so a subject seen before costs nothing;
* on the way out (lookups, account history, queries, the change stream), opens the
  values behind the pseudonyms in one statement per answer, without a cache: a value
  whose subject was erased reads as ``""`` at once;
* a query's ``user_data`` filter is the subject's current pseudonym (none: an empty page).

The ledger's rows, hash chain and archives hold only pseudonyms, so ``txproc erase``
(destroying the subject's key and deleting its sealed value) changes nothing that
``txproc verify`` checks. Every other tenant's requests pass through unchanged, at the
cost of a set lookup. Which tenants are marked is read at start and every
``REFRESH_S`` seconds.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from msgspec.structs import replace

from actors.database import keep_session
from actors.ops.audit_events import record_audit_event
from actors.subjects import STATEMENT_TIMEOUT_S, SubjectKeys, master_key_of
from processor.audit import AuditActor
from processor.batch import TransferBatch
from processor.codes import AccountResult, TransferResult
from processor.history import AccountTransfersFilter, TransfersPage, TransfersQuery
from processor.privacy import (
    NONCE_BYTES,
    Personal,
    PrivacyError,
    key_id_of,
    open_personal,
    pseudonym_of,
    seal_personal,
    user_data_row_id,
)
from processor.stream import StreamPage
from processor.types import Account, Transfer

__all__ = ["REFRESH_S", "PersonalUserData", "mark_personal"]

log = logging.getLogger(__name__)

_Item = TypeVar("_Item", Account | None, Transfer | None, Transfer)
_Created = TypeVar("_Created", Account, Transfer)

# How soon a tenant newly marked personal is seen by every front.
REFRESH_S = 5.0
# Key ids whose sealed value this front knows is stored (bounded: forgetting one costs an
# INSERT that does nothing).
_STORED_MAX = 100_000

_TENANTS = "SELECT tenant_slot FROM tenant_privacy WHERE personal_user_data"
_STORE_VALUE = ("INSERT INTO personal_values (subject_key_id, sealed) VALUES ($1, $2) "
                "ON CONFLICT (subject_key_id) DO NOTHING")
# The values behind a tenant's pseudonyms: only live keys of that tenant open.
_VALUES = """
SELECT k.id, k.subject_digest, k.wrapped_key, v.sealed
FROM subject_keys k JOIN personal_values v ON v.subject_key_id = k.id
WHERE k.id = ANY($1::bigint[]) AND k.tenant_slot = $2 AND k.wrapped_key IS NOT NULL
"""
_MARK = ("INSERT INTO tenant_privacy (tenant_slot, personal_user_data, set_by) "
         "VALUES ($1, true, $2) ON CONFLICT (tenant_slot) DO NOTHING RETURNING 1")
_LIVE_KEY = ("SELECT id FROM subject_keys WHERE tenant_slot = $1 AND subject_digest = $2 "
             "AND erased_at IS NULL")


async def mark_personal(conn: asyncpg.Connection, *, tenant_slot: int, tenant: str,
                        actor: AuditActor) -> bool:
    """Mark a tenant's user_data personal (``txproc tenants personal-user-data``), with an
    audit event, in one transaction; False when it was marked before. Run by the operator's
    role: the service's may only read the list."""
    async with conn.transaction():
        marked = await conn.fetchval(_MARK, tenant_slot, actor.subject,
                                     timeout=STATEMENT_TIMEOUT_S)
        if marked is None:
            return False
        await record_audit_event(conn, actor=actor, action="tenant.personal_user_data",
                                 target_kind="tenant", target_id=tenant,
                                 tenant_slot=tenant_slot)
    return True


class PersonalUserData:
    """The ledger service as the edge sees it: ``inner``'s, with personal user_data kept
    as pseudonyms for the tenants marked so. Everything else is ``inner``'s."""

    def __init__(self, inner: Any, pool: asyncpg.Pool, keys_path: Path, *,
                 shared_keys: bool) -> None:
        self._inner = inner
        self._pool = pool
        self._keys_path = keys_path
        self._shared_keys = shared_keys
        self._subjects: SubjectKeys | None = None  # made when a marked tenant first writes
        self._stored: dict[int, None] = {}
        self.tenants: frozenset[int] = frozenset()

    @classmethod
    async def connect(cls, inner: Any, url: str, keys_path: Path, *, shared_keys: bool,
                      connect_timeout_s: float, command_timeout_s: float) -> PersonalUserData:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2,
                                         timeout=connect_timeout_s,
                                         command_timeout=command_timeout_s,
                                         reset=keep_session)
        wrapper = cls(inner, pool, keys_path, shared_keys=shared_keys)
        await wrapper.refresh()
        return wrapper

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def close(self) -> None:
        await self._pool.close()

    async def refresh(self) -> None:
        rows = await self._pool.fetch(_TENANTS, timeout=STATEMENT_TIMEOUT_S)
        self.tenants = frozenset(int(r["tenant_slot"]) for r in rows)

    async def run(self) -> None:
        """Refresh the marked tenants every ``REFRESH_S`` seconds until cancelled; a failed
        read keeps the last list."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.refresh()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning("personal user_data: tenants not refreshed: %s",
                            type(exc).__name__)

    # -- writes --------------------------------------------------------------------------

    async def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        results: list[AccountResult] = await self._inner.create_accounts(
            await self._pseudonymized(accounts))
        return results

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        results: list[TransferResult] = await self._inner.create_transfers(
            await self._pseudonymized(transfers))
        return results

    async def create_transfer_batch(self, batch: TransferBatch) -> Any:
        texts = batch.user_data
        if texts and self.tenants and batch.tenant is not None and len(batch):
            tenant = int(batch.tenant[0])
            if tenant in self.tenants:
                mapping = await self._pseudonyms(tenant, {t for t in texts if t})
                batch = batch.with_user_data([mapping[t] if t else t for t in texts])
        return await self._inner.create_transfer_batch(batch)

    async def _pseudonymized(self, items: list[_Created]) -> list[_Created]:
        """``items`` (all of one tenant: the edge sets it) with each personal value
        replaced by its pseudonym; as they are when their tenant is not marked."""
        if not self.tenants or not items or items[0].tenant not in self.tenants:
            return items
        values = {i.user_data for i in items if i.user_data}
        if not values:
            return items
        mapping = await self._pseudonyms(items[0].tenant, values)
        return [replace(i, user_data=mapping[i.user_data]) if i.user_data else i
                for i in items]

    async def _pseudonyms(self, tenant: int, values: Iterable[str]) -> dict[str, str]:
        subjects = self._subject_keys()
        mapping: dict[str, str] = {}
        for value in values:
            key_id, key = await subjects.key_for(tenant, value)
            if key_id not in self._stored:
                sealed = seal_personal(key, Personal(customer_ref=value),
                                       row_id=user_data_row_id(key_id),
                                       nonce=secrets.token_bytes(NONCE_BYTES))
                await self._pool.execute(_STORE_VALUE, key_id, sealed,
                                         timeout=STATEMENT_TIMEOUT_S)
                self._stored[key_id] = None
                while len(self._stored) > _STORED_MAX:
                    del self._stored[next(iter(self._stored))]
            mapping[value] = pseudonym_of(key_id)
        return mapping

    def _subject_keys(self) -> SubjectKeys:
        if self._subjects is None:
            self._subjects = SubjectKeys(
                self._pool, master_key_of(self._keys_path, shared=self._shared_keys))
        return self._subjects

    # -- reads ---------------------------------------------------------------------------

    async def lookup_accounts(self, ids: list[int]) -> list[Account | None]:
        found: list[Account | None] = await self._inner.lookup_accounts(ids)
        return await self._opened(found)

    async def lookup_transfers(self, ids: list[int]) -> list[Transfer | None]:
        found: list[Transfer | None] = await self._inner.lookup_transfers(ids)
        return await self._opened(found)

    async def get_account_transfers(self, query: AccountTransfersFilter,
                                    tenant: int) -> TransfersPage | None:
        page: TransfersPage | None = await self._inner.get_account_transfers(query, tenant)
        if page is None or tenant not in self.tenants:
            return page
        return replace(page, data=await self._opened(page.data))

    async def query_transfers(self, query: TransfersQuery, tenant: int) -> TransfersPage:
        if tenant in self.tenants and query.user_data:
            pseudonym = await self._current_pseudonym(tenant, query.user_data)
            if pseudonym is None:  # no live subject: nothing of it is stored
                return TransfersPage(data=[], next_cursor=None)
            query = replace(query, user_data=pseudonym)
        page: TransfersPage = await self._inner.query_transfers(query, tenant)
        if tenant not in self.tenants:
            return page
        return replace(page, data=await self._opened(page.data))

    async def stream_transfers(self, after: str, limit: int, wait_s: float,
                               tenant: int) -> StreamPage:
        page: StreamPage = await self._inner.stream_transfers(after, limit, wait_s, tenant)
        if tenant not in self.tenants:
            return page
        return replace(page, data=await self._opened(page.data))

    async def _current_pseudonym(self, tenant: int, value: str) -> str | None:
        digest = self._subject_keys().master.subject_digest(tenant, value)
        key_id = await self._pool.fetchval(_LIVE_KEY, tenant, digest,
                                           timeout=STATEMENT_TIMEOUT_S)
        return None if key_id is None else pseudonym_of(int(key_id))

    async def _opened(self, items: list[_Item]) -> list[_Item]:
        """``items`` with the pseudonyms of marked tenants' items replaced by their values
        (``""`` for an erased subject's)."""
        if not self.tenants:
            return items
        wanted: dict[int, set[int]] = {}
        for item in items:
            if item is not None and item.tenant in self.tenants:
                key_id = key_id_of(item.user_data)
                if key_id is not None:
                    wanted.setdefault(item.tenant, set()).add(key_id)
        if not wanted:
            return items
        values: dict[tuple[int, int], str] = {}
        for tenant, key_ids in wanted.items():
            found = await self._values(tenant, key_ids)
            values.update(((tenant, k), v) for k, v in found.items())
        opened: list[_Item] = []
        for item in items:
            key_id = None if item is None or item.tenant not in wanted else key_id_of(
                item.user_data)
            opened.append(item if key_id is None or item is None else replace(
                item, user_data=values.get((item.tenant, key_id), "")))
        return opened

    async def _values(self, tenant: int, key_ids: set[int]) -> dict[int, str]:
        """The values behind ``key_ids`` of ``tenant`` whose subjects are not erased."""
        rows = await self._pool.fetch(_VALUES, sorted(key_ids), tenant,
                                      timeout=STATEMENT_TIMEOUT_S)
        master = self._subject_keys().master
        values: dict[int, str] = {}
        for row in rows:
            key_id = int(row["id"])
            try:
                key = master.unwrap(bytes(row["wrapped_key"]),
                                    digest=bytes(row["subject_digest"]))
                values[key_id] = open_personal(key, bytes(row["sealed"]),
                                               row_id=user_data_row_id(key_id)).customer_ref
            except PrivacyError:  # another master key, or changed bytes: shown as gone
                log.error("personal user_data: the value of subject key %d does not open",
                          key_id)
        return values
