"""The hash chain over a shard's committed batches: the canonical encoding of ledger rows
and the digests that link one batch to the next (docs/design.md §15).

Every batch a shard commits is one *link*: a digest over the batch's rows and over the
digest of the shard's previous link. The rows are encoded the same way by the writer
(from the arrays and objects it commits) and by ``txproc verify`` (from the rows it reads
back from PostgreSQL), by the functions below; ``tests/db/test_chain.py`` requires both to
give the same bytes.

The encoding, per table, is a *section*: the table's rows in the batch ordered by
timestamp (then by key), each a fixed-width big-endian record followed by the UTF-8 bytes
of its ``user_data`` (if it has one). A transfer's record is its tuple in PostgreSQL's
binary COPY layout (the buffer a columnar commit sends as it is, with the user_data's
length and without its bytes), so the fast path hashes the very bytes it copies. A
section is hashed on its own (BLAKE2b, its own personalization), and the link digest
covers the shard, sequence number, epoch, greatest timestamp and row counts, the
previous digest and the four section digests. Hashing is once per batch over contiguous
arrays: no Python work per row, except per row that carries user_data.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import msgspec
import numpy as np

__all__ = [
    "ACCOUNT_ROW",
    "DIGEST_BYTES",
    "EMPTY_SECTIONS",
    "FAILED_ROW",
    "GENESIS_DIGEST",
    "RESOLUTION_ROW",
    "SECTIONS",
    "TRANSFER_COLUMN_COUNT",
    "TRANSFER_ROW",
    "Link",
    "Rows",
    "SectionHasher",
    "account_rows",
    "currency_letters",
    "encode_section",
    "failed_rows",
    "link_digest",
    "resolution_rows",
    "section_digest",
    "transfer_rows",
]

DIGEST_BYTES = 32
# The previous digest of a shard's first link.
GENESIS_DIGEST = bytes(DIGEST_BYTES)
# The sections of a link, in the order the link digest covers them (each name is also the
# section's BLAKE2b personalization, at most 16 bytes).
SECTIONS = (b"txproc.transfers", b"txproc.accounts", b"txproc.failed", b"txproc.resolved")
_LINK_PERSON = b"txproc.link.v1"
_LINK_HEADER = struct.Struct(">iqqqiiii")


def _field(name: str, kind: str) -> list[tuple[str, str]]:
    return [(f"{name}_bytes", ">i4"), (name, kind)]


# One row of ``transfers`` as a tuple of PostgreSQL's binary COPY format (a field count,
# then each field as its length and big-endian value): id, debit_account_id,
# credit_account_id, amount, currency, flags, pending_id, timeout_s, code, user_data,
# timestamp, tenant, origin, partition, local_legs. ``user_data_bytes`` is the length of
# the row's user_data, whose bytes follow the record in a section (a COPY of rows whose
# user_data is empty sends the records as they are).
TRANSFER_ROW = np.dtype([
    ("fields", ">i2"),
    *_field("id", ">i8"), *_field("debit_account_id", ">i8"),
    *_field("credit_account_id", ">i8"), *_field("amount", ">i8"),
    *_field("currency", "S3"), *_field("flags", ">i4"), *_field("pending_id", ">i8"),
    *_field("timeout_s", ">i4"), *_field("code", ">i4"),
    ("user_data_bytes", ">i4"),
    *_field("timestamp", ">i8"), *_field("tenant", ">i8"), *_field("origin", ">i8"),
    *_field("partition", ">i4"), *_field("local_legs", ">i2"),
])
TRANSFER_COLUMN_COUNT = 15
_TRANSFER_INTS = ("id", "debit_account_id", "credit_account_id", "amount", "flags",
                  "pending_id", "timeout_s", "code", "timestamp", "tenant", "origin",
                  "partition", "local_legs")

# An account's creation (its balance sums are a checkpoint, not history).
ACCOUNT_ROW = np.dtype([
    ("id", ">i8"), ("currency", "S3"), ("flags", ">i4"), ("code", ">i4"),
    ("user_data_bytes", ">i4"), ("timestamp", ">i8"), ("tenant", ">i8"), ("origin", ">i8"),
    ("partition", ">i4"),
])
FAILED_ROW = np.dtype([("id", ">i8"), ("result", ">i2"), ("timestamp", ">i8")])
RESOLUTION_ROW = np.dtype([
    ("pending_id", ">i8"), ("kind", ">i2"), ("transfer_id", ">i8"), ("timestamp", ">i8"),
])


@dataclass(frozen=True, slots=True)
class Rows:
    """Rows of one table in the canonical encoding: fixed-width records and, when any row
    has one, each row's user_data as UTF-8 bytes (else None)."""

    fixed: np.ndarray
    user_data: Sequence[bytes] | None = None

    def __len__(self) -> int:
        return int(self.fixed.shape[0])

    def in_order(self, key: str) -> Rows:
        """These rows ordered by timestamp, then ``key``: the order of a section."""
        stamps = self.fixed["timestamp"]
        if len(self) < 2 or bool(np.all(stamps[1:] > stamps[:-1])):
            return self
        order = np.lexsort((self.fixed[key].astype(np.int64), stamps.astype(np.int64)))
        user_data = None if self.user_data is None else [self.user_data[i] for i in
                                                         order.tolist()]
        return Rows(self.fixed[order], user_data)

    def slice(self, start: int, stop: int) -> Rows:
        return Rows(self.fixed[start:stop],
                    None if self.user_data is None else self.user_data[start:stop])

    @staticmethod
    def concat(parts: Sequence[Rows], dtype: np.dtype) -> Rows:
        if not parts:
            return Rows(np.zeros(0, dtype=dtype))
        if len(parts) == 1:
            return parts[0]
        # Assigned into one array of ``dtype``: np.concatenate promotes structured dtypes to
        # native byte order, which would change the bytes.
        fixed = np.empty(sum(len(p) for p in parts), dtype=dtype)
        at = 0
        for p in parts:
            fixed[at:at + len(p)] = p.fixed
            at += len(p)
        if all(p.user_data is None for p in parts):
            return Rows(fixed)
        user_data: list[bytes] = []
        for p in parts:
            user_data.extend(p.user_data if p.user_data is not None else [b""] * len(p))
        return Rows(fixed, user_data)


