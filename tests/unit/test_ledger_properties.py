"""Invariants of processor.ledger.rules over random workloads on one, two and three shards.

A workload is a sequence of steps drawn one at a time against the state so far: batches of
requests of transfers (plain, pending, post, void, linked), clock advances, expiry pulses,
shard recoveries and replays of earlier requests. After every committed coordinator batch
the store must keep double entry, equal its own postings, keep every flagged account within
its limit and resolve each hold at most once; after every step every book must agree with
the store and hold nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processor.codes import TransferResult, burns_id
from processor.ledger import Book, Resolution, ResolutionRow
from processor.ledger.columnar import ArrayBook
from processor.types import AMOUNT_MAX, Account, AccountFlags, Transfer, TransferFlags
from tests.unit.ledger_sim import (
    Cluster,
    ColumnarBook,
    book_mismatches,
    chains_of,
    postings_of,
)

R = TransferResult
DL = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CL = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)

ACCOUNT_IDS = (1, 2, 3, 4, 5, 6)
MISSING_ACCOUNT_ID = 7  # never created
ACCOUNT_CHOICES = ACCOUNT_IDS * 3 + (MISSING_ACCOUNT_ID,)
KINDS = ("plain", "plain", "plain", "pending", "post", "void", "again")
# Tenants: accounts 1-5 belong to tenant A, account 6 to tenant B; transfers are mostly
# A's, some B's (which may touch only account 6) and some the processor's (0: any account).
TENANT_A, TENANT_B = 11, 22
TRANSFER_TENANTS = (TENANT_A,) * 6 + (TENANT_B, 0)


def tenant_of(account_id: int) -> int:
    return TENANT_B if account_id == ACCOUNT_IDS[-1] else TENANT_A
# Amounts: 1 and AMOUNT_MAX explicitly, small amounts that limits decide, and huge ones
# that overflow decides.
AMOUNTS = st.one_of(
    st.just(1),
    st.just(AMOUNT_MAX),
    *[st.integers(1, 100)] * 9,
    st.integers(2**62, AMOUNT_MAX),
)
FUNDING = 300  # what account 1 gives each flagged account before the workload starts
STEPS = ("batch", "batch", "batch", "advance", "pulse", "recover", "replay")
SUCCESS = (R.ok, R.exists)
EXAMPLES_MAX = 60
SETTINGS = settings(
    max_examples=EXAMPLES_MAX,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Workload:
    """Which accounts exist, with which flags and currencies."""

    flags: tuple[int, ...]
    currencies: tuple[str, ...]
    # Give a pending transfer chained behind another transfer the debit account of its
    # chain's first transfer (more chains then succeed); False draws them freely, so some
    # chains are refused by two_phase_transfers_in_chain_must_share_shard.
    holds_on_coordinator: bool = False

    def currency_of(self, account_id: int) -> str:
        if account_id in ACCOUNT_IDS:
            return self.currencies[ACCOUNT_IDS.index(account_id)]
        return "USD"


@dataclass
class History:
    """What the run has submitted, for references and replays."""

    next_id: int = 100
    transfers: list[Transfer] = field(default_factory=list)
    pending: list[Transfer] = field(default_factory=list)
    requests: list[tuple[list[Transfer], list[TransferResult]]] = field(default_factory=list)
    resolutions: dict[int, ResolutionRow] = field(default_factory=dict)

    def fresh_id(self) -> int:
        self.next_id += 1
        return self.next_id


# -- drawing a workload -----------------------------------------------------------------------

def _draw_transfer(
    data: st.DataObject, w: Workload, h: History, cluster: Cluster, *, duplicates: bool,
    last: bool,
) -> Transfer:
    kind = data.draw(st.sampled_from(KINDS))
    if kind == "again" and duplicates and h.transfers:
        earlier = data.draw(st.sampled_from(h.transfers))
        if data.draw(st.booleans()):
            earlier = Transfer(**{**_fields(earlier), "amount": earlier.amount % AMOUNT_MAX + 1})
        if not data.draw(st.sampled_from([True] * 5 + [False])):
            earlier = Transfer(**{**_fields(earlier),
                                  "tenant": data.draw(st.sampled_from(TRANSFER_TENANTS))})
        return earlier
    t = _draw_new_transfer(data, w, h, cluster, kind, last=last)
    tenant = data.draw(st.sampled_from(TRANSFER_TENANTS))
    if t.flags & PENDING:
        h.pending.remove(t)
        t = Transfer(**{**_fields(t), "tenant": tenant})
        h.pending.append(t)
        return t
    return Transfer(**{**_fields(t), "tenant": tenant})


def _draw_new_transfer(
    data: st.DataObject, w: Workload, h: History, cluster: Cluster, kind: str, *, last: bool,
) -> Transfer:
    tid = h.fresh_id()
    # A request mostly ends outside a chain, so chains are mostly closed.
    linked = data.draw(st.sampled_from([False, False, True]))
    if last:
        linked = linked and data.draw(st.sampled_from([False, False, False, True]))
    flags = LINKED if linked else 0
    if kind in ("post", "void") and h.pending:
        stored = [t for t in h.pending if t.id in cluster.store.transfers]
        target = data.draw(st.sampled_from(
            stored if stored and data.draw(st.sampled_from([True, True, True, False]))
            else h.pending
        ))
        amount = target.amount
        if kind == "post":
            amount = data.draw(st.sampled_from(
                sorted({target.amount, max(1, target.amount - 1), 1,
                        min(AMOUNT_MAX, target.amount + 1)})
            ))
        dr, cr = target.debit_account_id, target.credit_account_id
        if not data.draw(st.sampled_from([True, True, True, False])):
            dr = data.draw(st.sampled_from(ACCOUNT_CHOICES))
        return Transfer(
            id=tid, debit_account_id=dr, credit_account_id=cr, amount=amount,
            currency=target.currency, pending_id=target.id,
            flags=flags | (POST if kind == "post" else VOID),
        )
    dr = data.draw(st.sampled_from(ACCOUNT_CHOICES))
    cr = dr
    if data.draw(st.sampled_from([True] * 9 + [False])):
        cr = data.draw(st.sampled_from([a for a in ACCOUNT_CHOICES if a != dr]))
    currency = w.currency_of(dr)
    if not data.draw(st.sampled_from([True] * 19 + [False])):
        currency = "EUR" if currency == "USD" else "USD"
    amount = data.draw(AMOUNTS)
    if kind == "pending":
        timeout_s = data.draw(st.sampled_from([0, 0, 1, 3]))
        t = Transfer(id=tid, debit_account_id=dr, credit_account_id=cr, amount=amount,
                     currency=currency, flags=flags | PENDING, timeout_s=timeout_s)
        h.pending.append(t)
        return t
    return Transfer(id=tid, debit_account_id=dr, credit_account_id=cr, amount=amount,
                    currency=currency, flags=flags)


def _fields(t: Transfer) -> dict[str, object]:
    return {f: getattr(t, f) for f in t.__struct_fields__}


def _draw_batch(
    data: st.DataObject, w: Workload, h: History, cluster: Cluster
) -> list[list[Transfer]]:
    # Under the interleaved schedule one id may go to only one coordinator per batch
    # (ledger_sim's docstring), so no id repeats within a batch there.
    interleaved = cluster.interleaved
    used: set[int] = set()
    requests = []
    for _ in range(data.draw(st.integers(1, 3))):
        request = []
        size = data.draw(st.integers(1, 4))
        for i in range(size):
            t = _draw_transfer(data, w, h, cluster, duplicates=not interleaved,
                               last=i == size - 1)
            if t.id in used and interleaved:
                continue
            used.add(t.id)
            request.append(t)
        if request and w.holds_on_coordinator:
            request = _holds_on_coordinator(request, h, cluster)
        if request:
            requests.append(request)
    return requests


def _holds_on_coordinator(
    request: list[Transfer], h: History, cluster: Cluster
) -> list[Transfer]:
    """Give each pending transfer chained behind a transfer of another shard the debit
    account of its chain's first transfer, so the chain's coordinator owns the hold."""
    out = list(request)
    for start, end in chains_of(out):
        head = out[start].debit_account_id
        for k in range(start + 1, end):
            t = out[k]
            if t.flags & PENDING and cluster.shard_of(t.debit_account_id) != cluster.shard_of(head):
                out[k] = Transfer(**{**_fields(t), "debit_account_id": head})
                h.pending = [out[k] if p is t else p for p in h.pending]
    return out


# -- the invariants ---------------------------------------------------------------------------

def check_store(cluster: Cluster, h: History) -> None:
    """Double entry, rows equal postings, limits, and each hold resolved at most once."""
    store = cluster.store
    rows = list(store.accounts.values())
    assert sum(a.debits_posted for a in rows) == sum(a.credits_posted for a in rows)
    assert sum(a.debits_pending for a in rows) == sum(a.credits_pending for a in rows)
    assert postings_of(store) == {a.id: cluster.balances(a.id) for a in rows}
    for a in rows:
        if a.flags & DL:
            assert a.debits_pending + a.debits_posted <= a.credits_posted, a
        if a.flags & CL:
            assert a.credits_pending + a.credits_posted <= a.debits_posted, a
    assert not store.transfers.keys() & store.failed.keys()
    for pending_id, row in store.resolutions.items():
        assert store.transfers[pending_id].flags & PENDING
        if row.kind == Resolution.expired:
            assert row.transfer_id == 0
        else:
            resolving = store.transfers[row.transfer_id]
            assert resolving.pending_id == pending_id
            assert bool(resolving.flags & POST) == (row.kind == Resolution.posted)
    for t in store.transfers.values():
        if t.flags & (POST | VOID):
            assert store.resolutions[t.pending_id].transfer_id == t.id
        # A tenant's transfer names only its own tenant's accounts (and holds).
        if t.tenant:
            assert store.accounts[t.debit_account_id].tenant == t.tenant, t
            assert store.accounts[t.credit_account_id].tenant == t.tenant, t
            if t.pending_id:
                assert store.transfers[t.pending_id].tenant == t.tenant, t
    # A resolution, once written, never changes or disappears.
    for pending_id, row in h.resolutions.items():
        assert store.resolutions.get(pending_id) == row
    h.resolutions.update(store.resolutions)


def check_books(cluster: Cluster) -> None:
    """Every book equals the store for what it owns and holds nothing once all settled."""
    assert book_mismatches(cluster) == []
    for book in cluster.books:
        for pending_id in cluster.store.resolutions:
            assert pending_id not in book.pending


def _replayable(codes: list[TransferResult], request: list[Transfer]) -> bool:
    """False if a chain failed only through another item of its batch (every code
    linked_event_failed): such items were neither stored nor burned and may succeed now."""
    if R.not_applied in codes:  # not stored and not burned: it may be applied now
        return False
    for start, end in chains_of(request):
        if all(c == R.linked_event_failed for c in codes[start:end]):
            return False
    return True


def check_replay(cluster: Cluster, request: list[Transfer], codes: list[TransferResult]) -> None:
    """Replaying a processed request moves nothing and answers as a replay."""
    cluster.pulse()  # expire what is due first, so that only the replay could move money
    accounts = dict(cluster.store.accounts)
    transfers = dict(cluster.store.transfers)
    resolutions = dict(cluster.store.resolutions)
    again = cluster.create_transfers(request)
    for start, end in chains_of(request):
        before, after = codes[start:end], again[start:end]
        if all(c in SUCCESS for c in before):
            assert after == [R.exists] * (end - start), (before, after)
            continue
        assert all(c not in SUCCESS for c in after), (before, after)
        if end - start == 1:
            expected = R.id_already_failed if burns_id(before[0]) else before[0]
            assert after == [expected], (before, after)
    assert cluster.store.accounts == accounts
    assert cluster.store.transfers == transfers
    assert cluster.store.resolutions == resolutions


# -- the run ----------------------------------------------------------------------------------

def run(data: st.DataObject, shards: int, w: Workload, interleaved: bool,
        recent_ids_max: int, *, faults: bool = False,
        book_class: type[Book] = Book) -> None:
    cluster = Cluster(shards, recent_ids_max=recent_ids_max, interleaved=interleaved,
                      book_class=book_class)
    h = History()
    cluster.after_commit = lambda: check_store(cluster, h)
    accounts = [
        Account(id=i, currency=c, flags=f, tenant=tenant_of(i))
        for i, f, c in zip(ACCOUNT_IDS, w.flags, w.currencies, strict=True)
    ]
    assert all(c == 0 for c in cluster.create_accounts(accounts))
    funding = [
        Transfer(id=h.fresh_id(), debit_account_id=a.id if a.flags & CL else 1,
                 credit_account_id=1 if a.flags & CL else a.id, amount=FUNDING,
                 currency=a.currency)
        for a in accounts if a.flags and a.currency == "USD"
    ]
    assert cluster.create_transfers(funding) == [R.ok] * len(funding)
    check_store(cluster, h)
    if faults:
        cluster.reservation_fault = lambda coordinator, peer: data.draw(
            st.sampled_from([None, None, "answer_lost", "late", "never_sent"]),
            label="reservation fault")
    for _ in range(data.draw(st.integers(1, 10), label="steps")):
        step = data.draw(st.sampled_from(STEPS))
        if step == "batch":
            requests = _draw_batch(data, w, h, cluster)
            burned_before = set(cluster.store.failed)
            stored_before = set(cluster.store.transfers)
            results = cluster.submit(requests)
            for request, codes in zip(requests, results, strict=True):
                h.transfers.extend(request)
                h.requests.append((request, codes))
                for t, code in zip(request, codes, strict=True):
                    if code == R.not_applied:  # neither stored nor burned by this batch
                        assert t.id not in set(cluster.store.failed) - burned_before, t
                        assert t.id not in set(cluster.store.transfers) - stored_before, t
                    if code in SUCCESS:  # acknowledged: stored
                        assert t.id in cluster.store.transfers, (t, code)
                for start, end in chains_of(request):
                    # A chain a shard's failure left not applied is so as a whole.
                    if R.not_applied in codes[start:end]:
                        assert set(codes[start:end]) == {R.not_applied}, codes[start:end]
            again = [t for request, codes in zip(requests, results, strict=True)
                     for t, code in zip(request, codes, strict=True)
                     if code == R.not_applied]
            if again:
                # Sent again, chains whole: answered as transfers never seen before.
                codes = cluster.submit([again])[0]
                h.transfers.extend(again)
                h.requests.append((again, codes))
                for t, code in zip(again, codes, strict=True):
                    assert code != R.exists or t.id in stored_before, (t, code)
                    if code in SUCCESS:
                        assert t.id in cluster.store.transfers, (t, code)
        elif step == "advance":
            cluster.advance(seconds=data.draw(st.integers(1, 4)))
        elif step == "pulse":
            cluster.pulse()
        elif step == "recover":
            cluster.recover(data.draw(st.integers(0, shards - 1)))
        else:
            replayable = [(r, c) for r, c in h.requests if _replayable(c, r)]
            if replayable:
                check_replay(cluster, *data.draw(st.sampled_from(replayable)))
        check_store(cluster, h)
        check_books(cluster)
    cluster.advance(seconds=10)
    cluster.pulse()
    check_store(cluster, h)
    check_books(cluster)
    # Every timeout drawn is at most 3 s: ten seconds later each such hold is resolved.
    assert [t.id for t in cluster.store.open_pending() if t.timeout_s] == []


def full_workload(data: st.DataObject) -> Workload:
    """Account 1 is an unlimited USD source; the others get drawn flags; the last may be
    in EUR."""
    flags = (0, *(data.draw(st.sampled_from([0, DL, CL])) for _ in ACCOUNT_IDS[1:]))
    last = data.draw(st.sampled_from(["USD", "USD", "USD", "EUR"]))
    currencies = ("USD",) * (len(ACCOUNT_IDS) - 1) + (last,)
    return Workload(flags, currencies)


@pytest.mark.parametrize("shards", [1, 2, 3])
@SETTINGS
@given(data=st.data(), interleaved=st.booleans(), recent_ids_max=st.sampled_from([16, 1_024]))
def test_invariants(
    shards: int, data: st.DataObject, interleaved: bool, recent_ids_max: int
) -> None:
    """Any workload on one, two or three shards, under either schedule, keeps every store
    and book invariant and replays are no-ops."""
    run(data, shards, full_workload(data), interleaved and shards > 1, recent_ids_max)


@pytest.mark.parametrize("shards", [2, 3])
@SETTINGS
@given(data=st.data(), interleaved=st.booleans())
def test_invariants_when_reservations_fail(
    shards: int, data: st.DataObject, interleaved: bool
) -> None:
    """Reservation calls that fail (the answer lost, the call arriving after its cancel,
    or never sent) leave their legs ``not_applied``, cancelled on the peer: every store
    and book invariant still holds, nothing is held afterwards, and a ``not_applied``
    transfer is neither stored nor burned."""
    run(data, shards, full_workload(data), interleaved, 1_024, faults=True)


@pytest.mark.parametrize("shards", [2, 3])
@SETTINGS
@given(data=st.data(), interleaved=st.booleans())
def test_columnar_invariants_when_reservations_fail(
    shards: int, data: st.DataObject, interleaved: bool
) -> None:
    """The same over the columnar book, whose plain batches reserve hold blocks (every
    plain batch, or only those of ``plain_batch_min`` and more as the shards run)."""
    book_class = data.draw(st.sampled_from([ColumnarBook, ArrayBook]), label="book")
    run(data, shards, full_workload(data), interleaved, 1_024, faults=True,
        book_class=book_class)

