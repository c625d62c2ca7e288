"""The payments engine: runs the saga steps of processor/payments/saga.py against the world.

It lives in the payments actor (``actors/payments/actor.py``), a failure domain apart from
the ledger, and posts to the ledger through the front's RPC like any gateway, so its
postings join the same micro-batched lanes. It is the recovery worker too: ``recover_once`` takes
over every unfinished step whose claim lapsed or whose recheck is due, at start-up and on a
schedule. The rules are in ``processor/payments/saga.py``; this module only performs what they
decide and persists each phase before and after every external call:

* before a provider call the step is stored in ``PROVIDER`` with its claim (``due_at``);
* after it, the new phase is stored before anything else happens;
* ledger postings use the step's own transfer ids, provider calls the step's own key,
  so whatever a crashed runner did is repeated harmlessly by whoever takes over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import hashlib
import logging
import random
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import msgspec

from actors.ops import metrics, telemetry
from actors.payments.provider import ProviderLink
from actors.payments.store import KeyHold, KeyTaken, PaymentStore
from actors.risk import RiskLink
from processor.codes import AccountResult, TransferResult
from processor.errors import LedgerError, Unavailable
from processor.identity import tenant_of_principal
from processor.payments import (
    AuthorizeRequest,
    CaptureView,
    Dispute,
    DisputeError,
    DisputeNotice,
    DisputeStatus,
    DisputeView,
    Evidence,
    Kind,
    Operation,
    OperationView,
    Outcome,
    Payment,
    PaymentError,
    PaymentsConfig,
    PaymentStatus,
    PaymentView,
    Payout,
    PayoutRequest,
    PayoutStatus,
    PayoutView,
    Phase,
    ProviderReply,
    ProviderRequest,
    RefundView,
    Step,
    WebhookEvent,
    capture_named,
    captures_of,
    check_capture,
    check_evidence_allowed,
    check_increment,
    check_refund,
    check_void,
    clearing_account_id,
    clearing_accounts_of,
    compensation_request,
    dispute_status_after,
    early_transfers,
    hold_left_s,
    holds_early,
    ledger_transfers,
    new_step,
    on_ledger,
    on_provider,
    on_status,
    payment_after,
    provider_request,
    recheck_delay_s,
    refundable_amount,
    status_request,
    step_result,
)
from processor.request_audit import AuditSlot
from processor.risk import RiskConfig, RiskDecision, fallback
from processor.service import LedgerService
from processor.types import Account

__all__ = ["PaymentsEngine", "dispute_view", "payment_view", "payout_view", "refund_view",
           "step_key_of"]

log = logging.getLogger("txproc.payments")

# The audit record (actors/edge/audit.py) of the request being served, set by the endpoint
# for the request's task; the steps it starts carry it (0 for work no request started).
REQUEST_ORIGIN: contextvars.ContextVar[int] = contextvars.ContextVar("request_origin",
                                                                     default=0)
# That record itself, when the edge handed it over to be written here (a request that
# claims an Idempotency-Key: processor/request_audit.py): written by the request's first
# statement (the create, or the key's claim), or by the endpoint before it answers a
# request that wrote nothing.
REQUEST_AUDIT: contextvars.ContextVar[AuditSlot | None] = contextvars.ContextVar(
    "request_audit", default=None)

# A provider call that takes longer than its retry deadline and this margin is treated as
# unanswered (unknown).
PROVIDER_CALL_MARGIN_S = 5.0
RECOVERY_BATCH_MAX = 64
MERCHANTS_REMEMBERED_MAX = 100_000
KEY_PURGE_INTERVAL_S = 300.0
# How long a provider's event about a call this process is making waits for the call's
# answer to be stored, rather than being sent back to be delivered again later. Well
# inside the time a provider gives a delivery before it calls it failed (the simulators
# give 5 s), so a wait does not turn into a timed-out delivery.
EVENT_WAITS_FOR_ANSWER_S = 2.0


def _op_status(phase: Phase) -> str:
    if phase == Phase.SUCCEEDED:
        return "succeeded"
    if phase == Phase.FAILED:
        return "failed"
    if phase == Phase.COMPENSATED:
        return "compensated"
    return "processing"


def capture_id_text(step_id: int) -> str:
    """A capture's id in the API: ``cap_`` and its step id."""
    return f"cap_{step_id}" if step_id else ""


def payment_view(payment: Payment, steps: Sequence[Step]) -> PaymentView:
    return PaymentView(
        id=payment.id, status=payment.status.value, amount=payment.amount,
        currency=payment.currency, merchant_account_id=payment.merchant_account_id,
        provider=payment.provider, captured_amount=payment.captured_amount,
        refunded_amount=payment.refunded_amount, decline_code=payment.decline_code,
        error=payment.error, risk_reason=payment.risk_reason,
        reference=None if payment.erased else payment.reference,
        operations=[OperationView(id=f"op_{s.id}", kind=s.kind.value,
                                  status=_op_status(s.phase), amount=s.amount,
                                  provider=s.provider, decline_code=s.decline_code,
                                  error=s.error, capture_id=capture_id_text(s.capture_id))
                    for s in steps],
        metadata=None if payment.erased else payment.metadata,
        created_at=_rfc3339(payment.created_at),
        capturable_amount=payment.capturable_amount,
        captures=[CaptureView(id=capture_id_text(c.step_id), amount=c.amount, final=c.final,
                              status=_op_status(c.phase), refunded_amount=c.refunded_amount)
                  for c in captures_of(steps)],
        customer_ref=None if payment.erased else payment.customer_ref,
        erased=payment.erased,
    )


def _rfc3339(moment: dt.datetime | None) -> str:
    return "" if moment is None else moment.astimezone(dt.UTC).isoformat()


def _utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)


def refund_view(row: dict[str, Any]) -> RefundView:
    """A refund as the refunds list shows it, from ``PaymentStore.list_refunds``' row."""
    return RefundView(
        id=f"op_{row['id']}", payment_id=row["subject_id"],
        status=_op_status(Phase(row["phase"])), amount=row["amount"], currency=row["currency"],
        merchant_account_id=row["merchant_account_id"], provider=row["provider"],
        decline_code=row["decline_code"], error=row["error"], metadata=row["metadata"],
        created_at=_rfc3339(row["created_at"]))


