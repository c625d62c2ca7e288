"""What ``txproc verify`` checks, as pure functions over the rows it reads back.

The reader (actors/ledger/verify.py) streams every ledger table out of one consistent
snapshot, in chunks of arrays, into the checkers below, and each one reports what it found
as ``Problem`` rows in a ``Report``:

* ``ChainCheck``: every row belongs to one link of its shard's chain, every link's
  sections hash to what it stored, every link's digest covers its header, its sections
  and the previous link's digest, and every anchor names links that exist with the
  digests it recorded;
* ``BalanceCheck``: every account's four balance sums, re-derived from the transfers and
  the resolutions, equal what the ledger answers for it (checkpoint rows plus what is not
  folded yet); every currency's debits equal its credits; no account is beyond the limit
  its flags set; every transfer names existing accounts of its currency;
* ``PendingCheck``: each pending transfer is resolved at most once, by a post or void
  that names it or by an expiry, never posted beyond its amount, and its resolution row
  agrees with the transfer that resolved it.

docs/design.md §15 says what these prove and what they do not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from processor.ledger.chain import (
    DIGEST_BYTES,
    EMPTY_SECTIONS,
    GENESIS_DIGEST,
    SECTIONS,
    Rows,
    SectionHasher,
    link_digest,
)
from processor.ledger.partition import partitions_of
from processor.types import AccountFlags, TransferFlags

__all__ = [
    "SECTION_TABLES",
    "BalanceCheck",
    "ChainCheck",
    "PendingCheck",
    "Problem",
    "Report",
]

# The table each chain section hashes, in SECTIONS order.
SECTION_TABLES = ("transfers", "accounts", "failed_transfers", "pending_resolutions")
# The sections whose rows an archive takes out of the database (transfers, resolutions).
ARCHIVED_SECTIONS = (0, 3)
PROBLEMS_MAX = 1_000
_PENDING = int(TransferFlags.PENDING)
_POST = int(TransferFlags.POST_PENDING)
_VOID = int(TransferFlags.VOID_PENDING)
_DEBITS_MAX = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
_CREDITS_MAX = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
_SUMS = ("debits_pending", "debits_posted", "credits_pending", "credits_posted")


class Problem(msgspec.Struct, frozen=True):
    """One broken thing: where (table, row id), what kind, and the values expected and
    found (as text: a number, a digest in hex, a list)."""

    table: str
    id: str
    kind: str
    expected: str
    found: str


@dataclass(slots=True)
class Report:
    """What a verification found: counts of what it checked and the problems, the first
    ``problems_max`` of them kept (``problems_total`` counts all)."""

    checked: dict[str, float] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    problems_total: int = 0
    problems_max: int = PROBLEMS_MAX

    def add(self, table: str, id: object, kind: str, expected: object, found: object) -> None:
        self.problems_total += 1
        if len(self.problems) < self.problems_max:
            self.problems.append(Problem(table, str(id), kind, str(expected), str(found)))

    def count(self, name: str, n: float) -> None:
        self.checked[name] = self.checked.get(name, 0) + n

    @property
    def ok(self) -> bool:
        return self.problems_total == 0


# -- the chain ------------------------------------------------------------------------------


@dataclass(slots=True)
class _ShardLinks:
    """One shard's links as stored, ordered by seq, as arrays."""

    seq: np.ndarray
    epoch: np.ndarray
    timestamp_max: np.ndarray
    counts: np.ndarray  # (n, 4)
    prev: list[bytes]
    digest: list[bytes]
    sections: list[bytes]
    # What the rows read back gave: per link index, per section, its digest and row count.
    found: dict[int, list[tuple[bytes, int] | None]] = field(default_factory=dict)


