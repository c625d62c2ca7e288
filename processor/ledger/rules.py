"""The ledger rules of one shard, as pure functions over in-memory state.

A ``Book`` holds what one shard owns: its accounts with their balances, its open pending
transfers, the holds it granted, and a bounded cache of recent transfer ids. It has no
clock, no database and no Ray: callers pass ``now_ns`` and the rows they fetched.

Every transfer is two legs, a debit leg on the debit account and a credit leg on the credit
account. A leg is *local* when its account belongs to this shard and *remote* otherwise.
A transfer (or a linked chain) with any remote leg is *distributed*; it is evaluated in two
steps (docs/design.md, "Cross-shard transfers"):

1. ``plan_transfers`` evaluates every item in order. Local-only items take effect on the
   uncommitted balances at once. A distributed item's local legs become *holds* that only
   tighten limits, and its remote legs are returned to be reserved on their shards.
2. ``finalize`` takes the remote shards' answers, fails the distributed chains that were
   refused, turns the holds of the others into effects, and returns a ``CommitBatch``: the
   rows to write in one database transaction and the settlements to send afterwards.

Because a hold only ever tightens limits, releasing one can never invalidate a decision
already made for a later item; that is what lets step 2 fail a chain without re-evaluating
the rest of the batch.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec

from processor.codes import AccountResult, TransferResult, burns_id
from processor.currency import is_known_currency
from processor.ledger.holds import OpenHolds
from processor.ledger.partition import PartitionMap
from processor.types import (  # InvariantError and require live in types, shared by all
    ACCOUNT_FLAGS_KNOWN,
    AMOUNT_MAX,
    TRANSFER_FLAGS_KNOWN,
    Account,
    AccountFlags,
    InvariantError,
    Transfer,
    TransferFlags,
    require,
)

__all__ = [
    "AccountState",
    "Book",
    "CommitBatch",
    "Failed",
    "Hold",
    "InvariantError",
    "Known",
    "Leg",
    "PendingState",
    "Plan",
    "Resolution",
    "Side",
    "require",
]

R = TransferResult
DEBITS_LIMITED = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CREDITS_LIMITED = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)
NS_PER_S = 1_000_000_000
# Cancelled reservation calls a shard remembers (Book.cancelled): a call arrives after its
# cancel only if it was delayed past its coordinator's timeout, which is seconds, while
# this many cancels take far longer to accumulate.
CANCELLED_MAX = 100_000
# The epoch an answer carries for a shard that was not reached (``unreachable_answer``):
# it sets no commit fence, as nothing of the batch is held there.
UNREACHED_EPOCH = -1


class Side(enum.IntEnum):
    debit = 0
    credit = 1


class Resolution(enum.IntEnum):
    """How a pending transfer ended; stored in ``pending_resolutions.kind``."""

    posted = 1
    voided = 2
    expired = 3


class EventKind(enum.IntEnum):
    """What a leg belongs to, so a shard can look its fate up in the database."""

    transfer = 0  # committed iff the transfer row exists
    expiry = 1  # committed iff the pending transfer has an ``expired`` resolution


class Leg(msgspec.Struct, frozen=True, array_like=True):
    """One side of a transfer or expiry: the change it makes to one account's balances."""

    account_id: int
    side: int
    currency: str
    pending_delta: int  # signed: a hold adds, a post or void releases
    posted_delta: int  # never negative
    # True for a new transfer: the account must exist with the currency and within limits.
    # Posts, voids and expiries only release holds and are never refused.
    limited: bool
    event_kind: int = EventKind.transfer
    event_id: int = 0
    # Legs of one linked chain share a nonzero tag; a later leg may use what an earlier
    # leg of the same chain posted, since the chain commits whole or not at all.
    chain: int = 0
    # The tenant slot of the transfer: its account must belong to that tenant, unless the
    # transfer is the processor's own (0). Expiries are the processor's.
    tenant: int = 0

    @property
    def increase(self) -> int:
        """How much this leg raises its side's total (pending + posted): what it holds."""
        return max(0, self.pending_delta + self.posted_delta)


