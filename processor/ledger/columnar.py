"""A shard's book with balances in arrays, and a columnar path for single-phase batches.

``ArrayBook`` is the ``Book`` a shard runs. Every account's balances live in one int64
matrix (a row per account slot, the columns of ``processor.ledger.kernel``), and each account's
``AccountState`` is a view of its row (``SlotState``), so the general rules of
``processor.ledger.rules`` and the columnar path below read and write the same numbers.

A batch of at least ``plain_batch_min`` transfers (8; a shorter one costs the rules less)
takes the columnar path when every transfer in it is *plain*: no flags (so no
linked chain, no pending, post or void), an id this shard has not seen (not in memory, not
in the database rows fetched for it) and not repeated in the batch, its debit account on
this shard, and no hold of this shard due to expire. Then the static rules run as numpy
expressions over columns and the sequential ones (limits in order, overflow) in the
compiled ``processor.ledger.kernel.plan_plain``; a transfer whose credit account is on another
shard holds its debit here and has its credit reserved on that shard in one
``reserve_plain`` call per shard, which answers an array of codes and one *hold block*;
after the commit, one mask per block settles it. The protocol, the fences and the recovery
are those of docs/design.md §6-7; only the representation differs. Every other batch runs
through ``Book`` unchanged, except that a run of at least ``plain_run_min`` plain
transfers in it is planned over columns as a part of its own (``plan_transfers``).
``tests/unit/test_columnar_reference.py`` requires both to give the same codes and
balances on random workloads, with the plain ``Book`` as the reference.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np

from processor.codes import TransferResult
from processor.currency import CURRENCY_EXPONENTS
from processor.ledger import kernel
from processor.ledger.partition import PartitionMap
from processor.ledger.rules import (
    UNREACHED_EPOCH,
    AccountState,
    Book,
    CommitBatch,
    Failed,
    Known,
    Plan,
    require,
)
from processor.types import Account, Transfer, TransferFlags

__all__ = [
    "ArrayBook",
    "HoldBlock",
    "PlainLegs",
    "PlainPlan",
    "RecentIds",
    "SlotDeltas",
    "SlotState",
    "TransferColumns",
    "currency_code",
    "currency_number",
    "decode_legs",
    "decode_reserve_answer",
    "encode_legs",
    "encode_reserve_answer",
]

R = TransferResult
OK = int(R.ok)
NOT_APPLIED = int(R.not_applied)
_I64 = np.int64
_ENCODER = msgspec.msgpack.Encoder()
_LEGS = msgspec.msgpack.Decoder(tuple[bytes, bytes, bytes, bytes, bytes])
_RESERVE_ANSWER = msgspec.msgpack.Decoder(tuple[int, int, bytes])
SLOTS_INITIAL = 1024
PLAIN_RUN_MIN = 1024
PLAIN_BATCH_MIN = 8
_LINKED = int(TransferFlags.LINKED)


def _pack(code: str) -> int:
    return int.from_bytes(code.encode("ascii"), "little")


# A currency as a number for the arrays: its three ASCII letters; 0 for an unknown one.
_CURRENCY_NUMBERS: dict[str, int] = {c: _pack(c) for c in CURRENCY_EXPONENTS}


_CURRENCY_CODES: dict[int, str] = {n: c for c, n in _CURRENCY_NUMBERS.items()}


def currency_number(code: str) -> int:
    """The currency's number in the balance matrix, or 0 if it is not a known code."""
    return _CURRENCY_NUMBERS.get(code, 0)


def currency_code(number: int) -> str:
    """The code of a known currency's number."""
    return _CURRENCY_CODES[number]


_TRANSFER_FIELDS = attrgetter(
    "id", "debit_account_id", "credit_account_id", "amount", "currency", "flags",
    "pending_id", "timeout_s", "code", "user_data", "timestamp", "tenant", "origin")