class ChainCheck:
    """The hash chains of every shard, checked against the rows read back.

    Feed it the links first (``add_links``, a shard's in seq order), then each table's
    rows (``feed``), each shard's in section order (timestamp, then key) in as many chunks
    as come, then ``finish``, then ``check_anchor`` for every anchor.
    """

    def __init__(self, report: Report) -> None:
        self._report = report
        self._shards: dict[int, _ShardLinks] = {}
        # The open section: (section, shard, link index) and its hasher.
        self._open: tuple[int, int, int] | None = None
        self._hasher: SectionHasher | None = None
        # Per shard, the last link whose transfers and resolutions an archive in force
        # holds (docs/design.md §16, "Archive and restore").
        self._archived: dict[int, int] = {}

    def add_links(self, shard: int, seq: np.ndarray, epoch: np.ndarray,
                  timestamp_max: np.ndarray, counts: np.ndarray, prev: list[bytes],
                  digest: list[bytes], sections: list[bytes]) -> None:
        known = self._shards.get(shard)
        if known is None:
            self._shards[shard] = _ShardLinks(seq, epoch, timestamp_max, counts, prev,
                                              digest, sections)
            return
        known.seq = np.concatenate([known.seq, seq])
        known.epoch = np.concatenate([known.epoch, epoch])
        known.timestamp_max = np.concatenate([known.timestamp_max, timestamp_max])
        known.counts = np.concatenate([known.counts, counts])
        known.prev += prev
        known.digest += digest
        known.sections += sections

    def archived_through(self, shard: int, seq: int) -> None:
        """The transfers and resolutions of ``shard``'s links up to ``seq`` are archived:
        those sections are not compared with rows (none may be left), the links' digests,
        their order and the other sections still are."""
        self._archived[shard] = max(seq, self._archived.get(shard, -1))

    def check_archive_cut(self, archive: str, shard: int, seq: int, digest: bytes) -> None:
        """The link an archive's manifest names as its shard's cut is in the chain with the
        digest it recorded."""
        links = self._shards.get(shard)
        at = -1 if links is None else int(np.searchsorted(links.seq, seq))
        if links is None or at >= len(links.seq) or int(links.seq[at]) != seq:
            self._report.add("ledger_archives", archive, "archived_link_missing",
                             f"shard {shard} link {seq} {digest.hex()}", "none")
        elif links.digest[at] != digest:
            self._report.add("ledger_archives", archive, "archived_digest_mismatch",
                             digest.hex(), links.digest[at].hex())

    def feed(self, section: int, shard: int | None, rows: Rows, ids: np.ndarray) -> None:
        """Rows of ``SECTIONS[section]`` written by ``shard`` (None: by no known shard),
        in section order; ``ids`` are their keys, for naming a row that belongs nowhere."""
        table = SECTION_TABLES[section]
        links = self._shards.get(shard) if shard is not None else None
        n = len(rows)
        if n == 0:
            return
        if links is None or len(links.seq) == 0:
            for row_id in ids[:10].tolist():
                self._report.add(table, row_id, "unchained_row", f"a link of shard {shard}",
                                 "none")
            self._report.count("unchained_rows", n)
            return
        stamps = rows.fixed["timestamp"].astype(np.int64)
        where = np.searchsorted(links.timestamp_max, stamps, side="left")
        genesis = int(links.seq[0]) == 0
        start = 0
        while start < n:
            index = int(where[start])
            stop = start + int(np.searchsorted(where[start:], index, side="right"))
            part = rows.slice(start, stop)
            if genesis and index == 0:
                self._report.count("rows_before_chain", len(part))
            elif index >= len(links.seq):
                for row_id in ids[start:stop][:10].tolist():
                    self._report.add(table, row_id, "unchained_row",
                                     f"timestamp <= {int(links.timestamp_max[-1])}",
                                     f"a row of shard {shard} after its last link")
                self._report.count("unchained_rows", len(part))
            else:
                self._hash(section, shard, index, part)  # type: ignore[arg-type]
            start = stop

    def _hash(self, section: int, shard: int, index: int, rows: Rows) -> None:
        key = (section, shard, index)
        if self._open != key:
            self._close()
            self._open, self._hasher = key, SectionHasher(SECTIONS[section])
        assert self._hasher is not None  # noqa: S101 - set just above
        self._hasher.update(rows)

    def _close(self) -> None:
        if self._open is None or self._hasher is None:
            return
        section, shard, index = self._open
        found = self._shards[shard].found.setdefault(index, [None] * len(SECTIONS))
        if found[section] is not None:  # rows out of order: a reader's bug, not the data's
            raise ValueError(f"section {section} of shard {shard} link {index} fed twice")
        found[section] = (self._hasher.digest(), self._hasher.rows)
        self._open = self._hasher = None

    def finish(self) -> None:
        """Compare every link with what its rows gave, and with its predecessor."""
        self._close()
        for shard in sorted(self._shards):
            self._finish_shard(shard, self._shards[shard])

    def _finish_shard(self, shard: int, links: _ShardLinks) -> None:
        report = self._report
        previous_seq, previous_digest = -1, GENESIS_DIGEST
        for i, seq in enumerate(links.seq.tolist()):
            name = f"shard {shard} link {seq}"
            report.count("links", 1)
            if seq == 0:  # the genesis of a ledger migrated with rows in it
                previous_seq, previous_digest = 0, GENESIS_DIGEST
                continue
            if seq != previous_seq + 1 and not (previous_seq == -1 and seq == 1):
                report.add("ledger_chain", f"shard {shard} link {previous_seq + 1}",
                           "missing_link", f"seq {previous_seq + 1}", f"seq {seq}")
            elif links.prev[i] != previous_digest:
                report.add("ledger_chain", name, "broken_link", previous_digest.hex(),
                           links.prev[i].hex())
            self._check_sections(shard, links, i, name)
            counts = tuple(int(c) for c in links.counts[i].tolist())
            stored = _split_sections(links.sections[i])
            digest = link_digest(
                shard=shard, seq=seq, epoch=int(links.epoch[i]),
                timestamp_max=int(links.timestamp_max[i]),
                counts=counts, prev_digest=links.prev[i],  # type: ignore[arg-type]
                sections=stored if stored is not None else EMPTY_SECTIONS)
            if stored is None or digest != links.digest[i]:
                report.add("ledger_chain", name, "digest_mismatch", digest.hex(),
                           links.digest[i].hex())
            previous_seq, previous_digest = seq, links.digest[i]

    def _check_sections(self, shard: int, links: _ShardLinks, i: int, name: str) -> None:
        found = links.found.get(i, [None] * len(SECTIONS))
        stored = _split_sections(links.sections[i]) or EMPTY_SECTIONS
        archived = int(links.seq[i]) <= self._archived.get(shard, -1)
        for section, table in enumerate(SECTION_TABLES):
            expected_rows = int(links.counts[i][section])
            digest, rows = found[section] or (EMPTY_SECTIONS[section], 0)
            if archived and section in ARCHIVED_SECTIONS:
                if rows:
                    self._report.add(table, name, "archived_rows_present", 0, rows)
                self._report.count(f"archived_{table}", expected_rows)
                continue
            if rows != expected_rows:
                self._report.add(table, name, "row_count", expected_rows, rows)
            elif digest != stored[section]:
                self._report.add(table, name, "rows_changed", stored[section].hex(),
                                 digest.hex())
            self._report.count(f"chained_{table}", rows)

    def check_anchor(self, anchor_id: int, shards: Sequence[int], seqs: Sequence[int],
                     digests: Sequence[bytes], held: frozenset[int] | None = None) -> None:
        """Every head the anchor recorded is a link of the chain with that digest; of the
        shards the database holds (``held``; None: every one), since a shard moved to
        another database (``txproc move-shard``) took its links along."""
        self._report.count("anchors", 1)
        for shard, seq, digest in zip(shards, seqs, digests, strict=True):
            if held is not None and shard not in held:
                self._report.count("anchored_elsewhere", 1)
                continue
            links = self._shards.get(shard)
            at = -1 if links is None else int(np.searchsorted(links.seq, seq))
            if links is None or at >= len(links.seq) or int(links.seq[at]) != seq:
                self._report.add("ledger_anchors", anchor_id, "anchored_link_missing",
                                 f"shard {shard} link {seq} {bytes(digest).hex()}", "none")
            elif links.digest[at] != bytes(digest):
                self._report.add("ledger_anchors", anchor_id, "anchored_digest_mismatch",
                                 bytes(digest).hex(), links.digest[at].hex())

    def links_after(self, heads: dict[int, int]) -> int:
        """How many links no anchor vouches for: those after each shard's anchored head
        (``heads``: shard -> the newest anchor's seq)."""
        return sum(int(np.count_nonzero(links.seq > heads.get(shard, -1)))
                   for shard, links in self._shards.items())


