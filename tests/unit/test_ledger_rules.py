"""Result codes of processor.ledger.rules, one row per input, on one shard and across three."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from processor.codes import AccountResult, TransferResult, burns_id
from processor.ledger import Resolution
from processor.types import (
    AMOUNT_MAX,
    Account,
    AccountFlags,
    Transfer,
    TransferFlags,
)
from tests.unit.ledger_sim import (
    Cluster,
    _Work,
    account_ids_on_shards,
    book_mismatches,
)

R = TransferResult
A = AccountResult
DL = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CL = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)

# Where each named account lives when there are three shards: the payer side on shard 0
# (the coordinator of every transfer it debits), the payee side on shards 1 and 2. With one
# shard every account is local.
ACCOUNTS: dict[str, tuple[int, int, str]] = {
    "bank": (0, 0, "USD"),
    "payer": (0, 0, "USD"),
    "dl": (0, DL, "USD"),
    "cl_near": (0, CL, "USD"),
    "payee": (1, 0, "USD"),
    "cl": (1, CL, "USD"),
    "eur": (1, 0, "EUR"),
    "dl_far": (2, DL, "USD"),
    "other": (2, 0, "USD"),
}
MISSING = "missing"  # a name whose id no account is created with


@dataclass
class World:
    """A cluster with the named accounts created, and a transfer id counter."""

    cluster: Cluster
    ids: dict[str, int]
    next_id: int = 1_000

    def id(self) -> int:
        self.next_id += 1
        return self.next_id

    def t(self, dr: str, cr: str, amount: int = 10, **fields: Any) -> Transfer:
        """A transfer between named accounts; a fresh id unless ``id`` is given."""
        fields.setdefault("id", self.id())
        fields.setdefault("currency", "USD")
        return Transfer(
            debit_account_id=self.ids[dr], credit_account_id=self.ids[cr], amount=amount,
            **fields,
        )

    def submit(self, *transfers: Transfer) -> list[TransferResult]:
        return self.cluster.create_transfers(list(transfers))

    def ok(self, *transfers: Transfer) -> None:
        codes = self.submit(*transfers)
        assert codes == [R.ok] * len(transfers)

    def balances(self, name: str) -> tuple[int, int, int, int]:
        return self.cluster.balances(self.ids[name])


def world(shards: int) -> World:
    cluster = Cluster(shards)
    per_shard = account_ids_on_shards(cluster.partitions, len(ACCOUNTS) + 1)
    taken = [0] * shards
    ids: dict[str, int] = {}
    accounts = []
    for name, (shard, flags, currency) in ACCOUNTS.items():
        s = shard % shards
        ids[name] = per_shard[s][taken[s]]
        taken[s] += 1
        accounts.append(Account(id=ids[name], currency=currency, flags=flags))
    ids[MISSING] = per_shard[1 % shards][taken[1 % shards]]
    assert cluster.create_accounts(accounts) == [A.ok] * len(accounts)
    return World(cluster, ids)


def fund(w: World, name: str, amount: int) -> None:
    """Give a debit-limited account credits, or a credit-limited account debits."""
    if ACCOUNTS[name][1] & CL:
        w.ok(w.t(name, "bank", amount))
    else:
        w.ok(w.t("bank", name, amount))


def nothing_stored(w: World, transfer: Transfer) -> bool:
    return w.cluster.lookup_transfer(transfer.id) is None


SHARDS = pytest.mark.parametrize("shards", [1, 3])


# -- codes that depend only on the transfer's own fields ----------------------------------

EXCLUSIVE = R.flags_are_mutually_exclusive
STATIC_CASES = [
    ("id_zero", {"id": 0}, R.id_must_not_be_zero),
    ("flags_unknown", {"flags": 1 << 4}, R.flags_unknown),
    ("pending_and_post", {"flags": PENDING | POST, "pending_id": 1}, EXCLUSIVE),
    ("pending_and_void", {"flags": PENDING | VOID, "pending_id": 1}, EXCLUSIVE),
    ("post_and_void", {"flags": POST | VOID, "pending_id": 1}, EXCLUSIVE),
    ("debit_zero", {"debit_account_id": 0}, R.debit_account_id_must_not_be_zero),
    ("credit_zero", {"credit_account_id": 0}, R.credit_account_id_must_not_be_zero),
    ("same_accounts", {"credit_account_id": "payer"}, R.accounts_must_be_different),
    ("plain_with_pending_id", {"pending_id": 7}, R.pending_id_must_be_zero),
    ("pending_with_pending_id", {"flags": PENDING, "pending_id": 7}, R.pending_id_must_be_zero),
    ("post_without_pending_id", {"flags": POST}, R.pending_id_must_not_be_zero),
    ("void_without_pending_id", {"flags": VOID}, R.pending_id_must_not_be_zero),
    ("post_of_itself", {"flags": POST, "pending_id": "self"}, R.pending_id_must_be_different),
    ("plain_with_timeout", {"timeout_s": 5}, R.timeout_reserved_for_pending_transfer),
    ("post_with_timeout", {"flags": POST, "pending_id": 7, "timeout_s": 5},
     R.timeout_reserved_for_pending_transfer),
    ("amount_zero", {"amount": 0}, R.amount_must_not_be_zero),
    ("currency_unknown", {"currency": "ZZZ"}, R.currency_unknown),
    ("timestamp_nonzero", {"timestamp": 1}, R.timestamp_must_be_zero),
    # Precedence: with several rules broken the smallest code wins.
    ("id_zero_beats_amount_zero", {"id": 0, "amount": 0}, R.id_must_not_be_zero),
    ("flags_beat_accounts", {"flags": 1 << 5, "credit_account_id": "payer"}, R.flags_unknown),
    ("debit_zero_beats_credit_zero", {"debit_account_id": 0, "credit_account_id": 0},
     R.debit_account_id_must_not_be_zero),
    ("accounts_beat_timeout", {"credit_account_id": "payer", "timeout_s": 1},
     R.accounts_must_be_different),
    ("amount_beats_currency", {"amount": 0, "currency": "ZZZ"}, R.amount_must_not_be_zero),
]


def _static_transfer(w: World, fields: dict[str, Any]) -> Transfer:
    fields = dict(fields)
    tid = fields.pop("id", w.id())
    for key in ("debit_account_id", "credit_account_id"):
        if isinstance(fields.get(key), str):
            fields[key] = w.ids[fields[key]]
    if fields.get("pending_id") == "self":
        fields["pending_id"] = tid
    base = {"debit_account_id": w.ids["payer"], "credit_account_id": w.ids["payee"],
            "amount": 10, "currency": "USD"}
    return Transfer(id=tid, **{**base, **fields})


@SHARDS
@pytest.mark.parametrize(
    ("fields", "code"), [c[1:] for c in STATIC_CASES], ids=[c[0] for c in STATIC_CASES]
)
def test_static_code(shards: int, fields: dict[str, Any], code: TransferResult) -> None:
    """A transfer breaking a rule on its own fields gets that rule's code and writes nothing."""
    w = world(shards)
    before = dict(w.cluster.store.accounts)
    t = _static_transfer(w, fields)
    assert w.submit(t) == [code]
    assert not burns_id(code)
    assert w.cluster.store.accounts == before
    assert w.cluster.store.transfers == {}
    assert t.id not in w.cluster.store.failed
    assert book_mismatches(w.cluster) == []


