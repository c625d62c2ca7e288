"""Payments' actors: the payments actor (saga engine, recovery worker, outbox relay), the
provider actors, and their PostgreSQL persistence. A failure domain of their own at run
time (docs/architecture.md): they reach the ledger only through its RPC.

Public interface:

* ``make_payments``, ``PAYMENTS_ACTOR_NAME``: the payments actor, which the edge forwards
  the payments routes to;
* ``make_provider``, ``ProviderConfig``, ``provider_actor_name``: one actor per provider;
* what the edge needs to answer payments requests before forwarding them:
  ``OPERATION_SCOPES``, ``PAYMENT_ERROR_STATUS``, ``PaymentsApiError``, ``PaymentFailure``,
  ``WebhookAnswer``, ``api_error_of``, ``require_key``, ``ORIGIN_HEADER`` (the audit
  record a request forwards), ``AUDITED_OPERATIONS`` (those whose record the payments
  actor writes itself);
* ``outbox``: outbound events and their dead letters (the operator's ``txproc dlq``);
* settlement reconciliation's API messages (``RunRequest``, ``RunView``, ``RunsPage``,
  ``ExceptionView``, ``ExceptionsPage``, ``ResolveRequest``) for the edge's document, and
  ``cli_principal`` (who a command-line request is recorded as), and
  ``check_reconciliation_records`` (``txproc verify``'s check of their links);
* ``webhook_endpoints``: tenants' webhook endpoints (the API's and ``txproc webhooks``),
  with ``EndpointsPage`` and ``ENDPOINTS_PAGE_MAX`` for the edge's document.

Its names are imported when first read (``processor.lazy``): a command that reads the
dead letters does not load the payments actor, its providers' HTTP clients or Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from processor.lazy import lazy_exports

if TYPE_CHECKING:
    from actors.payments import outbox, webhook_endpoints
    from actors.payments.actor import PAYMENTS_ACTOR_NAME, PaymentsActor, make_payments
    from actors.payments.endpoints import (
        AUDITED_OPERATIONS,
        EVENT_TYPE_PATTERN,
        EVENTS_PAGE_MAX,
        OPERATION_SCOPES,
        ORIGIN_HEADER,
        PAYMENT_ERROR_STATUS,
        EventsPage,
        PaymentFailure,
        PaymentsApiError,
        WebhookAnswer,
        api_error_of,
        require_key,
    )
    from actors.payments.provider import ProviderConfig, make_provider, provider_actor_name
    from actors.payments.reconciliation import (
        EXCEPTIONS_PAGE_MAX,
        RUNS_PAGE_MAX,
        ExceptionsPage,
        ExceptionView,
        ResolveRequest,
        RunRequest,
        RunsPage,
        RunView,
        cli_principal,
    )
    from actors.payments.reconciliation_check import check_reconciliation_records
    from actors.payments.webhook_endpoints import ENDPOINTS_PAGE_MAX, EndpointsPage

__all__ = [
    "AUDITED_OPERATIONS",
    "ENDPOINTS_PAGE_MAX",
    "EVENTS_PAGE_MAX",
    "EVENT_TYPE_PATTERN",
    "EXCEPTIONS_PAGE_MAX",
    "OPERATION_SCOPES",
    "ORIGIN_HEADER",
    "PAYMENTS_ACTOR_NAME",
    "PAYMENT_ERROR_STATUS",
    "RUNS_PAGE_MAX",
    "EndpointsPage",
    "EventsPage",
    "ExceptionView",
    "ExceptionsPage",
    "PaymentFailure",
    "PaymentsActor",
    "PaymentsApiError",
    "ProviderConfig",
    "ResolveRequest",
    "RunRequest",
    "RunView",
    "RunsPage",
    "WebhookAnswer",
    "api_error_of",
    "check_reconciliation_records",
    "cli_principal",
    "make_payments",
    "make_provider",
    "outbox",
    "provider_actor_name",
    "require_key",
    "webhook_endpoints",
]

if not TYPE_CHECKING:
    __getattr__ = lazy_exports(__name__, {
        "actors.payments": ("outbox", "webhook_endpoints"),
        "actors.payments.actor": ("PAYMENTS_ACTOR_NAME", "PaymentsActor", "make_payments"),
        "actors.payments.endpoints": (
            "AUDITED_OPERATIONS", "EVENT_TYPE_PATTERN", "EVENTS_PAGE_MAX", "OPERATION_SCOPES",
            "ORIGIN_HEADER", "PAYMENT_ERROR_STATUS", "EventsPage", "PaymentFailure",
            "PaymentsApiError", "WebhookAnswer", "api_error_of", "require_key",
        ),
        "actors.payments.provider": ("ProviderConfig", "make_provider", "provider_actor_name"),
        "actors.payments.reconciliation": (
            "EXCEPTIONS_PAGE_MAX", "RUNS_PAGE_MAX", "ExceptionsPage", "ExceptionView",
            "ResolveRequest", "RunRequest", "RunsPage", "RunView", "cli_principal",
        ),
        "actors.payments.reconciliation_check": ("check_reconciliation_records",),
        "actors.payments.webhook_endpoints": ("ENDPOINTS_PAGE_MAX", "EndpointsPage"),
    })