def _split_sections(stored: bytes) -> tuple[bytes, ...] | None:
    if len(stored) != DIGEST_BYTES * len(SECTIONS):
        return None
    return tuple(stored[i:i + DIGEST_BYTES] for i in range(0, len(stored), DIGEST_BYTES))


# -- balances -------------------------------------------------------------------------------


class BalanceCheck:
    """Every account's balances re-derived from the transfers, against what is stored.

    Built with every account (ids sorted), fed the transfers in chunks of arrays, then
    ``finish``. ``resolved`` are the ids of pending transfers that are resolved, sorted: a
    resolved hold counts nothing (its post counts what it posted). ``mapped``, when given,
    says which partitions this database holds (indexed by partition): a leg on an account
    of another partition is in another database (its shard moved there, docs/design.md
    §12) and counts there, not here; a missing account of a partition held here is a
    problem as before."""

    def __init__(self, report: Report, *, ids: np.ndarray, currency: np.ndarray,
                 flags: np.ndarray, stored: np.ndarray, resolved: np.ndarray,
                 mapped: np.ndarray | None = None) -> None:
        order = np.argsort(ids, kind="stable")
        self._report = report
        self._ids = ids[order]
        self._currency = currency[order]
        self._flags = flags[order]
        self._stored = stored[order]  # (n, 4): the _SUMS
        self._derived = np.zeros_like(self._stored)
        self._resolved = resolved
        self._mapped = mapped
        # Per currency, the _SUMS of the legs counted in another database.
        self._elsewhere: dict[bytes, list[int]] = {}

    def feed(self, *, id: np.ndarray, debit: np.ndarray, credit: np.ndarray,
             amount: np.ndarray, currency: np.ndarray, flags: np.ndarray,
             resolved: np.ndarray | None = None) -> None:
        """Transfers: ids, accounts, amounts, currencies (``S3``) and flags; ``resolved``
        (sorted) in place of the constructor's for these rows (mirrors, whose resolutions
        are mirrored with them)."""
        self._report.count("balance_transfers", len(id))
        debit_at, debit_away = self._find(debit, id, "debit_account_missing")
        credit_at, credit_away = self._find(credit, id, "credit_account_missing")
        for side, at in (("debit", debit_at), ("credit", credit_at)):
            wrong = (at >= 0) & (self._currency[np.maximum(at, 0)] != currency)
            for i in np.flatnonzero(wrong)[:10].tolist():
                self._report.add("transfers", int(id[i]), f"{side}_account_currency",
                                 self._currency[at[i]].decode(), currency[i].decode())
        pending = (flags & _PENDING) != 0
        open_hold = pending & ~np.isin(id, self._resolved if resolved is None else resolved)
        posts = ((flags & (_PENDING | _POST | _VOID)) == 0) | ((flags & _POST) != 0)
        pend = np.where(open_hold, amount, 0)
        post = np.where(posts, amount, 0)
        d, c = debit_at >= 0, credit_at >= 0
        np.add.at(self._derived[:, 0], debit_at[d], pend[d])
        np.add.at(self._derived[:, 1], debit_at[d], post[d])
        np.add.at(self._derived[:, 2], credit_at[c], pend[c])
        np.add.at(self._derived[:, 3], credit_at[c], post[c])
        for k, away in ((0, debit_away), (2, credit_away)):
            for i in np.flatnonzero(away).tolist():
                sums = self._elsewhere.setdefault(bytes(currency[i]), [0, 0, 0, 0])
                sums[k] += int(pend[i])
                sums[k + 1] += int(post[i])
        self._report.count("legs_elsewhere", int(debit_away.sum() + credit_away.sum()))

    def add_checkpoint(self, ids: np.ndarray, sums: np.ndarray) -> None:
        """Start the re-derivation of these accounts from an archive's balance checkpoint
        (``sums``: (n, 4), the _SUMS each account's archived transfers added)."""
        self._report.count("checkpoint_accounts", len(ids))
        at, _ = self._find(ids, ids, "checkpoint_account_missing")
        known = at >= 0
        np.add.at(self._derived, at[known], sums[known])

    def _find(self, accounts: np.ndarray, ids: np.ndarray,
              kind: str) -> tuple[np.ndarray, np.ndarray]:
        """Each account's index (-1: not here), and whether it is in another database."""
        at = np.searchsorted(self._ids, accounts)
        clipped = np.minimum(at, max(len(self._ids) - 1, 0))
        found = (at < len(self._ids)) & (self._ids[clipped] == accounts) if len(self._ids) \
            else np.zeros(len(accounts), dtype=bool)
        away = np.zeros(len(accounts), dtype=bool)
        if self._mapped is not None:
            away = ~found & ~self._mapped[partitions_of(accounts)]
        for i in np.flatnonzero(~found & ~away)[:10].tolist():
            self._report.add("transfers", int(ids[i]), kind, int(accounts[i]), "none")
        return np.where(found, clipped, -1), away

    def finish(self) -> None:
        report = self._report
        report.count("accounts", len(self._ids))
        wrong = np.flatnonzero((self._derived != self._stored).any(axis=1))
        for i in wrong[:PROBLEMS_MAX].tolist():
            for k, name in enumerate(_SUMS):
                if self._derived[i, k] != self._stored[i, k]:
                    report.add("accounts", int(self._ids[i]), f"{name}_mismatch",
                               int(self._derived[i, k]), int(self._stored[i, k]))
        report.count("accounts_mismatched", len(wrong))
        self._check_currencies()
        self._check_limits()

    def _check_currencies(self) -> None:
        """Per currency, the stored debits equal the stored credits (pending and posted),
        with the legs of this database's transfers counted in another one added."""
        codes = np.unique(self._currency)
        self._report.count("currencies", len(codes))
        for code in codes.tolist():
            rows = self._stored[self._currency == code].astype(object)
            sums = list(rows.sum(axis=0)) if len(rows) else [0, 0, 0, 0]
            # The legs counted in another database balance this one's.
            sums = [a + b for a, b in zip(sums, self._elsewhere.get(code, [0, 0, 0, 0]),
                                          strict=True)]
            for kind, debits, credits in (("pending", sums[0], sums[2]),
                                          ("posted", sums[1], sums[3])):
                if debits != credits:
                    self._report.add("accounts", code.decode(),
                                     f"currency_{kind}_not_balanced",
                                     f"debits {credits}", f"debits {debits}")

    def _check_limits(self) -> None:
        s = self._stored.astype(object)
        debits_over = ((self._flags & _DEBITS_MAX) != 0) & (s[:, 0] + s[:, 1] > s[:, 3])
        credits_over = ((self._flags & _CREDITS_MAX) != 0) & (s[:, 2] + s[:, 3] > s[:, 1])
        for i in np.flatnonzero(debits_over.astype(bool)
                                | credits_over.astype(bool))[:10].tolist():
            self._report.add("accounts", int(self._ids[i]), "beyond_limit",
                             "within the limit of its flags", list(self._stored[i].tolist()))


