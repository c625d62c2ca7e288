"""Disputes (chargebacks): the pure rules of a dispute object and of its ledger steps.

A payer's bank may take back (part of) a captured payment; the provider tells us by webhook
and charges a dispute fee. A dispute moves ``needs_response`` -> ``under_review`` (evidence
submitted, ``POST /v1/disputes/{id}/evidence``) -> ``won`` | ``lost`` (the provider's
decision, by webhook); a provider may decide without evidence, straight from
``needs_response``.

Its money moves as saga steps of the dispute (``subject_id`` the dispute's id, so they never
block the payment's own steps), each with its own four ledger ids
(``processor.payments.saga.ledger_transfers``):

* ``dispute_hold`` when it opens: **pending** disputed amount and **pending** fee, merchant
  -> the provider's clearing account, linked, without timeout: the merchant's available
  balance drops by both while the dispute is open, and no payout can spend them;
* ``dispute_lost``: **post** both holds (the money leaves the merchant);
* ``dispute_won``: **void** the amount hold and **post** the fee hold (the provider keeps
  its fee whatever the outcome, as card networks charge it);
* ``dispute_evidence``: no ledger transfer; one provider call, idempotent by the step's key.

This module decides; ``actors/payments/engine.py`` and ``store.py`` do the I/O.
"""

from __future__ import annotations

import datetime as dt
import enum

import msgspec

from processor.errors import TxprocError, register
from processor.types import AMOUNT_MAX

__all__ = [
    "DISPUTE_EVENT_TYPES",
    "EVIDENCE_FILES_MAX",
    "EVIDENCE_FILE_CHARS_MAX",
    "EVIDENCE_TEXT_CHARS_MAX",
    "Dispute",
    "DisputeError",
    "DisputeStatus",
    "DisputeView",
    "DisputesPage",
    "Evidence",
    "EvidenceRequest",
    "check_dispute_opening",
    "check_evidence",
    "check_evidence_allowed",
    "disputable_amount",
    "dispute_status_after",
]

EVIDENCE_TEXT_CHARS_MAX = 20_000
EVIDENCE_FILES_MAX = 10
EVIDENCE_FILE_CHARS_MAX = 500


class DisputeStatus(enum.StrEnum):
    NEEDS_RESPONSE = "needs_response"  # opened; the merchant may submit evidence
    UNDER_REVIEW = "under_review"  # evidence submitted; the provider decides
    WON = "won"  # decided for the merchant: the amount is released, the fee kept
    LOST = "lost"  # decided for the payer: amount and fee leave the merchant


DISPUTE_EVENT_TYPES: tuple[str, ...] = tuple(f"dispute.{s.value}" for s in DisputeStatus)
_DECIDED = frozenset({DisputeStatus.WON, DisputeStatus.LOST})


register(400, {"invalid_evidence": "evidence text or files outside their limits"})
register(404, {"dispute_not_found": "no dispute of the tenant has this id"})
register(422, {
    "dispute_not_open": "the dispute no longer takes evidence",
    "evidence_deadline_passed": "the provider takes no evidence for this dispute any more",
    "evidence_not_accepted": "the provider refused the evidence",
})


class DisputeError(TxprocError):
    """A dispute request or notice the rules refuse; ``code`` is stable.

    The codes of a provider's notice (``dispute_payment_not_captured``,
    ``dispute_exceeds_captured``, ``dispute_fee_invalid``) are recorded with the notice and
    never answered, so they are not registered.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message, code=code)


class Evidence(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    files: list[str] = []


class EvidenceRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/disputes/{id}/evidence``. The limits are checked after decoding
    (``check_evidence``), so every breach is the one code ``invalid_evidence``; the OpenAPI
    document states them."""

    text: str
    files: list[str] = []