@dataclass(slots=True)
class TransferColumns:
    """Transfers as columns: int64 arrays of one length, the currency as its number
    (``currency_number``), ``user_data`` None when every one is empty."""

    id: np.ndarray
    debit_account_id: np.ndarray
    credit_account_id: np.ndarray
    amount: np.ndarray
    currency: np.ndarray
    flags: np.ndarray
    pending_id: np.ndarray
    timeout_s: np.ndarray
    code: np.ndarray
    timestamp: np.ndarray
    user_data: list[str] | None = None
    tenant: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=_I64))
    origin: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=_I64))

    def __post_init__(self) -> None:
        # Not given: the processor's own, with no audit record (tests and tools that build
        # columns).
        if self.tenant.shape[0] != self.id.shape[0]:
            self.tenant = np.zeros(self.id.shape[0], dtype=_I64)
        if self.origin.shape[0] != self.id.shape[0]:
            self.origin = np.zeros(self.id.shape[0], dtype=_I64)

    def __len__(self) -> int:
        return int(self.id.shape[0])

    @classmethod
    def from_transfers(cls, transfers: list[Transfer]) -> TransferColumns:
        if not transfers:
            empty = np.zeros(0, dtype=_I64)
            return cls(empty, empty, empty, empty, empty, empty, empty, empty, empty, empty)
        (ids, debits, credits, amounts, currencies, flags, pending, timeouts, codes,
         user_data, timestamps, tenants, origins) = zip(*map(_TRANSFER_FIELDS, transfers),
                                                        strict=True)
        numbers = _CURRENCY_NUMBERS

        def column(values: tuple[int, ...]) -> np.ndarray:
            return np.array(values, dtype=_I64)

        return cls(
            column(ids), column(debits), column(credits), column(amounts),
            np.array([numbers.get(c, 0) for c in currencies], dtype=_I64),
            column(flags), column(pending), column(timeouts), column(codes),
            column(timestamps), list(user_data) if any(user_data) else None,
            column(tenants), column(origins),
        )

    def take(self, index: np.ndarray, *, timestamps: np.ndarray | None = None
             ) -> TransferColumns:
        """The rows at ``index``, with ``timestamps`` instead of theirs if given."""
        rows = index.tolist() if self.user_data is not None else None
        return TransferColumns(
            self.id[index], self.debit_account_id[index], self.credit_account_id[index],
            self.amount[index], self.currency[index], self.flags[index],
            self.pending_id[index], self.timeout_s[index], self.code[index],
            self.timestamp[index] if timestamps is None else timestamps,
            None if rows is None else [self.user_data[i] for i in rows],  # type: ignore[index]
            self.tenant[index], self.origin[index],
        )

    def transfer(self, row: int) -> Transfer:
        """Row ``row`` as a Transfer (for the general rules and tests)."""
        return Transfer(
            id=int(self.id[row]), debit_account_id=int(self.debit_account_id[row]),
            credit_account_id=int(self.credit_account_id[row]), amount=int(self.amount[row]),
            currency=currency_code(int(self.currency[row])), flags=int(self.flags[row]),
            pending_id=int(self.pending_id[row]), timeout_s=int(self.timeout_s[row]),
            code=int(self.code[row]),
            user_data=self.user_data[row] if self.user_data is not None else "",
            timestamp=int(self.timestamp[row]), tenant=int(self.tenant[row]),
            origin=int(self.origin[row]),
        )

    def transfers(self) -> list[Transfer]:
        return [self.transfer(i) for i in range(len(self))]


def _column(column: int) -> Any:
    def get(self: SlotState) -> int:
        return int(self._book.bal[self.slot, column])

    def set_(self: SlotState, value: int) -> None:
        self._book.bal[self.slot, column] = value

    return property(get, set_)


class SlotState(AccountState):
    """An ``AccountState`` whose balances are its row of the book's matrix.

    The rules of ``AccountState`` run over it unchanged; the values they read are Python
    ints, so no sum there can wrap.
    """

    __slots__ = ("_book", "slot")

    def __init__(self, book: ArrayBook, slot: int, account: Account) -> None:
        # The dataclass fields of AccountState are replaced by views of the row below, so
        # its __init__ is not called.
        self._book = book
        self.slot = slot
        self.account = account

    committed = _column(kernel.COMMITTED)
    debits_pending = _column(kernel.DP)
    debits_posted = _column(kernel.DPO)
    credits_pending = _column(kernel.CP)
    credits_posted = _column(kernel.CPO)
    u_debits_pending = _column(kernel.U_DP)
    u_debits_posted = _column(kernel.U_DPO)
    u_credits_pending = _column(kernel.U_CP)
    u_credits_posted = _column(kernel.U_CPO)
    up_debits = _column(kernel.UP_D)
    up_credits = _column(kernel.UP_C)
    reserved_debits = _column(kernel.RES_D)
    reserved_credits = _column(kernel.RES_C)