@dataclass(slots=True)
class AccountState:
    """An account owned by this shard and its balances in three layers.

    ``debits_pending`` etc. are committed: they equal the database row. ``u_*`` are the
    signed effects of validated local events not yet committed. ``up_*`` add up the
    increases among those, and ``reserved_*`` the holds granted to distributed items; both
    only ever make limits tighter.
    """

    account: Account
    committed: bool
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    u_debits_pending: int = 0
    u_debits_posted: int = 0
    u_credits_pending: int = 0
    u_credits_posted: int = 0
    up_debits: int = 0
    up_credits: int = 0
    reserved_debits: int = 0
    reserved_credits: int = 0

    def apply(self, leg: Leg) -> None:
        """Apply a leg's effect to the uncommitted layer."""
        if leg.side == Side.debit:
            self.u_debits_pending += leg.pending_delta
            self.u_debits_posted += leg.posted_delta
            self.up_debits += leg.increase
        else:
            self.u_credits_pending += leg.pending_delta
            self.u_credits_posted += leg.posted_delta
            self.up_credits += leg.increase

    def unapply(self, leg: Leg) -> None:
        if leg.side == Side.debit:
            self.u_debits_pending -= leg.pending_delta
            self.u_debits_posted -= leg.posted_delta
            self.up_debits -= leg.increase
        else:
            self.u_credits_pending -= leg.pending_delta
            self.u_credits_posted -= leg.posted_delta
            self.up_credits -= leg.increase

    def reserve(self, leg: Leg) -> None:
        if leg.side == Side.debit:
            self.reserved_debits += leg.increase
        else:
            self.reserved_credits += leg.increase

    def release(self, leg: Leg) -> None:
        if leg.side == Side.debit:
            self.reserved_debits -= leg.increase
        else:
            self.reserved_credits -= leg.increase
        require(self.reserved_debits >= 0 and self.reserved_credits >= 0, "reserve >= 0")

    def settle_committed(self, leg: Leg) -> None:
        """A remote coordinator committed ``leg``: the database row already holds it."""
        if leg.side == Side.debit:
            self.debits_pending += leg.pending_delta
            self.debits_posted += leg.posted_delta
        else:
            self.credits_pending += leg.pending_delta
            self.credits_posted += leg.posted_delta

    def check(self, leg: Leg, *, remote: bool, chain_posted: int = 0) -> TransferResult:
        """The code for applying ``leg`` now; ``remote`` is the view granted to others.

        The local view sees uncommitted local effects, which commit in order with whatever
        is decided against them. A remote coordinator commits on its own, so it is shown
        only committed balances plus every uncommitted increase (never an uncommitted
        decrease or a credit that might not commit).
        """
        acct = self.account
        # ``chain_posted`` is what earlier legs of the same chain posted to the side that
        # this leg's limit is measured against (credits for a debit, debits for a credit).
        if leg.limited and acct.currency != leg.currency:
            return R.currency_mismatch
        debit = leg.side == Side.debit
        pending = self.debits_pending if debit else self.credits_pending
        posted = self.debits_posted if debit else self.credits_posted
        up = self.up_debits if debit else self.up_credits
        reserved = self.reserved_debits if debit else self.reserved_credits
        grow_pending = max(0, leg.pending_delta)
        # Overflow bounds take every increase that may still commit: the committed value,
        # uncommitted increases and holds. They are upper bounds, so they are safe.
        if pending + up + reserved + grow_pending > AMOUNT_MAX:
            return R.overflows_debits_pending if debit else R.overflows_credits_pending
        if posted + up + reserved + leg.posted_delta > AMOUNT_MAX:
            return R.overflows_debits_posted if debit else R.overflows_credits_posted
        if pending + posted + up + reserved + grow_pending + leg.posted_delta > AMOUNT_MAX:
            return R.overflows_debits if debit else R.overflows_credits
        if not leg.limited:
            return R.ok
        if not acct.flags & (DEBITS_LIMITED if debit else CREDITS_LIMITED):
            return R.ok
        # A debit is limited by posted credits and a credit by posted debits.
        against_posted = self.credits_posted if debit else self.debits_posted
        if remote:
            total = pending + posted + up
            against = against_posted
        else:
            u_pending = self.u_debits_pending if debit else self.u_credits_pending
            u_posted = self.u_debits_posted if debit else self.u_credits_posted
            total = pending + u_pending + posted + u_posted
            against = against_posted + (self.u_credits_posted if debit else self.u_debits_posted)
        if total + reserved + leg.increase > against + chain_posted:
            return R.exceeds_credits if debit else R.exceeds_debits
        return R.ok



@dataclass(slots=True)
class PendingState:
    """An open pending transfer coordinated (and owned) by this shard."""

    transfer: Transfer
    expires_at_ns: int  # 0: never expires


class Failed(msgspec.Struct, frozen=True, array_like=True):
    """A transfer id burned by a failure that depended on ledger state."""

    id: int
    result: int
    timestamp: int


class ResolutionRow(msgspec.Struct, frozen=True, array_like=True):
    pending_id: int
    kind: int
    transfer_id: int
    timestamp: int


@dataclass(slots=True)
class Known:
    """What the database holds about ids the book had no memory of (fetched per batch)."""

    transfers: dict[int, Transfer] = field(default_factory=dict)
    failed: dict[int, int] = field(default_factory=dict)
    resolutions: dict[int, int] = field(default_factory=dict)  # pending id -> Resolution


@dataclass(slots=True)
class Hold:
    """A reservation this shard granted; ``coordinator`` is the shard that will commit it."""

    coordinator: int
    epoch: int
    leg: Leg
    request: int = 0  # the coordinator's reservation call that asked for it (0: untagged)


@dataclass(slots=True)
class _Item:
    transfer: Transfer
    code: TransferResult = R.ok
    stored: Transfer | None = None  # the transfer as it will be stored (with timestamp)
    legs: list[tuple[int, Leg]] = field(default_factory=list)  # (shard, leg)
    distributed: bool = False
    pending: PendingState | None = None  # the pending transfer a post/void resolves
    dup_of: int = -1  # index of an earlier item in this batch with the same id
    pending_from: int = -1  # index of the item in this batch that created the pending
    remote_codes: list[TransferResult] = field(default_factory=list)
    applied: bool = False  # step 1 applied (or held) its effects; undo must reverse them
    failed: Failed | None = None  # the burned id's record, written with the batch


@dataclass(slots=True)
class Plan:
    """Step 1's outcome: provisional codes and the remote legs to reserve, per shard."""

    items: list[_Item]
    request_sizes: list[int]
    chains: list[tuple[int, int]]  # [start, end) over items, in order
    remote: dict[int, list[tuple[int, Leg]]]  # shard -> [(item index, leg)]
    expiries: list[PendingState]  # remote legs of expiries are in ``remote`` at index -1
    # Requests (or the tail of one) not evaluated by this plan; plan them after finalize.
    rest: list[list[Transfer]] = field(default_factory=list)
    # Set by processor.ledger.columnar.ArrayBook when it planned the batch over columns: its plan,
    # and the credit legs to reserve per shard (reserve_plain), instead of ``remote``.
    plain: Any = None
    remote_plain: dict[int, Any] = field(default_factory=dict)