def dispute_view(dispute: Dispute) -> DisputeView:
    return DisputeView(
        id=dispute.id, payment_id=dispute.payment_id, status=dispute.status.value,
        amount=dispute.amount, fee=dispute.fee, currency=dispute.currency,
        merchant_account_id=dispute.merchant_account_id, provider=dispute.provider,
        reason=dispute.reason, evidence_due_by=_rfc3339(dispute.evidence_due_at),
        evidence=dispute.evidence, error=dispute.error,
        created_at=_rfc3339(dispute.created_at))


def dispute_id_of(provider: str, dispute_ref: str) -> str:
    """Our id of a provider's dispute: derived, so every notice about it names the same
    dispute without a lookup of its own."""
    digest = hashlib.sha256(f"{provider}\x00{dispute_ref}".encode()).hexdigest()
    return f"dp_{digest[:24]}"


def payout_view(payout: Payout) -> PayoutView:
    return PayoutView(
        id=payout.id, status=payout.status.value, amount=payout.amount,
        currency=payout.currency, merchant_account_id=payout.merchant_account_id,
        destination=payout.destination, provider=payout.provider,
        decline_code=payout.decline_code, error=payout.error,
        reference=None if payout.erased else payout.reference,
        metadata=None if payout.erased else payout.metadata,
        created_at=_rfc3339(payout.created_at),
        customer_ref=None if payout.erased else payout.customer_ref, erased=payout.erased)


