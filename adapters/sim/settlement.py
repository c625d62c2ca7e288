"""What a simulated provider's daily settlement report holds, and the discrepancies an
operator (a test) can make the next reports carry.

A report is built from the provider's ledger (``Book.settled_on``) in neutral words
(``Entry``, ``Batch``); each provider renders it in its own format. ``Discrepancies`` is
the fault injection of reports, set through ``POST /_sim/reports/discrepancies``: each
instruction either waits for the next transaction(s) to settle (or for the one it names)
and changes how that transaction is reported, or adds a line to the report of a date.
Reports are computed when asked, so asking twice for a date answers the same bytes: a
reconciliation run that is repeated sees what the first saw.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from adapters.base import Operation
from adapters.sim.core import Book, Op, utc_date
from processor.types import AMOUNT_MAX

__all__ = [
    "DISCREPANCIES_DECODER",
    "Batch",
    "Discrepancies",
    "Discrepancy",
    "DiscrepancyRequest",
    "Entry",
    "batches_of",
    "next_date",
]

PENDING_MAX = 10_000  # instructions waiting for a transaction, and lines waiting for a date
Kind = Literal["missing", "amount_changed", "currency_changed", "unknown", "duplicate",
               "unexpected_fee", "late"]
# Kinds that change how one transaction of ours is reported; the others add a line.
_ON_TRANSACTION = frozenset({"missing", "amount_changed", "currency_changed", "duplicate",
                             "late"})
EntryKind = Literal["capture", "refund", "payout", "fee"]


class Discrepancy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instruction of ``POST /_sim/reports/discrepancies`` (docs/providers.md)."""

    kind: Kind
    # How many transactions it strikes (one after the other), or how many lines it adds.
    count: Annotated[int, Meta(ge=1, le=1_000)] = 1
    # The transaction it strikes, by its idempotency key or the provider's id; otherwise
    # the next one(s) to settle.
    target: Annotated[str, Meta(max_length=255)] = ""
    # amount_changed: added to the reported amount (minor units; the result stays >= 1).
    amount_delta: Annotated[int, Meta(ge=-AMOUNT_MAX, le=AMOUNT_MAX)] = 100
    # currency_changed: the currency reported (default: another the provider serves);
    # unknown, unexpected_fee: their currency (default: the first the provider serves).
    currency: Annotated[str, Meta(pattern="^([A-Z]{3})?$")] = ""
    # unknown: the amount of the made-up transaction; unexpected_fee: the fee.
    amount: Annotated[int, Meta(ge=1, le=AMOUNT_MAX)] = 1_234
    # unknown: what kind of transaction it claims to be.
    operation: Literal["capture", "refund", "payout"] = "capture"
    # unknown, unexpected_fee: the report date they appear in (default: today, UTC).
    date: Annotated[str, Meta(pattern=r"^(\d{4}-\d{2}-\d{2})?$")] = ""


class DiscrepancyRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    discrepancies: Annotated[list[Discrepancy], Meta(min_length=1, max_length=100)]


DISCREPANCIES_DECODER = msgspec.json.Decoder(DiscrepancyRequest)


@dataclass(frozen=True, slots=True)
class Entry:
    """One line of a report, in neutral words: a transaction or a fee on its own."""

    kind: EntryKind
    op_id: str
    authorization_id: str
    idempotency_key: str
    reference: str
    currency: str
    amount: int  # gross minor units, positive; 0 for a fee on its own
    fee: int
    settlement_date: str

    @property
    def signed_gross(self) -> int:
        return self.amount if self.kind == "capture" else -self.amount


@dataclass(frozen=True, slots=True)
class Batch:
    """The provider's transfer of a day's net, per currency."""

    batch_id: str
    currency: str
    net: int  # signed: gross of captures, less refunds, payouts and every fee
    entries: int
    settlement_date: str


