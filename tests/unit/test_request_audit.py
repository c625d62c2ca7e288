"""processor/request_audit.py: the record the edge hands to the payments actor survives
its header whole, and anything else in the header is refused."""

from __future__ import annotations

import datetime as dt

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.request_audit import (
    AUDIT_COLUMNS,
    RequestRecord,
    decode_header,
    encode_header,
    row_of,
)

_TEXT = st.text(max_size=40)
_RECORDS = st.builds(
    RequestRecord, id=st.integers(1, 2**63 - 1), tenant=st.integers(0, 2**63 - 1),
    tenant_name=_TEXT, subject=_TEXT, token_id=_TEXT, request_id=_TEXT, operation=_TEXT,
    items=st.integers(0, 10_000), at_s=st.floats(0, 4e9))


@given(_RECORDS)
def test_a_record_survives_its_header(record: RequestRecord) -> None:
    assert decode_header(encode_header(record)) == record
    row = row_of(record)
    assert len(row) == len(AUDIT_COLUMNS)
    assert row[-1] == dt.datetime.fromtimestamp(record.at_s, tz=dt.UTC)


@pytest.mark.parametrize("value", [
    "", "{}", "not json",
    '{"id": 0, "tenant": 1, "tenant_name": "", "subject": "", "token_id": "",'
    ' "request_id": "", "operation": "", "items": 1, "at_s": 0}',
    '{"id": 1, "tenant": 1, "tenant_name": "", "subject": "", "token_id": "",'
    ' "request_id": "", "operation": "", "items": -1, "at_s": 0}',
    '{"id": 1, "tenant": 1, "tenant_name": "", "subject": "", "token_id": "",'
    ' "request_id": "", "operation": "", "items": 1, "at_s": 0, "extra": 1}',
])
def test_anything_else_is_refused(value: str) -> None:
    with pytest.raises((msgspec.ValidationError, msgspec.DecodeError)):
        decode_header(value)