@dataclass(slots=True)
class CommitBatch:
    """Everything one database transaction writes, and what to do after it commits."""

    transfers: list[Transfer] = field(default_factory=list)
    failed: list[Failed] = field(default_factory=list)
    resolutions: list[ResolutionRow] = field(default_factory=list)
    accounts: list[Account] = field(default_factory=list)
    # account id -> [debits_pending, debits_posted, credits_pending, credits_posted] deltas
    balance_deltas: dict[int, list[int]] = field(default_factory=dict)
    # Local legs applied to uncommitted balances, moved to committed after the commit.
    local_legs: list[Leg] = field(default_factory=list)
    # shard -> epoch: the other shards whose holds this batch relies on (commit fence).
    fences: dict[int, int] = field(default_factory=dict)
    # shard -> [(hold id, committed)] to send once the commit is durable.
    settlements: dict[int, list[tuple[int, bool]]] = field(default_factory=dict)
    codes: list[int] = field(default_factory=list)
    # Per item, the stored transfer's timestamp for ``ok`` and ``exists``, else 0.
    timestamps: list[int] = field(default_factory=list)
    # A columnar batch's local legs (processor.ledger.columnar.SlotDeltas), moved to committed
    # after the commit like ``local_legs``.
    slot_deltas: Any = None
    # A columnar batch's stored transfers (processor.ledger.columnar.TransferColumns), written
    # besides ``transfers``.
    transfer_columns: Any = None
    # A columnar batch's balance deltas: account ids (each once) and an (n, 4) int64 array
    # in the order of ``balance_deltas``' lists, kept as arrays for the store.
    delta_ids: Any = None
    delta_values: Any = None
    # shard -> [(hold block id, committed mask)] to send once the commit is durable.
    plain_settlements: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)

    def add_delta(self, leg: Leg) -> None:
        d = self.balance_deltas.setdefault(leg.account_id, [0, 0, 0, 0])
        if leg.side == Side.debit:
            d[0] += leg.pending_delta
            d[1] += leg.posted_delta
        else:
            d[2] += leg.pending_delta
            d[3] += leg.posted_delta

    def transfer_count(self) -> int:
        """How many transfers this batch stores."""
        columns = 0 if self.transfer_columns is None else len(self.transfer_columns)
        return len(self.transfers) + columns

    def all_transfers(self) -> list[Transfer]:
        """Every stored transfer as an object (for tests and small batches)."""
        if self.transfer_columns is None:
            return self.transfers
        return [*self.transfers, *self.transfer_columns.transfers()]

    def deltas(self) -> Iterator[tuple[int, list[int]]]:
        """Every (account id, [dp, dpo, cp, cpo]) this batch changes, each account once."""
        yield from self.balance_deltas.items()
        if self.delta_ids is not None:
            yield from zip(self.delta_ids.tolist(), self.delta_values.tolist(), strict=True)

    def check_balanced(self) -> None:
        """Double entry: the batch moves as much to debits as to credits, posted and pending."""
        # Python ints: a sum over many accounts may pass int64.
        dp = dpo = cp = cpo = 0
        for d in self.balance_deltas.values():
            dp, dpo, cp, cpo = dp + d[0], dpo + d[1], cp + d[2], cpo + d[3]
        if self.delta_values is not None:
            sums = _exact_column_sums(self.delta_values)
            dp, dpo, cp, cpo = dp + sums[0], dpo + sums[1], cp + sums[2], cpo + sums[3]
        require(dp == cp, "pending debits equal pending credits")
        require(dpo == cpo, "posted debits equal posted credits")