def next_date(date: str) -> str:
    return (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()


def _previous_date(date: str) -> str:
    return (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()


def batches_of(entries: Iterable[Entry], date: str, prefix: str) -> list[Batch]:
    """One batch per currency of the report, in currency order."""
    net: dict[str, int] = {}
    count: dict[str, int] = {}
    for entry in entries:
        net[entry.currency] = net.get(entry.currency, 0) + entry.signed_gross - entry.fee
        count[entry.currency] = count.get(entry.currency, 0) + 1
    return [Batch(batch_id=f"{prefix}{date.replace('-', '')}_{currency}", currency=currency,
                  net=net[currency], entries=count[currency], settlement_date=date)
            for currency in sorted(net)]


class Discrepancies:
    """The report discrepancies pending, bound to transactions, and added to dates."""

    def __init__(self, *, currencies: frozenset[str], clock_s: Callable[[], float]) -> None:
        self._currencies = sorted(currencies)
        self._clock_s = clock_s
        self._waiting: list[Discrepancy] = []  # one per transaction still to strike
        self._bound: dict[str, Discrepancy] = {}  # op id -> what its report line suffers
        self._added: dict[str, list[Entry]] = {}  # date -> lines made up for it
        self._made = 0

    def clear(self) -> None:
        self._waiting.clear()
        self._bound.clear()
        self._added.clear()

    def add(self, items: list[Discrepancy], book: Book) -> list[str]:
        """Take instructions; answers the dates whose reports changed at once. Raises
        ``ValueError`` when too many wait, or a currency is not the provider's."""
        if len(self._waiting) + sum(i.count for i in items) > PENDING_MAX:
            raise ValueError("too many discrepancies waiting")
        for item in items:
            if item.currency and item.currency not in self._currencies:
                raise ValueError(f"the provider does not serve {item.currency}")
            if item.date:
                dt.date.fromisoformat(item.date)  # a ValueError for 2026-02-31
        touched = []
        for item in items:
            for _ in range(item.count):
                if item.kind in _ON_TRANSACTION:
                    op = self._settled_target(item, book)
                    if op is None:
                        self._waiting.append(item)
                    else:
                        self._bound[op.id] = item
                        touched += [op.settled_on, next_date(op.settled_on)]
                else:
                    date = item.date or utc_date(self._clock_s())
                    self._added.setdefault(date, []).append(self._made_up(item, date))
                    touched.append(date)
        return touched

    def _settled_target(self, item: Discrepancy, book: Book) -> Op | None:
        if not item.target:
            return None
        for op in book.ops():
            if item.target in (op.id, op.idempotency_key) and book.reportable(op) and (
                    op.id not in self._bound):
                return op
        return None

    def on_settled(self, op: Op) -> list[str]:
        """Bind the first instruction waiting for ``op`` (one naming it, else the first
        naming none) once it settled; answers the dates whose reports it changes."""
        if op.id in self._bound:
            return []
        named = [i for i, item in enumerate(self._waiting)
                 if item.target and item.target in (op.id, op.idempotency_key)]
        index = named[0] if named else next(
            (i for i, item in enumerate(self._waiting) if not item.target), -1)
        if index < 0:
            return []
        self._bound[op.id] = self._waiting.pop(index)
        return [next_date(op.settled_on)]

    def entries(self, book: Book, date: str) -> list[Entry]:
        """The report of ``date``: what settled that day, as the instructions bound to it
        say (late ones from the day before included), then the lines added for the day."""
        entries: list[Entry] = []
        for op in book.settled_on(_previous_date(date)):
            bound = self._bound.get(op.id)
            if bound is not None and bound.kind == "late":
                entries.append(replace(_entry(op), settlement_date=date))
        for op in book.settled_on(date):
            entries += self._reported(op)
        return entries + self._added.get(date, [])

    def _reported(self, op: Op) -> list[Entry]:
        entry = _entry(op)
        bound = self._bound.get(op.id)
        if bound is None:
            return [entry]
        if bound.kind in ("missing", "late"):
            return []
        if bound.kind == "duplicate":
            return [entry, entry]
        if bound.kind == "amount_changed":
            changed = entry.amount + bound.amount_delta
            return [replace(entry, amount=min(AMOUNT_MAX, changed if changed >= 1
                                              else entry.amount + abs(bound.amount_delta)))]
        currency = bound.currency if bound.currency and bound.currency != op.currency else (
            next(c for c in self._currencies if c != op.currency))
        return [replace(entry, currency=currency)]

    def _made_up(self, item: Discrepancy, date: str) -> Entry:
        self._made += 1
        digest = hashlib.sha256(f"{date}/{self._made}/{self._clock_s()}".encode()).hexdigest()
        currency = item.currency or self._currencies[0]
        if item.kind == "unexpected_fee":
            return Entry(kind="fee", op_id=f"fee_{digest[:20]}", authorization_id="",
                         idempotency_key="", reference="", currency=currency, amount=0,
                         fee=item.amount, settlement_date=date)
        return Entry(kind=item.operation, op_id=f"unk_{digest[:20]}",
                     authorization_id=f"unk_auth_{digest[20:40]}",
                     idempotency_key=f"sim-unknown-{digest[40:56]}", reference="",
                     currency=currency, amount=item.amount, fee=0, settlement_date=date)

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /_sim/reports/discrepancies`` shows."""
        return {"waiting": [msgspec.to_builtins(item) for item in self._waiting],
                "bound": {op_id: msgspec.to_builtins(item)
                          for op_id, item in self._bound.items()},
                "added": {date: len(lines) for date, lines in self._added.items()}}


def _entry(op: Op) -> Entry:
    kind: EntryKind = "capture" if op.operation in (Operation.CAPTURE, Operation.AUTHORIZE) \
        else "refund" if op.operation is Operation.REFUND else "payout"
    return Entry(kind=kind, op_id=op.id, authorization_id=op.authorization_id,
                 idempotency_key=op.idempotency_key, reference=op.reference,
                 currency=op.currency, amount=op.amount, fee=op.fee,
                 settlement_date=op.settled_on)