@SHARDS
@pytest.mark.parametrize(
    "fields", [{"amount": 0}, {"currency": "ZZZ"}, {"timeout_s": 5}, {"timestamp": 1}],
    ids=["amount_zero", "currency_unknown", "timeout", "timestamp"],
)
def test_static_failure_burns_nothing(shards: int, fields: dict[str, Any]) -> None:
    """After a static failure the same id, with its fields fixed, succeeds."""
    w = world(shards)
    bad = _static_transfer(w, fields)
    assert w.submit(bad) != [R.ok]
    w.ok(w.t("payer", "payee", 10, id=bad.id))
    assert w.balances("payee") == (0, 0, 0, 10)


# -- exists and exists_with_different_* -----------------------------------------------------

# Each row changes the named field and every field after it in the documented comparison
# order, so the row's code proves the field comes first among those that differ.
EXISTS_CASES = [
    ("flags", "pending", {"flags": POST, "pending_id": 99, "timeout_s": 0, "amount": 6},
     R.exists_with_different_flags),
    ("pending_id", "post", {"pending_id": 99, "amount": 1, "user_data": "y"},
     R.exists_with_different_pending_id),
    ("timeout", "pending", {"timeout_s": 61, "debit_account_id": "other", "amount": 6},
     R.exists_with_different_timeout),
    ("debit_account_id", "pending",
     {"debit_account_id": "other", "credit_account_id": "bank", "amount": 6},
     R.exists_with_different_debit_account_id),
    ("credit_account_id", "pending", {"credit_account_id": "bank", "amount": 6},
     R.exists_with_different_credit_account_id),
    ("amount", "pending", {"amount": 6, "currency": "EUR"}, R.exists_with_different_amount),
    ("currency", "pending", {"currency": "EUR", "code": 2}, R.exists_with_different_currency),
    ("code", "pending", {"code": 2, "user_data": "y"}, R.exists_with_different_code),
    ("user_data", "pending", {"user_data": "y"}, R.exists_with_different_user_data),
    ("same", "pending", {}, R.exists),
    ("same_post", "post", {}, R.exists),
]


@SHARDS
@pytest.mark.parametrize("recovered", [False, True], ids=["remembered", "recovered"])
@pytest.mark.parametrize(
    ("base", "changes", "code"), [c[1:] for c in EXISTS_CASES], ids=[c[0] for c in EXISTS_CASES]
)
def test_exists_code(
    shards: int, recovered: bool, base: str, changes: dict[str, Any], code: TransferResult
) -> None:
    """Resubmitting a stored id reports the first differing field, or exists; nothing moves."""
    w = world(shards)
    pending = w.t("payer", "payee", 5, flags=PENDING, timeout_s=60, code=1, user_data="x")
    w.ok(pending)
    post = w.t("payer", "payee", 5, flags=POST, pending_id=pending.id, code=1, user_data="x")
    w.ok(post)
    stored = {"pending": pending, "post": post}[base]
    if recovered:
        for shard in range(shards):
            w.cluster.recover(shard)
    fields = {f: getattr(stored, f) for f in stored.__struct_fields__ if f != "timestamp"}
    for key, value in changes.items():
        fields[key] = w.ids[value] if key.endswith("account_id") else value
    before = dict(w.cluster.store.accounts)
    transfers = dict(w.cluster.store.transfers)
    assert w.submit(Transfer(**fields)) == [code]
    assert w.cluster.store.accounts == before
    assert w.cluster.store.transfers == transfers
    assert stored.id not in w.cluster.store.failed
    assert book_mismatches(w.cluster) == []


@SHARDS
@pytest.mark.parametrize("recovered", [False, True], ids=["remembered", "recovered"])
def test_id_already_failed_stays_burned_after_funds_arrive(shards: int, recovered: bool) -> None:
    """An id refused for exceeds_credits is burned: funding the account does not revive it."""
    w = world(shards)
    spend = w.t("dl", "payee", 10)
    assert w.submit(spend) == [R.exceeds_credits]
    assert w.cluster.store.failed == {spend.id: R.exceeds_credits}
    fund(w, "dl", 100)
    if recovered:
        for shard in range(shards):
            w.cluster.recover(shard)
    assert w.submit(spend) == [R.id_already_failed]
    # A different transfer under the burned id is refused as well, before its fields count.
    assert w.submit(w.t("payer", "payee", 1, id=spend.id)) == [R.id_already_failed]
    assert nothing_stored(w, spend)
    assert w.balances("dl") == (0, 0, 0, 100)
    assert book_mismatches(w.cluster) == []