class Book:
    """The state of one shard: its accounts, open holds and recent transfer ids."""

    def __init__(self, shard: int, partitions: PartitionMap, *, recent_ids_max: int) -> None:
        require(recent_ids_max > 0, "recent_ids_max > 0")
        self.shard = shard
        self.partitions = partitions
        self.accounts: dict[int, AccountState] = {}
        # Open holds, with their deadlines in order (expiring them costs O(due), not
        # O(open holds), per batch).
        self.pending: OpenHolds[PendingState] = OpenHolds()
        # Transfer ids seen recently (stored transfers and burned failures), bounded: older
        # ones are fetched from the database. Holds memory to O(accounts + open holds).
        self.recent: OrderedDict[int, Transfer | Failed] = OrderedDict()
        self.recent_ids_max = recent_ids_max
        self.resolved: OrderedDict[int, int] = OrderedDict()  # pending id -> Resolution
        self.holds: dict[tuple[int, int], Hold] = {}  # (coordinator, hold id) -> Hold
        self.hold_seq = 0
        # Reservation calls their coordinator gave up on (cancel_reservation): a call of
        # one that arrives afterwards is granted nothing. The newest CANCELLED_MAX are kept.
        self.cancelled: OrderedDict[tuple[int, int, int], None] = OrderedDict()
        self.last_timestamp = 0
        # While a distributed chain is evaluated: its tag, and per (account, side) what its
        # earlier held legs posted (see Leg.chain).
        self._chain_tag = 0
        self._chain_posted: dict[tuple[int, int], int] = {}

    # -- recovery -------------------------------------------------------------------------

    def _new_state(self, account: Account, *, committed: bool) -> AccountState:
        """The in-memory state of a new account (columnar books keep it in arrays)."""
        return AccountState(account=account, committed=committed)

    def load_account(self, account: Account) -> None:
        """Add a committed account read from the database at recovery."""
        state = self._new_state(
            msgspec.structs.replace(
                account, debits_pending=0, debits_posted=0, credits_pending=0,
                credits_posted=0,
            ),
            committed=True,
        )
        state.debits_pending = account.debits_pending
        state.debits_posted = account.debits_posted
        state.credits_pending = account.credits_pending
        state.credits_posted = account.credits_posted
        self.accounts[account.id] = state
        self.last_timestamp = max(self.last_timestamp, account.timestamp)

    def load_pending(self, transfer: Transfer) -> None:
        """Add an open pending transfer read from the database at recovery."""
        self.pending[transfer.id] = PendingState(transfer, _expires_at_ns(transfer))
        self.last_timestamp = max(self.last_timestamp, transfer.timestamp)

    def owns(self, account_id: int) -> bool:
        return self.partitions.shard_of(account_id) == self.shard

    def _timestamp(self, now_ns: int) -> int:
        """Strictly increasing per shard, even if the wall clock steps back."""
        self.last_timestamp = max(now_ns, self.last_timestamp + 1)
        return self.last_timestamp

    def next_timestamp(self, now_ns: int) -> int:
        """Take a timestamp no row will carry: every later one of this shard exceeds it
        (a checkpoint's position when everything planned so far has committed)."""
        return self._timestamp(now_ns)

    def _remember(self, key: int, value: Transfer | Failed) -> None:
        if key in self.recent:
            self.recent.move_to_end(key)
        self.recent[key] = value
        while len(self.recent) > self.recent_ids_max:
            self.recent.popitem(last=False)

    def _remember_resolution(self, pending_id: int, kind: int) -> None:
        self.resolved[pending_id] = kind
        while len(self.resolved) > self.recent_ids_max:
            self.resolved.popitem(last=False)

    # -- accounts ---------------------------------------------------------------------------

    def create_accounts(
        self, requests: list[list[Account]], now_ns: int
    ) -> tuple[list[list[AccountResult]], CommitBatch]:
        """Validate and apply account creations; every id must be owned by this shard."""
        batch = CommitBatch()
        out: list[list[AccountResult]] = []
        for accounts in requests:
            codes = []
            for a in accounts:
                require(a.id == 0 or self.owns(a.id), "account routed to its owner")
                code = self._check_account(a)
                if code == AccountResult.ok:
                    stored = msgspec.structs.replace(a, timestamp=self._timestamp(now_ns))
                    self.accounts[a.id] = self._new_state(stored, committed=False)
                    batch.accounts.append(stored)
                codes.append(code)
            out.append(codes)
        return out, batch

    def _check_account(self, a: Account) -> AccountResult:
        A = AccountResult
        if a.id == 0:
            return A.id_must_not_be_zero
        if a.flags & ~ACCOUNT_FLAGS_KNOWN:
            return A.flags_unknown
        if a.flags & DEBITS_LIMITED and a.flags & CREDITS_LIMITED:
            return A.flags_are_mutually_exclusive
        if not is_known_currency(a.currency):
            return A.currency_unknown
        for name, code in (
            ("debits_pending", A.debits_pending_must_be_zero),
            ("debits_posted", A.debits_posted_must_be_zero),
            ("credits_pending", A.credits_pending_must_be_zero),
            ("credits_posted", A.credits_posted_must_be_zero),
            ("timestamp", A.timestamp_must_be_zero),
        ):
            if getattr(a, name) != 0:
                return code
        existing = self.accounts.get(a.id)
        if existing is not None:
            e = existing.account
            if e.tenant != a.tenant:
                return A.exists_with_different_tenant
            if e.flags != a.flags:
                return A.exists_with_different_flags
            if e.currency != a.currency:
                return A.exists_with_different_currency
            if e.code != a.code:
                return A.exists_with_different_code
            if e.user_data != a.user_data:
                return A.exists_with_different_user_data
            return A.exists
        return A.ok

    def accounts_committed(self, batch: CommitBatch) -> None:
        for a in batch.accounts:
            self.accounts[a.id].committed = True

    # -- transfers, step 1 ------------------------------------------------------------------

    def lookups_needed(self, requests: list[list[Transfer]]) -> tuple[list[int], list[int]]:
        """Transfer ids and pending ids this book cannot answer from memory."""
        ids: set[int] = set()
        pending_ids: set[int] = set()
        for transfers in requests:
            for t in transfers:
                if t.id and t.id not in self.recent:
                    ids.add(t.id)
                p = t.pending_id
                if p and p not in self.pending and p not in self.recent:
                    ids.add(p)
                if p and p not in self.pending and p not in self.resolved:
                    pending_ids.add(p)
        return sorted(ids), sorted(pending_ids)

    def plan_transfers(
        self, requests: list[list[Transfer]], now_ns: int, known: Known
    ) -> Plan:
        """Step 1: evaluate every transfer in order (see the module docstring)."""
        items = [_Item(t) for transfers in requests for t in transfers]
        plan = Plan(
            items=items,
            request_sizes=[len(r) for r in requests],
            chains=[],
            remote={},
            expiries=[],
        )
        self._plan_expiries(plan, now_ns)
        # Ids whose fate rides on a distributed item of this batch (its own id, the pending
        # it resolves) until finalize. A later item naming one of them is not answered from
        # that unconfirmed state: the plan stops before its chain, and the caller plans the
        # rest again after finalize (``Plan.rest``).
        distributed_ids: set[int] = set()
        in_batch: dict[int, int] = {}  # transfer id -> index of its latest item
        start = 0
        for r, size in enumerate(plan.request_sizes):
            end_of_request = start + size
            i = start
            while i < end_of_request:
                j = i
                while j < end_of_request - 1 and items[j].transfer.flags & LINKED:
                    j += 1
                chain_end = j + 1
                if any(items[k].transfer.id in distributed_ids
                       or items[k].transfer.pending_id in distributed_ids
                       for k in range(i, chain_end)):
                    plan.rest = [requests[r][i - start:], *requests[r + 1:]]
                    plan.request_sizes = [*plan.request_sizes[:r], i - start]
                    del plan.items[i:]
                    return plan
                plan.chains.append((i, chain_end))
                if items[j].transfer.flags & LINKED:
                    # The request ended inside a chain: the chain is refused whole.
                    for k in range(i, chain_end):
                        items[k].code = R.linked_event_failed
                    items[j].code = R.linked_event_chain_open
                else:
                    self._plan_chain(items, i, chain_end, now_ns, known,
                                     distributed_ids, in_batch, plan)
                i = chain_end
            start = end_of_request
        return plan

    def _plan_chain(
        self,
        items: list[_Item],
        start: int,
        end: int,
        now_ns: int,
        known: Known,
        distributed_ids: set[int],
        in_batch: dict[int, int],
        plan: Plan,
    ) -> None:
        distributed = any(
            not self.owns(items[k].transfer.debit_account_id)
            or not self.owns(items[k].transfer.credit_account_id)
            for k in range(start, end)
        )
        undo: list[tuple[int, dict[int, Transfer | Failed | None], object]] = []
        failed_at = -1
        self._chain_tag = start + 1 if distributed and end - start > 1 else 0
        self._chain_posted = {}
        for k in range(start, end):
            item = items[k]
            item.distributed = distributed
            saved_recent = {item.transfer.id: self.recent.get(item.transfer.id)}
            code = self._evaluate(item, k, now_ns, known, in_batch)
            item.code = code
            if code not in (R.ok, R.exists):
                failed_at = k
                break
            undo.append((k, saved_recent, None))
        if failed_at >= 0:
            for k, saved, _ in reversed(undo):
                self._undo_item(items[k], saved)
            self._fail_chain(items, start, end, failed_at, now_ns)
            return
        for k in range(start, end):
            in_batch[items[k].transfer.id] = k
            if distributed and items[k].code == R.ok:
                distributed_ids.add(items[k].transfer.id)
                if items[k].transfer.pending_id:
                    distributed_ids.add(items[k].transfer.pending_id)
                for shard, leg in items[k].legs:
                    if shard != self.shard:
                        plan.remote.setdefault(shard, []).append((k, leg))

    def _fail_chain(
        self, items: list[_Item], start: int, end: int, failed_at: int, now_ns: int
    ) -> None:
        """Codes of a refused chain whose effects were undone: the refused item keeps its
        own code (and burns its id if the code says so), the others are linked failures.
        A chain that failed because a shard was not reached (``not_applied``) is not
        refused: every item of it answers ``not_applied``, so that a caller sends the
        whole chain again rather than take the others for a decided failure."""
        failing = items[failed_at]
        other = R.not_applied if failing.code == R.not_applied else R.linked_event_failed
        for k in range(start, end):
            if k != failed_at:
                items[k].code = other
        if burns_id(failing.code):
            failing.failed = Failed(failing.transfer.id, int(failing.code),
                                    self._timestamp(now_ns))
            self._remember(failing.transfer.id, failing.failed)

    def _evaluate(
        self, item: _Item, index: int, now_ns: int, known: Known, in_batch: dict[int, int]
    ) -> TransferResult:
        t = item.transfer
        code = _static_check(t)
        if code != R.ok:
            return code
        if t.flags & (PENDING | POST | VOID) and not self.owns(t.debit_account_id):
            # A hold lives on its debit account's shard; a chain can be coordinated by only
            # one shard (PartitionMap.coordinator_of), so its holds must share that shard.
            return R.two_phase_transfers_in_chain_must_share_shard
        previous = self.recent.get(t.id)
        if previous is None:
            previous = known.transfers.get(t.id)
            if previous is None and t.id in known.failed:
                previous = Failed(t.id, known.failed[t.id], 0)
        if previous is not None:
            if t.id in in_batch:
                item.dup_of = in_batch[t.id]
            if isinstance(previous, Failed):
                # An archived transfer's id is read back beside the burned ones
                # (LedgerStore.fetch_known), with this code as its result.
                if previous.result == R.id_archived:
                    return R.id_archived
                return R.id_already_failed
            item.stored = previous
            return _compare_existing(t, previous)
        if t.flags & (POST | VOID):
            code = self._check_pending_reference(item, now_ns, known, in_batch)
            if code != R.ok:
                return code
        stored = msgspec.structs.replace(t, timestamp=self._timestamp(now_ns))
        item.stored = stored
        item.legs = self._legs(stored, item.pending)
        code = R.ok
        for shard, leg in item.legs:
            if shard == self.shard:
                leg_code = self._check_local_leg(leg)
                if leg_code != R.ok and (code == R.ok or leg_code < code):
                    code = leg_code
        if code != R.ok:
            return code
        for shard, leg in item.legs:
            if shard == self.shard:
                state = self.accounts[leg.account_id]
                if item.distributed:
                    state.reserve(leg)
                    _add_chain_posted(self._chain_posted, leg)
                else:
                    state.apply(leg)
        item.applied = True
        self._remember(t.id, stored)
        if t.flags & PENDING:
            self.pending[t.id] = PendingState(stored, _expires_at_ns(stored))
        elif item.pending is not None:
            pending_id = item.pending.transfer.id
            self.pending.pop(pending_id, None)
            kind = Resolution.posted if t.flags & POST else Resolution.voided
            self._remember_resolution(pending_id, kind)
        return R.ok

    def _check_local_leg(self, leg: Leg) -> TransferResult:
        state = self.accounts.get(leg.account_id)
        if state is None or not _may_touch(leg.tenant, state.account.tenant):
            return (R.debit_account_not_found if leg.side == Side.debit
                    else R.credit_account_not_found)
        return state.check(leg, remote=False,
                           chain_posted=self._chain_posted.get((leg.account_id, leg.side), 0))

    def _check_pending_reference(
        self, item: _Item, now_ns: int, known: Known, in_batch: dict[int, int]
    ) -> TransferResult:
        t = item.transfer
        pending = self.pending.get(t.pending_id)
        if pending is None:
            resolved = self.resolved.get(t.pending_id, known.resolutions.get(t.pending_id))
            stored = self.recent.get(t.pending_id)
            if stored is None or isinstance(stored, Failed):
                stored = known.transfers.get(t.pending_id)
            if stored is None or not _may_touch(t.tenant, stored.tenant):
                return R.pending_transfer_not_found
            if not stored.flags & PENDING:
                return R.pending_transfer_not_pending
            code = _compare_pending(t, stored)
            if code != R.ok:
                return code
            if resolved == Resolution.posted:
                return R.pending_transfer_already_posted
            if resolved == Resolution.voided:
                return R.pending_transfer_already_voided
            if resolved == Resolution.expired:
                return R.pending_transfer_expired
            # Owned here, not open and not resolved cannot happen: recovery loads every
            # open hold of this shard's partitions.
            require(not self.owns(stored.debit_account_id), "open pending is in memory")
            return R.pending_transfer_has_different_debit_account_id
        if not _may_touch(t.tenant, pending.transfer.tenant):
            return R.pending_transfer_not_found
        code = _compare_pending(t, pending.transfer)
        if code != R.ok:
            return code
        if pending.expires_at_ns and now_ns >= pending.expires_at_ns:
            return R.pending_transfer_expired
        item.pending = pending
        item.pending_from = in_batch.get(t.pending_id, -1)
        return R.ok

    def _legs(self, t: Transfer, pending: PendingState | None) -> list[tuple[int, Leg]]:
        """The debit and credit legs of a stored transfer, with the shard owning each."""
        if t.flags & PENDING:
            dp, dpo, limited = t.amount, 0, True
        elif pending is not None:
            dp, limited = -pending.transfer.amount, False
            dpo = t.amount if t.flags & POST else 0
        else:
            dp, dpo, limited = 0, t.amount, True
        shard_of = self.partitions.shard_of
        tag = self._chain_tag
        return [
            (shard_of(t.debit_account_id),
             Leg(t.debit_account_id, Side.debit, t.currency, dp, dpo, limited,
                 EventKind.transfer, t.id, tag, t.tenant)),
            (shard_of(t.credit_account_id),
             Leg(t.credit_account_id, Side.credit, t.currency, dp, dpo, limited,
                 EventKind.transfer, t.id, tag, t.tenant)),
        ]

    def _undo_item(self, item: _Item, saved: dict[int, Transfer | Failed | None]) -> None:
        """Reverse what ``_evaluate`` did for an item whose effects it applied."""
        if not item.applied:
            return  # refused or ``exists``: nothing was changed
        item.applied = False
        t = item.transfer
        for shard, leg in item.legs:
            if shard == self.shard:
                state = self.accounts[leg.account_id]
                if item.distributed:
                    state.release(leg)
                else:
                    state.unapply(leg)
        for key, value in saved.items():
            if value is None:
                self.recent.pop(key, None)
            else:
                self.recent[key] = value
        if t.flags & PENDING:
            self.pending.pop(t.id, None)
        elif item.pending is not None:
            self.pending[item.pending.transfer.id] = item.pending
            self.resolved.pop(item.pending.transfer.id, None)

    def _plan_expiries(self, plan: Plan, now_ns: int) -> None:
        """Expire open holds whose timeout passed; expiry only releases, it never fails."""
        for pending_id, p in self.pending.pop_due(now_ns):
            self._remember_resolution(pending_id, Resolution.expired)
            # Keep the transfer at hand: a post or void of it in this batch is answered
            # ``pending_transfer_expired`` after its fields are compared.
            self._remember(pending_id, p.transfer)
            plan.expiries.append(p)
            t = p.transfer
            for account_id, side in ((t.debit_account_id, Side.debit),
                                     (t.credit_account_id, Side.credit)):
                leg = Leg(account_id, side, t.currency, -t.amount, 0, False,
                          EventKind.expiry, pending_id)
                shard = self.partitions.shard_of(account_id)
                if shard == self.shard:
                    self.accounts[account_id].apply(leg)
                else:
                    plan.remote.setdefault(shard, []).append((-1, leg))

    # -- holds granted to other shards ----------------------------------------------------

    def reserve(self, coordinator: int, epoch: int, legs: list[Leg],
                request: int = 0) -> list[tuple[int, int]]:
        """Check and hold legs for a distributed item coordinated elsewhere.

        Returns one (code, hold id) per leg; a refused leg holds nothing (hold id 0). Legs of
        the same chain are held even if a sibling is refused; the coordinator settles each.
        ``request`` tags the holds with the coordinator's call (``cancel_reservation``); a
        call already cancelled holds nothing and answers ``not_applied`` for every leg.
        """
        if request and (coordinator, epoch, request) in self.cancelled:
            return [(int(R.not_applied), 0)] * len(legs)
        out: list[tuple[int, int]] = []
        chain, chain_posted = 0, dict[tuple[int, int], int]()
        for leg in legs:
            require(self.owns(leg.account_id), "leg routed to its owner")
            if leg.chain != chain or not leg.chain:
                chain, chain_posted = leg.chain, {}
            state = self.accounts.get(leg.account_id)
            if state is None or (leg.limited and not state.committed) \
                    or not _may_touch(leg.tenant, state.account.tenant):
                code = (R.debit_account_not_found if leg.side == Side.debit
                        else R.credit_account_not_found)
            else:
                code = state.check(leg, remote=True, chain_posted=chain_posted.get(
                    (leg.account_id, leg.side), 0))
            if code != R.ok or state is None:
                out.append((int(code), 0))
                continue
            state.reserve(leg)
            _add_chain_posted(chain_posted, leg)
            self.hold_seq += 1
            self.holds[(coordinator, self.hold_seq)] = Hold(coordinator, epoch, leg, request)
            out.append((int(R.ok), self.hold_seq))
        return out

    def settle(self, coordinator: int, outcomes: list[tuple[int, bool]]) -> None:
        """The coordinator committed (or dropped) the items these holds were granted for.

        A hold that is unknown here was granted by an earlier incarnation of this shard; the
        database already holds its effect (or not), and recovery read it.
        """
        for hold_id, committed in outcomes:
            hold = self.holds.pop((coordinator, hold_id), None)
            if hold is None:
                continue
            state = self.accounts[hold.leg.account_id]
            state.release(hold.leg)
            if committed:
                state.settle_committed(hold.leg)

    def cancel_reservation(self, coordinator: int, epoch: int, request: int) -> int:
        """The coordinator gave up on its reservation call ``request`` (it got no answer):
        release what that call holds, and grant nothing to it should it arrive later.
        Returns how many holds (or hold blocks) were released."""
        require(request > 0, "a cancelled reservation names its call")
        self.cancelled[(coordinator, epoch, request)] = None
        while len(self.cancelled) > CANCELLED_MAX:
            self.cancelled.popitem(last=False)
        mine = [hold_id for (c, hold_id), hold in self.holds.items()
                if c == coordinator and hold.epoch == epoch and hold.request == request]
        self.settle(coordinator, [(hold_id, False) for hold_id in mine])
        return len(mine)

    @staticmethod
    def unreachable_answer(legs: list[tuple[int, Leg]]) -> tuple[int, list[tuple[int, int]]]:
        """The answer ``finalize`` takes for a shard whose reservation call failed: every
        leg ``not_applied`` (nothing held there, nothing stored, no id burned), no fence.
        Expiry legs must be reached (they always commit), so they have none."""
        require(all(index >= 0 for index, _ in legs), "expiry legs are reached")
        return UNREACHED_EPOCH, [(int(R.not_applied), 0)] * len(legs)

    def holds_of_old_epochs(self, coordinator: int, epoch: int) -> list[tuple[int, Hold]]:
        """Holds granted to incarnations of ``coordinator`` older than ``epoch``."""
        return [
            (hold_id, hold) for (c, hold_id), hold in self.holds.items()
            if c == coordinator and hold.epoch < epoch
        ]

    # -- transfers, step 2 ------------------------------------------------------------------

    def finalize(
        self,
        plan: Plan,
        remote_answers: dict[int, tuple[int, list[tuple[int, int]]]],
        now_ns: int,
        plain_answers: dict[int, Any] | None = None,
    ) -> CommitBatch:
        """Step 2: combine remote answers, fail refused chains, build the commit.

        ``remote_answers`` maps shard -> (its epoch, one (code, hold id) per reserved leg in
        the order of ``plan.remote[shard]``). ``plain_answers`` are the answers to
        ``plan.remote_plain`` (only a columnar book plans those; see ArrayBook.finalize).
        """
        require(not plan.remote_plain, "a plain plan is finalized by a columnar book")
        batch = CommitBatch()
        hold_ids: dict[int, list[tuple[int, int]]] = {}  # item -> [(shard, hold id)]
        for shard, legs in plan.remote.items():
            epoch, answers = remote_answers[shard]
            require(len(answers) == len(legs), "one answer per reserved leg")
            if epoch != UNREACHED_EPOCH:
                batch.fences[shard] = epoch
            for (index, _leg), (code, hold_id) in zip(legs, answers, strict=True):
                if index < 0:
                    # An expiry only releases; it is always accepted and always commits.
                    require(code == R.ok and hold_id > 0, "expiry legs are held")
                    batch.settlements.setdefault(shard, []).append((hold_id, True))
                    continue
                plan.items[index].remote_codes.append(TransferResult(code))
                if hold_id:
                    hold_ids.setdefault(index, []).append((shard, hold_id))
        items = plan.items
        for start, end in plan.chains:
            if not items[start].distributed:
                continue
            if any(items[k].code not in (R.ok, R.exists) for k in range(start, end)):
                continue  # refused in step 1; nothing of it is held
            failed_at = -1
            for k in range(start, end):
                item = items[k]
                dependency = item.pending_from if item.pending_from >= 0 else item.dup_of
                if dependency >= 0 and items[dependency].code == R.not_applied:
                    # Not stored, not refused: this one is sent again with it.
                    item.code = R.not_applied
                elif dependency >= 0 and items[dependency].code not in (R.ok, R.exists):
                    item.code = (R.pending_transfer_not_found if item.pending_from >= 0
                                 else items[dependency].code)
                elif item.remote_codes:
                    worst = min(item.remote_codes, key=lambda c: (c == R.ok, c))
                    if worst != R.ok:
                        item.code = worst
                if item.code not in (R.ok, R.exists):
                    failed_at = k
                    break
            if failed_at >= 0:
                for k in range(end - 1, start - 1, -1):
                    self._undo_item(items[k], {items[k].transfer.id: None})
                self._fail_chain(items, start, end, failed_at, now_ns)
                continue
            for k in range(start, end):
                for shard, leg in items[k].legs:
                    if shard == self.shard and items[k].code == R.ok:
                        state = self.accounts[leg.account_id]
                        state.release(leg)
                        state.apply(leg)
        for index, holds in hold_ids.items():
            committed = items[index].code == R.ok
            for shard, hold_id in holds:
                batch.settlements.setdefault(shard, []).append((hold_id, committed))
        self._fill_batch(plan, batch)
        return batch

    def _fill_batch(self, plan: Plan, batch: CommitBatch) -> None:
        for item in plan.items:
            code = item.code
            batch.codes.append(int(code))
            stored_now = code in (R.ok, R.exists) and item.stored is not None
            batch.timestamps.append(item.stored.timestamp if stored_now and item.stored else 0)
            if code == R.ok:
                require(item.stored is not None, "an ok item has its stored form")
                assert item.stored is not None  # noqa: S101 - narrows the type; require() above enforces it
                batch.transfers.append(item.stored)
                for shard, leg in item.legs:
                    batch.add_delta(leg)
                    if shard == self.shard:
                        batch.local_legs.append(leg)
                if item.pending is not None:
                    kind = Resolution.posted if item.transfer.flags & POST else Resolution.voided
                    batch.resolutions.append(ResolutionRow(
                        item.pending.transfer.id, kind, item.transfer.id,
                        item.stored.timestamp))
            elif burns_id(code) and item.dup_of < 0 and item.failed is not None:
                # Kept on the item, not re-read from the bounded memory of recent ids,
                # which a batch larger than it would have evicted it from.
                batch.failed.append(item.failed)
        batch.failed = list({f.id: f for f in batch.failed}.values())
        for p in plan.expiries:
            t = p.transfer
            timestamp = self._timestamp(self.last_timestamp)
            batch.resolutions.append(ResolutionRow(t.id, Resolution.expired, 0, timestamp))
            for account_id, side in ((t.debit_account_id, Side.debit),
                                     (t.credit_account_id, Side.credit)):
                leg = Leg(account_id, side, t.currency, -t.amount, 0, False,
                          EventKind.expiry, t.id)
                batch.add_delta(leg)
                if self.owns(account_id):
                    batch.local_legs.append(leg)
        batch.check_balanced()

    def committed(self, batch: CommitBatch) -> None:
        """The batch is durable: move its local effects from uncommitted to committed."""
        for leg in batch.local_legs:
            state = self.accounts[leg.account_id]
            state.unapply(leg)
            state.settle_committed(leg)


