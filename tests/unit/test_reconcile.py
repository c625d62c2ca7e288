"""The settlement matcher (processor/payments/reconcile.py): each rule and each kind of
discrepancy on hand-made reports, and properties over generated ones."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processor.payments import (
    FEE_ACCOUNT_OFFSET,
    DiscrepancyKind,
    Operation,
    PaymentsConfig,
    Record,
    SettlementFee,
    SettlementLine,
    SettlementPayoutBatch,
    SettlementReport,
    clearing_account_for,
    clearing_account_id,
    fee_account_id,
    fee_transfer_id,
    reconcile,
    record_window,
)
from processor.service import placement_of
from processor.types import AMOUNT_MAX

CONFIG = PaymentsConfig()
DAY = "2026-12-06"
YESTERDAY = "2026-12-05"


def record(step_id: int, amount: int = 1_000, *, operation: Operation = Operation.CAPTURE,
           currency: str = "EUR", on: str = DAY, **extra: object) -> Record:
    fields: dict[str, object] = {
        "key": str(step_id), "step_id": step_id, "subject_id": f"pay_{step_id}",
        "operation": operation, "provider_key": f"txp-{step_id}-acme",
        "provider_ref": f"auth_{step_id}", "amount": amount, "currency": currency,
        "expected_on": on, "transfer_id": 2**62 + 4 * step_id}
    fields.update(extra)
    return msgspec.convert(fields, Record)


def line(rec: Record, *, fee: int = 30, on: str = DAY, **extra: object) -> SettlementLine:
    fields: dict[str, object] = {
        "provider_ref": rec.provider_ref, "idempotency_key": rec.provider_key,
        "operation": rec.operation, "amount": rec.amount, "currency": rec.currency,
        "fee": fee, "settled_on": on, "line_ref": f"cap_{rec.step_id}"}
    fields.update(extra)
    return msgspec.convert(fields, SettlementLine)


def run(lines: list[SettlementLine], records: list[Record], **report: object
        ) -> tuple[dict[str, int], object]:
    result = reconcile("acme", DAY, SettlementReport(lines=lines, **report),  # type: ignore[arg-type]
                       records, CONFIG)
    kinds: dict[str, int] = {}
    for discrepancy in result.discrepancies:
        kinds[discrepancy.kind.value] = kinds.get(discrepancy.kind.value, 0) + 1
    return kinds, result


def test_everything_agrees() -> None:
    """A report that says exactly what our records say matches every line, flags nothing,
    and posts each line's fee from the fee account to the clearing account."""
    records = [record(1), record(2, 500, operation=Operation.REFUND),
               record(3, 700, operation=Operation.PAYOUT)]
    kinds, result = run([line(r) for r in records], records)
    assert kinds == {}
    assert result.matched_count == 3  # type: ignore[attr-defined]
    assert result.totals["EUR"].matched_amount == 2_200  # type: ignore[attr-defined]
    fees = result.fees  # type: ignore[attr-defined]
    assert [f.amount for f in fees] == [30, 30, 30]
    assert {f.debit_account_id for f in fees} == {fee_account_id(CONFIG, "acme", "EUR")}
    # Credited to the clearing account in the fee account's placement: one shard.
    fees_account = fee_account_id(CONFIG, "acme", "EUR")
    assert {f.credit_account_id for f in fees} == {
        clearing_account_for(CONFIG, "acme", "EUR", fees_account)}
    assert all(placement_of(f.credit_account_id) == placement_of(fees_account) for f in fees)
    one = msgspec.structs.replace(CONFIG, clearing_per_partition=False)
    assert clearing_account_for(one, "acme", "EUR", fees_account) == clearing_account_id(
        CONFIG, "acme", "EUR")


@pytest.mark.parametrize(("change", "kind", "amount"), [
    ({"amount": 1_100}, DiscrepancyKind.AMOUNT_MISMATCH, 100),
    ({"amount": 1}, DiscrepancyKind.AMOUNT_MISMATCH, 999),
    ({"currency": "USD"}, DiscrepancyKind.CURRENCY_MISMATCH, 1_000),
])
def test_a_line_that_disagrees_is_flagged_with_what_is_at_stake(
        change: dict[str, object], kind: DiscrepancyKind, amount: int) -> None:
    """A line that names our step but differs in amount or currency is one discrepancy
    about that step, carrying the difference (or the amount) at stake and both sides."""
    rec = record(1)
    kinds, result = run([line(rec, **change)], [rec])
    assert kinds == {kind.value: 1}
    [found] = result.discrepancies  # type: ignore[attr-defined]
    assert (found.amount, found.step_id, found.transfer_id) == (amount, 1, rec.transfer_id)
    assert found.expected["amount"] == 1_000 and found.found is not None
    assert result.matched_count == 0  # type: ignore[attr-defined]


