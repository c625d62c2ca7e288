"""Archive and restore of closed months: the pure part (docs/design.md §16, "Archive and
restore").

What ``txproc archive`` and ``txproc restore`` (actors/ledger/archive.py) and the reads
share: months as nanosecond boundaries, the manifest written beside the files and its
digest, the sums the manifest records, the retention schedule's settings, and the rule a read
applies to an archive in force (``ArchiveBound``). No I/O here, and nothing heavy: the
configuration tree imports it, and the small commands must start fast (the digest of a
file's rows, over numpy and the chain's encoding, is actors/ledger/archive.py's).
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import re
from collections.abc import Sequence

import msgspec

from processor.history import HistoryError, format_rfc3339_ns
from processor.types import require

__all__ = [
    "ARCHIVE_FORMAT",
    "ArchiveBound",
    "ArchiveFile",
    "CurrencySums",
    "Manifest",
    "RetentionConfig",
    "ShardCut",
    "archive_name",
    "decode_manifest",
    "encode_manifest",
    "month_of_ns",
    "month_start_ns",
    "retention_before",
    "sha256_hex",
]

ARCHIVE_FORMAT = 1
NS_PER_S = 1_000_000_000
_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")


def month_start_ns(text: str) -> int:
    """The first nanosecond (UTC, since the epoch) of the month ``YYYY-MM``; raises
    ``ValueError`` for anything else, or a month before 1970-02."""
    match = _MONTH.fullmatch(text)
    if match is None:
        raise ValueError(f"a month is YYYY-MM, such as 2026-03; not {text[:20]!r}")
    year, month = int(match[1]), int(match[2])
    seconds = calendar.timegm((year, month, 1, 0, 0, 0))
    if seconds <= 0:
        raise ValueError("the boundary must be after the epoch (1970-02 or later)")
    return seconds * NS_PER_S


def month_of_ns(nanos: int) -> str:
    """The month ``YYYY-MM`` (UTC) of an instant in nanoseconds since the epoch."""
    moment = datetime.datetime.fromtimestamp(nanos // NS_PER_S, tz=datetime.UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


def retention_before(now: datetime.datetime, hot_months: int) -> str:
    """The ``--before`` month that keeps the current month and the ``hot_months`` whole
    months before it in the database (``YYYY-MM``, UTC): on 2026-12-06 with 3, 2026-09."""
    require(1 <= hot_months <= 1200, "hot months from 1 to 1200")
    moment = now.astimezone(datetime.UTC)
    index = moment.year * 12 + (moment.month - 1) - hot_months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


class RetentionConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``serve --retain-hot-months``: keep the current month and ``hot_months`` whole months
    before it in the database, archiving what is older into ``directory`` every
    ``interval_s`` (0 months: off). Checked on construction."""

    hot_months: int = 0
    directory: str = ""
    interval_s: float = 3_600.0

    def __post_init__(self) -> None:
        if not 0 <= self.hot_months <= 1200:
            raise ValueError(f"retain_hot_months is 0 (off) to 1200, not {self.hot_months}")
        if self.hot_months and not self.directory:
            raise ValueError("retain_hot_months needs an archive directory")
        if not 1.0 <= self.interval_s <= 31 * 86_400:
            raise ValueError(f"archive interval_s is 1 to 2678400, not {self.interval_s}")


def archive_name(before: str, now: datetime.datetime) -> str:
    """A name for an archive of everything before ``before``, unique per second: the same
    months may be archived again after a restore."""
    return f"before-{before}-{now.astimezone(datetime.UTC):%Y%m%dT%H%M%SZ}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- the manifest ----------------------------------------------------------------------------


class ShardCut(msgspec.Struct, frozen=True, kw_only=True):
    """A shard's last chain link wholly below the boundary: the archive holds exactly the
    transfers and resolutions of its links up to this one (``timestamp_max`` is the cut)."""

    shard: int
    seq: int
    timestamp_max: int
    digest: str  # hex


class CurrencySums(msgspec.Struct, frozen=True, kw_only=True):
    """One currency's archived transfers: how many, their amounts' sum, and the part
    counted as posted (plain transfers and posts), which the balance checkpoint adds to
    each side."""

    transfers: int = 0
    amount: int = 0
    posted: int = 0


class ArchiveFile(msgspec.Struct, frozen=True, kw_only=True):
    """One Parquet file: one table's rows of one month, in (timestamp, key) order."""

    table: str  # "transfers" or "pending_resolutions"
    month: str
    file: str
    rows: int
    sha256: str
    # The digest of the rows in the chain's canonical encoding (processor/ledger/chain.py).
    rows_digest: str


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    format: int
    name: str
    before: str
    boundary_ns: int
    boundary: str  # RFC 3339
    created_at: str
    shards: list[ShardCut]
    files: list[ArchiveFile]
    transfers: int
    resolutions: int
    accounts: int  # rows of the balance checkpoint
    currencies: dict[str, CurrencySums]
    months: list[str] = []  # the months the files hold, in order
    # The key of the database whose rows these are (main, db1, ...: docs/design.md §12);
    # restore puts them back there. Manifests written before several databases were
    # archivable name none, and were main's.
    database: str = "main"


_DECODER = msgspec.json.Decoder(Manifest)


def encode_manifest(manifest: Manifest) -> bytes:
    """The manifest's bytes as written: keys sorted, indented, one trailing newline. Its
    sha256 is the digest the archive record keeps."""
    raw = msgspec.json.encode(manifest, order="sorted")
    return msgspec.json.format(raw, indent=2) + b"\n"


def decode_manifest(data: bytes) -> Manifest:
    """Raises ``msgspec.ValidationError`` / ``DecodeError`` for a manifest of another form."""
    manifest = _DECODER.decode(data)
    if manifest.format != ARCHIVE_FORMAT:
        raise ValueError(f"archive format {manifest.format}; this version reads "
                         f"{ARCHIVE_FORMAT}")
    return manifest


# -- what a read does with the archive in force ----------------------------------------------


class ArchiveBound(msgspec.Struct, frozen=True, kw_only=True):
    """The newest archive in force: every instant before ``boundary_ns`` is archived, and
    per shard (index) the stream's rows at or below ``cuts[shard]`` are gone (-1: none)."""

    name: str
    boundary_ns: int
    cuts: Sequence[int] = ()

    def refuse(self, what: str) -> HistoryError:
        return HistoryError("archived", (
            f"{what} reaches before {format_rfc3339_ns(self.boundary_ns)}, archived as "
            f"{self.name}; read from that instant on, or restore the archive "
            "(docs/operations.md, \"Archive and restore\")"))

    def range_start(self, from_ns: int, to_ns: int) -> int:
        """The start of a time range ``[from_ns, to_ns)`` to read: no ``from`` (0) starts
        at the boundary; a range that reaches before it is refused."""
        if from_ns == 0 and to_ns > self.boundary_ns:
            return self.boundary_ns
        if from_ns < self.boundary_ns:
            raise self.refuse("the range")
        return from_ns

    def check_position(self, timestamp_ns: int) -> None:
        """A cursor's position before the boundary is refused."""
        if timestamp_ns < self.boundary_ns:
            raise self.refuse("the cursor")

    def check_instant(self, at_ns: int) -> None:
        """Balances at an instant before the boundary are refused."""
        require(at_ns >= 0, "an instant is not negative")
        if at_ns < self.boundary_ns:
            raise self.refuse("the instant")
