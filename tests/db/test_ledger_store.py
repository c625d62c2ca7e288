"""The ledger store writes columnar batches exactly as the object form, on a real server.

A batch planned over columns reaches PostgreSQL as one binary COPY built from its arrays
(or as records when it carries user_data), and its legs on the other shard's accounts as
postings. Read back, every transfer equals its object form and the database's own audit
passes. A checkpoint folds a shard's effects into its balance rows without changing what
readers see. Small commits are one statement, larger ones a transaction of COPYs, and a
checkpoint folds its accounts in slices: every commit test runs both forms (``form``).
"""

from __future__ import annotations

import time

import pytest

from actors.ledger.store import LedgerStore
from processor.ledger import Known, PartitionMap
from processor.types import Account, Transfer
from tests.unit.ledger_sim import ColumnarBook, account_ids_on_shards

pytestmark = pytest.mark.asyncio


# Per form under test: how many rows a commit may have and still be one statement, and
# how many accounts a checkpoint folds per statement (the long forms: COPY commits, and
# checkpoints folding one account per statement).
FORMS = {"one_statement": (10_000, 10_000), "transaction": (0, 1)}


@pytest.fixture(params=sorted(FORMS))
def form(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _store(url: str, form: str = "one_statement") -> LedgerStore:
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    store.one_statement_rows_max, store.checkpoint_accounts_per_statement = FORMS[form]
    return store


@pytest.mark.parametrize("user_data", ["", "order 17 ü"])
async def test_a_columnar_batch_reads_back_as_its_objects(db_url: str, user_data: str,
                                                         form: str) -> None:
    """Transfers committed from columns (COPY binary, or records with user_data) and their
    cross-shard postings read back exactly, tenants included, and the audit recomputes the
    same balances."""
    tenant = 2**63 - 7
    partitions = PartitionMap.uniform(2)
    (a0, b0), (a1, _) = account_ids_on_shards(partitions, 2)
    store = await _store(db_url, form)
    try:
        await store.ensure_partition_map(partitions)
        books = [ColumnarBook(s, partitions, recent_ids_max=64) for s in (0, 1)]
        for s in (0, 1):
            await store.take_epoch(s)
        now = time.time_ns()
        for book, ids in ((books[0], (a0, b0)), (books[1], (a1,))):
            _, batch = book.create_accounts(
                [[Account(id=i, currency="EUR", tenant=tenant) for i in ids]], now)
            await store.commit([batch], fences={book.shard: 1}, shard=book.shard,
                               partition_map=partitions)
            book.accounts_committed(batch)
        transfers = [
            Transfer(id=100, debit_account_id=a0, credit_account_id=b0, amount=2**62,
                     currency="EUR", code=7, user_data=user_data, tenant=tenant),
            Transfer(id=101, debit_account_id=a0, credit_account_id=a1, amount=5,
                     currency="EUR", user_data=user_data, tenant=tenant),
            Transfer(id=102, debit_account_id=b0, credit_account_id=a1, amount=1,
                     currency="EUR", code=2**31 - 1),
        ]
        plan = books[0].plan_transfers([transfers], now + 1, Known())
        assert plan.plain is not None and list(plan.remote_plain) == [1]
        codes, block = books[1].reserve_plain(0, 1, plan.remote_plain[1])
        batch = books[0].finalize(plan, {}, now + 1, {1: (1, block, codes)})
        assert batch.codes == [0, 0, 0]
        await store.commit([batch], fences={0: 1, 1: 1}, shard=0, partition_map=partitions)
        stored = await store.lookup_transfers([100, 101, 102])
        assert [stored[i] for i in (100, 101, 102)] == batch.all_transfers()
        balances = await store.lookup_accounts([a0, b0, a1])
        assert balances[a0].debits_posted == 2**62 + 5
        assert balances[b0].credits_posted == 2**62 and balances[b0].debits_posted == 1
        assert balances[a1].credits_posted == 6  # its postings, not yet folded by shard 1
        assert {a.tenant for a in balances.values()} == {tenant}
        assert [stored[i].tenant for i in (100, 101, 102)] == [tenant, tenant, 0]
        assert (await store.audit()).passed
    finally:
        await store.close()


async def test_an_id_is_never_both_stored_and_burned(db_url: str, form: str) -> None:
    """A commit that would store a burned id, or burn a stored one, is refused whole with
    IdConflict (the shard then restarts and reads the id back); the primary keys cover the
    rest."""
    from actors.ledger.store import IdConflict
    from processor.ledger import CommitBatch, Failed

    partitions = PartitionMap.uniform(1)
    store = await _store(db_url, form)
    try:
        await store.ensure_partition_map(partitions)
        await store.take_epoch(0)
        book = ColumnarBook(0, partitions, recent_ids_max=64)
        now = time.time_ns()
        _, accounts = book.create_accounts(
            [[Account(id=1, currency="EUR"), Account(id=2, currency="EUR")]], now)
        await store.commit([accounts], fences={0: 1}, shard=0, partition_map=partitions)
        book.accounts_committed(accounts)
        await store.commit([CommitBatch(failed=[Failed(50, 48, now)])], fences={0: 1},
                           shard=0, partition_map=partitions)
        assert await store.ids_max() == 50
        plan = book.plan_transfers([[Transfer(id=i, debit_account_id=1, credit_account_id=2,
                                              amount=1, currency="EUR")
                                     for i in (49, 50, 51)]], now + 1, Known())
        with pytest.raises(IdConflict, match="50"):
            await store.commit([book.finalize(plan, {}, now + 1)], fences={0: 1},
                               shard=0, partition_map=partitions)
        assert await store.lookup_transfers([49, 50, 51]) == {}
        stored = CommitBatch(transfers=[Transfer(id=60, debit_account_id=1,
                                                 credit_account_id=2, amount=1,
                                                 currency="EUR", timestamp=now + 2)],
                             balance_deltas={1: [0, 1, 0, 0], 2: [0, 0, 0, 1]})
        await store.commit([stored], fences={0: 1}, shard=0, partition_map=partitions)
        # Read back in one statement: the stored transfer whole, the burned id's result,
        # nothing for an id never used.
        known = await store.fetch_known([50, 60, 61], [])
        assert known.transfers == {60: stored.transfers[0]}
        assert known.failed == {50: 48}
        with pytest.raises(IdConflict, match="60"):
            await store.commit([CommitBatch(failed=[Failed(60, 48, now + 3)])],
                               fences={0: 1}, shard=0, partition_map=partitions)
        # Both in the same commit: neither row is in the database before it.
        both = CommitBatch(transfers=[Transfer(id=70, debit_account_id=1,
                                               credit_account_id=2, amount=1,
                                               currency="EUR", timestamp=now + 4)],
                           failed=[Failed(70, 48, now + 4)],
                           balance_deltas={1: [0, 1, 0, 0], 2: [0, 0, 0, 1]})
        with pytest.raises(IdConflict, match="70"):
            await store.commit([both], fences={0: 1}, shard=0, partition_map=partitions)
        assert await store.ids_max() == 60
        assert (await store.audit()).passed
    finally:
        await store.close()


async def test_a_fenced_commit_writes_nothing(db_url: str, form: str) -> None:
    """A commit fenced on an epoch that has moved on (its shard, or a peer whose holds it
    relies on, restarted) is refused with FenceError and leaves no row behind."""
    from actors.ledger.store import FenceError
    from processor.ledger import CommitBatch, Failed

    partitions = PartitionMap.uniform(2)
    (a0, _), (a1, _) = account_ids_on_shards(partitions, 2)
    store = await _store(db_url, form)
    try:
        await store.ensure_partition_map(partitions)
        for s in (0, 1):
            await store.take_epoch(s)
        now = time.time_ns()
        transfer = Transfer(id=80, debit_account_id=a0, credit_account_id=a1, amount=3,
                            currency="EUR", timestamp=now)
        batch = CommitBatch(transfers=[transfer], failed=[Failed(81, 48, now)],
                            balance_deltas={a0: [0, 3, 0, 0], a1: [0, 0, 0, 3]})
        await store.take_epoch(1)  # the peer restarted: epoch 2
        with pytest.raises(FenceError):
            await store.commit([batch], fences={0: 1, 1: 1}, shard=0,
                               partition_map=partitions)
        await store.take_epoch(0)  # and this shard too
        with pytest.raises(FenceError):
            await store.commit([batch], fences={0: 1}, shard=0, partition_map=partitions)
        assert await store.lookup_transfers([80]) == {}
        assert await store.ids_max() == 0
        # The current epochs commit the same batch.
        await store.commit([batch], fences={0: 2, 1: 2}, shard=0, partition_map=partitions)
        assert list(await store.lookup_transfers([80])) == [80]
    finally:
        await store.close()


async def test_a_checkpoint_folds_without_changing_balances(db_url: str, form: str) -> None:
    """Balances read the same before and after a checkpoint; the rows catch up with them;
    an idle shard's checkpoint moves forward; a superseded incarnation cannot checkpoint."""
    from actors.ledger.store import FenceError

    partitions = PartitionMap.uniform(2)
    (a0, b0), (a1, _) = account_ids_on_shards(partitions, 2)
    own0 = partitions.partitions_of_shard(0)
    store = await _store(db_url, form)
    try:
        books = [ColumnarBook(s, partitions, recent_ids_max=64) for s in (0, 1)]
        for s in (0, 1):
            await store.take_epoch(s)
        now = time.time_ns()
        for book, accounts in ((books[0], (a0, b0)), (books[1], (a1,))):
            _, batch = book.create_accounts(
                [[Account(id=i, currency="EUR") for i in accounts]], now)
            await store.commit([batch], fences={book.shard: 1}, shard=book.shard,
                               partition_map=partitions)
            book.accounts_committed(batch)
        transfers = [
            Transfer(id=200, debit_account_id=a0, credit_account_id=b0, amount=30,
                     currency="EUR"),
            Transfer(id=201, debit_account_id=a0, credit_account_id=a1, amount=12,
                     currency="EUR", flags=2),
        ]
        plan = books[0].plan_transfers([transfers], now + 1, Known())
        granted = books[1].reserve(0, 1, [leg for _, leg in plan.remote[1]])
        batch = books[0].finalize(plan, {1: (1, granted)}, now + 1)
        assert batch.codes == [0, 0]
        await store.commit([batch], fences={0: 1, 1: 1}, shard=0, partition_map=partitions)
        ids = [a0, b0, a1]

        async def rows() -> dict[int, tuple[int, ...]]:
            async with store._pool.acquire() as conn:
                found = await conn.fetch(
                    "SELECT id, debits_pending, debits_posted, credits_pending, "
                    "credits_posted FROM accounts WHERE id = ANY($1::bigint[])", ids)
            return {r["id"]: tuple(r)[1:] for r in found}

        def balances(found: dict[int, Account]) -> dict[int, tuple[int, ...]]:
            return {i: (a.debits_pending, a.debits_posted, a.credits_pending,
                        a.credits_posted) for i, a in found.items()}

        before = balances(await store.lookup_accounts(ids))
        assert before == {a0: (12, 30, 0, 0), b0: (0, 0, 0, 30), a1: (0, 0, 12, 0)}
        assert set((await rows()).values()) == {(0, 0, 0, 0)}
        high = await store.checkpoint_timestamp(own0)
        assert high == max(t.timestamp for t in batch.transfers)

        position = await store.checkpoint(0, 1, own0)
        assert position == high
        assert balances(await store.lookup_accounts(ids)) == before
        folded = await rows()
        assert folded[a0] == before[a0] and folded[b0] == before[b0]
        assert folded[a1] == (0, 0, 0, 0)  # shard 1's posting waits for shard 1's checkpoint
        await store.checkpoint(1, 1, partitions.partitions_of_shard(1))
        assert await rows() == before
        assert (await store.audit()).passed

        # What commits answered, folded as the shard does (in slices of accounts in the
        # long form), lands in the rows exactly.
        more = [Transfer(id=300, debit_account_id=b0, credit_account_id=a0, amount=5,
                         currency="EUR"),
                Transfer(id=301, debit_account_id=a0, credit_account_id=b0, amount=2,
                         currency="EUR")]
        plan = books[0].plan_transfers([more], now + 2, Known())
        later = books[0].finalize(plan, {}, now + 2)
        assert later.codes == [0, 0]
        effects = await store.commit([later], fences={0: 1}, shard=0,
                                     partition_map=partitions)
        books[0].committed(later)
        before = balances(await store.lookup_accounts(ids))
        assert before[a0] == (12, 32, 0, 5) and before[b0] == (0, 5, 0, 32)
        high = max(t.timestamp for t in later.all_transfers())
        assert await store.checkpoint(0, 1, own0, own=effects) == high
        assert await rows() == before
        assert balances(await store.lookup_accounts(ids)) == before

        # Nothing new, but a promised floor moves the position (an idle shard).
        assert await store.checkpoint(0, 1, own0, floor_ns=high + 10) == high + 10
        assert await store.checkpoint_timestamp(own0) == high + 10
        assert balances(await store.lookup_accounts(ids)) == before

        await store.take_epoch(0)  # a successor: the old incarnation is fenced out
        with pytest.raises(FenceError):
            await store.checkpoint(0, 1, own0)
    finally:
        await store.close()