class Dispute(msgspec.Struct, frozen=True, kw_only=True):
    id: str  # dp_ and 24 hex digits, derived from the provider and its dispute id
    payment_id: str
    provider: str
    provider_dispute_id: str
    merchant_account_id: int
    amount: int
    fee: int
    currency: str
    status: DisputeStatus
    reason: str = ""
    evidence_due_at: dt.datetime | None = None
    # The first of the dispute_hold step's ledger ids (amount hold; fee hold the next id);
    # 0 when the ledger refused the holds (docs/runbooks/disputes.md).
    hold_transfer_id: int = 0
    evidence: Evidence | None = None
    error: str = ""  # why the last step of the dispute failed ('' when none did)
    created_at: dt.datetime | None = None


class DisputeView(msgspec.Struct, frozen=True, kw_only=True):
    """A dispute as the API shows it."""

    id: str
    payment_id: str
    status: str
    amount: int
    fee: int
    currency: str
    merchant_account_id: int
    provider: str
    reason: str
    evidence_due_by: str  # RFC 3339, '' when the provider gave no deadline
    evidence: Evidence | None
    error: str
    created_at: str


class DisputesPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[DisputeView]
    next_cursor: str | None


def disputable_amount(captured: int, refunded: int, disputed: int) -> int:
    """What may still be disputed of a payment: captured, less refunded, less what its
    other disputes (open or lost) already took."""
    return max(0, captured - refunded - disputed)


def check_dispute_opening(*, captured: int, refunded: int, disputed: int, amount: int,
                          fee: int) -> None:
    """A provider's new dispute is taken only on a payment with something captured, never
    for more than captured minus refunded (less other disputes), with a fee in range."""
    if captured == 0:
        raise DisputeError("dispute_payment_not_captured",
                           "the disputed payment has nothing captured")
    if not 1 <= amount <= disputable_amount(captured, refunded, disputed):
        raise DisputeError("dispute_exceeds_captured",
                           "the disputed amount exceeds what was captured and not refunded")
    if not 0 <= fee <= AMOUNT_MAX:
        raise DisputeError("dispute_fee_invalid", "the dispute fee is out of range")


def check_evidence_allowed(dispute: Dispute) -> None:
    """Evidence is taken while the dispute needs a response, once."""
    if dispute.status != DisputeStatus.NEEDS_RESPONSE:
        raise DisputeError("dispute_not_open",
                           f"a dispute in status {dispute.status} takes no evidence")


def check_evidence(request: EvidenceRequest) -> Evidence:
    """Bounded text and up to ten document references: ``invalid_evidence`` otherwise.
    (Card numbers are refused before, by the card scan of the request body.)"""
    text = request.text
    if not text.strip() or len(text) > EVIDENCE_TEXT_CHARS_MAX or "\x00" in text:
        raise DisputeError("invalid_evidence",
                           f"text must be 1 to {EVIDENCE_TEXT_CHARS_MAX} characters, not "
                           "blank, without U+0000")
    if len(request.files) > EVIDENCE_FILES_MAX:
        raise DisputeError("invalid_evidence", f"at most {EVIDENCE_FILES_MAX} files")
    for ref in request.files:
        if not 1 <= len(ref) <= EVIDENCE_FILE_CHARS_MAX or not ref.isprintable():
            raise DisputeError("invalid_evidence",
                               f"a file reference is 1 to {EVIDENCE_FILE_CHARS_MAX} printable "
                               "characters")
    return Evidence(text=text, files=list(request.files))


def dispute_status_after(current: DisputeStatus, notice_status: str) -> DisputeStatus | None:
    """The status a provider's notice moves an existing dispute to, or None when it changes
    nothing (a repeat, a late ``under_review``, a word we do not know, or a decision after
    a decision: a decided dispute stays decided)."""
    try:
        said = DisputeStatus(notice_status)
    except ValueError:
        return None
    if current in _DECIDED or said == current:
        return None
    if said in _DECIDED:
        return said
    if said == DisputeStatus.UNDER_REVIEW and current == DisputeStatus.NEEDS_RESPONSE:
        return said
    return None