@dataclass(slots=True)
class PlainLegs:
    """Credit legs of plain transfers for one remote shard, as columns."""

    account_ids: np.ndarray
    amounts: np.ndarray
    currencies: np.ndarray
    event_ids: np.ndarray  # the transfer ids
    tenants: np.ndarray  # the transfers' tenant slots
    index: np.ndarray | None = None  # the items' positions on the coordinator (not sent)


def encode_legs(legs: PlainLegs) -> bytes:
    return _ENCODER.encode((legs.account_ids.tobytes(), legs.amounts.tobytes(),
                            legs.currencies.tobytes(), legs.event_ids.tobytes(),
                            legs.tenants.tobytes()))


def decode_legs(raw: bytes) -> PlainLegs:
    ids, amounts, currencies, events, tenants = _LEGS.decode(raw)
    cols = [np.frombuffer(b, dtype=_I64) for b in (ids, amounts, currencies, events, tenants)]
    require(len({c.shape[0] for c in cols}) == 1, "leg columns of equal length")
    return PlainLegs(*cols)


def encode_reserve_answer(epoch: int, block_id: int, codes: np.ndarray) -> bytes:
    return _ENCODER.encode((epoch, block_id, codes.astype(_I64).tobytes()))


def decode_reserve_answer(raw: bytes) -> tuple[int, int, np.ndarray]:
    epoch, block_id, codes = _RESERVE_ANSWER.decode(raw)
    return epoch, block_id, np.frombuffer(codes, dtype=_I64)


@dataclass(slots=True)
class HoldBlock:
    """The credit holds one ``reserve_plain`` call granted to a coordinator."""

    epoch: int
    slots: np.ndarray  # -1 where the leg was refused (nothing held)
    amounts: np.ndarray
    event_ids: np.ndarray
    request: int = 0  # the coordinator's reservation call (Book.cancel_reservation)


@dataclass(slots=True)
class SlotDeltas:
    """The posted amounts of a plain batch's committed local legs, by slot."""

    debit_slots: np.ndarray
    debit_amounts: np.ndarray
    credit_slots: np.ndarray
    credit_amounts: np.ndarray


@dataclass(slots=True)
class PlainPlan:
    """Step 1 of a plain batch, kept for finalize."""

    cols: TransferColumns
    debit_slot: np.ndarray
    credit_slot: np.ndarray
    credit_local: np.ndarray
    codes: np.ndarray
    timestamps: np.ndarray
    failed: list[Failed]


class RecentIds(OrderedDict[int, Any]):
    """``Book.recent`` with room for rows of columns: a transfer stored by the columnar
    path is kept as (its columns, its row) and made a ``Transfer`` only when the general
    rules read it (an id repeated later), so the hot path creates no object per transfer."""

    def get(self, key: int, default: Any = None) -> Any:
        value = super().get(key, default)
        if type(value) is tuple:
            cols, row = value
            value = cols.transfer(row)
            self[key] = value  # an existing key keeps its place in the order
        return value

    def __getitem__(self, key: int) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def remember_rows(self, cols: TransferColumns) -> None:
        """Remember every row of ``cols`` (new ids, newest last)."""
        self.update(zip(cols.id.tolist(), zip(repeat(cols), range(len(cols))), strict=True))


_MISSING = object()


