"""Tests of the one error root and its registry of stable codes (processor/errors.py)."""

from __future__ import annotations

import pathlib
import re

import pytest

import actors.edge.http_api as http_api
import actors.payments.endpoints  # noqa: F401  (registers the payments' codes)
import adapters.registry  # noqa: F401  (imports every adapter)
from processor import errors, wire
from processor.errors import (
    ERROR_REGISTRY,
    ERROR_STATUS,
    ErrorCodeConflict,
    TxprocError,
    register,
    statuses,
)
from processor.identity import AUTH_CODES, SIGNATURE_CODES
from processor.payments import IdempotencyErrorCode, ListCode
from processor.payments.webhooks import WebhookEndpointCode

ROOT = pathlib.Path(__file__).parents[2]
# The classes whose first string argument (after an HTTP status, for ApiError) is a code
# answered to a client, and the helpers that answer one.
_RAISED = re.compile(
    r"\b(ApiError|PaymentsApiError|EndpointRefused|ReconciliationRefused|AuditQueryError"
    r"|AuthError|SignatureError|WebhookRejected|IdempotencyError|PaymentError|DisputeError"
    r"|error_body|_failure)\(\s*(?:\d{3},\s*)?\"([a-z_]+)\"")
# Reasons that name a rule inside the service and are never answered as they are:
# the engine's (answered as payment_failed by api_error_of) and a provider's dispute
# notice's (recorded with the refused notice).
INTERNAL_REASONS = {
    "step_exists", "step_not_waiting", "step_not_applying", "no_compensation",
    "dispute_payment_not_captured", "dispute_exceeds_captured", "dispute_fee_invalid",
}


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy of the registry for one test, so its registrations do not outlive it."""
    monkeypatch.setattr(errors, "_REGISTRY", dict(errors._REGISTRY))


def subclasses(cls: type[TxprocError]) -> list[type[TxprocError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *subclasses(sub)]
    return found


def source_codes() -> set[str]:
    """Every code literal the service's own code raises or answers (not the simulators')."""
    codes = set()
    for path in [*ROOT.glob("processor/**/*.py"), *ROOT.glob("adapters/*.py"),
                 *ROOT.glob("actors/**/*.py")]:
        codes |= {m.group(2) for m in _RAISED.finditer(path.read_text())}
    return codes


@pytest.mark.parametrize(("status", "code", "meaning"), [
    (404, "invalid_body", "the JSON does not match the schema; the message names the field"),
    (400, "invalid_body", "another meaning"),
    (399, "a_new_code", "a status that is not an error"),
    (600, "a_new_code", "a status past 599"),
    (400, "Not-Snake", "a code that is not snake case"),
    (400, "a_new_code", ""),
    (400, "a_new_code", "two\nlines"),
], ids=["other status", "other meaning", "status 399", "status 600", "bad code",
        "empty meaning", "two lines"])
@pytest.mark.usefixtures("scratch_registry")
def test_register_refuses(status: int, code: str, meaning: str) -> None:
    """A code registered again with another status or meaning, or ill-formed, is refused."""
    with pytest.raises(ErrorCodeConflict):
        register(status, {code: meaning})


@pytest.mark.usefixtures("scratch_registry")
def test_register_records_and_repeats_identically() -> None:
    """A new code is recorded with its status, and registering it again unchanged is a no-op,
    while a duplicate with another status raises and leaves the first."""
    assert register(418, {"a_new_code": "a test's code"}) == ("a_new_code",)
    register(418, {"a_new_code": "a test's code"})
    with pytest.raises(ErrorCodeConflict, match="418"):
        register(409, {"a_new_code": "a test's code"})
    assert ERROR_STATUS["a_new_code"] == 418
    assert ERROR_REGISTRY["a_new_code"].meaning == "a test's code"
    assert http_api.ERROR_CODES["a_new_code"] == 418  # the edge's table is a view


def test_statuses_refuses_an_unregistered_code() -> None:
    """A domain's table cannot list a code the registry does not know."""
    assert statuses(["invalid_body", "overloaded"]) == {"invalid_body": 400, "overloaded": 429}
    with pytest.raises(KeyError, match="no_such_code"):
        statuses(["invalid_body", "no_such_code"])


def test_every_class_code_is_registered_or_an_rpc_code() -> None:
    """Every error class under the root names a code the registry (HTTP) or the RPC
    protocol (wire.ERROR_CODES) knows."""
    classes = subclasses(TxprocError)
    assert len(classes) >= 15
    unknown = [c.__name__ for c in [TxprocError, *classes]
               if c.code not in ERROR_REGISTRY and c.code not in wire.ERROR_CODES]
    assert unknown == []


def test_every_enumerated_code_is_registered() -> None:
    """The codes the domains enumerate are all registered, with a 4xx status."""
    codes = [*AUTH_CODES, *SIGNATURE_CODES, *ListCode, *WebhookEndpointCode,
             *IdempotencyErrorCode]
    assert all(400 <= ERROR_STATUS[code] < 500 for code in codes)


def test_every_code_raised_or_answered_is_registered() -> None:
    """Every code literal raised or answered in processor/, adapters/ and actors/ is
    registered, except the internal reasons, which are not."""
    codes = source_codes()
    assert len(codes) > 50
    assert {c for c in codes if c not in ERROR_REGISTRY} == INTERNAL_REASONS


def test_the_api_docs_tables_have_the_registered_statuses() -> None:
    """docs/api.md's code table and docs/payments.md's status table give each code the
    status the registry has."""
    api_rows = re.findall(r"^\| `(\w+)` \| (\d{3}) \|", (ROOT / "docs/api.md").read_text(),
                          flags=re.MULTILINE)
    assert len(api_rows) > 25
    payment_rows = re.findall(r"^\| (\d{3}) \| (.*) \| [^|]* \|$",
                              (ROOT / "docs/payments.md").read_text(), flags=re.MULTILINE)
    documented = [(code, int(status)) for code, status in api_rows] + [
        (code, int(status)) for status, text in payment_rows if int(status) >= 400
        for code in re.findall(r"`(\w+)`", text)]
    assert len(documented) > 60
    assert [(code, status) for code, status in documented if ERROR_STATUS.get(code) != status
            ] == []