# -- pending transfers ----------------------------------------------------------------------


@dataclass(slots=True)
class PendingCheck:
    """Pending transfers and what resolved them. Feed every resolution row, then the
    pending transfers and the posts and voids among the transfers, then ``finish``."""

    report: Report
    resolution_pending: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    resolution_kind: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    resolution_transfer: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _pending: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _resolving: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = field(
        default_factory=list)

    def feed(self, *, id: np.ndarray, pending_id: np.ndarray, amount: np.ndarray,
             flags: np.ndarray) -> None:
        holds = (flags & _PENDING) != 0
        if holds.any():
            self._pending.append((id[holds], amount[holds]))
        resolving = (flags & (_POST | _VOID)) != 0
        if resolving.any():
            self._resolving.append((id[resolving], pending_id[resolving], amount[resolving],
                                    flags[resolving]))

    def finish(self) -> None:
        report = self._report_counts()
        hold_ids, hold_amounts = _concat2(self._pending)
        order = np.argsort(hold_ids)
        hold_ids, hold_amounts = hold_ids[order], hold_amounts[order]
        ids, pending_ids, amounts, flags = _concat4(self._resolving)
        at = _index_of(hold_ids, pending_ids)
        for i in np.flatnonzero(at < 0)[:10].tolist():
            report.add("transfers", int(ids[i]), "resolves_no_pending_transfer",
                       f"pending transfer {int(pending_ids[i])}", "none")
        unique, counts = np.unique(pending_ids, return_counts=True)
        for p in unique[counts > 1][:10].tolist():
            report.add("transfers", int(p), "pending_resolved_twice", 1,
                       int(counts[unique == p][0]))
        known = at >= 0
        beyond = known & ((flags & _POST) != 0) & (amounts > hold_amounts[np.maximum(at, 0)])
        for i in np.flatnonzero(beyond)[:10].tolist():
            report.add("transfers", int(ids[i]), "posted_beyond_pending_amount",
                       f"<= {int(hold_amounts[at[i]])}", int(amounts[i]))
        self._check_resolution_rows(hold_ids, ids, pending_ids, flags)

    def _report_counts(self) -> Report:
        self.report.count("pending_transfers", sum(len(p[0]) for p in self._pending))
        self.report.count("posts_and_voids", sum(len(p[0]) for p in self._resolving))
        return self.report

    def _check_resolution_rows(self, hold_ids: np.ndarray, ids: np.ndarray,
                               pending_ids: np.ndarray, flags: np.ndarray) -> None:
        """Each resolution row names a pending transfer, and the post or void it names
        resolves that one with its kind (an expiry names none and none resolves it); each
        post or void has its row."""
        report = self.report
        rp, kind, rt = self.resolution_pending, self.resolution_kind, self.resolution_transfer
        for i in np.flatnonzero(_index_of(hold_ids, rp) < 0)[:10].tolist():
            report.add("pending_resolutions", int(rp[i]), "resolves_no_pending_transfer",
                       "a pending transfer", "none")
        order = np.argsort(ids)
        by_id, by_pending, by_flags = ids[order], pending_ids[order], flags[order]
        if len(by_id) == 0:  # expiries only: one row that matches nothing, to index safely
            by_id, by_pending, by_flags = (np.full(1, -1, np.int64), np.full(1, -1, np.int64),
                                           np.zeros(1, np.int64))
        at = _index_of(by_id, rt)
        expected_flag = np.where(kind == 1, _POST, np.where(kind == 2, _VOID, 0))
        found = at >= 0
        safe = np.maximum(at, 0)
        agrees = np.where(
            kind == 3, rt == 0,
            found & (by_pending[safe] == rp) & ((by_flags[safe] & expected_flag) != 0))
        for i in np.flatnonzero(~agrees)[:10].tolist():
            report.add("pending_resolutions", int(rp[i]), "resolution_disagrees",
                       f"kind {int(kind[i])} by transfer {int(rt[i])}",
                       "no such post or void" if at[i] < 0 else
                       f"transfer {int(rt[i])} resolves {int(by_pending[at[i]])}")
        expired = rp[kind == 3]
        for p in pending_ids[np.isin(pending_ids, expired)][:10].tolist():
            report.add("pending_resolutions", int(p), "expired_and_resolved",
                       "expired only", "also posted or voided")
        rows_of = np.isin(pending_ids, rp[kind != 3])
        for i in np.flatnonzero(~rows_of)[:10].tolist():
            report.add("transfers", int(ids[i]), "resolution_row_missing",
                       f"a resolution of {int(pending_ids[i])}", "none")


def _index_of(sorted_ids: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The index of each of ``wanted`` in ``sorted_ids``, or -1."""
    if len(sorted_ids) == 0:
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, wanted), len(sorted_ids) - 1)
    return np.where(sorted_ids[at] == wanted, at, -1)


def _concat2(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _concat4(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if not parts:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))  # type: ignore[return-value]