def _exact_column_sums(values: Any) -> list[int]:
    """The column sums of an (n, k) int64 array as exact Python ints: each value is split
    into its high and low 32 bits, whose sums cannot overflow int64 below 2**31 rows."""
    require(values.shape[0] < 2**31, "fewer than 2**31 rows")
    high = (values >> 32).sum(axis=0).tolist()
    low = (values & 0xFFFFFFFF).sum(axis=0).tolist()
    return [h * 2**32 + lo for h, lo in zip(high, low, strict=True)]


def _may_touch(tenant: int, owner: int) -> bool:
    """Whether a transfer of ``tenant`` may name an account (or hold) of ``owner``: its
    own, or any if it is the processor's (tenant 0)."""
    return tenant == owner or tenant == 0


def _add_chain_posted(chain_posted: dict[tuple[int, int], int], leg: Leg) -> None:
    """Record what a held leg posts, keyed by the side whose limit it loosens: a credit
    posted to an account raises what its debits may reach, and the other way round."""
    if leg.posted_delta > 0:
        other = Side.debit if leg.side == Side.credit else Side.credit
        key = (leg.account_id, int(other))
        chain_posted[key] = chain_posted.get(key, 0) + leg.posted_delta


def _expires_at_ns(t: Transfer) -> int:
    if t.flags & PENDING and t.timeout_s:
        return t.timestamp + t.timeout_s * NS_PER_S
    return 0