class ArrayBook(Book):
    """A ``Book`` over a balance matrix, with the columnar path for plain batches."""

    # A run of plain transfers in a mixed batch at least this long is planned over columns
    # on its own. Each part costs a plan, a reserve call per peer and a database read of
    # its pending ids (a few ms), against about 25 µs saved per transfer; with 64 the demo
    # (5% pending transfers scattered in batches of 4,000) split into ~17 parts a batch and
    # ran a third slower, so only long runs (bulk traffic with occasional payments) split.
    plain_run_min = PLAIN_RUN_MIN
    # A plain batch shorter than this is planned by ``Book``'s rules: the columnar path
    # costs about 150 µs whatever the length (a few dozen numpy calls), the rules about
    # 20 µs a transfer, so they break even near 8 (docs/design.md §5a). Single transfers
    # (an HTTP request) are most of what arrives one at a time.
    plain_batch_min = PLAIN_BATCH_MIN

    def __init__(self, shard: int, partitions: PartitionMap, *, recent_ids_max: int) -> None:
        super().__init__(shard, partitions, recent_ids_max=recent_ids_max)
        # Holds lazily made transfers as well; Book reads it through get(), which makes them.
        self._recent_rows = RecentIds()
        self.recent = self._recent_rows
        self.bal = np.zeros((SLOTS_INITIAL, kernel.COLUMNS), dtype=_I64)
        self.slot_of: dict[int, int] = {}
        self.blocks: dict[tuple[int, int], HoldBlock] = {}
        self.block_seq = 0
        self.plain_batches = 0  # batches planned over columns (the rest by Book's rules)

    def _new_state(self, account: Account, *, committed: bool) -> AccountState:
        slot = self.slot_of.get(account.id)
        if slot is None:
            slot = len(self.slot_of)
            if slot == self.bal.shape[0]:
                grown = np.zeros((2 * slot, kernel.COLUMNS), dtype=_I64)
                grown[:slot] = self.bal
                self.bal = grown
            self.slot_of[account.id] = slot
        # An account refused after its creation was undone never reaches here twice: ids of
        # created accounts stay in ``accounts`` for the life of the book.
        self.bal[slot] = 0
        self.bal[slot, kernel.FLAGS] = account.flags
        self.bal[slot, kernel.CURRENCY] = currency_number(account.currency)
        self.bal[slot, kernel.COMMITTED] = int(committed)
        self.bal[slot, kernel.TENANT] = account.tenant
        return SlotState(self, slot, account)

    # -- step 1 -----------------------------------------------------------------------------

    def plan_transfers(self, requests: list[list[Transfer]], now_ns: int, known: Known) -> Plan:
        """Step 1. A batch that is plain throughout and at least ``plain_batch_min`` long
        is planned over columns; in a mixed batch, a leading run of at least
        ``plain_run_min`` plain transfers is planned over columns and the rest after it
        (``Plan.rest``), and general items before a later such run are planned by ``Book``
        with that run left for the next plan. Each part is finalized before the next is
        planned and commits before it, so the order of the batch is kept (docs/design.md
        §5a)."""
        plain = _plain_flags(requests)
        transfers = [t for r in requests for t in r]
        lead = _run_length(plain, 0)
        whole = lead == len(plain) and lead >= self.plain_batch_min
        if lead and (whole or lead >= self.plain_run_min):
            head, tail = _split(requests, lead)
            plan = self.plan_columns(
                TransferColumns.from_transfers(transfers[:lead]), [len(r) for r in head],
                now_ns, known)
            if plan is not None:
                plan.rest = tail
                return plan
            return super().plan_transfers(requests, now_ns, known)
        start = _next_run(plain, lead, self.plain_run_min)
        if start is None:
            return super().plan_transfers(requests, now_ns, known)
        head, tail = _split(requests, start)
        plan = super().plan_transfers(head, now_ns, known)
        plan.rest = [*plan.rest, *tail]
        return plan

    def plan_columns(self, cols: TransferColumns, request_sizes: list[int], now_ns: int,
                     known: Known) -> Plan | None:
        """Step 1 over columns, or None if the batch is not plain (module docstring); the
        caller then plans it as objects with ``plan_transfers``."""
        if not self._plain(cols, now_ns, known):
            return None
        plan = Plan(items=[], request_sizes=request_sizes, chains=[], remote={}, expiries=[])
        plan.plain = self._plan_plain(cols, now_ns, plan)
        self.plain_batches += 1
        return plan

    def _plain(self, cols: TransferColumns, now_ns: int, known: Known) -> bool:
        """Whether this batch may take the columnar path (module docstring)."""
        n = len(cols)
        if n == 0 or cols.flags.any() or np.unique(cols.id).shape[0] != n:
            return False
        recent, stored, failed = self.recent, known.transfers, known.failed
        if any(i in recent or i in stored or i in failed for i in cols.id.tolist()):
            return False
        if (self.partitions.shards_of(cols.debit_account_id) != self.shard).any():
            return False
        return not self.pending.any_due(now_ns)

    def _plan_plain(self, cols: TransferColumns, now_ns: int, plan: Plan) -> PlainPlan:
        n = len(cols)
        debit, credit, amount = cols.debit_account_id, cols.credit_account_id, cols.amount
        codes = _static_codes(cols)
        slot_of = self.slot_of
        debit_slot = np.fromiter((slot_of.get(i, -1) for i in debit.tolist()), _I64, n)
        credit_shard = self.partitions.shards_of(credit)
        credit_local = credit_shard == self.shard
        credit_slot = np.fromiter(
            (slot_of.get(i, -1) if local else -1
             for i, local in zip(credit.tolist(), credit_local.tolist(), strict=True)),
            _I64, n)
        evaluated = codes == OK
        timestamps = np.zeros(n, dtype=_I64)
        count = int(evaluated.sum())
        if count:
            first = max(now_ns, self.last_timestamp + 1)
            timestamps[evaluated] = np.arange(first, first + count, dtype=_I64)
            self.last_timestamp = first + count - 1
        kernel.plan_plain(self.bal, debit_slot, credit_slot, credit_local, amount,
                          cols.currency, cols.tenant, codes)
        ok = np.flatnonzero(codes == OK)
        self._recent_rows.remember_rows(cols.take(ok, timestamps=timestamps[ok]))
        self._trim_recent()
        failed: list[Failed] = []
        for i in np.flatnonzero(evaluated & (codes != OK)).tolist():
            # Every code the kernel gives depends on ledger state, so each burns its id.
            f = Failed(int(cols.id[i]), int(codes[i]), self._timestamp(now_ns))
            failed.append(f)
            self._remember(f.id, f)
        pp = PlainPlan(cols, debit_slot, credit_slot, credit_local, codes, timestamps, failed)
        distributed = ok[~credit_local[ok]]
        if distributed.size:
            shards = credit_shard[distributed]
            for shard in np.unique(shards).tolist():
                index = distributed[shards == shard]
                plan.remote_plain[shard] = PlainLegs(credit[index], amount[index],
                                                     cols.currency[index], cols.id[index],
                                                     cols.tenant[index], index)
        return pp

    def _trim_recent(self) -> None:
        while len(self.recent) > self.recent_ids_max:
            self.recent.popitem(last=False)

    # -- holds granted to other shards ----------------------------------------------------

    def reserve_plain(self, coordinator: int, epoch: int, legs: PlainLegs,
                      request: int = 0) -> tuple[np.ndarray, int]:
        """Check and hold plain credit legs coordinated elsewhere; (codes, block id). A
        call already cancelled (``cancel_reservation``) holds nothing: every leg
        ``not_applied``, block id 0."""
        n = legs.account_ids.shape[0]
        if request and (coordinator, epoch, request) in self.cancelled:
            return np.full(n, NOT_APPLIED, dtype=_I64), 0
        ids = legs.account_ids.tolist()
        require(bool((self.partitions.shards_of(legs.account_ids) == self.shard).all()),
                "legs routed to their owner")
        slots = np.fromiter((self.slot_of.get(i, -1) for i in ids), _I64, n)
        codes = np.zeros(n, dtype=_I64)
        kernel.reserve_plain(self.bal, slots, legs.amounts, legs.currencies, legs.tenants,
                             codes)
        self.block_seq += 1
        granted = codes == OK
        if granted.any():
            self.blocks[(coordinator, self.block_seq)] = HoldBlock(
                epoch, np.where(granted, slots, -1), legs.amounts.copy(),
                legs.event_ids.copy(), request)
        return codes, self.block_seq

    def settle_plain(self, coordinator: int, outcomes: list[tuple[int, Any]]) -> None:
        """Release the blocks' holds; move those whose transfer committed to committed.

        A block unknown here was granted by an earlier incarnation (see ``Book.settle``).
        """
        for block_id, committed in outcomes:
            block = self.blocks.pop((coordinator, block_id), None)
            if block is None:
                continue
            mask = np.asarray(committed, dtype=np.bool_)
            require(mask.shape == block.slots.shape, "one outcome per leg of the block")
            held = block.slots >= 0
            kernel.scatter_add(self.bal, block.slots[held], kernel.RES_C, block.amounts[held], -1)
            done = held & mask
            kernel.scatter_add(self.bal, block.slots[done], kernel.CPO, block.amounts[done], 1)

    def cancel_reservation(self, coordinator: int, epoch: int, request: int) -> int:
        released = super().cancel_reservation(coordinator, epoch, request)
        mine = [block_id for (c, block_id), b in self.blocks.items()
                if c == coordinator and b.epoch == epoch and b.request == request]
        self.settle_plain(coordinator, [
            (block_id, np.zeros(self.blocks[(coordinator, block_id)].slots.shape[0],
                                dtype=np.bool_)) for block_id in mine])
        return released + len(mine)

    @staticmethod
    def unreachable_plain_answer(legs: PlainLegs) -> tuple[int, int, np.ndarray]:
        """``unreachable_answer`` for plain legs: every leg ``not_applied``, no block."""
        return UNREACHED_EPOCH, 0, np.full(legs.event_ids.shape[0], NOT_APPLIED, dtype=_I64)

    def blocks_of_old_epochs(self, coordinator: int, epoch: int) -> list[tuple[int, HoldBlock]]:
        return [(block_id, b) for (c, block_id), b in self.blocks.items()
                if c == coordinator and b.epoch < epoch]

    # -- step 2 -----------------------------------------------------------------------------

    def finalize(self, plan: Plan, remote_answers: dict[int, tuple[int, list[tuple[int, int]]]],
                 now_ns: int, plain_answers: dict[int, Any] | None = None) -> CommitBatch:
        pp: PlainPlan | None = plan.plain
        if pp is None:
            return super().finalize(plan, remote_answers, now_ns)
        require(not plan.remote, "a plain plan reserves columns only")
        batch = CommitBatch()
        codes = pp.codes
        answers = plain_answers or {}
        distributed = np.flatnonzero((codes == OK) & ~pp.credit_local)
        for shard, legs in plan.remote_plain.items():
            epoch, block_id, remote_codes = answers[shard]
            require(remote_codes.shape == legs.event_ids.shape, "one answer per reserved leg")
            codes[legs.index] = remote_codes
            if epoch == UNREACHED_EPOCH:  # not reached: nothing held there, no fence
                continue
            batch.fences[shard] = epoch
            batch.plain_settlements.setdefault(shard, []).append(
                (block_id, remote_codes == OK))
        bal, debit_slot, amount = self.bal, pp.debit_slot, pp.cols.amount
        kernel.scatter_add(bal, debit_slot[distributed], kernel.RES_D, amount[distributed], -1)
        applied = distributed[codes[distributed] == OK]
        kernel.scatter_add(bal, debit_slot[applied], kernel.U_DPO, amount[applied], 1)
        kernel.scatter_add(bal, debit_slot[applied], kernel.UP_D, amount[applied], 1)
        for i in distributed[codes[distributed] == NOT_APPLIED].tolist():
            # Remembered as stored when planned: it is not, and may be sent again.
            self.recent.pop(int(pp.cols.id[i]), None)
        refused = (codes[distributed] != OK) & (codes[distributed] != NOT_APPLIED)
        for i in distributed[refused].tolist():
            # Refused by the credit's shard: a state-dependent code, so the id is burned.
            # (``not_applied``: that shard was not reached; nothing burns.)
            f = Failed(int(pp.cols.id[i]), int(codes[i]), self._timestamp(now_ns))
            pp.failed.append(f)
            self._remember(f.id, f)
        self._fill_plain(pp, batch)
        return batch

    def _fill_plain(self, pp: PlainPlan, batch: CommitBatch) -> None:
        codes, cols = pp.codes, pp.cols
        ok_mask = codes == OK
        ok = np.flatnonzero(ok_mask)
        batch.codes = codes.tolist()
        batch.timestamps = np.where(ok_mask, pp.timestamps, 0).tolist()
        batch.transfer_columns = cols.take(ok, timestamps=pp.timestamps[ok])
        batch.failed = pp.failed
        amounts = cols.amount[ok]
        accounts = np.concatenate([cols.debit_account_id[ok], cols.credit_account_id[ok]])
        unique, inverse = np.unique(accounts, return_inverse=True)
        values = np.zeros((unique.shape[0], 4), dtype=_I64)
        count = amounts.shape[0]
        kernel.scatter_add(values, inverse[:count], 1, amounts, 1)
        kernel.scatter_add(values, inverse[count:], 3, amounts, 1)
        batch.delta_ids, batch.delta_values = unique, values
        local_credit = ok[pp.credit_local[ok]]
        batch.slot_deltas = SlotDeltas(pp.debit_slot[ok], amounts, pp.credit_slot[local_credit],
                                       cols.amount[local_credit])
        batch.check_balanced()

    def committed(self, batch: CommitBatch) -> None:
        super().committed(batch)
        d: SlotDeltas | None = batch.slot_deltas
        if d is None:
            return
        bal = self.bal
        for slots, amounts, u_posted, up, posted in (
            (d.debit_slots, d.debit_amounts, kernel.U_DPO, kernel.UP_D, kernel.DPO),
            (d.credit_slots, d.credit_amounts, kernel.U_CPO, kernel.UP_C, kernel.CPO),
        ):
            kernel.scatter_add(bal, slots, u_posted, amounts, -1)
            kernel.scatter_add(bal, slots, up, amounts, -1)
            kernel.scatter_add(bal, slots, posted, amounts, 1)


