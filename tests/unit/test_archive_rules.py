"""The pure part of archive and restore (processor/archive.py): months as boundaries, the
retention month, the manifest's bytes, and what a read may ask with an archive in force."""

from __future__ import annotations

import datetime

import msgspec
import pytest

from processor.archive import (
    ArchiveBound,
    ArchiveFile,
    CurrencySums,
    Manifest,
    ShardCut,
    decode_manifest,
    encode_manifest,
    month_of_ns,
    month_start_ns,
    retention_before,
)
from processor.history import HistoryError

FEB = month_start_ns("2026-02")


@pytest.mark.parametrize(("text", "seconds"), [
    ("2026-02", 1_769_904_000), ("1970-02", 31 * 86_400), ("2026-12", 1_796_083_200),
])
def test_month_start(text: str, seconds: int) -> None:
    """A month's first instant, UTC, in nanoseconds; and back to its month."""
    assert month_start_ns(text) == seconds * 10**9
    assert month_of_ns(month_start_ns(text)) == text
    assert month_of_ns(month_start_ns(text) - 1) != text


@pytest.mark.parametrize("text", ["2026-2", "2026-13", "2026-00", "26-02", "1970-01", "",
                                  "2026-02-01", "२०२६-02"])
def test_month_refused(text: str) -> None:
    """Anything but YYYY-MM after the epoch's month is refused."""
    with pytest.raises(ValueError):
        month_start_ns(text)


@pytest.mark.parametrize(("now", "hot", "before"), [
    ("2026-12-06T18:00:00+00:00", 3, "2026-09"),
    ("2026-01-31T23:59:59+00:00", 1, "2025-12"),
    ("2026-03-01T00:30:00+01:00", 2, "2025-12"),  # still February in UTC
    ("2026-12-06T18:00:00+00:00", 12, "2025-12"),
])
def test_retention_before(now: str, hot: int, before: str) -> None:
    """--retain-hot-months keeps the current month and N whole months before it."""
    assert retention_before(datetime.datetime.fromisoformat(now), hot) == before


def test_manifest_round_trip_and_bytes() -> None:
    """The manifest's bytes are deterministic (keys sorted) and decode to the same value;
    another format version is refused."""
    manifest = Manifest(
        format=1, name="before-2026-02-20261206T180000Z", before="2026-02", boundary_ns=FEB,
        boundary="2026-02-01T00:00:00.000000000Z", created_at="2026-12-06T18:00:00+00:00",
        shards=[ShardCut(shard=0, seq=7, timestamp_max=FEB - 5, digest="ab" * 32)],
        files=[ArchiveFile(table="transfers", month="2026-01", file="t.parquet", rows=3,
                           sha256="00" * 32, rows_digest="11" * 32)],
        transfers=3, resolutions=0, accounts=2,
        currencies={"EUR": CurrencySums(transfers=3, amount=2**63 - 1, posted=5)})
    data = encode_manifest(manifest)
    assert data == encode_manifest(decode_manifest(data)) and data.endswith(b"\n")
    assert decode_manifest(data) == manifest
    assert data.index(b'"accounts"') < data.index(b'"before"')  # sorted
    with pytest.raises(ValueError, match="format 2"):
        decode_manifest(data.replace(b'"format": 1', b'"format": 2'))
    with pytest.raises(msgspec.ValidationError):
        decode_manifest(data.replace(b'"rows": 3', b'"rows": "3"'))


BOUND = ArchiveBound(name="before-2026-02-x", boundary_ns=FEB, cuts=[FEB - 10, -1])


@pytest.mark.parametrize(("from_ns", "to_ns", "start"), [
    (0, 2**63 - 1, FEB),         # no from: from the boundary
    (FEB, 2**63 - 1, FEB),
    (FEB + 5, FEB + 9, FEB + 5),
    (FEB - 1, 2**63 - 1, None),  # reaches before it
    (0, FEB, None),              # a range wholly archived
    (1, FEB + 9, None),
])
def test_range_start(from_ns: int, to_ns: int, start: int | None) -> None:
    """Where a range read starts with the archive in force, or ``archived``."""
    if start is None:
        with pytest.raises(HistoryError, match="before-2026-02-x") as refused:
            BOUND.range_start(from_ns, to_ns)
        assert refused.value.code == "archived"
    else:
        assert BOUND.range_start(from_ns, to_ns) == start


def test_instants_and_cursors() -> None:
    """An instant or a cursor position before the boundary is refused; at it, answered."""
    BOUND.check_instant(FEB)
    BOUND.check_position(FEB)
    for check in (BOUND.check_instant, BOUND.check_position):
        with pytest.raises(HistoryError, match="archived as before-2026-02-x"):
            check(FEB - 1)
