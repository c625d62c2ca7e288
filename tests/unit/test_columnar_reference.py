"""The columnar book (processor.ledger.columnar and .kernel) against the reference model.

``processor.ledger.rules.Book`` with its per-account objects is the readable statement of the
rules; ``ArrayBook`` keeps balances in arrays and runs batches of plain transfers through
numpy and a compiled kernel. Driven through the same random workloads on one to three
shards, under both schedules, with recoveries, expiries and replays, the two must answer
every transfer with the same code and leave the same rows: accounts with their balances,
transfers, burned ids and resolutions (timestamps aside, whose order within a batch may
differ between the two).
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.codes import TransferResult
from processor.ledger import Book, Known, PartitionMap, kernel
from processor.ledger.columnar import ArrayBook, decode_legs, encode_legs
from processor.types import AMOUNT_MAX, Account, AccountFlags, Transfer, TransferFlags
from tests.unit.ledger_sim import Cluster, ColumnarBook, book_mismatches
from tests.unit.test_ledger_properties import (
    ACCOUNT_CHOICES,
    AMOUNTS,
    CL,
    FUNDING,
    SETTINGS,
    TRANSFER_TENANTS,
    History,
    Workload,
    _draw_batch,
    _replayable,
    full_workload,
    tenant_of,
)

R = TransferResult
# Amounts whose sums meet the flagged accounts' funding exactly, so limits are decided at
# their boundary, besides the reference test's own mix.
PLAIN_AMOUNTS = st.one_of(AMOUNTS, st.sampled_from([50, 100, 150, FUNDING]))


def _draw_plain(data: st.DataObject, w: Workload, h: History) -> list[list[Transfer]]:
    """Requests of transfers without flags: what the columnar path takes when every id is
    new. Some break a static rule, some repeat an id (those batches fall back to Book)."""
    requests = []
    for _ in range(data.draw(st.integers(1, 3))):
        request = []
        for _ in range(data.draw(st.integers(1, 12))):
            dr = data.draw(st.sampled_from(ACCOUNT_CHOICES))
            cr = data.draw(st.sampled_from([a for a in ACCOUNT_CHOICES if a != dr]))
            fields = {
                "id": h.fresh_id(), "debit_account_id": dr, "credit_account_id": cr,
                "amount": data.draw(PLAIN_AMOUNTS), "currency": w.currency_of(dr),
                "tenant": data.draw(st.sampled_from(TRANSFER_TENANTS)),
            }
            broken = data.draw(st.sampled_from(
                [None] * 12 + ["id", "same", "amount", "currency", "pending_id", "timeout",
                               "timestamp", "unknown_currency", "again"]))
            if broken == "id":
                fields["id"] = 0
            elif broken == "same":
                fields["credit_account_id"] = dr
            elif broken == "amount":
                fields["amount"] = 0
            elif broken == "currency":
                fields["currency"] = "EUR" if fields["currency"] == "USD" else "USD"
            elif broken == "pending_id":
                fields["pending_id"] = 1
            elif broken == "timeout":
                fields["timeout_s"] = 1
            elif broken == "timestamp":
                fields["timestamp"] = 1
            elif broken == "unknown_currency":
                fields["currency"] = "XQQ"
            elif broken == "again" and h.transfers:
                fields["id"] = data.draw(st.sampled_from(h.transfers)).id
            request.append(Transfer(**fields))  # type: ignore[arg-type]
        requests.append(request)
    return requests


def _rows(cluster: Cluster) -> tuple[object, ...]:
    """Everything stored, timestamps of transfers and resolutions aside."""
    store = cluster.store
    no_time = msgspec.structs.replace
    return (
        store.accounts,
        {i: no_time(t, timestamp=0) for i, t in store.transfers.items()},
        store.failed,
        {p: (r.kind, r.transfer_id) for p, r in store.resolutions.items()},
    )


class ShortRunBook(ColumnarBook):
    """Plans every plain batch, and every run of plain transfers in a mixed batch, over
    columns, however short."""

    plain_run_min = 1


def _run_both(data: st.DataObject, shards: int, interleaved: bool,
              recent_ids_max: int) -> None:
    w = full_workload(data)
    reference = Cluster(shards, interleaved=interleaved, book_class=Book,
                        recent_ids_max=recent_ids_max)
    book_class = data.draw(st.sampled_from([ArrayBook, ColumnarBook, ShortRunBook]), label="book")
    columnar = Cluster(shards, interleaved=interleaved, book_class=book_class,
                       recent_ids_max=recent_ids_max)
    both = (reference, columnar)
    h = History()
    accounts = [Account(id=i, currency=c, flags=f, tenant=tenant_of(i))
                for i, f, c in zip((1, 2, 3, 4, 5, 6), w.flags, w.currencies, strict=True)]
    for cluster in both:
        assert cluster.create_accounts(accounts) == [0] * len(accounts)
    funding = [
        Transfer(id=h.fresh_id(), debit_account_id=a.id if a.flags & CL else 1,
                 credit_account_id=1 if a.flags & CL else a.id, amount=FUNDING,
                 currency=a.currency)
        for a in accounts if a.flags and a.currency == "USD"
    ]
    for cluster in both:
        assert cluster.create_transfers(funding) == [R.ok] * len(funding)
    for _ in range(data.draw(st.integers(1, 12), label="steps")):
        step = data.draw(st.sampled_from(
            ["plain", "plain", "plain", "mixed", "advance", "pulse", "recover", "replay"]))
        if step in ("plain", "mixed"):
            if step == "plain":
                requests = _draw_plain(data, w, h)
                if interleaved:  # one id per batch at most (ledger_sim's docstring)
                    seen: set[int] = set()
                    requests = [[t for t in r if not (t.id in seen or seen.add(t.id))]
                                for r in requests]
                    requests = [r for r in requests if r]
            else:
                requests = _draw_batch(data, w, h, reference)
            expected = reference.submit(requests)
            assert columnar.submit(requests) == expected, requests
            for request, codes in zip(requests, expected, strict=True):
                h.transfers.extend(request)
                h.requests.append((request, codes))
        elif step == "advance":
            seconds = data.draw(st.integers(1, 4))
            for cluster in both:
                cluster.advance(seconds=seconds)
        elif step == "pulse":
            for cluster in both:
                cluster.pulse()
        elif step == "recover":
            shard = data.draw(st.integers(0, shards - 1))
            for cluster in both:
                cluster.recover(shard)
        else:
            replayable = [r for r, c in h.requests if _replayable(c, r)]
            if replayable:
                request = data.draw(st.sampled_from(replayable))
                assert columnar.create_transfers(request) == reference.create_transfers(request)
        assert _rows(columnar) == _rows(reference)
        assert book_mismatches(columnar) == []


@pytest.mark.parametrize("shards", [1, 2, 3])
@SETTINGS
@given(data=st.data(), interleaved=st.booleans(), recent_ids_max=st.sampled_from([16, 1_024]))
def test_columnar_book_answers_as_the_reference(
    shards: int, data: st.DataObject, interleaved: bool, recent_ids_max: int
) -> None:
    """On any workload the columnar book gives the reference's codes and rows, whether the
    ids it checks are in its memory (kept as rows of columns) or read back from the store."""
    _run_both(data, shards, interleaved and shards > 1, recent_ids_max)


def _book(shards: int = 1, shard: int = 0) -> ArrayBook:
    book = ColumnarBook(shard, PartitionMap.uniform(shards), recent_ids_max=64)
    return book


def test_a_batch_without_flags_takes_the_columnar_path() -> None:
    """A batch of new flagless transfers is planned over columns; one with a flag, or with
    an id seen before, is planned by the general rules."""
    book = _book()
    _, batch = book.create_accounts([[Account(id=1, currency="USD"),
                                      Account(id=2, currency="USD")]], 1)
    book.accounts_committed(batch)
    plain = [Transfer(id=10, debit_account_id=1, credit_account_id=2, amount=5,
                      currency="USD")]
    plan = book.plan_transfers([plain], 2, Known())
    assert plan.plain is not None
    book.committed(book.finalize(plan, {}, 2))
    assert book.plan_transfers([plain], 3, Known()).plain is None  # id 10 is known now
    pending = [Transfer(id=11, debit_account_id=1, credit_account_id=2, amount=5,
                        currency="USD", flags=int(TransferFlags.PENDING))]
    assert book.plan_transfers([pending], 4, Known()).plain is None


def test_a_short_plain_batch_is_planned_by_the_rules() -> None:
    """The shard's book plans a plain batch shorter than ``plain_batch_min`` by ``Book``'s
    rules and one of that length over columns, with the same answers."""
    book = ArrayBook(0, PartitionMap.uniform(1), recent_ids_max=64)
    _, batch = book.create_accounts([[Account(id=1, currency="USD"),
                                      Account(id=2, currency="USD")]], 1)
    book.accounts_committed(batch)
    size = book.plain_batch_min

    def transfers(first: int, n: int) -> list[Transfer]:
        return [Transfer(id=i, debit_account_id=1, credit_account_id=2, amount=5,
                         currency="USD") for i in range(first, first + n)]

    short = book.plan_transfers([transfers(10, size - 1)], 2, Known())
    assert short.plain is None
    assert book.finalize(short, {}, 2).codes == [R.ok] * (size - 1)
    full = book.plan_transfers([transfers(100, size)], 3, Known())
    assert full.plain is not None
    assert book.finalize(full, {}, 3).codes == [R.ok] * size


def test_overflow_is_decided_without_wrapping() -> None:
    """Sums near AMOUNT_MAX overflow into a result code, never into a wrapped int64."""
    book = _book()
    _, batch = book.create_accounts([[Account(id=1, currency="USD"),
                                      Account(id=2, currency="USD")]], 1)
    book.accounts_committed(batch)
    transfers = [
        Transfer(id=10, debit_account_id=1, credit_account_id=2, amount=AMOUNT_MAX,
                 currency="USD"),
        Transfer(id=11, debit_account_id=1, credit_account_id=2, amount=AMOUNT_MAX,
                 currency="USD"),
    ]
    plan = book.plan_transfers([transfers], 2, Known())
    assert plan.plain is not None
    assert book.finalize(plan, {}, 2).codes == [R.ok, R.overflows_debits_posted]


def test_limited_debits_follow_order_within_a_batch() -> None:
    """A limited account may spend, in order, what earlier items of the batch credited."""
    book = _book()
    flags = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    _, batch = book.create_accounts([[Account(id=1, currency="USD"),
                                      Account(id=2, currency="USD", flags=flags)]], 1)
    book.accounts_committed(batch)
    t = [
        Transfer(id=10, debit_account_id=2, credit_account_id=1, amount=5, currency="USD"),
        Transfer(id=11, debit_account_id=1, credit_account_id=2, amount=7, currency="USD"),
        Transfer(id=12, debit_account_id=2, credit_account_id=1, amount=7, currency="USD"),
        Transfer(id=13, debit_account_id=2, credit_account_id=1, amount=1, currency="USD"),
    ]
    batch = book.finalize(book.plan_transfers([t], 2, Known()), {}, 2)
    assert batch.codes == [R.exceeds_credits, R.ok, R.ok, R.exceeds_credits]


def test_legs_survive_their_wire_form() -> None:
    """Plain legs sent to another shard decode to the same columns."""
    from processor.ledger.columnar import PlainLegs

    cols = [np.array(v, dtype=np.int64)
            for v in ([1, 2], [AMOUNT_MAX, 1], [5, 6], [9, 10], [0, 2**63 - 1])]
    back = decode_legs(encode_legs(PlainLegs(*cols)))
    for a, b in zip(cols, (back.account_ids, back.amounts, back.currencies, back.event_ids,
                           back.tenants), strict=True):
        assert a.tolist() == b.tolist()


def test_a_mixed_batch_plans_its_plain_runs_over_columns() -> None:
    """In a mixed batch, a long enough run of plain transfers is planned over columns and
    the general items around it by the rules, in order, each part after the one before."""
    book = ShortRunBook(0, PartitionMap.uniform(1), recent_ids_max=64)
    _, batch = book.create_accounts([[Account(id=1, currency="USD"),
                                      Account(id=2, currency="USD")]], 1)
    book.accounts_committed(batch)

    def t(id_: int, **kw: object) -> Transfer:
        return Transfer(id=id_, debit_account_id=1, credit_account_id=2, amount=5,
                        currency="USD", **kw)  # type: ignore[arg-type]

    pending = int(TransferFlags.PENDING)
    linked = int(TransferFlags.LINKED)
    requests = [[t(10), t(11), t(12, flags=pending), t(13, flags=linked), t(14)], [t(15)]]
    kinds = []
    remaining = requests
    while remaining:
        plan = book.plan_transfers(remaining, 2, Known())
        kinds.append(("columns" if plan.plain is not None else "rules",
                      sum(plan.request_sizes)))
        book.committed(book.finalize(plan, {}, 2))
        remaining = plan.rest
    # 14 ends the chain 13 opens, so it goes with the rules, not with the run of 15.
    assert kinds == [("columns", 2), ("rules", 3), ("columns", 1)]


def test_kernels_are_compiled() -> None:
    """The kernels run compiled (a pure-Python fallback would be ~100x slower unseen)."""
    kernel.warm_up()
    assert kernel.plan_plain.signatures
    assert kernel.reserve_plain.signatures


@SETTINGS
@given(ids=st.lists(st.integers(0, 2**63 - 1), min_size=1, max_size=64),
       shards=st.integers(1, 7))
def test_partitions_over_arrays_equal_the_scalar_hash(ids: list[int], shards: int) -> None:
    """Routing over arrays (front, columnar book, store) sends every id where the scalar
    hash does."""
    from processor.ledger import partition_of, partitions_of
    from processor.ledger.partition import partitions_of_array

    array = np.array([*ids, 0, 2**63 - 1], dtype=np.int64)
    expected = [partition_of(i) for i in array.tolist()]
    assert partitions_of(array).tolist() == expected
    # Both ways of computing it, small arrays (hashed one by one) and large ones, unsigned
    # ids above 2**63 included.
    assert partitions_of_array(array).tolist() == expected
    for size in (0, 1, 2, len(array)):
        unsigned = array[:size].astype(np.uint64) | np.uint64(2**63)
        scalar = [partition_of(i) for i in unsigned.tolist()]
        assert partitions_of(unsigned).tolist() == scalar
        assert partitions_of_array(unsigned).tolist() == scalar
        assert partitions_of(array[:size]).dtype == np.int64
    m = PartitionMap.uniform(shards)
    assert m.shards_of(array).tolist() == [m.shard_of(i) for i in array.tolist()]


@SETTINGS
@given(rows=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=4, max_size=4),
                     max_size=50))
def test_delta_sums_are_exact_past_int64(rows: list[list[int]]) -> None:
    """Double entry is checked on exact sums, even where an int64 sum would wrap."""
    from processor.ledger.rules import _exact_column_sums

    values = np.array(rows, dtype=np.int64).reshape(-1, 4)
    assert _exact_column_sums(values) == [sum(r[k] for r in rows) for k in range(4)]