def currency_letters(numbers: np.ndarray) -> np.ndarray:
    """Currency numbers (processor.ledger.currency_number: the code's ASCII letters, least
    significant first) as their three letters, an ``S3`` array."""
    return np.ascontiguousarray(numbers, dtype="<i8").view("S8").astype("S3")


def _user_data(texts: Sequence[str] | None, n: int) -> tuple[list[bytes] | None, np.ndarray]:
    if texts is None or not any(texts):
        return None, np.zeros(n, dtype=np.int64)
    encoded = [t.encode("utf-8") for t in texts]
    return encoded, np.fromiter(map(len, encoded), dtype=np.int64, count=n)


def transfer_rows(
    *, id: np.ndarray, debit_account_id: np.ndarray, credit_account_id: np.ndarray,
    amount: np.ndarray, currency: np.ndarray, flags: np.ndarray, pending_id: np.ndarray,
    timeout_s: np.ndarray, code: np.ndarray, user_data: Sequence[str] | None,
    timestamp: np.ndarray, tenant: np.ndarray, origin: np.ndarray, partition: np.ndarray,
    local_legs: np.ndarray,
) -> Rows:
    """Transfers as records of ``TRANSFER_ROW`` (in the order given); ``currency`` is an
    ``S3`` array of the codes' letters, ``user_data`` None when every one is empty."""
    n = int(id.shape[0])
    rows = np.zeros(n, dtype=TRANSFER_ROW)
    rows["fields"] = TRANSFER_COLUMN_COUNT
    values = {"id": id, "debit_account_id": debit_account_id,
              "credit_account_id": credit_account_id, "amount": amount, "flags": flags,
              "pending_id": pending_id, "timeout_s": timeout_s, "code": code,
              "timestamp": timestamp, "tenant": tenant, "origin": origin,
              "partition": partition, "local_legs": local_legs}
    for name in _TRANSFER_INTS:
        rows[f"{name}_bytes"] = TRANSFER_ROW[name].itemsize
        rows[name] = values[name]
    rows["currency_bytes"] = 3
    rows["currency"] = currency
    encoded, lengths = _user_data(user_data, n)
    rows["user_data_bytes"] = lengths
    return Rows(rows, encoded)


