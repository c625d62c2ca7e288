"""The public messages of the payments API, shared by HTTP, RPC and the client.

Inbound structs are strict (unknown fields are refused); amounts are integer minor units
with the same limits as the ledger's. A payment method is a provider-issued token
(``pm_...``), a payout destination a tokenised bank account (``ba_...``): the API never
accepts card or account numbers (``processor/cardscan.py`` refuses any that slip in).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from processor.types import AMOUNT_MAX, ID_MAX

__all__ = [
    "AuthorizeRequest",
    "CaptureRequest",
    "CaptureView",
    "IncrementRequest",
    "OperationView",
    "PartialCaptureRequest",
    "PaymentView",
    "PaymentsPage",
    "PayoutRequest",
    "PayoutView",
    "PayoutsPage",
    "RefundRequest",
    "RefundView",
    "RefundsPage",
]

Amount = Annotated[int, Meta(ge=1, le=AMOUNT_MAX)]
AccountId = Annotated[int, Meta(ge=1, le=ID_MAX)]
Currency = Annotated[str, Meta(pattern="^[A-Z]{3}$")]
PaymentMethod = Annotated[str, Meta(pattern="^pm_[A-Za-z0-9_]{8,64}$")]
Destination = Annotated[str, Meta(pattern="^ba_[A-Za-z0-9_]{8,64}$")]
Reference = Annotated[str, Meta(max_length=64, pattern="^[A-Za-z0-9_.:-]*$")]
# The data subject (the client's reference for the person a payment concerns): its
# personal fields are sealed with that subject's key and erased with it (processor/
# privacy.py). Spelled here, not imported, so the API's structs stand alone.
CustomerRef = Annotated[str, Meta(max_length=100, pattern="^[A-Za-z0-9_.:@+-]*$")]
ProviderName = Annotated[str, Meta(pattern="^[a-z][a-z0-9_]{0,31}$")]
# Checked after decoding (processor.payments.listing.check_metadata), so that every breach
# of its limits is the one code invalid_metadata; the OpenAPI document states the limits.
Metadata = dict[str, Any]
# A capture of a payment: ``cap_`` and its step id (CaptureView.id).
CaptureId = Annotated[str, Meta(pattern="^cap_[1-9][0-9]{0,18}$")]


class AuthorizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    payment_method: PaymentMethod
    merchant_account_id: AccountId
    capture: bool = False
    provider: ProviderName | None = None  # a preference; failover may still choose another
    reference: Reference = ""
    metadata: Metadata = {}
    customer_ref: CustomerRef = ""  # "": no data subject named


class CaptureRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/payments/{id}/capture``: one final capture."""

    amount: Amount | None = None  # None: all that is still authorized


class PartialCaptureRequest(msgspec.Struct, frozen=True, kw_only=True,
                            forbid_unknown_fields=True):
    """``POST /v1/payments/{id}/captures``: one of several captures. ``final`` closes the
    authorization (the rest is released); otherwise the rest stays capturable."""

    amount: Amount
    final: bool


class IncrementRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``POST /v1/payments/{id}/increments``: raise the authorized amount by ``amount``."""

    amount: Amount


class RefundRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # None: everything captured (of ``capture_id`` when given) and not yet refunded
    amount: Amount | None = None
    capture_id: CaptureId | None = None  # refund this capture; None: the payment
    metadata: Metadata = {}


class PayoutRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    amount: Amount
    currency: Currency
    merchant_account_id: AccountId
    destination: Destination
    provider: ProviderName | None = None
    reference: Reference = ""
    metadata: Metadata = {}
    customer_ref: CustomerRef = ""  # "": no data subject named


class OperationView(msgspec.Struct, frozen=True, kw_only=True):
    """One step of a payment's life as the API shows it."""

    id: str  # op_<step id>
    kind: str  # authorize, capture, void, refund, payout, increment
    status: str  # processing, succeeded, failed, compensated
    amount: int
    provider: str
    decline_code: str = ""
    error: str = ""
    capture_id: str = ""  # a refund of one capture: that capture's id


class CaptureView(msgspec.Struct, frozen=True, kw_only=True):
    """A capture of a payment (a child object: every capture operation is one)."""

    id: str  # cap_<step id>
    amount: int
    final: bool  # it closed the authorization
    status: str  # processing, succeeded, failed, compensated
    refunded_amount: int  # by refunds that named this capture


class PaymentView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str
    amount: int
    currency: str
    merchant_account_id: int
    provider: str
    captured_amount: int
    refunded_amount: int
    decline_code: str = ""
    error: str = ""
    risk_reason: str = ""
    reference: str | None = ""  # null once erased
    operations: list[OperationView] = []
    metadata: dict[str, str] | None = {}  # null once erased
    created_at: str = ""  # RFC 3339, UTC
    capturable_amount: int = 0  # still authorized (held) and capturable
    captures: list[CaptureView] = []
    customer_ref: str | None = ""  # the data subject; null once erased
    erased: bool = False  # the subject was erased: its personal fields are gone


class PayoutView(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    status: str
    amount: int
    currency: str
    merchant_account_id: int
    destination: str
    provider: str
    decline_code: str = ""
    error: str = ""
    reference: str | None = ""  # null once erased
    metadata: dict[str, str] | None = {}  # null once erased
    created_at: str = ""  # RFC 3339, UTC
    customer_ref: str | None = ""  # the data subject; null once erased
    erased: bool = False  # the subject was erased: its personal fields are gone


class RefundView(msgspec.Struct, frozen=True, kw_only=True):
    """A refund: the refund step of a payment (its ``operations`` show it as well)."""

    id: str  # op_<step id>, as in the payment's operations
    payment_id: str
    status: str  # processing, succeeded, failed, compensated
    amount: int
    currency: str
    merchant_account_id: int
    provider: str
    decline_code: str = ""
    error: str = ""
    metadata: dict[str, str] = {}
    created_at: str = ""  # RFC 3339, UTC


# Pages of the lists (processor.payments.listing): newest first; next_cursor is null on the
# last page, else the ``cursor`` that reads on.
class PaymentsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[PaymentView]
    next_cursor: str | None


class PayoutsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[PayoutView]
    next_cursor: str | None


class RefundsPage(msgspec.Struct, frozen=True, kw_only=True):
    data: list[RefundView]
    next_cursor: str | None