def _plain_flags(requests: list[list[Transfer]]) -> list[bool]:
    """Per transfer, in order: no flags and not the last transfer of a linked chain."""
    out: list[bool] = []
    for request in requests:
        linked_before = False
        for t in request:
            out.append(not t.flags and not linked_before)
            linked_before = bool(t.flags & _LINKED)
    return out


def _run_length(plain: list[bool], start: int) -> int:
    end = start
    while end < len(plain) and plain[end]:
        end += 1
    return end - start


def _next_run(plain: list[bool], start: int, length_min: int) -> int | None:
    """Where the first run of at least ``length_min`` plain transfers after ``start``
    begins, if any."""
    i = start
    while i < len(plain):
        run = _run_length(plain, i)
        if run >= length_min:
            return i
        i += max(run, 1)
    return None


def _split(requests: list[list[Transfer]], k: int) -> tuple[list[list[Transfer]],
                                                             list[list[Transfer]]]:
    """The first ``k`` transfers and the rest, each still grouped by request."""
    head: list[list[Transfer]] = []
    for r, request in enumerate(requests):
        if k <= 0:
            return head, requests[r:]
        if len(request) <= k:
            head.append(request)
            k -= len(request)
        else:
            return [*head, request[:k]], [request[k:], *requests[r + 1:]]
    return head, []


def _static_codes(cols: TransferColumns) -> np.ndarray:
    """``processor.ledger.rules._static_check`` for transfers without flags, over columns."""
    debit, credit = cols.debit_account_id, cols.credit_account_id
    # In precedence order; np.select takes the first condition that holds.
    rules = (
        (cols.id == 0, R.id_must_not_be_zero),
        (debit == 0, R.debit_account_id_must_not_be_zero),
        (credit == 0, R.credit_account_id_must_not_be_zero),
        (debit == credit, R.accounts_must_be_different),
        (cols.pending_id != 0, R.pending_id_must_be_zero),
        (cols.timeout_s != 0, R.timeout_reserved_for_pending_transfer),
        (cols.amount == 0, R.amount_must_not_be_zero),
        (cols.currency == 0, R.currency_unknown),
        (cols.timestamp != 0, R.timestamp_must_be_zero),
    )
    return np.select([c for c, _ in rules], [int(code) for _, code in rules],
                     default=OK).astype(_I64)