def test_missing_unknown_duplicate_and_fee() -> None:
    """A step left out is missing; a line naming nothing is unknown; a second line for a
    step is a duplicate (no second fee); a fee on its own is an unexpected fee."""
    one, two = record(1), record(2, 2_000)
    stranger = line(record(99, 1_234), idempotency_key="sim-unknown-1", provider_ref="x")
    fee = SettlementFee(fee_ref="fee_1", amount=99, currency="EUR", settled_on=DAY)
    kinds, result = run([line(one), line(one), stranger], [one, two], fees=[fee])
    assert kinds == {"missing": 1, "unknown": 1, "duplicate": 1, "unexpected_fee": 1}
    by_kind = {d.kind: d for d in result.discrepancies}  # type: ignore[attr-defined]
    assert by_kind[DiscrepancyKind.MISSING].amount == 2_000
    assert by_kind[DiscrepancyKind.UNKNOWN].amount == 1_234
    assert by_kind[DiscrepancyKind.DUPLICATE].amount == 1_000
    assert by_kind[DiscrepancyKind.UNEXPECTED_FEE].amount == 99
    assert len(result.fees) == 1  # type: ignore[attr-defined]


def test_late_settlement_matches_and_is_reported_late() -> None:
    """A step of yesterday that no report matched yet matches today's line, late; a step
    of yesterday is never missing from today's report."""
    late, unseen = record(1, on=YESTERDAY), record(2, on=YESTERDAY)
    kinds, result = run([line(late)], [late, unseen])
    assert kinds == {}
    assert result.late == ["1"]  # type: ignore[attr-defined]


def test_a_step_matched_by_another_days_report_is_a_duplicate_there() -> None:
    """A line for a step another day's report already matched is a duplicate; a step
    matched by an earlier run of the same day matches again (a repeated run)."""
    other, same = record(1, matched_on=YESTERDAY), record(2, matched_on=DAY)
    kinds, result = run([line(other), line(same)], [other, same])
    assert kinds == {"duplicate": 1}
    assert [m.record_key for m in result.matches] == ["2"]  # type: ignore[attr-defined]


def test_reference_then_amount_rules() -> None:
    """Without our key, a line matches by the provider's reference (partial captures of one
    authorization: the one of the same amount first), and a line with no key at all by
    amount, currency and operation among records of that day or the day before."""
    first = record(1, 300, provider_ref="auth_x")
    second = record(2, 700, provider_ref="auth_x")
    loose = record(3, 5_000, operation=Operation.PAYOUT, provider_ref="po_3", on=YESTERDAY)
    lines = [line(second, idempotency_key="other"), line(first, idempotency_key="other2"),
             line(loose, idempotency_key="", provider_ref="")]
    kinds, result = run(lines, [first, second, loose])
    assert kinds == {}
    assert [m.record_key for m in result.matches] == ["2", "1", "3"]  # type: ignore[attr-defined]


def test_a_line_with_a_key_we_never_sent_is_not_matched_by_amount() -> None:
    """The amount rule is only for lines without a key: a made-up line of the same amount as
    a step left out is unknown, and the step stays missing."""
    rec = record(1)
    stranger = line(rec, idempotency_key="sim-unknown-2", provider_ref="nothing")
    kinds, _ = run([stranger], [rec])
    assert kinds == {"unknown": 1, "missing": 1}


def test_a_step_still_running_or_failed_is_a_status_mismatch() -> None:
    """A line for a step that has not succeeded here is a status mismatch; such a step is
    never missing."""
    running = record(1, settled=False, phase="await_provider")
    failed = record(2, settled=False, phase="failed")
    kinds, result = run([line(running)], [running, failed])
    assert kinds == {"status_mismatch": 1}
    assert result.fees == []  # type: ignore[attr-defined]


