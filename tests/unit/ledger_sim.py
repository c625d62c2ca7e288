"""An in-memory cluster of ledger Books for unit tests: N shards, a dict store, a fake clock.

It runs the protocol of the shard actors (actors/ledger/shard.py) without Ray or PostgreSQL:
accounts are created by their owners; each linked chain of a request is coordinated by the
shard owning the debit account of its first transfer; a coordinator looks up what it does
not remember, plans, has its remote legs reserved, finalizes, commits to the store and then
settles the holds it relied on. ``Store`` refuses what PostgreSQL would refuse (duplicate
keys, a balance below zero or above bigint, a posting to a missing account, a stale epoch),
so a ledger bug shows up as a ``StoreError`` rather than as a silently wrong row.

Two schedules are offered. ``sequential`` runs one coordinator's batch to its commit before
the next one looks anything up. ``interleaved`` plans on every coordinator first, then
reserves, then finalizes, then commits: every coordinator holds uncommitted effects while
the others reserve on it, as the actors allow between their ``plan`` and ``finalize``.
Under ``interleaved`` the caller must not send one transfer id to two coordinators in one
batch: the database would refuse the second commit and that shard would crash and recover,
which this helper does not model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from processor.codes import AccountResult, TransferResult
from processor.ledger import (
    NS_PER_S,
    ArrayBook,
    Book,
    CommitBatch,
    Known,
    PartitionMap,
    Plan,
    Resolution,
    ResolutionRow,
)
from processor.types import AMOUNT_MAX, Account, Transfer, TransferFlags

__all__ = [
    "NOW_NS_START",
    "Cluster",
    "Store",
    "StoreError",
    "account_ids_on_shards",
    "book_mismatches",
    "chains_of",
    "postings_of",
]

NOW_NS_START = 1_700_000_000 * NS_PER_S
RECENT_IDS_MAX_DEFAULT = 1_024
LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)


class ColumnarBook(ArrayBook):
    """An ``ArrayBook`` that plans every plain batch over columns, however short (the
    shard's book leaves batches under ``plain_batch_min`` to ``Book``'s rules): for the
    tests whose subject is the columnar path."""

    plain_batch_min = 1


class StoreError(AssertionError):
    """A write the database would refuse; with a correct ledger it never happens."""


@dataclass(slots=True)
class Store:
    """The ledger's tables as dicts keyed by their primary keys."""

    accounts: dict[int, Account] = field(default_factory=dict)
    transfers: dict[int, Transfer] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)  # id -> result code
    resolutions: dict[int, ResolutionRow] = field(default_factory=dict)  # by pending id
    epochs: dict[int, int] = field(default_factory=dict)  # shard -> epoch

    def fetch_known(self, ids: list[int], pending_ids: list[int]) -> Known:
        """What ``actors.ledger.store.LedgerStore.fetch_known`` reads, from the dicts."""
        known = Known()
        for i in ids:
            if i in self.transfers:
                known.transfers[i] = self.transfers[i]
            if i in self.failed:
                known.failed[i] = self.failed[i]
        for p in pending_ids:
            if p in self.resolutions:
                known.resolutions[p] = self.resolutions[p].kind
        return known

    def commit(self, batch: CommitBatch, fences: dict[int, int]) -> None:
        """Write ``batch`` atomically: either every row and delta, or nothing."""
        for shard, epoch in fences.items():
            _refuse(self.epochs.get(shard) != epoch, f"shard {shard} fenced at {epoch}")
        new_accounts = {a.id: a for a in batch.accounts}
        _refuse(len(new_accounts) != len(batch.accounts), "duplicate account in batch")
        _refuse(any(i in self.accounts for i in new_accounts), "account id exists")
        transfers = batch.all_transfers()
        transfer_ids = [t.id for t in transfers]
        _refuse(len(set(transfer_ids)) != len(transfer_ids), "duplicate transfer in batch")
        _refuse(any(i in self.transfers for i in transfer_ids), "transfer id exists")
        _refuse(any(t.amount <= 0 for t in transfers), "transfer amount > 0")
        failed_ids = [f.id for f in batch.failed]
        _refuse(len(set(failed_ids)) != len(failed_ids), "duplicate failure in batch")
        _refuse(any(i in self.failed for i in failed_ids), "failed id exists")
        pending_ids = [r.pending_id for r in batch.resolutions]
        _refuse(len(set(pending_ids)) != len(pending_ids), "two resolutions in one batch")
        _refuse(any(p in self.resolutions for p in pending_ids), "pending already resolved")
        rows: dict[int, Account] = {}
        for account_id, (dp, dpo, cp, cpo) in batch.deltas():
            row = self.accounts.get(account_id, new_accounts.get(account_id))
            _refuse(row is None, f"posting to missing account {account_id}")
            assert row is not None
            row = msgspec.structs.replace(
                row,
                debits_pending=row.debits_pending + dp,
                debits_posted=row.debits_posted + dpo,
                credits_pending=row.credits_pending + cp,
                credits_posted=row.credits_posted + cpo,
            )
            for value in _balances(row):
                _refuse(not 0 <= value <= AMOUNT_MAX, f"balance out of bigint >= 0: {row}")
            rows[account_id] = row
        self.accounts.update(new_accounts)
        self.accounts.update(rows)
        self.transfers.update({t.id: t for t in transfers})
        self.failed.update({f.id: f.result for f in batch.failed})
        self.resolutions.update({r.pending_id: r for r in batch.resolutions})

    def open_pending(self) -> list[Transfer]:
        """Pending transfers with no resolution, in id order."""
        return [
            t for i, t in sorted(self.transfers.items())
            if t.flags & PENDING and i not in self.resolutions
        ]