def _static_check(t: Transfer) -> TransferResult:
    """Rules that depend only on the transfer's own fields, in precedence order."""
    if t.id == 0:
        return R.id_must_not_be_zero
    if t.flags & ~TRANSFER_FLAGS_KNOWN:
        return R.flags_unknown
    kinds = bool(t.flags & PENDING) + bool(t.flags & POST) + bool(t.flags & VOID)
    if kinds > 1:
        return R.flags_are_mutually_exclusive
    if t.debit_account_id == 0:
        return R.debit_account_id_must_not_be_zero
    if t.credit_account_id == 0:
        return R.credit_account_id_must_not_be_zero
    if t.debit_account_id == t.credit_account_id:
        return R.accounts_must_be_different
    resolves = bool(t.flags & (POST | VOID))
    if not resolves and t.pending_id != 0:
        return R.pending_id_must_be_zero
    if resolves and t.pending_id == 0:
        return R.pending_id_must_not_be_zero
    if resolves and t.pending_id == t.id:
        return R.pending_id_must_be_different
    if t.timeout_s and not t.flags & PENDING:
        return R.timeout_reserved_for_pending_transfer
    if t.amount == 0:
        return R.amount_must_not_be_zero
    if not is_known_currency(t.currency):
        return R.currency_unknown
    if t.timestamp != 0:
        return R.timestamp_must_be_zero
    return R.ok


