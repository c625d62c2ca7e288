"""TransferBatch: columns that survive the wire, and bad columns refused before anything runs.

A batch built from arrays or from Transfer objects travels as fixed-width little-endian
bytes and comes back as the same transfers; every value a column cannot hold, or a batch
whose columns disagree, is refused with BatchInvalid naming the column, never misread.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.batch import BatchInvalid, TransferBatch, decode_batch, encode_batch
from processor.ledger import currency_number
from processor.types import AMOUNT_MAX, Transfer

TRANSFERS = st.lists(st.builds(
    Transfer,
    id=st.integers(0, 2**63 - 1), debit_account_id=st.integers(0, 2**63 - 1),
    credit_account_id=st.integers(0, 2**63 - 1), amount=st.integers(0, AMOUNT_MAX),
    currency=st.sampled_from(["EUR", "USD", "JPY", "XQQ"]), flags=st.integers(0, 0xFFFF),
    pending_id=st.integers(0, 2**63 - 1), timeout_s=st.integers(0, 2**31 - 1),
    code=st.integers(0, 2**31 - 1), user_data=st.sampled_from(["", "", "order 7", "ü" * 128]),
), max_size=40)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(transfers=TRANSFERS)
def test_transfers_survive_columns_and_bytes(transfers: list[Transfer]) -> None:
    """Objects -> columns -> bytes -> columns -> objects is the identity."""
    batch = TransferBatch.from_transfers(transfers)
    assert len(batch) == len(transfers)
    assert decode_batch(encode_batch(batch)).transfers() == transfers
    assert TransferBatch.from_bytes(*batch.column_bytes(), batch.user_data or []).transfers() \
        == transfers


def test_columns_number_known_currencies_and_zero_unknown_ones() -> None:
    """The ledger sees a known currency by its number and an unknown one as 0."""
    batch = TransferBatch.from_arrays(id=[1, 2], debit_account_id=[1, 1],
                                      credit_account_id=[2, 2], amount=[5, 5],
                                      currency=["EUR", "XQQ"])
    assert batch.columns().currency.tolist() == [currency_number("EUR"), 0]


def _arrays(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": [1, 2], "debit_account_id": [1, 1],
                            "credit_account_id": [2, 2], "amount": [5, 6], "currency": "EUR"}
    return {**base, **overrides}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"id": [1, -2]}, "id"),
    ({"id": [1, 2**63]}, "id"),
    ({"amount": [1.5, 2]}, "amount"),
    ({"amount": [1]}, "has 1 values"),
    ({"debit_account_id": [[1], [2]]}, "debit_account_id"),
    ({"currency": ["EUR", "eur"]}, "currency at index 1"),
    ({"currency": ["EUR", "EU"]}, "currency at index 1"),
    ({"currency": ["EUR", "EURO"]}, "currency at index 1"),
    ({"currency": ["EUR", "€UR"]}, "currency at index 1"),
    ({"flags": [0, 0x10000]}, "flags"),
    ({"timeout_s": [0, 2**31]}, "timeout_s"),
    ({"code": [2**31, 0]}, "code at index 0"),
    ({"user_data": ["", "x" * 129]}, "user_data at index 1"),
    ({"user_data": [""]}, "user_data has 1 values"),
])
def test_bad_columns_are_refused(overrides: dict[str, Any], message: str) -> None:
    """Every value outside its column's range, and every length mismatch, is refused."""
    with pytest.raises(BatchInvalid, match=message):
        TransferBatch.from_arrays(**_arrays(**overrides))


def test_ragged_bytes_are_refused() -> None:
    """Column bytes that are not whole values are refused, not truncated."""
    cols = list(TransferBatch.from_arrays(**_arrays()).column_bytes())
    cols[3] = cols[3][:-1]
    with pytest.raises(BatchInvalid, match="amount"):
        TransferBatch.from_bytes(*cols, [])
    cols = list(TransferBatch.from_arrays(**_arrays()).column_bytes())
    cols[4] = cols[4] + b"EUR"
    with pytest.raises(BatchInvalid, match="currency"):
        TransferBatch.from_bytes(*cols, [])