# -- accounts, currency, limits and overflow -----------------------------------------------

LIMIT_CASES = [
    # (debit, credit, funding of the limited account, amount, code)
    ("missing_debit", MISSING, "payee", 0, 10, R.debit_account_not_found),
    ("missing_credit", "payer", MISSING, 0, 10, R.credit_account_not_found),
    ("missing_both", MISSING, "bank", 0, 10, R.debit_account_not_found),
    ("debit_currency", "eur", "payee", 0, 10, R.currency_mismatch),
    ("credit_currency", "payer", "eur", 0, 10, R.currency_mismatch),
    ("dl_within", "dl", "payee", 100, 100, R.ok),
    ("dl_beyond", "dl", "payee", 100, 101, R.exceeds_credits),
    ("dl_unfunded_one", "dl", "payee", 0, 1, R.exceeds_credits),
    ("dl_amount_max", "dl", "payee", 100, AMOUNT_MAX, R.exceeds_credits),
    ("cl_within", "payer", "cl", 100, 100, R.ok),
    ("cl_beyond", "payer", "cl", 100, 101, R.exceeds_debits),
    ("cl_unfunded_one", "payer", "cl", 0, 1, R.exceeds_debits),
    ("cl_local_beyond", "payer", "cl_near", 100, 101, R.exceeds_debits),
    ("dl_credit_side_free", "payer", "dl", 0, 10, R.ok),
    ("cl_debit_side_free", "cl", "payer", 0, 10, R.ok),
    # Both limits broken: the debit's exceeds_credits precedes exceeds_debits.
    ("dl_and_cl", "dl", "cl", 0, 10, R.exceeds_credits),
]


@SHARDS
@pytest.mark.parametrize(
    ("dr", "cr", "funding", "amount", "code"),
    [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES],
)
def test_account_and_limit_code(
    shards: int, dr: str, cr: str, funding: int, amount: int, code: TransferResult
) -> None:
    """A plain transfer gets its account, currency or limit code; only ok moves money."""
    w = world(shards)
    if funding:
        fund(w, dr if dr == "dl" else cr, funding)
    before = {name: w.balances(name) for name in ("payer", "payee", "dl", "cl", "cl_near")}
    t = w.t(dr, cr, amount, currency="EUR" if dr == "eur" else "USD")
    assert w.submit(t) == [code]
    if code == R.ok:
        assert w.cluster.lookup_transfer(t.id) is not None
        assert w.balances(dr)[1] == before[dr][1] + amount
        assert w.balances(cr)[3] == before[cr][3] + amount
    else:
        assert nothing_stored(w, t)
        assert {name: w.balances(name) for name in before} == before
        assert w.cluster.store.failed[t.id] == code


def test_debit_limit_holds_on_a_remote_debit_leg() -> None:
    """A chained transfer debiting a limited account on another shard is checked there."""
    w = world(3)
    fund(w, "dl_far", 50)
    first = w.t("payer", "payee", 1, flags=LINKED)
    beyond = w.t("dl_far", "other", 51)
    assert w.submit(first, beyond) == [R.linked_event_failed, R.exceeds_credits]
    assert nothing_stored(w, first)
    assert w.balances("dl_far") == (0, 0, 0, 50)
    w.ok(w.t("payer", "payee", 1, flags=LINKED), w.t("dl_far", "other", 50))
    assert w.balances("dl_far") == (0, 50, 0, 50)


def test_a_hold_granted_to_another_shard_counts_against_local_transfers() -> None:
    """While a remote coordinator holds part of a limited account's funds, the account's own
    shard refuses a local debit that only the held funds could cover, and accepts it once
    the hold is dropped."""
    w = world(3)
    fund(w, "dl_far", 100)
    c = w.cluster
    chain = [w.t("payer", "payee", 1, flags=LINKED), w.t("dl_far", "other", 60)]
    work = _Work(shard=c.partitions.coordinator_of(
        [t.debit_account_id for t in chain], [t.flags for t in chain]))
    assert work.shard != c.shard_of(w.ids["dl_far"])
    work.remaining = [chain]
    c._plan(work)
    c._reserve(work)  # dl_far's shard now holds 60 for the chain
    assert c.create_transfers([w.t("dl_far", "other", 41)]) == [R.exceeds_credits]
    c._finalize(work)
    for batch in work.batches:
        c._commit(work.shard, batch)
    assert work.codes == [R.ok, R.ok]
    assert w.balances("dl_far") == (0, 60, 0, 100)
    w.ok(w.t("dl_far", "other", 40))
    assert book_mismatches(c) == []


def test_a_remote_coordinator_sees_uncommitted_local_debits() -> None:
    """A limited account's shard grants another shard's debit only against what its own
    uncommitted debits leave, because the two commit independently."""
    w = world(3)
    fund(w, "dl_far", 100)
    c = w.cluster
    local = _Work(shard=c.shard_of(w.ids["dl_far"]))
    local.remaining = [[w.t("dl_far", "other", 60)]]
    c._plan(local)
    c._reserve(local)
    c._finalize(local)  # evaluated, not yet committed
    chain = [w.t("payer", "payee", 1, flags=LINKED), w.t("dl_far", "other", 41)]
    assert c.create_transfers(chain) == [R.linked_event_failed, R.exceeds_credits]
    for batch in local.batches:
        c._commit(local.shard, batch)
    assert local.codes == [R.ok]
    assert w.balances("dl_far") == (0, 60, 0, 100)
    assert book_mismatches(c) == []