def test_a_batch_that_is_not_the_net_of_its_lines() -> None:
    """A payout batch must be the net of its currency's lines and fees: one that is not is
    flagged with the difference; one that is passes."""
    rec = record(1)
    good = SettlementPayoutBatch(batch_ref="b1", currency="EUR", net=1_000 - 30, entries=1,
                                 settled_on=DAY)
    kinds, _ = run([line(rec)], [rec], batches=[good])
    assert kinds == {}
    bad = msgspec.structs.replace(good, net=900)
    kinds, result = run([line(rec)], [rec], batches=[bad])
    assert kinds == {"batch_mismatch": 1}
    assert result.discrepancies[0].amount == 70  # type: ignore[attr-defined]


def test_ids_are_derived_and_in_the_processors_range() -> None:
    """Fee accounts sit beside the clearing accounts and fee transfer ids are stable, in the
    reserved range above every step transfer id, and different per record."""
    assert fee_account_id(CONFIG, "acme", "EUR") == (
        clearing_account_id(CONFIG, "acme", "EUR") + FEE_ACCOUNT_OFFSET)
    top = clearing_account_id(CONFIG, "acme", "AAA") + 2**20
    assert fee_account_id(CONFIG, "acme", "ZZZ") < top
    ids = {fee_transfer_id(CONFIG, "acme", str(n)) for n in range(1_000)}
    assert len(ids) == 1_000
    assert all(2**62 + 2**61 <= i < 2**63 - 1 for i in ids)
    assert fee_transfer_id(CONFIG, "acme", "7") == fee_transfer_id(CONFIG, "acme", "7")
    assert fee_transfer_id(CONFIG, "acme", "7") != fee_transfer_id(CONFIG, "globex", "7")
    assert record_window(DAY) == ("2026-11-29", "2026-12-07")


def test_limits_are_refused() -> None:
    """Records of an operation that settles nothing are refused, as is a bad date."""
    with pytest.raises(ValueError, match="records"):
        reconcile("acme", DAY, SettlementReport(lines=[]),
                  [record(1, operation=Operation.VOID)], CONFIG)
    with pytest.raises(ValueError):
        reconcile("acme", "2026-02-31", SettlementReport(lines=[]), [], CONFIG)


# --- properties --------------------------------------------------------------------------------

_ops = st.sampled_from([Operation.CAPTURE, Operation.REFUND, Operation.PAYOUT])
_amounts = st.one_of(st.just(1), st.just(AMOUNT_MAX), st.integers(1, 10**9))
_records = st.lists(st.tuples(_ops, _amounts, st.sampled_from(["EUR", "USD"])),
                    min_size=0, max_size=12)
# What happens to each record's line: reported as is, left out, doubled, or changed.
_fates = st.sampled_from(["same", "missing", "duplicate", "amount", "currency"])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_records, st.data())
def test_every_line_and_record_is_accounted_for_once(
        specs: list[tuple[Operation, int, str]], data: st.DataObject) -> None:
    """Whatever the report does to our records, each record is matched, mismatched or
    missing exactly once, each extra line is a duplicate, the discrepancies are exactly the
    fates drawn, and running again over the same input decides the same."""
    records = [record(i + 1, amount, operation=op, currency=currency)
               for i, (op, amount, currency) in enumerate(specs)]
    fates = data.draw(st.lists(_fates, min_size=len(records), max_size=len(records)))
    lines: list[SettlementLine] = []
    for rec, fate in zip(records, fates, strict=True):
        if fate == "same":
            lines.append(line(rec))
        elif fate == "duplicate":
            lines += [line(rec), line(rec)]
        elif fate == "amount":
            lines.append(line(rec, amount=rec.amount - 1 if rec.amount > 1 else 2))
        elif fate == "currency":
            lines.append(line(rec, currency="USD" if rec.currency == "EUR" else "EUR"))
    report = SettlementReport(lines=lines)
    result = reconcile("acme", DAY, report, records, CONFIG)
    expected = {"missing": fates.count("missing"), "duplicate": fates.count("duplicate"),
                "amount_mismatch": fates.count("amount"),
                "currency_mismatch": fates.count("currency")}
    kinds = {k: 0 for k in expected}
    for discrepancy in result.discrepancies:
        kinds[discrepancy.kind.value] += 1
    assert kinds == expected
    assert result.matched_count == fates.count("same") + fates.count("duplicate")
    linked = {m.record_key for m in result.matches}
    missing = {d.step_id for d in result.discrepancies if d.kind is DiscrepancyKind.MISSING}
    assert linked.isdisjoint({str(s) for s in missing})
    assert len(linked) + len(missing) == len(records)
    assert len({d.key for d in result.discrepancies}) == len(result.discrepancies)
    assert reconcile("acme", DAY, report, list(reversed(records)), CONFIG) == result