def compare_existing(t: Transfer, e: Transfer) -> TransferResult:
    """``exists`` if ``t`` repeats the stored ``e`` exactly, else the first difference (what
    a shard answers for an id it finds stored)."""
    return _compare_existing(t, e)


def _compare_existing(t: Transfer, e: Transfer) -> TransferResult:
    """``exists`` if ``t`` repeats the stored ``e`` exactly, else the first difference."""
    if t.tenant != e.tenant:
        # Another tenant's transfer: nothing of it is compared, so nothing is revealed.
        return R.exists_with_different_tenant
    for name, code in (
        ("flags", R.exists_with_different_flags),
        ("pending_id", R.exists_with_different_pending_id),
        ("timeout_s", R.exists_with_different_timeout),
        ("debit_account_id", R.exists_with_different_debit_account_id),
        ("credit_account_id", R.exists_with_different_credit_account_id),
        ("amount", R.exists_with_different_amount),
        ("currency", R.exists_with_different_currency),
        ("code", R.exists_with_different_code),
        ("user_data", R.exists_with_different_user_data),
    ):
        if getattr(t, name) != getattr(e, name):
            return code
    return R.exists


def _compare_pending(t: Transfer, p: Transfer) -> TransferResult:
    """The rules a post or void must meet against the pending transfer it resolves."""
    if not p.flags & PENDING:
        return R.pending_transfer_not_pending
    if t.debit_account_id != p.debit_account_id:
        return R.pending_transfer_has_different_debit_account_id
    if t.credit_account_id != p.credit_account_id:
        return R.pending_transfer_has_different_credit_account_id
    if t.currency != p.currency:
        return R.pending_transfer_has_different_currency
    if t.flags & VOID and t.amount != p.amount:
        return R.pending_transfer_has_different_amount
    if t.flags & POST and t.amount > p.amount:
        return R.exceeds_pending_transfer_amount
    return R.ok
