"""processor.batch.transfer_columns, the small-batch packing, against its reference model:
``TransferBatch.from_transfers(...).column_bytes()`` (numpy) with the user_data a client
sends. The same bytes for every valid list, ``BatchInvalid`` for every invalid one."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.batch import (
    SMALL_BATCH_MAX,
    BatchInvalid,
    Columns,
    TransferBatch,
    transfer_columns,
)
from processor.types import CODE_MAX, ID_MAX, TIMEOUT_S_MAX, USER_DATA_CHARS_MAX, Transfer


def reference(transfers: list[Transfer]) -> tuple[Columns, list[str]]:
    batch = TransferBatch.from_transfers(transfers)
    return batch.column_bytes(), batch.user_data or []


def outcome(function: Any, transfers: list[Transfer]) -> Any:
    try:
        return function(transfers)
    except BatchInvalid:
        return "invalid"


def edge_int(high: int) -> st.SearchStrategy[int]:
    """Mostly in range, with the bounds and one past each."""
    return st.one_of(st.integers(0, high), st.sampled_from([0, high, -1, high + 1]))


currencies = st.one_of(st.sampled_from(["USD", "EUR", "JPY"]),
                       st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabc1é", min_size=0,
                               max_size=4))
texts = st.one_of(st.just(""), st.text(max_size=USER_DATA_CHARS_MAX + 2),
                  st.sampled_from(["a\x00b", "x" * USER_DATA_CHARS_MAX]))


@st.composite
def transfers(draw: st.DrawFn, valid: bool) -> Transfer:
    if valid:
        def num(high: int) -> int:
            return draw(st.integers(0, high))
        currency = draw(st.sampled_from(["USD", "EUR", "GBP"]))
        text = draw(st.one_of(st.just(""), st.text(
            alphabet=st.characters(blacklist_characters="\x00"),
            max_size=USER_DATA_CHARS_MAX)))
        timestamp = 0
    else:
        def num(high: int) -> int:
            return draw(edge_int(high))
        currency = draw(currencies)
        text = draw(texts)
        timestamp = draw(st.sampled_from([0, 0, 0, 5]))
    return Transfer(id=num(ID_MAX), debit_account_id=num(ID_MAX),
                    credit_account_id=num(ID_MAX), amount=num(ID_MAX), currency=currency,
                    flags=num(0xFFFF), pending_id=num(ID_MAX), timeout_s=num(TIMEOUT_S_MAX),
                    code=num(CODE_MAX), user_data=text, timestamp=timestamp)


@settings(max_examples=150, deadline=None)
@given(st.lists(transfers(valid=True), max_size=SMALL_BATCH_MAX + 3))
def test_valid_lists_pack_to_the_reference_bytes(items: list[Transfer]) -> None:
    assert transfer_columns(items) == reference(items)


@settings(max_examples=250, deadline=None)
@given(st.lists(transfers(valid=False), min_size=1, max_size=5))
def test_lists_with_bad_values_are_refused_as_the_reference_refuses_them(
        items: list[Transfer]) -> None:
    assert outcome(transfer_columns, items) == outcome(reference, items)


@pytest.mark.parametrize("change", [
    {"amount": -1}, {"id": ID_MAX + 1}, {"flags": 0x10000}, {"timeout_s": TIMEOUT_S_MAX + 1},
    {"code": CODE_MAX + 1}, {"currency": "usd"}, {"currency": "US"}, {"timestamp": 1},
    {"user_data": "a\x00"}, {"user_data": "x" * (USER_DATA_CHARS_MAX + 1)},
])
def test_each_bad_value_is_refused(change: dict[str, Any]) -> None:
    fields: dict[str, Any] = {"id": 1, "debit_account_id": 2, "credit_account_id": 3,
                              "amount": 5, "currency": "USD", **change}
    with pytest.raises(BatchInvalid):
        reference([Transfer(**fields)])
    with pytest.raises(BatchInvalid):
        transfer_columns([Transfer(**fields)])