def account_rows(
    *, id: np.ndarray, currency: np.ndarray, flags: np.ndarray, code: np.ndarray,
    user_data: Sequence[str] | None, timestamp: np.ndarray, tenant: np.ndarray,
    origin: np.ndarray, partition: np.ndarray,
) -> Rows:
    """Account creations as records of ``ACCOUNT_ROW``; ``currency`` as in transfer_rows."""
    n = int(id.shape[0])
    rows = np.zeros(n, dtype=ACCOUNT_ROW)
    for name, values in (("id", id), ("currency", currency), ("flags", flags),
                         ("code", code), ("timestamp", timestamp), ("tenant", tenant),
                         ("origin", origin), ("partition", partition)):
        rows[name] = values
    encoded, lengths = _user_data(user_data, n)
    rows["user_data_bytes"] = lengths
    return Rows(rows, encoded)


def failed_rows(*, id: np.ndarray, result: np.ndarray, timestamp: np.ndarray) -> Rows:
    rows = np.zeros(int(id.shape[0]), dtype=FAILED_ROW)
    rows["id"], rows["result"], rows["timestamp"] = id, result, timestamp
    return Rows(rows)


def resolution_rows(*, pending_id: np.ndarray, kind: np.ndarray, transfer_id: np.ndarray,
                    timestamp: np.ndarray) -> Rows:
    rows = np.zeros(int(pending_id.shape[0]), dtype=RESOLUTION_ROW)
    rows["pending_id"], rows["kind"] = pending_id, kind
    rows["transfer_id"], rows["timestamp"] = transfer_id, timestamp
    return Rows(rows)


def _bytes(fixed: np.ndarray) -> memoryview:
    """The records' bytes, without a copy when they are contiguous."""
    return memoryview(np.ascontiguousarray(fixed).view(np.uint8).data)


def _pieces(rows: Rows) -> Iterator[memoryview | bytes]:
    """The section bytes of ``rows`` in order, as few contiguous pieces as it allows."""
    fixed = rows.fixed
    if rows.user_data is None:
        if len(fixed):
            yield _bytes(fixed)
        return
    start = 0
    for i in np.flatnonzero(fixed["user_data_bytes"]).tolist():
        yield _bytes(fixed[start:i + 1])
        yield rows.user_data[i]
        start = i + 1
    if start < len(fixed):
        yield _bytes(fixed[start:])


def encode_section(rows: Rows) -> bytes:
    """The canonical bytes of ``rows`` (already in section order)."""
    return b"".join(bytes(p) for p in _pieces(rows))


class SectionHasher:
    """The digest of one section, fed in order in as many parts as come (the verifier
    streams rows; a batch's rows may arrive in several chunks)."""

    __slots__ = ("_hash", "rows")

    def __init__(self, name: bytes) -> None:
        self._hash = hashlib.blake2b(digest_size=DIGEST_BYTES, person=name)
        self.rows = 0

    def update(self, rows: Rows) -> None:
        for piece in _pieces(rows):
            self._hash.update(piece)
        self.rows += len(rows)

    def digest(self) -> bytes:
        return self._hash.digest()


def section_digest(name: bytes, rows: Rows) -> bytes:
    hasher = SectionHasher(name)
    hasher.update(rows)
    return hasher.digest()


EMPTY_SECTIONS = tuple(section_digest(name, Rows(np.zeros(0, dtype=FAILED_ROW)))
                       for name in SECTIONS)


class Link(msgspec.Struct, frozen=True, kw_only=True):
    """One committed batch of a shard, as ``ledger_chain`` stores it."""

    shard: int
    seq: int
    epoch: int
    timestamp_max: int
    transfers: int
    accounts: int
    failed: int
    resolutions: int
    prev_digest: bytes
    digest: bytes
    # The four section digests, concatenated (what the digest covers besides the header).
    sections: bytes


def link_digest(*, shard: int, seq: int, epoch: int, timestamp_max: int,
                counts: tuple[int, int, int, int], prev_digest: bytes,
                sections: Sequence[bytes]) -> bytes:
    """The digest of a link: its header, the previous link's digest and the digests of its
    four sections (``SECTIONS`` order; ``EMPTY_SECTIONS`` for a table with no rows)."""
    if len(prev_digest) != DIGEST_BYTES or len(sections) != len(SECTIONS):
        raise ValueError("a link needs a 32-byte previous digest and four sections")
    h = hashlib.blake2b(digest_size=DIGEST_BYTES, person=_LINK_PERSON)
    h.update(_LINK_HEADER.pack(shard, seq, epoch, timestamp_max, *counts))
    h.update(prev_digest)
    for section in sections:
        h.update(section)
    return h.digest()