def test_pending_hold_on_a_remote_credit_account_counts_against_its_limit() -> None:
    """A pending credit to a remote credit-limited account uses up its limit while held."""
    w = world(3)
    fund(w, "cl", 100)
    w.ok(w.t("payer", "cl", 70, flags=PENDING))
    assert w.submit(w.t("payer", "cl", 31)) == [R.exceeds_debits]
    w.ok(w.t("payer", "cl", 30))
    assert w.balances("cl") == (0, 100, 70, 30)


OVERFLOW_CASES = [
    # (first transfer fills a balance with AMOUNT_MAX, second adds 1, code of the second)
    ("debits_posted", ("payer", "payee", 0), ("payer", "other", 0), R.overflows_debits_posted),
    ("credits_posted", ("payer", "payee", 0), ("other", "payee", 0),
     R.overflows_credits_posted),
    ("debits_pending", ("payer", "payee", PENDING), ("payer", "other", PENDING),
     R.overflows_debits_pending),
    ("credits_pending", ("payer", "payee", PENDING), ("other", "payee", PENDING),
     R.overflows_credits_pending),
    ("debits", ("payer", "payee", 0), ("payer", "other", PENDING), R.overflows_debits),
    ("credits", ("payer", "payee", 0), ("other", "payee", PENDING), R.overflows_credits),
    ("debits_pending_then_posted", ("payer", "payee", PENDING), ("payer", "other", 0),
     R.overflows_debits),
]


@SHARDS
@pytest.mark.parametrize(
    ("first", "second", "code"), [c[1:] for c in OVERFLOW_CASES],
    ids=[c[0] for c in OVERFLOW_CASES],
)
def test_overflow_code(
    shards: int, first: tuple[str, str, int], second: tuple[str, str, int], code: TransferResult
) -> None:
    """A balance at AMOUNT_MAX refuses one more unit with the overflow code of that balance."""
    w = world(shards)
    w.ok(w.t(first[0], first[1], AMOUNT_MAX, flags=first[2]))
    before = dict(w.cluster.store.accounts)
    t = w.t(second[0], second[1], 1, flags=second[2])
    assert w.submit(t) == [code]
    assert w.cluster.store.accounts == before
    assert nothing_stored(w, t)


# -- pending transfers ------------------------------------------------------------------------

@SHARDS
def test_pending_hold_counts_against_the_debit_limit(shards: int) -> None:
    """A pending debit uses up a debit-limited account's credits until it is resolved."""
    w = world(shards)
    fund(w, "dl", 100)
    w.ok(w.t("dl", "payee", 70, flags=PENDING))
    assert w.submit(w.t("dl", "payee", 31)) == [R.exceeds_credits]
    w.ok(w.t("dl", "payee", 30))
    assert w.balances("dl") == (70, 30, 0, 100)
    assert book_mismatches(w.cluster) == []


@SHARDS
def test_partial_post_releases_the_remainder(shards: int) -> None:
    """Posting 50 of a 70 hold posts 50 on both sides and frees the other 20 of the limit."""
    w = world(shards)
    fund(w, "dl", 100)
    hold = w.t("dl", "payee", 70, flags=PENDING)
    w.ok(hold)
    w.ok(w.t("dl", "payee", 50, flags=POST, pending_id=hold.id))
    assert w.balances("dl") == (0, 50, 0, 100)
    assert w.balances("payee") == (0, 0, 0, 50)
    assert w.cluster.resolution_of(hold.id) == Resolution.posted
    assert w.submit(w.t("dl", "payee", 51)) == [R.exceeds_credits]
    w.ok(w.t("dl", "payee", 50))
    assert book_mismatches(w.cluster) == []


PENDING_REFERENCE_CASES = [
    # (what happened to the hold first, the resolving transfer's changes, code)
    ("post_more_than_held", None, {"flags": POST, "amount": 71},
     R.exceeds_pending_transfer_amount),
    ("post_amount_max", None, {"flags": POST, "amount": AMOUNT_MAX},
     R.exceeds_pending_transfer_amount),
    ("void_different_amount", None, {"flags": VOID, "amount": 69},
     R.pending_transfer_has_different_amount),
    ("post_different_debit", None, {"flags": POST, "dr": "bank"},
     R.pending_transfer_has_different_debit_account_id),
    ("post_different_credit", None, {"flags": POST, "cr": "other"},
     R.pending_transfer_has_different_credit_account_id),
    ("post_different_currency", None, {"flags": POST, "currency": "EUR"},
     R.pending_transfer_has_different_currency),
    ("post_twice", POST, {"flags": POST}, R.pending_transfer_already_posted),
    ("void_after_post", POST, {"flags": VOID}, R.pending_transfer_already_posted),
    ("post_after_void", VOID, {"flags": POST}, R.pending_transfer_already_voided),
    ("void_twice", VOID, {"flags": VOID}, R.pending_transfer_already_voided),
    ("post_of_plain", "plain", {"flags": POST}, R.pending_transfer_not_pending),
    ("void_of_plain", "plain", {"flags": VOID}, R.pending_transfer_not_pending),
    ("post_of_unknown", "unknown", {"flags": POST}, R.pending_transfer_not_found),
    ("void_of_unknown", "unknown", {"flags": VOID}, R.pending_transfer_not_found),
    # Field mismatches are reported before the hold's state.
    ("post_twice_different_credit", POST, {"flags": POST, "cr": "other"},
     R.pending_transfer_has_different_credit_account_id),
]


