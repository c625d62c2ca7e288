"""The chain's canonical encoding is the same bytes on both sides: what the store hashes
when it commits (from its objects, its columns and the COPY records it sends) equals what
``txproc verify`` encodes from the rows it reads back from PostgreSQL, for any transfers
(hypothesis: amounts 1 and AMOUNT_MAX, every flag, user_data empty, ASCII or not, both
commit forms), and the link stored is the link those bytes give.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from actors.ledger import LedgerStore
from actors.ledger.store import _ChainRows, column_rows
from actors.ledger.verify import _TRANSFERS_SQL, _ints, _letters
from processor.ledger import (
    SECTIONS,
    CommitBatch,
    PartitionMap,
    TransferColumns,
    encode_section,
    link_digest,
    section_digest,
    transfer_rows,
)
from processor.types import AMOUNT_MAX, Transfer

pytestmark = pytest.mark.asyncio

PARTITIONS = PartitionMap.uniform(2)
OWN = np.asarray(sorted(PARTITIONS.partitions_of_shard(0)), dtype=np.int64)

transfer_fields = st.fixed_dictionaries({
    "debit_account_id": st.integers(1, 2**63 - 1),
    "credit_account_id": st.integers(1, 2**63 - 1),
    "amount": st.sampled_from([1, AMOUNT_MAX]) | st.integers(1, AMOUNT_MAX),
    "currency": st.sampled_from(["EUR", "USD", "JPY"]),
    "flags": st.integers(0, 15),
    "pending_id": st.integers(0, 2**63 - 1),
    "timeout_s": st.integers(0, 2**31 - 1),
    "code": st.integers(0, 2**31 - 1),
    "user_data": st.sampled_from(["", "order 17 ü", "x" * 40]) | st.text(max_size=8).filter(
        lambda t: "\x00" not in t),
    "tenant": st.integers(0, 2**63 - 1),
    "origin": st.integers(0, 2**63 - 1),
})


def _read_back(records: list[asyncpg.Record]) -> bytes:
    """The transfers section as verify builds it from the rows it reads."""
    c = list(zip(*records, strict=True))
    return encode_section(transfer_rows(
        id=_ints(c[1]), debit_account_id=_ints(c[2]), credit_account_id=_ints(c[3]),
        amount=_ints(c[4]), currency=_letters(c[5]), flags=_ints(c[6]),
        pending_id=_ints(c[7]), timeout_s=_ints(c[8]), code=_ints(c[9]), user_data=c[10],
        timestamp=_ints(c[11]), tenant=_ints(c[12]), origin=_ints(c[13]),
        partition=_ints(c[14]), local_legs=_ints(c[15])))


async def test_the_writers_encoding_equals_the_encoding_of_the_rows_read_back(
    db_url: str,
) -> None:
    """For random batches, half as objects and half as columns, the section the store
    hashed equals the section rebuilt from the rows read back, and the stored link's
    digest is the link digest of that section."""
    store = await LedgerStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=30)
    await store.take_epoch(0)
    await store.close()
    state = {"next_id": 1, "now": time.time_ns()}

    @settings(max_examples=25, deadline=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(transfer_fields, min_size=1, max_size=12), st.integers(0, 12),
           st.booleans(), st.booleans())
    def example(fields: list[dict[str, object]], split: int, as_columns_with_user_data: bool,
                one_statement: bool) -> None:
        transfers = []
        for f in fields:
            state["next_id"] += 1
            state["now"] += 1
            transfers.append(Transfer(id=state["next_id"], timestamp=state["now"], **f))  # type: ignore[arg-type]
        objects, rest = transfers[:split], transfers[split:]
        if not as_columns_with_user_data:
            rest = [t for t in rest if not t.user_data]
        columns = TransferColumns.from_transfers(rest) if rest else None
        written = [*objects, *rest]
        assume(written)  # user_data filtered out of every row: nothing to commit
        expected = _ChainRows.of(
            objects, [column_rows(columns, OWN)] if columns is not None else [], [], [], [],
            OWN).transfers

        async def run() -> None:
            # Each example runs on its own event loop (hypothesis calls it synchronously):
            # a store of its own, which reads the chain's head from the database.
            store = await LedgerStore.connect(db_url, pool_size_max=2, connect_timeout_s=10,
                                              command_timeout_s=30)
            store.one_statement_rows_max = 10_000 if one_statement else 0
            try:
                await store.commit(
                    [CommitBatch(transfers=objects, transfer_columns=columns)],
                    fences={0: 1}, shard=0, partition_map=PARTITIONS)
            finally:
                await store.close()
            conn = await asyncpg.connect(db_url, timeout=10)
            try:
                ids = [t.id for t in written]
                records = await conn.fetch(
                    _TRANSFERS_SQL.replace("ORDER BY", "WHERE t.id = ANY($3::bigint[]) ORDER BY"),
                    [], [], ids)
                link = await conn.fetchrow(
                    "SELECT * FROM ledger_chain WHERE shard = 0 ORDER BY seq DESC LIMIT 1")
            finally:
                await conn.close()
            assert len(records) == len(written), (len(records), len(written))
            assert encode_section(expected) == _read_back(records), (
                [t.id for t in written], [r["id"] for r in records],
                expected.fixed["id"].tolist(), len(encode_section(expected)),
                len(_read_back(records)))
            assert link["transfers"] == len(written)
            section = section_digest(SECTIONS[0], expected)
            assert bytes(link["sections"])[:32] == section
            assert bytes(link["digest"]) == link_digest(
                shard=0, seq=link["seq"], epoch=link["epoch"],
                timestamp_max=link["timestamp_max"], counts=(len(written), 0, 0, 0),
                prev_digest=bytes(link["prev_digest"]), sections=[
                    bytes(link["sections"])[i:i + 32] for i in range(0, 128, 32)])

        loop.run_until_complete(run())

    loop = asyncio.new_event_loop()
    try:
        await asyncio.to_thread(example)
    finally:
        loop.close()