def _refuse(condition: bool, what: str) -> None:
    if condition:
        raise StoreError(what)


def _balances(a: Account) -> tuple[int, int, int, int]:
    return (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)


def postings_of(store: Store) -> dict[int, tuple[int, int, int, int]]:
    """Every account's balances recomputed from the stored transfers and resolutions."""
    sums = {i: [0, 0, 0, 0] for i in store.accounts}
    for t in store.transfers.values():
        if t.flags & PENDING:
            sums[t.debit_account_id][0] += t.amount
            sums[t.credit_account_id][2] += t.amount
        elif t.flags & POST:
            sums[t.debit_account_id][1] += t.amount
            sums[t.credit_account_id][3] += t.amount
        elif not t.pending_id:
            sums[t.debit_account_id][1] += t.amount
            sums[t.credit_account_id][3] += t.amount
    for r in store.resolutions.values():
        p = store.transfers[r.pending_id]
        sums[p.debit_account_id][0] -= p.amount
        sums[p.credit_account_id][2] -= p.amount
    return {i: (s[0], s[1], s[2], s[3]) for i, s in sums.items()}


def chains_of(transfers: list[Transfer]) -> list[tuple[int, int]]:
    """The [start, end) ranges of the linked chains of one request, in order."""
    chains = []
    start = 0
    for i, t in enumerate(transfers):
        if not t.flags & LINKED or i == len(transfers) - 1:
            chains.append((start, i + 1))
            start = i + 1
    return chains


def account_ids_on_shards(partitions: PartitionMap, count_per_shard: int) -> list[list[int]]:
    """The smallest account ids owned by each shard, ``count_per_shard`` of each."""
    out: list[list[int]] = [[] for _ in range(partitions.shards)]
    candidate = 1
    while any(len(ids) < count_per_shard for ids in out):
        ids = out[partitions.shard_of(candidate)]
        if len(ids) < count_per_shard:
            ids.append(candidate)
        candidate += 1
    return out


@dataclass(slots=True)
class _Work:
    """One coordinator's share of a submitted batch and where its codes go back."""

    shard: int
    requests: list[list[Transfer]] = field(default_factory=list)
    slots: list[tuple[int, int]] = field(default_factory=list)  # (request, item), flat order
    # What is still to be planned: the requests, then each ``Plan.rest``.
    remaining: list[list[Transfer]] | None = None
    plan: Plan | None = None
    answers: dict[int, tuple[int, list[tuple[int, int]]]] = field(default_factory=dict)
    plain_answers: dict[int, Any] = field(default_factory=dict)
    batches: list[CommitBatch] = field(default_factory=list)  # finalized, in commit order
    codes: list[int] = field(default_factory=list)
    unreached: bool = False  # a reservation of the current plan failed