@SHARDS
@pytest.mark.parametrize("recovered", [False, True], ids=["remembered", "recovered"])
@pytest.mark.parametrize(
    ("before", "changes", "code"), [c[1:] for c in PENDING_REFERENCE_CASES],
    ids=[c[0] for c in PENDING_REFERENCE_CASES],
)
def test_pending_reference_code(
    shards: int, recovered: bool, before: object, changes: dict[str, Any], code: TransferResult
) -> None:
    """A post or void that may not resolve its pending transfer gets that rule's code."""
    w = world(shards)
    held = w.t("payer", "payee", 70, flags=0 if before == "plain" else PENDING)
    w.ok(held)
    if before in (POST, VOID):
        w.ok(w.t("payer", "payee", 70, flags=before, pending_id=held.id))
    if recovered:
        for shard in range(shards):
            w.cluster.recover(shard)
    snapshot = dict(w.cluster.store.accounts)
    resolutions = dict(w.cluster.store.resolutions)
    changes = dict(changes)
    t = w.t(
        changes.pop("dr", "payer"), changes.pop("cr", "payee"), changes.pop("amount", 70),
        pending_id=held.id + (10**6 if before == "unknown" else 0), **changes,
    )
    assert w.submit(t) == [code]
    assert w.cluster.store.accounts == snapshot
    assert w.cluster.store.resolutions == resolutions
    assert w.cluster.store.failed[t.id] == code
    assert book_mismatches(w.cluster) == []


@SHARDS
@pytest.mark.parametrize("kind", ["post", "void", "pulse"])
def test_pending_expires_after_its_timeout(shards: int, kind: str) -> None:
    """From timestamp + timeout_s on, a hold is expired: released on both accounts, never
    postable or voidable; one nanosecond earlier it still is."""
    w = world(shards)
    fund(w, "dl", 100)
    hold = w.t("dl", "payee", 70, flags=PENDING, timeout_s=5)
    w.ok(hold)
    timestamp = w.cluster.store.transfers[hold.id].timestamp
    w.cluster.now_ns = timestamp + 5 * 10**9 - 1
    w.cluster.pulse()
    assert w.balances("dl") == (70, 0, 0, 100)
    assert w.balances("payee") == (0, 0, 70, 0)
    w.cluster.advance(ns=1)
    if kind == "pulse":
        w.cluster.pulse()
    else:
        flags = POST if kind == "post" else VOID
        resolve = w.t("dl", "payee", 70, flags=flags, pending_id=hold.id)
        assert w.submit(resolve) == [R.pending_transfer_expired]
        assert w.cluster.store.failed[resolve.id] == R.pending_transfer_expired
    assert w.cluster.resolution_of(hold.id) == Resolution.expired
    assert w.balances("dl") == (0, 0, 0, 100)
    assert w.balances("payee") == (0, 0, 0, 0)
    # The released 70 can be spent again.
    w.ok(w.t("dl", "payee", 100))
    assert book_mismatches(w.cluster) == []


@SHARDS
def test_expired_hold_stays_expired_after_recovery(shards: int) -> None:
    """A recovered shard answers pending_transfer_expired from the stored resolution."""
    w = world(shards)
    hold = w.t("payer", "payee", 5, flags=PENDING, timeout_s=1)
    w.ok(hold)
    w.cluster.advance(seconds=2)
    w.cluster.pulse()
    for shard in range(shards):
        w.cluster.recover(shard)
    assert w.submit(w.t("payer", "payee", 5, flags=VOID, pending_id=hold.id)) == [
        R.pending_transfer_expired
    ]
    assert book_mismatches(w.cluster) == []


@SHARDS
def test_open_hold_expires_after_recovery(shards: int) -> None:
    """A hold still open when its shard recovers is expired by the new incarnation."""
    w = world(shards)
    hold = w.t("payer", "payee", 5, flags=PENDING, timeout_s=1)
    w.ok(hold)
    w.cluster.recover(w.cluster.shard_of(w.ids["payer"]))
    w.cluster.advance(seconds=2)
    w.cluster.pulse()
    assert w.cluster.resolution_of(hold.id) == Resolution.expired
    assert w.balances("payer") == (0, 0, 0, 0)
    assert w.balances("payee") == (0, 0, 0, 0)
    assert book_mismatches(w.cluster) == []


# -- linked chains --------------------------------------------------------------------------

# A breaker replaces one item of the chain below; "remote" marks those refused by a shard
# other than the coordinator when there are three shards.
CHAIN_BREAKERS: dict[str, tuple[dict[str, Any], TransferResult, bool]] = {
    "exceeds_credits": ({"debit_account_id": "dl", "amount": 1}, R.exceeds_credits, False),
    "amount_zero": ({"amount": 0}, R.amount_must_not_be_zero, False),
    "credit_not_found": ({"credit_account_id": MISSING}, R.credit_account_not_found, True),
    "remote_exceeds_debits": ({"credit_account_id": "cl"}, R.exceeds_debits, True),
}
CHAIN_CASES = [
    pytest.param(
        shards, position, breaker,
        id=f"{shards}-{breaker}-at-{position}",
    )
    for shards in (1, 3)
    for breaker in CHAIN_BREAKERS
    for position in (0, 1, 3)
]


@pytest.mark.parametrize(("shards", "position", "breaker"), CHAIN_CASES)
def test_chain_fails_whole(shards: int, position: int, breaker: str) -> None:
    """One failing item keeps its code, the rest get linked_event_failed, the earlier items'
    effects are rolled back, and every book ends as it began."""
    w = world(shards)
    chain = [
        w.t("payer", "payee", 5, flags=LINKED),
        w.t("payer", "other", 6, flags=LINKED),
        w.t("bank", "payee", 7, flags=LINKED),
        w.t("bank", "other", 8),
    ]
    changes, code, _remote = CHAIN_BREAKERS[breaker]
    fields = {f: getattr(chain[position], f) for f in chain[position].__struct_fields__}
    for key, value in changes.items():
        fields[key] = w.ids[value] if key.endswith("account_id") else value
    chain[position] = Transfer(**fields)
    before = dict(w.cluster.store.accounts)
    expected = [R.linked_event_failed] * len(chain)
    expected[position] = code
    assert w.submit(*chain) == expected
    assert w.cluster.store.accounts == before
    assert all(nothing_stored(w, t) for t in chain)
    assert set(w.cluster.store.failed) == ({chain[position].id} if burns_id(code) else set())
    assert book_mismatches(w.cluster) == []