def test_take_and_concat_keep_rows_and_user_data() -> None:
    """Splitting a batch by shard and joining the parts keeps every row with its data."""
    batch = TransferBatch.from_arrays(**_arrays(id=[1, 2, 3], debit_account_id=[1, 1, 1],
                                                credit_account_id=[2, 2, 2],
                                                amount=[5, 6, 7], user_data=["a", "", "c"]))
    parts = [batch.take(np.array([2, 0])), batch.take(np.array([1]))]
    joined = TransferBatch.concat(parts).transfers()
    assert [(t.id, t.user_data) for t in joined] == [(3, "c"), (1, "a"), (2, "")]


def test_with_user_data_replaces_each_text_and_keeps_the_rest() -> None:
    """The edge's pseudonyms replace user_data one for one (all empty: none kept); a list
    of another length is refused."""
    transfers = [Transfer(id=i, debit_account_id=1, credit_account_id=2, amount=i,
                          currency="EUR", user_data=u) for i, u in ((1, "a"), (2, ""))]
    batch = TransferBatch.from_transfers(transfers)
    swapped = batch.with_user_data(["~s9", ""]).transfers()
    assert [t.user_data for t in swapped] == ["~s9", ""]
    assert [t.amount for t in swapped] == [1, 2]
    assert batch.with_user_data(["", ""]).user_data is None
    with pytest.raises(BatchInvalid):
        batch.with_user_data(["~s9"])


_ANY_INT = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(n=st.integers(0, 10), data=st.data())
def test_small_batches_are_checked_as_large_ones_are(n: int, data: st.DataObject) -> None:
    """A batch of a few transfers is checked value by value, a larger one with numpy: the
    same batch gets the same error, at the same index, either way (or none)."""
    import processor.batch as batch_module

    def column(dtype: str, values: st.SearchStrategy[int]) -> np.ndarray:
        return np.array(data.draw(st.lists(values, min_size=n, max_size=n)), dtype=dtype)

    near = st.one_of(st.integers(0, 5), st.sampled_from([2**31 - 1, 2**31, 2**63 - 1]),
                     _ANY_INT)
    columns = {name: column("<i8", near) for name in
               ("id", "debit_account_id", "credit_account_id", "amount", "pending_id")}
    columns["flags"] = column("<u2", st.integers(0, 0xFFFF))
    columns["timeout_s"] = column("<u4", st.integers(0, 2**32 - 1))
    columns["code"] = column("<u4", st.integers(0, 2**32 - 1))
    codes = data.draw(st.lists(st.one_of(st.sampled_from([b"EUR", b"USD", b"XQQ"]),
                                         st.binary(min_size=0, max_size=3)),
                               min_size=n, max_size=n))
    columns["currency"] = np.array(codes, dtype="S3")

    def outcome(small_max: int) -> str:
        saved = batch_module._SCALAR_CHECK_MAX
        batch_module._SCALAR_CHECK_MAX = small_max
        try:
            TransferBatch(**columns)
        except BatchInvalid as exc:
            return str(exc)
        finally:
            batch_module._SCALAR_CHECK_MAX = saved
        return "ok"

    assert outcome(small_max=10) == outcome(small_max=-1)


def test_setting_the_tenant_keeps_the_columns_and_checks_nothing_again() -> None:
    batch = TransferBatch.from_arrays(**_arrays())
    made = batch.with_tenant(7, origin=99)
    assert made.tenant is not None and made.tenant.tolist() == [7, 7]
    assert made.origin is not None and made.origin.tolist() == [99, 99]
    assert made.id is batch.id and made.currency is batch.currency
    assert batch.tenant is None  # the original is unchanged
    assert decode_batch(encode_batch(made)).origin.tolist() == [99, 99]
