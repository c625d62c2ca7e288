"""Settlement reconciliation: a provider's daily report against our own records.

Pure and deterministic: given the report (``SettlementReport``) and the records of ours it
should match (``Record``: the money-moving saga steps of that provider around that date),
``reconcile`` says which lines matched which records, what does not agree (one
``Discrepancy`` per thing an operator must look at), which fees to post to the ledger, and
the totals. The executor (``actors/payments/reconciliation.py``) reads the records, fetches
the report, stores what this decides and posts the fees. docs/reconciliation.md explains
the rules; in order:

1. A line names our step by the idempotency key we sent (``provider_key``): the strongest
   link, unique per call.
2. Else by the provider's reference and the operation (a refund's or payout's own id; for a
   capture, the authorization, shared by partial captures: the one of the same amount and
   currency first, then the oldest).
3. Else, only for a line that carries no idempotency key at all, by amount, currency and
   operation among records expected that day or the day before (the oldest first).

A line linked to a record is *matched* when amount and currency agree and the step moved
money; otherwise it is a discrepancy about that record. A line linked to nothing is
``unknown``; a second line linked to the same record (in this report, or already matched
by another day's report) is a ``duplicate``. A record expected on the report's date that
no line names is ``missing``; when it turns up in a later day's report it matches there
(late) and the run that finds it closes the ``missing`` discrepancy of the earlier day.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from processor.payments.provider import Operation, SettlementLine, SettlementReport
from processor.payments.saga import PaymentsConfig, clearing_account_for, clearing_account_id
from processor.types import AMOUNT_MAX

__all__ = [
    "FEE_ACCOUNT_OFFSET",
    "FEE_TRANSFER_OFFSET",
    "LOOKBACK_DAYS",
    "REPORT_LINES_MAX",
    "CurrencyTotals",
    "Discrepancy",
    "DiscrepancyKind",
    "FeePosting",
    "Match",
    "Reconciliation",
    "Record",
    "fee_account_id",
    "fee_transfer_id",
    "reconcile",
    "record_window",
]

# A fee account sits beside its clearing account: the clearing id plus 2^15 (a currency's
# letters use less than 2^15), so it is derived, not stored, like the clearing account.
FEE_ACCOUNT_OFFSET = 2**15
# Fee transfers take ids from system_id_base + 2^61 up, a range the step transfer id
# sequence (from system_id_base, four per step) never reaches.
FEE_TRANSFER_OFFSET = 2**61
_FEE_TRANSFER_SPAN = 2**60
# Records are read from this many days before the report's date (late settlements) to the
# day after (a step that finished just after midnight of a line settled just before).
LOOKBACK_DAYS = 7
REPORT_LINES_MAX = 1_000_000
RECORDS_MAX = 1_000_000


class DiscrepancyKind(enum.StrEnum):
    """What does not agree, named after what an operator sees."""

    MISSING = "missing"  # a step of ours that moved money is not in its day's report
    AMOUNT_MISMATCH = "amount_mismatch"  # the line's amount is not the step's
    CURRENCY_MISMATCH = "currency_mismatch"  # the line's currency is not the step's
    UNKNOWN = "unknown"  # a line that names no step of ours
    DUPLICATE = "duplicate"  # a second line for a step already matched
    UNEXPECTED_FEE = "unexpected_fee"  # a fee charged on its own, tied to no transaction
    STATUS_MISMATCH = "status_mismatch"  # settled there, not (yet) succeeded here
    BATCH_MISMATCH = "batch_mismatch"  # a payout batch is not the net of its lines


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """A transaction of ours that a report line should match: a capture, refund or payout
    step of the provider (or a capture's compensation, key ``<step id>-undo``)."""

    key: str  # "<step id>" or "<step id>-undo"
    step_id: int
    subject_id: str  # the payment or payout
    operation: Operation  # CAPTURE, REFUND or PAYOUT
    provider_key: str  # the idempotency key we sent
    provider_ref: str  # what the provider's answer called it (a capture: the authorization)
    amount: int
    currency: str
    expected_on: str  # ISO date the step finished (when the provider settled it)
    # Whether the provider moved money as far as we know (the step succeeded, or it was a
    # compensated capture and its undo); False: still running, or it failed.
    settled: bool = True
    phase: str = "succeeded"
    transfer_id: int = 0  # the ledger transfer that posted it (0: none)
    matched_on: str = ""  # the date of the report that matched it before ("" none)


class Discrepancy(msgspec.Struct, frozen=True, kw_only=True):
    """One thing that does not agree. ``key`` identifies it across runs of the same
    (provider, date), so a repeated run finds the same discrepancy, not a new one."""

    kind: DiscrepancyKind
    key: str
    amount: int  # minor units at stake (for an amount mismatch, the difference)
    currency: str
    expected: dict[str, Any] | None = None  # what our records say
    found: dict[str, Any] | None = None  # what the report says
    step_id: int = 0
    subject_id: str = ""
    transfer_id: int = 0
    provider_ref: str = ""


class Match(msgspec.Struct, frozen=True, kw_only=True):
    """A line linked to a record (matched, or one of its discrepancies)."""

    record_key: str
    step_id: int
    line: int  # index into the report's lines
    agrees: bool  # amount, currency and status agree
    late: bool  # the record was expected on an earlier date


class FeePosting(msgspec.Struct, frozen=True, kw_only=True):
    """A fee the provider kept, as a ledger transfer: fee account -> clearing account."""

    transfer_id: int
    debit_account_id: int  # the provider's fee account in the currency
    credit_account_id: int  # its clearing account in the currency
    amount: int
    currency: str
    record_key: str


class CurrencyTotals(msgspec.Struct, kw_only=True):
    lines: int = 0
    matched_count: int = 0
    matched_amount: int = 0
    unmatched_count: int = 0
    unmatched_amount: int = 0
    fees: int = 0


class Reconciliation(msgspec.Struct, frozen=True, kw_only=True):
    matches: list[Match]
    discrepancies: list[Discrepancy]
    fees: list[FeePosting]
    totals: dict[str, CurrencyTotals]
    late: list[str]  # record keys matched late: their earlier ``missing`` is closed

    @property
    def matched_count(self) -> int:
        return sum(t.matched_count for t in self.totals.values())

    @property
    def unmatched_count(self) -> int:
        return len(self.discrepancies)


def fee_account_id(config: PaymentsConfig, provider: str, currency: str) -> int:
    """The ledger account of the fees ``provider`` kept in ``currency``: its clearing
    account's id plus ``FEE_ACCOUNT_OFFSET``."""
    return clearing_account_id(config, provider, currency) + FEE_ACCOUNT_OFFSET


def fee_transfer_id(config: PaymentsConfig, provider: str, record_key: str) -> int:
    """The ledger id of the fee kept on record ``record_key``: derived, so a repeated run
    posts the same transfer (the ledger answers ``exists``), never a second one."""
    digest = hashlib.sha256(f"{provider}\0fee\0{record_key}".encode()).digest()
    offset = int.from_bytes(digest[:8], "big") % _FEE_TRANSFER_SPAN
    return config.system_id_base + FEE_TRANSFER_OFFSET + offset


def record_window(date: str) -> tuple[str, str]:
    """The first and last date (ISO, inclusive) of records a run of ``date`` reads."""
    day = dt.date.fromisoformat(date)
    return ((day - dt.timedelta(days=LOOKBACK_DAYS)).isoformat(),
            (day + dt.timedelta(days=1)).isoformat())


def _line_view(line: SettlementLine) -> dict[str, Any]:
    return {"operation": line.operation.value, "amount": line.amount,
            "currency": line.currency, "fee": line.fee, "idempotency_key": line.idempotency_key,
            "provider_ref": line.provider_ref, "line_ref": line.line_ref,
            "settled_on": line.settled_on}


def _record_view(record: Record) -> dict[str, Any]:
    return {"operation": record.operation.value, "amount": record.amount,
            "currency": record.currency, "idempotency_key": record.provider_key,
            "provider_ref": record.provider_ref, "step_id": record.step_id,
            "subject_id": record.subject_id, "phase": record.phase,
            "expected_on": record.expected_on}


class _Matcher:
    """One reconciliation's state; ``reconcile`` is its only user."""

    def __init__(self, provider: str, date: str, records: Sequence[Record],
                 config: PaymentsConfig) -> None:
        self.provider, self.date, self.config = provider, date, config
        self.records = sorted(records, key=lambda r: (r.step_id, r.key))
        self.by_key = {r.provider_key: r for r in self.records if r.provider_key}
        self.by_ref: dict[tuple[Operation, str], list[Record]] = {}
        for record in self.records:
            self.by_ref.setdefault((record.operation, record.provider_ref), []).append(record)
        self.used: set[str] = set()
        self.matches: list[Match] = []
        self.discrepancies: list[Discrepancy] = []
        self.fees: list[FeePosting] = []
        self.totals: dict[str, CurrencyTotals] = {}
        self.duplicates: dict[str, int] = {}
        yesterday = (dt.date.fromisoformat(date) - dt.timedelta(days=1)).isoformat()
        self.near = (yesterday, date)

    def _total(self, currency: str) -> CurrencyTotals:
        return self.totals.setdefault(currency, CurrencyTotals())

    def flag(self, discrepancy: Discrepancy) -> None:
        self.discrepancies.append(discrepancy)
        total = self._total(discrepancy.currency)
        total.unmatched_count += 1
        total.unmatched_amount = min(AMOUNT_MAX, total.unmatched_amount + discrepancy.amount)

    def find(self, line: SettlementLine) -> Record | None:
        """The record ``line`` names, by the rules of the module docstring."""
        if line.idempotency_key:
            record = self.by_key.get(line.idempotency_key)
            if record is not None:
                return record if record.operation is line.operation else None
        if line.provider_ref:
            candidates = self.by_ref.get((line.operation, line.provider_ref), [])
            free = [r for r in candidates if r.key not in self.used]
            same = [r for r in free if (r.amount, r.currency) == (line.amount, line.currency)]
            if same or free:
                return (same or free)[0]
            if candidates:
                return candidates[0]  # every one linked already: a duplicate
        if line.idempotency_key:
            return None
        for record in self.records:
            if (record.key not in self.used and not record.matched_on
                    and record.operation is line.operation and record.amount == line.amount
                    and record.currency == line.currency and record.expected_on in self.near):
                return record
        return None

    def take(self, index: int, line: SettlementLine) -> None:
        record = self.find(line)
        self._total(line.currency).lines += 1
        if record is None:
            identity = line.line_ref or line.idempotency_key or line.provider_ref
            self.flag(Discrepancy(
                kind=DiscrepancyKind.UNKNOWN, amount=line.amount, currency=line.currency,
                key=f"unknown:{line.operation.value}:{identity}:{self._nth(identity)}",
                found=_line_view(line), provider_ref=line.provider_ref))
            return
        if record.key in self.used or (record.matched_on and record.matched_on != self.date):
            self.flag(self._about(record, DiscrepancyKind.DUPLICATE, line, line.amount,
                                  line.currency, f"duplicate:{record.key}:"
                                                 f"{self._nth(record.key)}"))
            return
        self.used.add(record.key)
        agrees = self._compare(record, line)
        self.matches.append(Match(record_key=record.key, step_id=record.step_id, line=index,
                                  agrees=agrees, late=record.expected_on < self.date))
        if line.fee > 0 and record.settled and line.currency == record.currency:
            fees = fee_account_id(self.config, self.provider, record.currency)
            self.fees.append(FeePosting(
                transfer_id=fee_transfer_id(self.config, self.provider, record.key),
                debit_account_id=fees,
                # The clearing account in the fee account's placement: one shard, one
                # database (the provider's one account where the ledger keeps the old layout).
                credit_account_id=clearing_account_for(self.config, self.provider,
                                                       record.currency, fees),
                amount=line.fee, currency=record.currency, record_key=record.key))
            total = self._total(record.currency)
            total.fees = min(AMOUNT_MAX, total.fees + line.fee)

    def _nth(self, identity: str) -> int:
        """How many discrepancies named ``identity`` before (keeps keys distinct)."""
        count = self.duplicates.get(identity, 0)
        self.duplicates[identity] = count + 1
        return count

    def _compare(self, record: Record, line: SettlementLine) -> bool:
        """Flag what disagrees between a line and its record; True when all agrees."""
        if not record.settled:
            self.flag(self._about(record, DiscrepancyKind.STATUS_MISMATCH, line, line.amount,
                                  line.currency, f"status:{record.key}"))
        elif line.currency != record.currency:
            self.flag(self._about(record, DiscrepancyKind.CURRENCY_MISMATCH, line,
                                  record.amount, record.currency, f"currency:{record.key}"))
        elif line.amount != record.amount:
            self.flag(self._about(record, DiscrepancyKind.AMOUNT_MISMATCH, line,
                                  abs(line.amount - record.amount), record.currency,
                                  f"amount:{record.key}"))
        else:
            total = self._total(line.currency)
            total.matched_count += 1
            total.matched_amount = min(AMOUNT_MAX, total.matched_amount + line.amount)
            return True
        return False

    @staticmethod
    def _about(record: Record, kind: DiscrepancyKind, line: SettlementLine | None,
               amount: int, currency: str, key: str) -> Discrepancy:
        return Discrepancy(kind=kind, key=key, amount=amount, currency=currency,
                           expected=_record_view(record),
                           found=None if line is None else _line_view(line),
                           step_id=record.step_id, subject_id=record.subject_id,
                           transfer_id=record.transfer_id, provider_ref=record.provider_ref)

    def missing(self) -> None:
        for record in self.records:
            if (record.settled and record.expected_on == self.date
                    and record.key not in self.used
                    and record.matched_on in ("", self.date)):
                self.flag(self._about(record, DiscrepancyKind.MISSING, None, record.amount,
                                      record.currency, f"missing:{record.key}"))

    def batches(self, report: SettlementReport) -> None:
        net: dict[str, int] = {}
        entries: dict[str, int] = {}
        for line in report.lines:
            signed = line.amount if line.operation is Operation.CAPTURE else -line.amount
            net[line.currency] = net.get(line.currency, 0) + signed - line.fee
            entries[line.currency] = entries.get(line.currency, 0) + 1
        for fee in report.fees:
            net[fee.currency] = net.get(fee.currency, 0) - fee.amount
            entries[fee.currency] = entries.get(fee.currency, 0) + 1
        for batch in report.batches:
            expected = net.get(batch.currency, 0)
            if (expected, entries.get(batch.currency, 0)) != (batch.net, batch.entries):
                self.flag(Discrepancy(
                    kind=DiscrepancyKind.BATCH_MISMATCH, key=f"batch:{batch.batch_ref}",
                    amount=min(AMOUNT_MAX, abs(batch.net - expected)),
                    currency=batch.currency,
                    expected={"net": expected, "entries": entries.get(batch.currency, 0)},
                    found={"net": batch.net, "entries": batch.entries,
                           "batch_ref": batch.batch_ref}))


def reconcile(provider: str, date: str, report: SettlementReport, records: Sequence[Record],
              config: PaymentsConfig) -> Reconciliation:
    """Match ``report`` (the provider's report of ``date``) against ``records``.

    ``records`` are the provider's capture, refund and payout records expected from
    ``record_window(date)``, each with the date of the report that matched it before, if
    any. Raises ``ValueError`` for more than ``REPORT_LINES_MAX`` lines or ``RECORDS_MAX``
    records, or a record of another operation.
    """
    dt.date.fromisoformat(date)
    if len(report.lines) + len(report.fees) > REPORT_LINES_MAX or len(records) > RECORDS_MAX:
        raise ValueError("report or records beyond their limits")
    if any(r.operation not in (Operation.CAPTURE, Operation.REFUND, Operation.PAYOUT)
           for r in records):
        raise ValueError("records are captures, refunds and payouts")
    matcher = _Matcher(provider, date, records, config)
    for index, line in enumerate(report.lines):
        matcher.take(index, line)
    for fee in report.fees:
        matcher._total(fee.currency).lines += 1
        matcher.flag(Discrepancy(kind=DiscrepancyKind.UNEXPECTED_FEE, key=f"fee:{fee.fee_ref}",
                                 amount=fee.amount, currency=fee.currency,
                                 found={"fee_ref": fee.fee_ref, "amount": fee.amount,
                                        "currency": fee.currency,
                                        "settled_on": fee.settled_on}))
    matcher.missing()
    matcher.batches(report)
    late = [m.record_key for m in matcher.matches if m.late]
    return Reconciliation(matches=matcher.matches, discrepancies=matcher.discrepancies,
                          fees=matcher.fees, totals=matcher.totals, late=late)