FUNDING_CHAINS = [
    # (funding transfer, spending transfer): the spender has nothing before the chain.
    ("local", ("bank", "dl"), ("dl", "payer")),
    ("remote_credit", ("bank", "dl"), ("dl", "payee")),
    ("remote_debit_limited", ("payer", "dl_far"), ("dl_far", "other")),
    ("remote_credit_limited", ("cl", "payer"), ("payer", "cl")),
]


@SHARDS
@pytest.mark.parametrize(
    ("funding", "spending"), [c[1:] for c in FUNDING_CHAINS], ids=[c[0] for c in FUNDING_CHAINS]
)
def test_chain_sees_its_earlier_items(
    shards: int, funding: tuple[str, str], spending: tuple[str, str]
) -> None:
    """A chain's later item may use the limit its earlier item posted, wherever the accounts
    live; one unit more than posted fails the whole chain."""
    w = world(shards)
    limited = "dl" if "dl" in funding else "dl_far" if "dl_far" in funding else "cl"
    before = w.balances(limited)
    chain = [w.t(*funding, 40, flags=LINKED), w.t(*spending, 41)]
    assert w.submit(*chain) == [R.linked_event_failed, R.exceeds_credits if limited != "cl"
                                else R.exceeds_debits]
    assert w.balances(limited) == before
    w.ok(w.t(*funding, 40, flags=LINKED), w.t(*spending, 40))
    assert w.balances(limited) == (0, 40, 0, 40)
    assert book_mismatches(w.cluster) == []


@SHARDS
@pytest.mark.parametrize("length", [1, 3])
def test_chain_open_at_end_of_request(shards: int, length: int) -> None:
    """A request ending inside a chain: its last item is linked_event_chain_open, the rest of
    the chain linked_event_failed, and the request's earlier chains and the next request
    are unaffected."""
    w = world(shards)
    before_chain = w.t("payer", "payee", 1)
    chain = [w.t("payer", "payee", 2, flags=LINKED) for _ in range(length)]
    next_request = [w.t("payer", "other", 3)]
    codes = w.cluster.submit([[before_chain, *chain], next_request])
    assert codes == [
        [R.ok, *[R.linked_event_failed] * (length - 1), R.linked_event_chain_open],
        [R.ok],
    ]
    assert all(nothing_stored(w, t) for t in chain)
    assert w.balances("payer") == (0, 4, 0, 0)
    assert book_mismatches(w.cluster) == []


def test_refused_remote_leg_fails_the_whole_chain() -> None:
    """A credit-limited account on another shard refusing its leg fails every chained item,
    stores nothing and leaves the remote shards' balances and grants as they were."""
    w = world(3)
    fund(w, "cl", 10)
    before = dict(w.cluster.store.accounts)
    chain = [
        w.t("payer", "payee", 5, flags=LINKED),
        w.t("payer", "other", 5, flags=LINKED),
        w.t("payer", "cl", 11),
    ]
    assert w.submit(*chain) == [R.linked_event_failed, R.linked_event_failed, R.exceeds_debits]
    assert w.cluster.store.accounts == before
    assert all(nothing_stored(w, t) for t in chain)
    assert w.cluster.store.failed[chain[2].id] == R.exceeds_debits
    for shard in (1, 2):
        assert w.cluster.books[shard].holds == {}
    payee = w.cluster.books[1].accounts[w.ids["payee"]]
    assert (payee.reserved_credits, payee.credits_posted) == (0, 0)
    w.ok(w.t("payer", "cl", 10))


# -- remote refusals and what depends on them ---------------------------------------------

def test_refused_remote_leg_releases_the_coordinators_hold() -> None:
    """After a remote refusal the coordinator's hold on the debit account is released, so a
    debit-limited account can still spend its whole balance."""
    w = world(3)
    fund(w, "dl", 100)
    assert w.submit(w.t("dl", "cl", 60)) == [R.exceeds_debits]
    assert book_mismatches(w.cluster) == []
    w.ok(w.t("dl", "payee", 100))


def test_refused_remote_pending_leaves_no_open_hold() -> None:
    """A pending transfer refused by its remote credit account is not open afterwards: its
    timeout expires nothing and a post of it is pending_transfer_not_found."""
    w = world(3)
    hold = w.t("payer", "cl", 60, flags=PENDING, timeout_s=5)
    assert w.submit(hold) == [R.exceeds_debits]
    assert book_mismatches(w.cluster) == []
    w.cluster.advance(seconds=10)
    w.cluster.pulse()
    assert w.cluster.resolution_of(hold.id) is None
    assert w.balances("payer") == (0, 0, 0, 0)
    post = w.t("payer", "cl", 60, flags=POST, pending_id=hold.id)
    assert w.submit(post) == [R.pending_transfer_not_found]


def test_void_after_a_rolled_back_post_of_the_same_batch() -> None:
    """A void following, in one batch, a post that a remote refusal rolls back finds the
    hold open and voids it (not pending_transfer_already_posted)."""
    w = world(3)
    fund(w, "cl", 1)
    hold = w.t("payer", "bank", 60, flags=PENDING)
    w.ok(hold)
    post = w.t("payer", "bank", 60, flags=POST | LINKED, pending_id=hold.id)
    refused = w.t("payer", "cl", 5)
    void = w.t("payer", "bank", 60, flags=VOID, pending_id=hold.id)
    codes = w.cluster.submit([[post, refused], [void]])
    assert codes == [[R.linked_event_failed, R.exceeds_debits], [R.ok]]
    assert w.cluster.store.resolutions[hold.id].transfer_id == void.id
    assert w.balances("payer") == (0, 0, 0, 0)
    assert book_mismatches(w.cluster) == []