class Cluster:
    """N Books over one dict store, driven by hand with a fake clock in nanoseconds."""

    def __init__(
        self,
        shards: int = 1,
        *,
        recent_ids_max: int = RECENT_IDS_MAX_DEFAULT,
        now_ns: int = NOW_NS_START,
        interleaved: bool = False,
        book_class: type[Book] = Book,
    ) -> None:
        self.partitions = PartitionMap.uniform(shards)
        self.book_class = book_class
        self.recent_ids_max = recent_ids_max
        self.now_ns = now_ns
        self.interleaved = interleaved
        self.store = Store(epochs={s: 1 for s in range(shards)})
        self.books = [
            book_class(s, self.partitions, recent_ids_max=recent_ids_max) for s in range(shards)
        ]
        self.batches_committed = 0
        # Called after each coordinator's batch is committed and settled, for checks of the
        # store "after every batch" (other coordinators may still hold uncommitted work).
        self.after_commit: Callable[[], None] | None = None
        # Whether a coordinator's reservation call on a peer fails, and how (None: it is
        # answered): ``answer_lost`` (the peer granted, the answer never came back),
        # ``late`` (the call reaches the peer only after its cancel), ``never_sent``. The
        # coordinator then takes the unreachable answer and cancels the call on the peer,
        # as actors.ledger.shard does.
        self.reservation_fault: Callable[[int, int], str | None] | None = None
        self.reservation_seq = 0

    # -- clock and reads --------------------------------------------------------------------

    def advance(self, *, seconds: int = 0, ns: int = 0) -> None:
        self.now_ns += seconds * NS_PER_S + ns

    def shard_of(self, account_id: int) -> int:
        return self.partitions.shard_of(account_id)

    def lookup_account(self, account_id: int) -> Account | None:
        return self.store.accounts.get(account_id)

    def lookup_transfer(self, transfer_id: int) -> Transfer | None:
        return self.store.transfers.get(transfer_id)

    def balances(self, account_id: int) -> tuple[int, int, int, int]:
        """(debits_pending, debits_posted, credits_pending, credits_posted) in the store."""
        account = self.store.accounts[account_id]
        return _balances(account)

    # -- accounts ---------------------------------------------------------------------------

    def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        """Create one request of accounts, each on the shard that owns its id."""
        by_shard: dict[int, list[int]] = {}
        for i, a in enumerate(accounts):
            by_shard.setdefault(self.shard_of(a.id), []).append(i)
        codes: list[AccountResult | None] = [None] * len(accounts)
        for shard, indexes in by_shard.items():
            book = self.books[shard]
            out, batch = book.create_accounts([[accounts[i] for i in indexes]], self.now_ns)
            self.store.commit(batch, {shard: self.store.epochs[shard]})
            book.accounts_committed(batch)
            for i, code in zip(indexes, out[0], strict=True):
                codes[i] = code
        out = [c for c in codes if c is not None]
        assert len(out) == len(accounts), "one code per account"
        return out

    # -- transfers --------------------------------------------------------------------------

    def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        """Submit one request as its own batch."""
        return self.submit([transfers])[0]

    def submit(self, requests: list[list[Transfer]]) -> list[list[TransferResult]]:
        """Submit several requests as one batch; codes come back in request order.

        Like the shard actor, a coordinator whose plan stops early (``Plan.rest``) plans the
        rest again after finalize, before any of its batches is committed; its batches then
        commit in order.
        """
        work = self._route(requests)
        self._run(work)
        codes: list[list[TransferResult | None]] = [[None] * len(r) for r in requests]
        for w in work:
            for (r, i), code in zip(w.slots, w.codes, strict=True):
                codes[r][i] = TransferResult(code)
        out = [[c for c in request if c is not None] for request in codes]
        assert [len(o) for o in out] == [len(r) for r in requests], "one code per item"
        return out

    def pulse(self) -> None:
        """Run an empty batch on every shard, so that each expires what timed out."""
        self._run([_Work(shard=s) for s in range(len(self.books))])

    def _run(self, work: list[_Work]) -> None:
        for w in work:
            w.remaining = w.requests
        if self.interleaved:
            active = list(work)
            while active:
                for w in active:
                    self._plan(w)
                for w in active:
                    self._reserve(w)
                for w in active:
                    self._finalize(w)
                active = [w for w in active if w.remaining is not None]
            rounds = max(len(w.batches) for w in work) if work else 0
            for r in range(rounds):
                for w in work:
                    if r < len(w.batches):
                        self._commit(w.shard, w.batches[r])
        else:
            for w in work:
                while w.remaining is not None:
                    self._plan(w)
                    self._reserve(w)
                    self._finalize(w)
                for batch in w.batches:
                    self._commit(w.shard, batch)

    def _route(self, requests: list[list[Transfer]]) -> list[_Work]:
        """Split every request into chains and give each chain to its coordinator."""
        by_shard: dict[int, _Work] = {}
        for r, transfers in enumerate(requests):
            touched: set[int] = set()
            for start, end in chains_of(transfers):
                chain = transfers[start:end]
                shard = self.partitions.coordinator_of(
                    [t.debit_account_id for t in chain], [t.flags for t in chain])
                w = by_shard.setdefault(shard, _Work(shard=shard))
                if shard not in touched:
                    w.requests.append([])
                    touched.add(shard)
                w.requests[-1].extend(transfers[start:end])
                w.slots.extend((r, i) for i in range(start, end))
        return list(by_shard.values())

    def _plan(self, w: _Work) -> None:
        assert w.remaining is not None
        book = self.books[w.shard]
        ids, pending_ids = book.lookups_needed(w.remaining)
        known = self.store.fetch_known(ids, pending_ids)
        w.plan = book.plan_transfers(w.remaining, self.now_ns, known)
        w.answers = {}
        w.plain_answers = {}
        w.unreached = False

    def _fault(self, coordinator: int, peer: int, expiries: bool) -> str | None:
        if self.reservation_fault is None or expiries:  # an expiry's peer must be reached
            return None
        return self.reservation_fault(coordinator, peer)

    def _reserve(self, w: _Work) -> None:
        assert w.plan is not None
        epoch = self.store.epochs[w.shard]
        for shard, legs in w.plan.remote.items():
            self.reservation_seq += 1
            request = self.reservation_seq
            book = self.books[shard]
            fault = self._fault(w.shard, shard, any(index < 0 for index, _ in legs))
            if fault == "answer_lost":
                book.reserve(w.shard, epoch, [leg for _, leg in legs], request)
            if fault is not None:
                book.cancel_reservation(w.shard, epoch, request)
                if fault == "late":
                    late = book.reserve(w.shard, epoch, [leg for _, leg in legs], request)
                    assert all(hold_id == 0 for _, hold_id in late), "granted after cancel"
                w.answers[shard] = Book.unreachable_answer(legs)
                w.unreached = True
                continue
            answers = book.reserve(w.shard, epoch, [leg for _, leg in legs], request)
            w.answers[shard] = (self.store.epochs[shard], answers)
        for shard, plain_legs in w.plan.remote_plain.items():
            self.reservation_seq += 1
            request = self.reservation_seq
            remote = self.books[shard]
            assert isinstance(remote, ArrayBook), "only a columnar book plans plain legs"
            fault = self._fault(w.shard, shard, False)
            if fault == "answer_lost":
                remote.reserve_plain(w.shard, epoch, plain_legs, request)
            if fault is not None:
                remote.cancel_reservation(w.shard, epoch, request)
                if fault == "late":
                    _, block = remote.reserve_plain(w.shard, epoch, plain_legs, request)
                    assert block == 0, "granted after cancel"
                w.plain_answers[shard] = ArrayBook.unreachable_plain_answer(plain_legs)
                w.unreached = True
                continue
            codes, block = remote.reserve_plain(w.shard, epoch, plain_legs, request)
            w.plain_answers[shard] = (self.store.epochs[shard], block, codes)

    def _finalize(self, w: _Work) -> None:
        assert w.plan is not None
        batch = self.books[w.shard].finalize(w.plan, w.answers, self.now_ns,
                                             w.plain_answers)
        w.batches.append(batch)
        w.codes.extend(batch.codes)
        if w.unreached and w.plan.rest:
            # As the shard does: what follows may depend on an item left not applied.
            w.codes.extend(int(TransferResult.not_applied) for r in w.plan.rest for _ in r)
            w.remaining = None
        else:
            w.remaining = w.plan.rest or None

    def _commit(self, shard: int, batch: CommitBatch) -> None:
        self.store.commit(batch, {shard: self.store.epochs[shard], **batch.fences})
        self.books[shard].committed(batch)
        for other, outcomes in batch.settlements.items():
            self.books[other].settle(shard, outcomes)
        for other, masks in batch.plain_settlements.items():
            remote = self.books[other]
            assert isinstance(remote, ArrayBook)
            remote.settle_plain(shard, masks)
        self.batches_committed += 1
        if self.after_commit is not None:
            self.after_commit()

    # -- recovery ---------------------------------------------------------------------------

    def recover(self, shard: int) -> Book:
        """Replace a shard's Book by one rebuilt from the store, under the next epoch."""
        epoch = self.store.epochs[shard] + 1
        self.store.epochs[shard] = epoch
        book = self.book_class(shard, self.partitions, recent_ids_max=self.recent_ids_max)
        for account_id, account in sorted(self.store.accounts.items()):
            if book.owns(account_id):
                book.load_account(account)
        for t in self.store.open_pending():
            if book.owns(t.debit_account_id):
                book.load_pending(t)
        self.books[shard] = book
        return book

    # -- views for assertions ---------------------------------------------------------------

    def owned_accounts(self, shard: int) -> Iterable[int]:
        return (i for i in self.store.accounts if self.shard_of(i) == shard)

    def resolution_of(self, pending_id: int) -> Resolution | None:
        row = self.store.resolutions.get(pending_id)
        return None if row is None else Resolution(row.kind)


