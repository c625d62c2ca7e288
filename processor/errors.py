"""Errors that callers of the ledger service can meet, apart from per-item result codes.

A result code (processor.codes) is an expected outcome for one item. These exceptions are
about the request as a whole: nothing of it was written, and the caller may retry it
unchanged (ids are idempotent) after ``retry_after_s``. When some parts of a request were
answered and another's shard was not, the request is answered per item instead, with
``not_applied`` for what was not stored (docs/api.md, "Partial answers"); the one exception
is an ``Unavailable`` whose message says the outcome is unknown (a shard and the database
both unreachable), after which the same request must be sent again.
"""

from __future__ import annotations

__all__ = ["LedgerError", "Overloaded", "QuotaExceeded", "Unavailable"]


class LedgerError(Exception):
    """Base of request-level errors. ``code`` is stable and appears in API error bodies."""

    code = "ledger_error"
    retryable = False

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.message = message
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