def test_id_of_a_rolled_back_transfer_is_free_later_in_the_batch() -> None:
    """An id whose transfer a remote refusal rolls back is evaluated afresh by a later item
    of the same batch (not answered exists_with_different_*)."""
    w = world(3)
    first = w.t("payer", "payee", 1, flags=LINKED)
    refused = w.t("payer", "cl", 5)
    again = w.t("payer", "payee", 2, id=first.id)
    codes = w.cluster.submit([[first, refused], [again]])
    assert codes == [[R.linked_event_failed, R.exceeds_debits], [R.ok]]
    assert w.cluster.store.transfers[first.id].amount == 2
    assert book_mismatches(w.cluster) == []


def test_pending_chained_behind_another_shard_is_held_by_its_debit_account_shard() -> None:
    """A pending transfer chained after a transfer of another shard is coordinated, and so
    held, by the shard of its debit account, which can then post it."""
    w = world(3)
    first = w.t("payee", "other", 1, flags=LINKED)  # its own debit lives on shard 1
    hold = w.t("payer", "other", 5, flags=PENDING)  # the chain goes to shard 0, the payer's
    w.ok(first, hold)
    assert book_mismatches(w.cluster) == []
    w.ok(w.t("payer", "other", 5, flags=POST, pending_id=hold.id))
    assert w.balances("payer") == (0, 5, 0, 0)


def test_holds_of_one_chain_on_two_shards_are_refused_whole() -> None:
    """A chain with holds whose debit accounts live on two shards is refused, writing
    nothing and burning no id (the rule depends only on the transfers' own fields)."""
    w = world(3)
    here = w.t("payer", "other", 5, flags=PENDING | LINKED)
    there = w.t("payee", "other", 5, flags=PENDING)
    assert w.submit(here, there) == [R.linked_event_failed,
                                     R.two_phase_transfers_in_chain_must_share_shard]
    assert w.balances("payee") == (0, 0, 0, 0)
    assert w.balances("payer") == (0, 0, 0, 0)
    w.ok(w.t("payee", "other", 5, flags=PENDING, id=there.id))


# -- accounts ---------------------------------------------------------------------------------

ACCOUNT_CASES = [
    ("ok", {}, A.ok),
    ("id_zero", {"id": 0}, A.id_must_not_be_zero),
    ("flags_unknown", {"flags": 1 << 3}, A.flags_unknown),
    ("flags_exclusive", {"flags": DL | CL}, A.flags_are_mutually_exclusive),
    ("currency_unknown", {"currency": "ZZZ"}, A.currency_unknown),
    ("debits_pending", {"debits_pending": 1}, A.debits_pending_must_be_zero),
    ("debits_posted", {"debits_posted": 1}, A.debits_posted_must_be_zero),
    ("credits_pending", {"credits_pending": 1}, A.credits_pending_must_be_zero),
    ("credits_posted", {"credits_posted": AMOUNT_MAX}, A.credits_posted_must_be_zero),
    ("timestamp", {"timestamp": 1}, A.timestamp_must_be_zero),
    # Precedence among static rules.
    ("id_beats_flags", {"id": 0, "flags": DL | CL}, A.id_must_not_be_zero),
    ("unknown_beats_exclusive", {"flags": DL | CL | 1 << 3}, A.flags_unknown),
    ("currency_beats_balances", {"currency": "ZZZ", "debits_pending": 1}, A.currency_unknown),
    ("debits_pending_first", {"credits_posted": 1, "debits_pending": 1},
     A.debits_pending_must_be_zero),
]


@SHARDS
@pytest.mark.parametrize(
    ("fields", "code"), [c[1:] for c in ACCOUNT_CASES], ids=[c[0] for c in ACCOUNT_CASES]
)
def test_account_code(shards: int, fields: dict[str, Any], code: AccountResult) -> None:
    """A new account breaking a rule gets that rule's code and is not stored."""
    cluster = Cluster(shards)
    account = Account(**{"id": 77, "currency": "USD", "flags": DL, **fields})
    assert cluster.create_accounts([account]) == [code]
    stored = cluster.lookup_account(account.id)
    if code == A.ok:
        assert stored is not None
        assert (stored.flags, stored.currency, stored.timestamp) == (DL, "USD", cluster.now_ns)
    else:
        assert stored is None


# Each row changes the named field and every later one, proving the comparison order.
ACCOUNT_EXISTS_CASES = [
    ("flags", {"flags": CL, "currency": "EUR", "code": 2, "user_data": "y"},
     A.exists_with_different_flags),
    ("currency", {"currency": "EUR", "code": 2, "user_data": "y"},
     A.exists_with_different_currency),
    ("code", {"code": 2, "user_data": "y"}, A.exists_with_different_code),
    ("user_data", {"user_data": "y"}, A.exists_with_different_user_data),
    ("same", {}, A.exists),
]


@SHARDS
@pytest.mark.parametrize("recovered", [False, True], ids=["remembered", "recovered"])
@pytest.mark.parametrize(
    ("changes", "code"), [c[1:] for c in ACCOUNT_EXISTS_CASES],
    ids=[c[0] for c in ACCOUNT_EXISTS_CASES],
)
def test_account_exists_code(
    shards: int, recovered: bool, changes: dict[str, Any], code: AccountResult
) -> None:
    """Creating a stored account id again reports the first differing field, or exists."""
    cluster = Cluster(shards)
    original = Account(id=77, currency="USD", flags=DL, code=1, user_data="x")
    assert cluster.create_accounts([original]) == [A.ok]
    if recovered:
        for shard in range(shards):
            cluster.recover(shard)
    stored = cluster.lookup_account(77)
    again = Account(**{**{"id": 77, "currency": "USD", "flags": DL, "code": 1,
                          "user_data": "x"}, **changes})
    assert cluster.create_accounts([again]) == [code]
    assert cluster.lookup_account(77) == stored