def book_mismatches(cluster: Cluster) -> list[str]:
    """How each Book differs from the store once every batch is committed and settled.

    Empty when every book's committed balances equal the store rows of the accounts it
    owns, nothing uncommitted or reserved is left, no hold is granted, and its open pending
    transfers are exactly the unresolved pending rows whose debit account it owns.
    """
    out: list[str] = []
    open_by_shard: dict[int, set[int]] = {}
    for t in cluster.store.open_pending():
        open_by_shard.setdefault(cluster.shard_of(t.debit_account_id), set()).add(t.id)
    for book in cluster.books:
        if book.holds:
            out.append(f"shard {book.shard} still grants holds {sorted(book.holds)}")
        if isinstance(book, ArrayBook) and book.blocks:
            out.append(f"shard {book.shard} still grants hold blocks {sorted(book.blocks)}")
        for account_id in sorted(cluster.owned_accounts(book.shard)):
            state = book.accounts.get(account_id)
            if state is None:
                out.append(f"shard {book.shard} lost account {account_id}")
                continue
            committed = (state.debits_pending, state.debits_posted,
                         state.credits_pending, state.credits_posted)
            row = cluster.balances(account_id)
            if committed != row:
                out.append(f"account {account_id}: book {committed} != store {row}")
            left = {
                name: getattr(state, name)
                for name in ("u_debits_pending", "u_debits_posted", "u_credits_pending",
                             "u_credits_posted", "up_debits", "up_credits",
                             "reserved_debits", "reserved_credits")
                if getattr(state, name)
            }
            if left:
                out.append(f"account {account_id} on shard {book.shard} keeps {left}")
        expected = open_by_shard.get(book.shard, set())
        if set(book.pending) != expected:
            out.append(
                f"shard {book.shard} open pending {sorted(book.pending)} != store "
                f"{sorted(expected)}"
            )
    return out
