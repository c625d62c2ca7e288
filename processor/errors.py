"""The one root of the errors a client can meet, and the registry of their stable codes.

Every error that ends a request with a stable code derives from ``TxprocError``: its
``code`` names the rule, its ``message`` is for people, and whether it may be retried as is
is the class attribute ``retryable`` (retry policies read it and never parse messages).
Each code means one HTTP status everywhere: ``register`` records a code with its status
and a one-line meaning, and refuses at import time a code registered again with another
status or meaning. The per-domain tables (``actors.edge.http_api.ERROR_CODES``,
``actors.payments.PAYMENT_ERROR_STATUS``, ...) are views of this registry, so docs/api.md
and docs/payments.md describe one set. Codes are registered by the module that owns the
rule (the identity package its token codes, the payments package its refusals, the edge
its request codes); this module holds the codes every domain shares.

Errors that are bugs or infrastructure (a broken invariant, a lost fence, a failed
migration) are not part of this tree: they crash or stop what met them and never reach a
client as a code (docs/architecture.md, "One error root").

A result code (processor.codes) is an expected outcome for one item. The ledger's
exceptions below are about the request as a whole: nothing of it was written, and the
caller may retry it unchanged (ids are idempotent) after ``retry_after_s``. When some parts
of a request were answered and another's shard was not, the request is answered per item
instead, with ``not_applied`` for what was not stored (docs/api.md, "Partial answers"); the
one exception is an ``Unavailable`` whose message says the outcome is unknown (a shard and
the database both unreachable), after which the same request must be sent again.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar, NamedTuple

__all__ = [
    "ERROR_REGISTRY",
    "ERROR_STATUS",
    "ErrorCode",
    "ErrorCodeConflict",
    "LedgerError",
    "Overloaded",
    "QuotaExceeded",
    "TxprocError",
    "Unavailable",
    "register",
    "statuses",
]

_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MEANING_CHARS_MAX = 200


class ErrorCode(NamedTuple):
    """A stable error code, the HTTP status it is answered with, and what it means."""

    code: str
    status: int
    meaning: str


class ErrorCodeConflict(Exception):
    """A code registered twice with another status or meaning, or not well formed: a bug
    found at import time, so not a ``TxprocError``."""


_REGISTRY: dict[str, ErrorCode] = {}


class _Registry(Mapping[str, ErrorCode]):
    """A read-only view of the registered codes, in the order they were registered."""

    def __getitem__(self, code: str) -> ErrorCode:
        return _REGISTRY[code]

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


class _Statuses(Mapping[str, int]):
    """A read-only view of every registered code's HTTP status."""

    def __getitem__(self, code: str) -> int:
        return _REGISTRY[code].status

    def __iter__(self) -> Iterator[str]:
        return iter(_REGISTRY)

    def __len__(self) -> int:
        return len(_REGISTRY)


ERROR_REGISTRY: Mapping[str, ErrorCode] = _Registry()
# Every registered code with its HTTP status; live, so a code registered later shows too.
ERROR_STATUS: Mapping[str, int] = _Statuses()


def register(status: int, meanings: Mapping[str, str]) -> tuple[str, ...]:
    """Register each code of ``meanings`` (code -> one-line meaning) with HTTP ``status``;
    returns the codes, in order.

    Registering a code again with the same status and meaning does nothing (a module
    imported twice); with another status or meaning it raises ``ErrorCodeConflict``, as do
    a status outside 400..599, a code that is not lower-case snake case of at most 64
    characters, and a meaning that is empty, longer than 200 characters or on two lines.
    """
    if not 400 <= status <= 599:
        raise ErrorCodeConflict(f"status {status} is not an error status (400..599)")
    for code, meaning in meanings.items():
        if _CODE.fullmatch(code) is None:
            raise ErrorCodeConflict(f"error code {code!r} is not lower-case snake case")
        if not 0 < len(meaning) <= _MEANING_CHARS_MAX or "\n" in meaning:
            raise ErrorCodeConflict(f"the meaning of {code} must be one line of text")
        entry = ErrorCode(code, status, meaning)
        known = _REGISTRY.get(code)
        if known is not None and known != entry:
            raise ErrorCodeConflict(
                f"error code {code} is registered with status {known.status} "
                f"({known.meaning!r}); it cannot also be {status} ({meaning!r})")
        _REGISTRY[code] = entry
    return tuple(meanings)


def statuses(codes: Iterable[str]) -> dict[str, int]:
    """``codes`` with their registered HTTP statuses: a domain's table as a view of the
    registry. Raises ``KeyError`` naming a code that is not registered."""
    table: dict[str, int] = {}
    for code in codes:
        if code not in _REGISTRY:
            raise KeyError(f"error code {code} is not registered (processor.errors.register)")
        table[code] = _REGISTRY[code].status
    return table


class TxprocError(Exception):
    """The root of errors that end a request with a stable ``code`` (see ``register``).

    ``message`` is for people and never holds a secret; ``retryable`` says whether the same
    request may be sent again as is. Subclasses keep their own constructors and pass the
    message, and the code when it is not the class's, to this one.
    """

    code: str = "internal"
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


# Codes every domain answers: bodies that cannot be read, queries and cursors that cannot
# be answered, the ledger's request-level errors below, and a bug.
register(400, {
    "malformed_json": "the body is not a JSON document (empty, truncated, trailing bytes)",
    "invalid_body": "the JSON does not match the schema; the message names the field",
    "invalid_query": "a query parameter is unknown, repeated or out of range",
    "invalid_cursor": "the cursor is not one the list gave",
})
register(422, {
    "account_quota_exceeded": "the tenant would hold more accounts than its quota allows",
    # A ledger result code (processor.codes) that payments answer too.
    "currency_mismatch": "the currencies differ: a transfer's and its accounts', or a "
                         "payment's and its merchant account's",
})
register(429, {"overloaded": "a queue or in-flight limit is full; retry after Retry-After"})
register(500, {"internal": "an unexpected server error; it was logged"})
register(503, {"unavailable": "the service cannot answer now; retry after Retry-After"})


class LedgerError(TxprocError):
    """Base of request-level errors. ``code`` is stable and appears in API error bodies."""

    code = "ledger_error"
    retryable = False

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(LedgerError):
    """A queue or in-flight limit is full; retry after ``retry_after_s`` (HTTP 429)."""

    code = "overloaded"
    retryable = True


class Unavailable(LedgerError):
    """A shard is restarting or the database is unreachable; retry later (HTTP 503)."""

    code = "unavailable"
    retryable = True


class QuotaExceeded(LedgerError):
    """The tenant would hold more accounts than its quota allows; nothing was created
    (HTTP 422 ``account_quota_exceeded``). Not retryable as is: accounts must be freed or
    the quota raised."""

    code = "account_quota_exceeded"