@SHARDS
def test_account_repeated_in_one_request(shards: int) -> None:
    """The second of two creations of one id in a request is compared with the first."""
    cluster = Cluster(shards)
    a = Account(id=77, currency="USD")
    assert cluster.create_accounts([a, a, Account(id=77, currency="EUR")]) == [
        A.ok, A.exists, A.exists_with_different_currency
    ]


# -- tenants -----------------------------------------------------------------------------------

T1, T2 = 101, 202


def tenant_world(shards: int) -> tuple[Cluster, dict[str, int]]:
    """Accounts of two tenants, spread over the shards: a1, a2 of T1 (a2 on the last shard),
    b1 of T2, and the processor's own p (tenant 0)."""
    cluster = Cluster(shards)
    per_shard = account_ids_on_shards(cluster.partitions, 4)
    ids = {"a1": per_shard[0][0], "a2": per_shard[-1][1], "b1": per_shard[-1][2],
           "p": per_shard[0][3]}
    owners = {"a1": T1, "a2": T1, "b1": T2, "p": 0}
    assert cluster.create_accounts([Account(id=ids[n], currency="USD", tenant=owners[n])
                                    for n in ids]) == [A.ok] * 4
    return cluster, ids


@SHARDS
def test_a_tenant_moves_only_its_own_accounts(shards: int) -> None:
    """Another tenant's account, or the processor's, is answered as a missing account on
    either side (and burns the id, as a missing account does); the processor's own
    transfers may name any account."""
    cluster, ids = tenant_world(shards)

    def t(tid: int, dr: str, cr: str, tenant: int, **fields: Any) -> Transfer:
        return Transfer(id=tid, debit_account_id=ids[dr], credit_account_id=ids[cr],
                        amount=5, currency="USD", tenant=tenant, **fields)

    assert cluster.create_transfers([t(1, "a1", "a2", T1)]) == [R.ok]
    assert cluster.create_transfers([t(2, "b1", "a2", T1)]) == [R.debit_account_not_found]
    assert cluster.create_transfers([t(3, "a1", "b1", T1)]) == [R.credit_account_not_found]
    assert cluster.create_transfers([t(4, "p", "a1", T1)]) == [R.debit_account_not_found]
    assert cluster.create_transfers([t(5, "a1", "p", T1)]) == [R.credit_account_not_found]
    assert cluster.create_transfers([t(6, "a1", "a2", T2)]) == [R.debit_account_not_found]
    assert cluster.create_transfers([t(2, "a1", "a2", T1)]) == [R.id_already_failed]
    assert cluster.create_transfers([t(7, "p", "b1", 0), t(8, "a2", "p", 0)]) == [R.ok] * 2
    assert cluster.lookup_transfer(1).tenant == T1
    assert cluster.lookup_transfer(7).tenant == 0


@SHARDS
def test_another_tenants_ids_and_holds_reveal_nothing(shards: int) -> None:
    """A transfer id another tenant stored answers exists_with_different_tenant whatever
    the fields; its hold cannot be posted or voided (pending_transfer_not_found); an
    account id another tenant holds answers exists_with_different_tenant."""
    cluster, ids = tenant_world(shards)
    hold = Transfer(id=10, debit_account_id=ids["a1"], credit_account_id=ids["a2"],
                    amount=5, currency="USD", flags=PENDING, tenant=T1)
    assert cluster.create_transfers([hold]) == [R.ok]
    assert cluster.create_transfers([msgspec_replace(hold, tenant=T2)]) == \
        [R.exists_with_different_tenant]
    assert cluster.create_transfers([msgspec_replace(hold, tenant=T2, amount=6)]) == \
        [R.exists_with_different_tenant]
    assert cluster.create_transfers([hold]) == [R.exists]
    void = Transfer(id=11, debit_account_id=ids["a1"], credit_account_id=ids["a2"], amount=5,
                    currency="USD", flags=VOID, pending_id=10, tenant=T2)
    assert cluster.create_transfers([void]) == [R.pending_transfer_not_found]
    assert cluster.create_transfers([msgspec_replace(void, id=12, tenant=T1)]) == [R.ok]
    assert cluster.create_accounts([Account(id=ids["a1"], currency="EUR", tenant=T2)]) == \
        [A.exists_with_different_tenant]
    assert cluster.create_accounts([Account(id=ids["a1"], currency="USD", tenant=T1)]) == \
        [A.exists]


def msgspec_replace(t: Transfer, **fields: Any) -> Transfer:
    return msgspec.structs.replace(t, **fields)


def test_an_answer_from_the_database_keeps_tenants_apart() -> None:
    """When a shard cannot answer and the front reads a stored transfer back
    (``compare_existing``, docs/api.md "Partial answers"), another tenant's transfer under
    the same id is exists_with_different_tenant, identical fields or not."""
    from processor.ledger import compare_existing

    stored = Transfer(id=5, debit_account_id=1, credit_account_id=2, amount=3,
                      currency="USD", tenant=T1, timestamp=9)
    mine = msgspec_replace(stored, timestamp=0)
    assert compare_existing(mine, stored) == R.exists
    assert compare_existing(msgspec_replace(mine, tenant=T2), stored) == \
        R.exists_with_different_tenant
    assert compare_existing(msgspec_replace(mine, tenant=T2, amount=4), stored) == \
        R.exists_with_different_tenant