class PaymentsEngine:
    def __init__(
        self,
        *,
        store: PaymentStore,
        ledger: LedgerService,
        providers: dict[str, ProviderLink],
        currencies: dict[str, frozenset[str]],
        provider_deadline_s: dict[str, float],
        risk: RiskLink | None,
        risk_config: RiskConfig,
        config: PaymentsConfig,
        clock_s: Callable[[], float] = time.time,
        new_id: Callable[[str], str] | None = None,
        rng: random.Random | None = None,
        capabilities: dict[str, frozenset[Operation]] | None = None,
    ) -> None:
        config.check()
        self.store = store
        self._ledger = ledger
        self._providers = providers
        self._currencies = currencies
        # What each provider offers beyond the basic operations (its adapter's declaration),
        # so a request it cannot serve is refused before it is asked.
        self._capabilities = capabilities or {}
        self._deadline_s = provider_deadline_s
        self._risk = risk
        self._risk_config = risk_config
        self.config = config
        self._clock_s = clock_s
        # Spreads rechecks (recheck_delay_s); not for secrets.
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not a secret
        self._new_id = new_id or (lambda prefix: prefix + secrets.token_hex(12))
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats: dict[str, int] = {"recovered": 0, "parked": 0, "lost_claims": 0,
                                      "events_waited": 0}
        # Merchant account id -> (currency, tenant slot): neither ever changes.
        self._merchant_currency: dict[int, tuple[str, int]] = {}
        # One payout at a time per merchant account, from its funds check until its step
        # has run (see payout()).
        self._payout_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = \
            weakref.WeakValueDictionary()
        # Provider key -> set once the answer to the provider call this process is making
        # under that key is stored (see apply_webhook).
        self._answers_pending: dict[str, asyncio.Event] = {}

    # -- start-up -----------------------------------------------------------------------------

    async def open_clearing_accounts(self) -> None:
        """Create every provider's clearing account per currency, and with
        ``clearing_per_partition`` its clearing account in each ledger placement (repeats
        are ``exists``)."""
        accounts = []
        for name in self.config.provider_order:
            for currency in sorted(self._currencies.get(name, ())):
                ids = [clearing_account_id(self.config, name, currency)]
                if self.config.clearing_per_partition:
                    ids += clearing_accounts_of(self.config.system_id_base, name, currency)
                accounts += [Account(id=i, currency=currency) for i in ids]
        results = await self._ledger.create_accounts(accounts)
        bad = [r for r in results if r not in (AccountResult.ok, AccountResult.exists)]
        if bad:
            raise RuntimeError(f"clearing accounts refused: {sorted({r.name for r in bad})}")

    # -- the API's operations -----------------------------------------------------------------

    async def authorize(self, request: AuthorizeRequest, *, principal: str,
                        request_key: str = "", hold: KeyHold | None = None,
                        answer: Callable[[PaymentView], tuple[int, bytes] | None] | None = None
                        ) -> PaymentView:
        """Authorize (and with ``capture``, capture) a payment.

        ``request_key`` identifies the request (a hash of its Idempotency-Key); the payment
        id derives from it, so a request executed again (after its key's claim lapsed, or
        after it was released) finds the payment it created instead of creating another.
        That is found when the payment is created (``create_payment`` answers False), not
        looked up before: a new request, the common case, costs no read for it.

        ``hold`` and ``answer`` (the request's Idempotency-Key and how its answer is
        written, None for an answer not to keep): when the authorization ends in the
        request, its final save stores the answer under the key as well
        (``PaymentStore.save_step``).
        """
        providers = self._providers_for(request.currency, request.provider)
        await self._require_merchant(request.merchant_account_id, request.currency, principal)
        payment_id = f"pay_{request_key[:24]}" if request_key else self._new_id("pay_")
        # The payment's id follows from its Idempotency-Key: a retry is checked as the
        # same request, counted once in the velocity window.
        decision = await self._risk_check(request.amount, request.currency,
                                          request.payment_method, payment_id)
        payment = Payment(
            id=payment_id, merchant_account_id=request.merchant_account_id,
            amount=request.amount, currency=request.currency,
            payment_method=request.payment_method, status=PaymentStatus.PROCESSING,
            provider=providers[0], risk_reason=decision.reason.value,
            risk_source=decision.source, reference=request.reference,
            auto_capture=request.capture, request_key=request_key,
            metadata=request.metadata, created_at=_utc(self._clock_s()),
            customer_ref=request.customer_ref)
        now_s = self._clock_s()
        step: Step | None = None
        if not decision.allowed:
            payment = msgspec.structs.replace(payment, status=PaymentStatus.DECLINED,
                                              error="risk_declined")
        else:
            step = await self._authorization_step(payment, providers[0])
        try:
            created = await self.store.create_payment(
                payment, step, principal=principal, hold=hold, audit=REQUEST_AUDIT.get(),
                due_at_s=now_s if step is None else now_s + self.config.claim_ttl_s)
        except KeyTaken:
            # A repeat of a request that holds or answered the key (the claim was left to
            # the create): what the risk check counted for it is taken back.
            if decision.counted:
                await self._risk_forget(request.payment_method, payment_id)
            raise
        if not created:
            return await self._existing(payment.id, request, principal)
        if step is None:
            return payment_view(payment, [])
        answer_step = None
        if answer is not None and not payment.auto_capture:
            def answer_step(done: Step) -> tuple[int, bytes] | None:
                return answer(payment_view(payment_after(payment, done), [done]))
        done = await self.drive(step, auto_capture=payment.auto_capture, payment=payment,
                                hold=hold, answer=answer_step)
        if done.final and not payment.auto_capture:
            # Saved final by this request, so the stored payment is this one after it
            # (PaymentStore._finish applies the same payment_after): no read needed.
            return payment_view(payment_after(payment, done), [done])
        return await self.payment(payment.id, principal=principal)

    async def _existing(self, payment_id: str, request: AuthorizeRequest,
                        principal: str) -> PaymentView:
        """The same request executed before and created the payment: resume it, or, when
        nothing happened last time (every provider refused before acting), try again on
        the same payment."""
        existing = await self.store.payment(payment_id, principal=principal)
        if existing is not None and existing.status == PaymentStatus.FAILED and (
                existing.error == "provider_unavailable"):
            return await self._authorize_again(existing, request, principal)
        return await self._resume(payment_id, principal)

    async def _authorize_again(self, payment: Payment, request: AuthorizeRequest,
                               principal: str) -> PaymentView:
        providers = self._providers_for(request.currency, request.provider)
        step = await self._authorization_step(payment, providers[0])
        if await self.store.reopen_payment(payment.id, step,
                                           due_at_s=self._clock_s() + self.config.claim_ttl_s):
            await self.drive(step)
        return await self.payment(payment.id, principal=principal)

    async def _authorization_step(self, payment: Payment, provider: str) -> Step:
        """A new authorize step for ``payment`` at ``provider``, with fresh ids."""
        step_id, transfer_base = await self.store.new_step_ids()
        return new_step(step_id=step_id, transfer_base=transfer_base, kind=Kind.AUTHORIZE,
                        subject_id=payment.id, amount=payment.amount,
                        currency=payment.currency, provider=provider,
                        merchant_account_id=payment.merchant_account_id,
                        payment_method=payment.payment_method, origin=REQUEST_ORIGIN.get())

    async def capture(self, payment_id: str, amount: int | None, *, principal: str,
                      request_key: str = "", final: bool = True) -> PaymentView:
        """Capture ``amount`` (None: all still authorized) of an authorized payment.

        A ``final`` capture closes the authorization: the ledger releases the rest of the
        hold and so does the provider. One that is not final leaves the rest capturable
        until a final capture, a void, or the authorization's expiry; it holds the rest
        again for the time the hold had left (``authorization_expired`` if none).
        """
        payment = await self._own_payment(payment_id, principal)
        if await self._resumed(payment_id, request_key, Kind.CAPTURE):
            return await self.payment(payment_id, principal=principal)
        amount = payment.capturable_amount if amount is None else amount
        check_capture(payment, amount)
        # Taking all that is held leaves nothing to hold again: that capture is final.
        final = final or amount == payment.capturable_amount
        timeout_s = 0
        if not final:
            (hold,) = await self._ledger.lookup_transfers([payment.hold_transfer_id])
            timeout_s = hold_left_s(hold, self._clock_s())
        await self._start(payment, Kind.CAPTURE, amount, request_key, final=final,
                          hold_timeout_s=timeout_s)
        return await self.payment(payment_id, principal=principal)

    async def increment(self, payment_id: str, amount: int, *, principal: str,
                        request_key: str = "") -> PaymentView:
        """Raise an open authorization by ``amount`` where its provider offers it: decided
        from the adapter's capabilities before any call (``increment_not_supported``). The
        ledger hold grows by the same amount, for the time the hold had left."""
        payment = await self._own_payment(payment_id, principal)
        if await self._resumed(payment_id, request_key, Kind.INCREMENT):
            return await self.payment(payment_id, principal=principal)
        offered = Operation.INCREMENT in self._capabilities.get(payment.provider, frozenset())
        check_increment(payment, amount, supported=offered)
        (hold,) = await self._ledger.lookup_transfers([payment.hold_transfer_id])
        timeout_s = hold_left_s(hold, self._clock_s())
        await self._start(payment, Kind.INCREMENT, amount, request_key,
                          hold_timeout_s=timeout_s)
        return await self.payment(payment_id, principal=principal)

    async def void(self, payment_id: str, *, principal: str,
                   request_key: str = "") -> PaymentView:
        """Release what the authorization still holds (after partial captures, the rest)."""
        payment = await self._own_payment(payment_id, principal)
        if await self._resumed(payment_id, request_key, Kind.VOID):
            return await self.payment(payment_id, principal=principal)
        check_void(payment)
        await self._start(payment, Kind.VOID, payment.capturable_amount, request_key)
        return await self.payment(payment_id, principal=principal)

    async def refund(self, payment_id: str, amount: int | None, *, principal: str,
                     request_key: str = "", capture_id: str | None = None,
                     metadata: dict[str, str] | None = None) -> PaymentView:
        """Refund ``amount`` (None: all that is left) of the payment, or of one of its
        captures (``capture_id``): never more than was captured, nor than that capture.
        ``metadata``: the client's pairs, shown in the refunds list."""
        payment = await self._own_payment(payment_id, principal)
        if await self._resumed(payment_id, request_key, Kind.REFUND):
            return await self.payment(payment_id, principal=principal)
        capture = None
        if capture_id is not None:
            capture = capture_named(await self.store.steps_of(payment_id),
                                    int(capture_id.removeprefix("cap_")))
        # What open or lost disputes took back is not refundable (nor refunded twice).
        disputed = await self.store.disputed_amount(payment_id)
        amount = (refundable_amount(payment, capture, disputed=disputed) if amount is None
                  else amount)
        check_refund(payment, amount, capture, disputed=disputed)
        await self._start(payment, Kind.REFUND, amount, request_key,
                          capture_id=0 if capture is None else capture.step_id,
                          metadata=metadata)
        return await self.payment(payment_id, principal=principal)

    async def payout(self, request: PayoutRequest, *, principal: str,
                     request_key: str = "") -> PayoutView:
        """Pay a merchant's funds out to its destination.

        The merchant account must be the caller's tenant's, and the amount within its
        available balance (credits posted minus debits posted and pending), whatever the
        account's flags: ``insufficient_funds`` otherwise. Payouts of one merchant account
        run one at a time in this actor, from that check until their step has run (its
        reserve hold is then a pending debit the next check counts), so two cannot both
        spend the same funds (docs/security.md names the one gap: a step parked before its
        hold was posted).
        """
        payout_id = f"po_{request_key[:24]}" if request_key else self._new_id("po_")
        if request_key and await self.store.payout(payout_id, principal=principal):
            await self._finish_open_steps(payout_id)
            return await self.get_payout(payout_id, principal=principal)
        providers = self._providers_for(request.currency, request.provider)
        await self._require_merchant(request.merchant_account_id, request.currency, principal)
        # Held by every payout of the account running or waiting; dropped with the last.
        lock = self._payout_locks.setdefault(request.merchant_account_id, asyncio.Lock())
        async with lock:
            return await self._payout_funded(request, payout_id, providers, principal)

    async def _payout_funded(self, request: PayoutRequest, payout_id: str,
                             providers: Sequence[str], principal: str) -> PayoutView:
        if await self.store.payout(payout_id, principal=principal):
            # The same request ran while this one waited for the lock.
            await self._finish_open_steps(payout_id)
            return await self.get_payout(payout_id, principal=principal)
        (account,) = await self._ledger.lookup_accounts([request.merchant_account_id])
        available = 0 if account is None else (
            account.credits_posted - account.debits_posted - account.debits_pending)
        if request.amount > available:
            raise PaymentError("insufficient_funds",
                               "the merchant account's available balance is below the amount")
        payout = Payout(
            id=payout_id, merchant_account_id=request.merchant_account_id,
            amount=request.amount, currency=request.currency, destination=request.destination,
            status=PayoutStatus.PROCESSING, provider=providers[0], reference=request.reference,
            metadata=request.metadata, created_at=_utc(self._clock_s()),
            customer_ref=request.customer_ref)
        step_id, transfer_base = await self.store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=transfer_base, kind=Kind.PAYOUT,
                        subject_id=payout.id, amount=request.amount, currency=request.currency,
                        provider=providers[0], merchant_account_id=request.merchant_account_id,
                        destination=request.destination,
                        origin=REQUEST_ORIGIN.get())
        if await self.store.create_payout(payout, step, principal=principal,
                                          due_at_s=self._clock_s() + self.config.claim_ttl_s):
            await self.drive(step)
        else:
            await self._finish_open_steps(payout_id)
        return await self.get_payout(payout.id, principal=principal)

    async def payment(self, payment_id: str, *, principal: str | None) -> PaymentView:
        found = await self.store.payment_with_steps(payment_id, principal=principal)
        if found is None:
            raise PaymentError("payment_not_found", "no payment has this id")
        return payment_view(*found)

    async def get_payout(self, payout_id: str, *, principal: str | None) -> PayoutView:
        payout = await self.store.payout(payout_id, principal=principal)
        if payout is None:
            raise PaymentError("payout_not_found", "no payout has this id")
        return payout_view(payout)

    # -- webhooks -----------------------------------------------------------------------------

    async def apply_webhook(self, provider: str, event: WebhookEvent) -> str:
        """Apply a verified provider event; returns applied, duplicate or ignored.

        ``provider`` is the one whose secret verified the event; an event about a step
        another provider handles is ignored.

        Deduplication and the step's new phase are one transaction, so an event is applied
        once even when the provider sends it twice or the process dies in between. Events
        about steps that already moved on (late, out of order) change nothing.
        """
        if event.dispute is not None:
            return await self._apply_dispute_notice(provider, event, event.dispute)
        key = step_key_of(event)
        await self._answers_stored([key])
        # A provider speaks only for its own calls: an event verified with one provider's
        # secret never moves a step another provider is handling. An event that cannot
        # move its step is remembered by the same statement that finds the step.
        step, fresh = await self.store.step_for_event(key, provider, event.event_id)
        if fresh is not None or step is None:
            return "ignored" if fresh else "duplicate"
        if step.phase in (Phase.PROVIDER, Phase.RESERVE):
            # A runner is calling the provider right now and will store its answer; the
            # provider is asked to send the event again later, when the step has moved on
            # (and should its runner die, the recovery worker asks the provider itself).
            return "retry"
        reply = ProviderReply(outcome=event.outcome, provider_ref=event.provider_ref,
                              amount=event.amount, decline_code=event.decline_code)
        after = on_status(step, reply) if event.idempotency_key == step.provider_key or (
            step.phase == Phase.COMPENSATE) else step
        if after == step:
            # Nothing to learn (a late, repeated or out-of-order event, or the step's owner
            # is applying it now): remember the event, leave the step to its owner.
            fresh = await self.store.record_webhook(provider, event.event_id)
            return "ignored" if fresh else "duplicate"
        saved = await self.store.save_step(
            step, after, due_at_s=self._due_s(after), detail=f"webhook {event.event_id}",
            webhook=(provider, event.event_id))
        if saved is None:
            # Either a duplicate, or the step was written meanwhile; the provider retries
            # the latter and a later attempt finds the step settled or applies then.
            seen = await self.store.webhook_seen(provider, event.event_id)
            return "duplicate" if seen else "retry"
        if saved.phase != step.phase and not saved.final:
            self._spawn(self.drive(saved))
        return "applied" if saved.phase != step.phase else "ignored"

    async def _answers_stored(self, keys: list[str]) -> None:
        """Wait (at most ``EVENT_WAITS_FOR_ANSWER_S``) until the answers this process is
        storing for these steps' calls are stored. A provider often sends its event as it
        answers, so the event overtakes the answer it repeats: judged after it, the event
        usually has nothing to teach, instead of being answered "retry" and delivered
        again."""
        pending = {self._answers_pending[k] for k in keys if k in self._answers_pending}
        if not pending:
            return
        self.stats["events_waited"] += len(pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in pending)),
                                   EVENT_WAITS_FOR_ANSWER_S)

    async def settle_inert_events(self, provider: str, events: list[WebhookEvent]
                                  ) -> list[str | None]:
        """A provider's batch: the events that cannot move their step (nearly all: the
        provider repeating answers this process already stored) remembered in one
        statement, each answered ``ignored`` or ``duplicate`` as ``apply_webhook`` would;
        None for a dispute notice or an event whose step may still move, for
        ``apply_webhook``. First waits, as ``apply_webhook`` does, for the answers this
        process is storing that the events are about."""
        plain = [i for i, e in enumerate(events) if e.dispute is None]
        results: list[str | None] = [None] * len(events)
        if not plain:
            return results
        keys = [step_key_of(events[i]) for i in plain]
        await self._answers_stored(keys)
        found = await self.store.record_inert_events(
            provider, [(key, events[i].event_id) for key, i in zip(keys, plain, strict=True)])
        for i, fresh in zip(plain, found, strict=True):
            if fresh is not None:
                results[i] = "ignored" if fresh else "duplicate"
        return results

    # -- disputes (processor/payments/disputes.py) --------------------------------------------

    async def _apply_dispute_notice(self, provider: str, event: WebhookEvent,
                                    notice: DisputeNotice) -> str:
        """A provider's dispute notice: open a dispute (and hold its money), or move one.

        A notice about a payment we do not know, of another currency, or that the rules
        refuse (nothing captured, more than captured minus refunded) is recorded and
        answered ``ignored``: nothing is held (docs/runbooks/disputes.md). The first notice
        of a dispute that is already a decision opens it and asks to be sent again, so
        the decision then follows the opening as usual.
        """
        dispute_id = dispute_id_of(provider, notice.dispute_ref)
        existing = await self.store.dispute(dispute_id)
        webhook = (provider, event.event_id)
        now_s = self._clock_s()
        if existing is None:
            payment = await self.store.payment_by_provider_ref(provider,
                                                               notice.authorization_ref)
            if payment is None or payment.currency != notice.currency or notice.amount < 1:
                log.warning("dispute %s of %s names no payment of ours in %s; ignored",
                            dispute_id, provider, notice.currency)
                fresh = await self.store.record_webhook(provider, event.event_id)
                return "ignored" if fresh else "duplicate"
            step_id, transfer_base = await self.store.new_step_ids()
            step = new_step(step_id=step_id, transfer_base=transfer_base,
                            kind=Kind.DISPUTE_HOLD, subject_id=dispute_id,
                            amount=notice.amount, currency=payment.currency,
                            provider=provider, merchant_account_id=payment.merchant_account_id,
                            hold_amount=notice.fee)
            dispute = Dispute(
                id=dispute_id, payment_id=payment.id, provider=provider,
                provider_dispute_id=notice.dispute_ref,
                merchant_account_id=payment.merchant_account_id, amount=notice.amount,
                fee=notice.fee, currency=payment.currency,
                status=DisputeStatus.NEEDS_RESPONSE, reason=notice.reason[:100],
                evidence_due_at=_utc(notice.evidence_due_by_s) if notice.evidence_due_by_s
                else None, hold_transfer_id=transfer_base, created_at=_utc(now_s))
            opening = notice.status == DisputeStatus.NEEDS_RESPONSE.value
            result = await self.store.open_dispute(
                dispute, step, webhook=webhook, due_at_s=now_s + self.config.claim_ttl_s,
                record_webhook=opening)
            if result.startswith("refused:"):
                log.warning("dispute %s of payment %s refused (%s); ignored", dispute_id,
                            payment.id, result.removeprefix("refused:"))
                return "ignored"
            if result == "applied":
                self._spawn(self.drive(step))
                return "applied" if opening else "retry"
            return result
        status = dispute_status_after(existing.status, notice.status)
        if status is None or existing.provider != provider:
            fresh = await self.store.record_webhook(provider, event.event_id)
            return "ignored" if fresh else "duplicate"
        outcome: Step | None = None
        if status in (DisputeStatus.WON, DisputeStatus.LOST) and existing.hold_transfer_id:
            step_id, transfer_base = await self.store.new_step_ids()
            kind = Kind.DISPUTE_WON if status == DisputeStatus.WON else Kind.DISPUTE_LOST
            outcome = new_step(step_id=step_id, transfer_base=transfer_base, kind=kind,
                            subject_id=existing.id, amount=existing.amount,
                            currency=existing.currency, provider=provider,
                            merchant_account_id=existing.merchant_account_id,
                            hold_amount=existing.fee,
                            hold_transfer_id=existing.hold_transfer_id)
        result = await self.store.decide_dispute(existing, status, outcome, webhook=webhook,
                                                 due_at_s=now_s + self.config.claim_ttl_s)
        if result == "applied" and outcome is not None:
            self._spawn(self.drive(outcome))
        return result

    async def submit_evidence(self, dispute_id: str, evidence: Evidence, *, principal: str,
                              request_key: str = "") -> tuple[DisputeView, str]:
        """Submit evidence against a dispute of the caller's tenant that needs a response:
        stored with the step that sends it to the provider (idempotent there by the step's
        key). Returns the dispute and how the submission stands (succeeded, processing,
        failed)."""
        dispute = await self.store.dispute(dispute_id, principal=principal)
        if dispute is None:
            raise PaymentError("dispute_not_found", "no dispute has this id")
        resumed = request_key and await self.store.step_by_request(
            dispute_id, f"{request_key}:{Kind.DISPUTE_EVIDENCE.value}")
        if resumed:
            await self._finish_open_steps(dispute_id)
            return await self._evidence_answer(dispute_id, request_key)
        try:
            check_evidence_allowed(dispute)
        except DisputeError as exc:
            raise PaymentError(exc.code, str(exc)) from exc
        if dispute.evidence_due_at is not None and (
                dispute.evidence_due_at.timestamp() <= self._clock_s()):
            raise PaymentError("evidence_deadline_passed",
                               "the provider takes no evidence for this dispute any more")
        step_id, transfer_base = await self.store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=transfer_base,
                        kind=Kind.DISPUTE_EVIDENCE, subject_id=dispute.id,
                        amount=dispute.amount, currency=dispute.currency,
                        provider=dispute.provider,
                        merchant_account_id=dispute.merchant_account_id,
                        auth_ref=dispute.provider_dispute_id, origin=REQUEST_ORIGIN.get())
        try:
            await self.store.start_evidence(
                dispute, evidence, step, due_at_s=self._clock_s() + self.config.claim_ttl_s,
                request_key=f"{request_key}:{Kind.DISPUTE_EVIDENCE.value}" if request_key
                else "")
        except DisputeError as exc:
            raise PaymentError(exc.code, str(exc)) from exc
        await self.drive(step)
        return await self._evidence_answer(dispute_id, request_key)

    async def _evidence_answer(self, dispute_id: str, request_key: str
                               ) -> tuple[DisputeView, str]:
        dispute = await self.store.dispute(dispute_id)
        if dispute is None:
            raise PaymentError("dispute_not_found", "no dispute has this id")
        step = await self.store.step_by_request(
            dispute_id, f"{request_key}:{Kind.DISPUTE_EVIDENCE.value}"
        ) if request_key else None
        if step is None:
            steps = [s for s in await self.store.steps_of(dispute_id)
                     if s.kind == Kind.DISPUTE_EVIDENCE]
            step = steps[-1] if steps else None
        return dispute_view(dispute), "processing" if step is None else _op_status(step.phase)

    async def get_dispute(self, dispute_id: str, *, principal: str | None) -> DisputeView:
        dispute = await self.store.dispute(dispute_id, principal=principal)
        if dispute is None:
            raise PaymentError("dispute_not_found", "no dispute has this id")
        return dispute_view(dispute)

    async def _request_of(self, step: Step) -> ProviderRequest:
        """The provider call of a step in ``PROVIDER``; evidence is read from its dispute
        (stored with the step, in one transaction, before the step could run)."""
        request = provider_request(step)
        if step.kind != Kind.DISPUTE_EVIDENCE:
            return request
        evidence = await self.store.dispute_evidence(step.subject_id)
        return msgspec.structs.replace(request, evidence_text=evidence.text,
                                       evidence_files=tuple(evidence.files))

    # -- recovery -----------------------------------------------------------------------------

    async def recover_once(self, limit: int = RECOVERY_BATCH_MAX) -> int:
        """Take over due steps and move each as far as it goes now. Returns how many."""
        steps = await self.store.claim_due(now_s=self._clock_s(),
                                           claim_ttl_s=self.config.claim_ttl_s, limit=limit)
        for step in steps:
            self.stats["recovered"] += 1
            try:
                await self._recover(step)
            except Exception:  # one bad step must not stop the others
                log.exception("recovering step %d failed", step.id)
        return len(steps)

    async def review_overdue(self) -> int:
        """Set aside the steps unfinished past ``review_after_s`` for an operator, and
        publish how many wait (``txproc_payment_steps_in_review``). Returns how many were
        set aside now."""
        steps = await self.store.flag_for_review(
            now_s=self._clock_s(), review_after_s=self.config.review_after_s,
            limit=RECOVERY_BATCH_MAX)
        for step in steps:
            log.warning("step %d of %s requires review: %s in phase %s after %d rechecks",
                        step.id, step.subject_id, step.kind.value, step.phase.value,
                        step.checks)
        metrics.PAYMENT_STEPS_IN_REVIEW.set(await self.store.review_count())
        return len(steps)

    async def run_recovery(self, interval_s: float) -> None:
        """The recovery worker: at start-up, then every ``interval_s``, until cancelled.

        Every ``KEY_PURGE_INTERVAL_S`` it also deletes Idempotency-Keys past their retention
        (they are already ignored; this keeps the table from growing).
        """
        purged_at_s = float("-inf")
        while True:
            try:
                while await self.recover_once() == RECOVERY_BATCH_MAX:
                    pass
                now_s = self._clock_s()
                await self.review_overdue()
                if now_s - purged_at_s >= KEY_PURGE_INTERVAL_S:
                    purged_at_s = now_s
                    await self.store.purge_keys(now_s=now_s)
            except Exception as exc:  # noqa: BLE001 - the database may be away; try again next round
                log.warning("recovery round failed: %r", exc)
            await asyncio.sleep(interval_s)

    async def _recover(self, step: Step) -> None:
        if step.phase in (Phase.PROVIDER, Phase.RESOLVE, Phase.AWAIT_PROVIDER):
            # Whoever held the step may have sent the call: never guess, ask by the key.
            # A provider that never saw it answers not_found and the call is sent again.
            asking = msgspec.structs.replace(step, phase=Phase.RESOLVE) if (
                step.phase == Phase.PROVIDER) else step
            reply = await self._call_provider(step.provider, "status", status_request(asking))
            after = on_status(asking, reply)
            if after == asking:
                await self._park(step, f"asked: {reply.outcome.value}")
                return
            saved = await self.store.save_step(step, after, due_at_s=self._due_s(after),
                                               detail=f"status {reply.outcome.value}")
            if saved is None:
                self.stats["lost_claims"] += 1
                return
            step = saved
        await self.drive(step)

    # -- driving a step -----------------------------------------------------------------------

    async def drive(self, step: Step, *, auto_capture: bool | None = None,
                    payment: Payment | None = None, hold: KeyHold | None = None,
                    answer: Callable[[Step], tuple[int, bytes] | None] | None = None
                    ) -> Step:
        """Move ``step`` until it is final or must wait; every phase is stored as it
        changes. Returns the last stored step (or the one it had when it lost its claim).

        ``auto_capture``: for an authorization, whether its payment asked for ``capture``
        when the caller knows (the request that created it); None reads the payment when
        the authorization succeeds. ``payment``: an authorization's payment as its request
        created it, which spares the final save a read of it; ``hold`` and ``answer``: the
        request's key and answer, stored by the final save too."""
        with telemetry.span("saga.step", attributes={
                "txproc.kind": step.kind.value, "txproc.phase": step.phase.value,
                "txproc.provider": step.provider}) as current:
            step = await self._drive(step, auto_capture, payment, hold, answer)
            if current is not None:
                current.set_attribute("txproc.final_phase", step.phase.value)
            return step

    async def _drive(self, step: Step, auto_capture: bool | None = None,
                     payment: Payment | None = None, hold: KeyHold | None = None,
                     answer: Callable[[Step], tuple[int, bytes] | None] | None = None
                    ) -> Step:
        while not step.final:
            if step.phase not in (Phase.PROVIDER, Phase.COMPENSATE) or (
                    step.provider_key in self._answers_pending):
                moved = await self._move(step, auto_capture, payment, hold, answer)
            else:
                stored = self._answers_pending[step.provider_key] = asyncio.Event()
                try:
                    moved = await self._move(step, auto_capture, payment, hold, answer)
                finally:
                    del self._answers_pending[step.provider_key]
                    stored.set()
            if moved is None:
                return step
            step = moved
        if step.kind == Kind.AUTHORIZE and step.phase == Phase.SUCCEEDED and (
                auto_capture is not False):
            await self._auto_capture(step.subject_id)
        return step

    async def _move(self, step: Step, auto_capture: bool | None, payment: Payment | None,
                    hold: KeyHold | None,
                    answer: Callable[[Step], tuple[int, bytes] | None] | None
                    ) -> Step | None:
        """One phase of ``_drive``: act, then store the step after it. None when the step
        must wait (parked or waiting for the recovery worker) or its claim was lost."""
        if step.phase in (Phase.RESERVE, Phase.APPLY, Phase.RELEASE):
            try:
                code = await self._apply_ledger(step)
            except (LedgerError, OSError, TimeoutError) as exc:
                await self._park(step, f"ledger unavailable: {type(exc).__name__}")
                return None
            after = on_ledger(step, code)
            detail = f"ledger {code.name}"
        elif step.phase == Phase.PROVIDER:
            # An authorization at its first provider posts its hold while the provider is
            # asked (saga.holds_early), so an approval waits on no ledger round trip of
            # its own; whatever else ends the step releases that hold.
            early = self._post_early(step)
            reply = await self._call_provider(step.provider, "call",
                                              await self._request_of(step))
            after = on_provider(step, reply, self._failover(step))
            detail = f"provider {reply.outcome.value} {reply.message}"[:160]
            if after.phase == Phase.APPLY or (after.phase == Phase.RELEASE
                                              and after.kind == Kind.AUTHORIZE):
                # Approved (or a declined authorization's hold to release): apply it in
                # the ledger before storing anything, so that one save records both.
                # Should this process die in between, the stored step is still at
                # PROVIDER: whoever takes it over sends the call again under its key,
                # which replays the provider's answer, and posts again under the step's
                # transfer ids, which answer exists. The provider's own event about it
                # waits for this save (_answers_pending) and then finds the step final.
                try:
                    code = await self._apply_ledger(after, early if (
                        after.phase == Phase.APPLY and after.provider == step.provider)
                        else None)
                except (LedgerError, OSError, TimeoutError) as exc:
                    await self._stored_then_parked(
                        step, after, detail, payment, hold, answer,
                        f"ledger unavailable: {type(exc).__name__}")
                    return None
                after = on_ledger(after, code)
                detail = f"{detail}; ledger {code.name}"[:200]
            elif early is not None:
                # Failed over, pending or unknown: the hold stays (or is posted again)
                # until the step ends; its posting is only waited for here, whatever it
                # answered (_quiet has taken its failure).
                await asyncio.wait([early])
        elif step.phase == Phase.COMPENSATE:
            reply = await self._call_provider(step.provider, "call",
                                              compensation_request(step))
            after = on_status(step, reply)
            detail = f"compensation {reply.outcome.value}"
        else:  # RESOLVE, AWAIT_PROVIDER: the recovery worker asks when due
            return None
        if after == step:
            await self._park(step, detail)
            return None
        saved = await self.store.save_step(step, after, due_at_s=self._due_s(after),
                                           detail=detail, payment=payment,
                                           hold=hold, answer=answer)
        if saved is None:
            self.stats["lost_claims"] += 1
            log.info("step %d was taken over; leaving it to its new owner", step.id)
            return None
        if saved.final:
            result = ("declined" if saved.error in ("provider_declined", "risk_declined")
                      else "compensation_refused" if saved.error == "compensation_refused"
                      else saved.phase.value)
            metrics.PAYMENT_OPERATIONS.labels(saved.kind.value, result).inc()
        return saved

    async def _auto_capture(self, payment_id: str) -> None:
        """Capture an authorization asked for with ``capture: true`` (once, whoever
        finished the authorization: its request, a webhook or the recovery worker)."""
        payment = await self.store.payment(payment_id)
        if payment is None or not payment.auto_capture or (
                payment.status != PaymentStatus.AUTHORIZED):
            return
        try:
            await self._start(payment, Kind.CAPTURE, payment.capturable_amount,
                              payment.request_key or payment.id)
        except PaymentError as exc:
            if exc.code not in ("operation_in_progress", "step_exists"):
                raise

    def _due_s(self, step: Step) -> float:
        now_s = self._clock_s()
        if step.phase in (Phase.RESOLVE, Phase.AWAIT_PROVIDER):
            return now_s + self._recheck_s(step)
        return now_s + self.config.claim_ttl_s

    def _recheck_s(self, step: Step) -> float:
        """When to look at a waiting step again: backing off the more it was looked at."""
        return recheck_delay_s(step.checks, self.config, self._rng)

    async def _stored_then_parked(
            self, before: Step, after: Step, detail: str, payment: Payment | None,
            hold: KeyHold | None, answer: Callable[[Step], tuple[int, bytes] | None] | None,
            why: str) -> None:
        """Store ``after`` (the provider's approval, not yet in the ledger) and park it:
        the ledger could not be reached, so the recovery worker applies it when due."""
        saved = await self.store.save_step(before, after, due_at_s=self._due_s(after),
                                           detail=detail, payment=payment, hold=hold,
                                           answer=answer)
        if saved is None:
            self.stats["lost_claims"] += 1
            return
        await self._park(saved, why)

    async def _park(self, step: Step, detail: str) -> None:
        """Leave the step where it is, due again after its recheck delay."""
        self.stats["parked"] += 1
        saved = await self.store.save_step(step, step,
                                           due_at_s=self._clock_s() + self._recheck_s(step),
                                           detail=f"parked: {detail}")
        if saved is None:
            self.stats["lost_claims"] += 1

    def _post_early(self, step: Step) -> asyncio.Future[list[TransferResult]] | None:
        """The posting of an authorization's hold, started beside its provider call
        (saga.holds_early); None for any other step. Its failure is the caller's to see
        when it awaits the future; a future nobody awaits (the request was cancelled)
        keeps its failure to itself."""
        if not holds_early(step):
            return None
        posting = asyncio.ensure_future(
            self._ledger.create_transfers(early_transfers(step, self.config)))
        posting.add_done_callback(_quiet)
        return posting

    async def _apply_ledger(self, step: Step,
                            posted: Awaitable[list[TransferResult]] | None = None
                            ) -> TransferResult:
        """The step's transfers applied (or ``posted`` already, when they were sent ahead:
        the early hold of an authorization); the code that decides them
        (``step_result``). Raises ``Unavailable`` when any of them came back
        ``not_applied`` (a shard's peer was not reached), as when the ledger cannot be
        reached: the step is parked and tried again, never taken as refused."""
        if posted is not None:
            results = await posted
        else:
            results = await self._ledger.create_transfers(ledger_transfers(step, self.config))
        if TransferResult.not_applied in results:
            raise Unavailable("the ledger applied none of the step's transfers (not_applied)",
                              retry_after_s=1.0)
        return step_result(step, results)

    async def _call_provider(self, provider: str, method: str,
                             request: ProviderRequest) -> ProviderReply:
        client = self._providers.get(provider)
        if client is None:
            return ProviderReply(outcome=Outcome.RETRYABLE, message="provider_not_configured")
        timeout_s = self._deadline_s.get(provider, 10.0) + PROVIDER_CALL_MARGIN_S
        try:
            async with asyncio.timeout(timeout_s):
                reply: ProviderReply = await getattr(client, method)(request)
            return reply
        except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
            # The provider actor died or hung mid-call, or its channel broke: the request
            # may have been sent, so only a status query may settle it.
            telemetry.event(log, "provider call failed", logging.WARNING,
                            event="provider_call_failed", provider=provider,
                            error=type(exc).__name__)
            return ProviderReply(outcome=Outcome.UNKNOWN,
                                 message=f"provider_call_failed {type(exc).__name__}")

    # -- helpers ------------------------------------------------------------------------------

    def _providers_for(self, currency: str, preferred: str | None) -> list[str]:
        names = [n for n in self.config.provider_order
                 if n in self._providers and currency in self._currencies.get(n, ())]
        if preferred is not None:
            if preferred not in self._providers:
                raise PaymentError("provider_unknown", f"no provider is named {preferred}")
            if preferred not in names:
                raise PaymentError("currency_not_supported",
                                   f"{preferred} does not serve {currency}")
            names.remove(preferred)
            names.insert(0, preferred)
        if not names:
            raise PaymentError("currency_not_supported", f"no provider serves {currency}")
        return names

    def _failover(self, step: Step) -> list[str]:
        return self._providers_for(step.currency, None) if step.kind == Kind.AUTHORIZE else []

    async def _require_merchant(self, account_id: int, currency: str, principal: str) -> None:
        """The merchant account must exist, belong to the caller's tenant (another
        tenant's is answered as a missing one) and hold ``currency``."""
        if account_id >= self.config.system_id_base:
            raise PaymentError("merchant_account_not_found", "no merchant account has this id")
        known = self._merchant_currency.get(account_id)
        if known is None:
            (account,) = await self._ledger.lookup_accounts([account_id])
            if account is None:
                raise PaymentError("merchant_account_not_found",
                                   "no merchant account has this id")
            # Accounts are never deleted; their currency and tenant never change.
            if len(self._merchant_currency) >= MERCHANTS_REMEMBERED_MAX:
                self._merchant_currency.pop(next(iter(self._merchant_currency)))
            known = self._merchant_currency[account_id] = (account.currency, account.tenant)
        held, owner = known
        if owner != tenant_of_principal(principal):
            raise PaymentError("merchant_account_not_found", "no merchant account has this id")
        if held != currency:
            raise PaymentError("currency_mismatch", f"the merchant account holds {held}")

    async def _risk_check(self, amount: int, currency: str, method: str,
                          request_id: str) -> RiskDecision:
        cfg = self._risk_config
        if self._risk is None:
            return fallback(cfg, amount=amount, currency=currency, cause="unavailable")
        try:
            async with asyncio.timeout(cfg.timeout_s):
                return await self._risk.check(amount, currency, method, request_id)
        except TimeoutError:
            return fallback(cfg, amount=amount, currency=currency, cause="timeout")
        except Exception as exc:  # noqa: BLE001 - every failure is logged or answered, never lost
            log.warning("risk check unavailable: %r", exc)
            return fallback(cfg, amount=amount, currency=currency, cause="unavailable")

    async def _risk_forget(self, method: str, request_id: str) -> None:
        """Take back a check's count in the velocity window, best effort: a risk actor
        that is away or slow keeps it (one more event for the token, within its window)."""
        if self._risk is None:
            return
        try:
            async with asyncio.timeout(self._risk_config.timeout_s):
                await self._risk.forget(method, request_id)
        except Exception as exc:  # noqa: BLE001 - logged; the count ages out of the window
            log.warning("risk count not taken back: %r", exc)

    async def _own_payment(self, payment_id: str, principal: str) -> Payment:
        payment = await self.store.payment(payment_id, principal=principal)
        if payment is None:
            raise PaymentError("payment_not_found", "no payment has this id")
        return payment

    async def _resume(self, payment_id: str, principal: str) -> PaymentView:
        await self._finish_open_steps(payment_id)
        return await self.payment(payment_id, principal=principal)

    async def _resumed(self, subject_id: str, request_key: str, kind: Kind) -> bool:
        """Whether this request ran before; if so its unfinished step, if any, is moved on
        now (taken over from the runner whose claim lapsed) rather than started again."""
        if not request_key:
            return False
        if await self.store.step_by_request(subject_id, f"{request_key}:{kind.value}") is None:
            return False
        await self._finish_open_steps(subject_id)
        return True

    async def _finish_open_steps(self, subject_id: str) -> None:
        steps = [s for s in await self.store.steps_of(subject_id) if not s.final]
        for step in steps:
            if step.phase in (Phase.PROVIDER, Phase.RESOLVE, Phase.AWAIT_PROVIDER):
                continue  # only the status query may settle these: the recovery worker's
            claimed = await self.store.claim_step(step.id, now_s=self._clock_s(),
                                                  claim_ttl_s=self.config.claim_ttl_s)
            if claimed is not None:
                await self.drive(claimed)

    async def _start(self, payment: Payment, kind: Kind, amount: int,
                     request_key: str = "", *, final: bool = True, capture_id: int = 0,
                     hold_timeout_s: int = 0, metadata: dict[str, str] | None = None) -> Step:
        step_id, transfer_base = await self.store.new_step_ids()
        step = new_step(step_id=step_id, transfer_base=transfer_base, kind=kind,
                        subject_id=payment.id, amount=amount, currency=payment.currency,
                        provider=payment.provider,
                        merchant_account_id=payment.merchant_account_id,
                        hold_transfer_id=payment.hold_transfer_id,
                        auth_ref=payment.provider_ref,
                        origin=REQUEST_ORIGIN.get(), final=final, capture_id=capture_id,
                        hold_amount=payment.capturable_amount, hold_timeout_s=hold_timeout_s)
        await self.store.create_step(step, due_at_s=self._clock_s() + self.config.claim_ttl_s,
                                     request_key=f"{request_key}:{kind.value}" if request_key
                                     else "", checked=payment, metadata=metadata)
        return await self.drive(step)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("a background step failed; the recovery worker will take it over",
                      exc_info=task.exception())


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a background future's failure, so that one nobody awaited is not reported
    as lost: its owner saw it, or the step's next phase posts again."""
    if not future.cancelled():
        future.exception()


def step_key_of(event: WebhookEvent) -> str:
    """The provider key of the step a provider's event is about (a compensation's events
    name the call's key with "-undo")."""
    return event.idempotency_key.removesuffix("-undo")
