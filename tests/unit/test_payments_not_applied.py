"""A payment step whose ledger transfers come back ``not_applied`` (a shard's peer was not
reached, docs/api.md "Partial answers") is never taken as refused: the engine raises
``Unavailable``, which parks the step to be tried again, as when the ledger cannot be
reached. Taken as a refusal, an approved capture would be refunded at the provider.

Pure logic of the engine's ledger step (``PaymentsEngine._apply_ledger``) over a stand-in
ledger that answers as the front does; no store or provider is touched."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from actors.payments.engine import PaymentsEngine
from processor.codes import TransferResult
from processor.errors import Unavailable
from processor.payments import Kind, PaymentsConfig, Phase, ledger_transfers
from processor.risk import RiskConfig
from processor.types import Transfer
from tests.unit.test_payments_saga import step

R = TransferResult


class AnsweringLedger:
    """Answers every request with the codes it is given, one per transfer."""

    def __init__(self, codes: list[TransferResult]) -> None:
        self.codes = codes
        self.sent: list[list[Transfer]] = []

    async def create_transfers(self, transfers: list[Transfer]) -> list[TransferResult]:
        self.sent.append(transfers)
        return self.codes[: len(transfers)]


def _engine(ledger: Any) -> PaymentsEngine:
    return PaymentsEngine(store=None, ledger=ledger, providers={},  # type: ignore[arg-type]
                          currencies={}, provider_deadline_s={}, risk=None,
                          risk_config=RiskConfig(), config=PaymentsConfig())


def _capture_step() -> Any:
    return msgspec.structs.replace(step(Kind.CAPTURE), phase=Phase.APPLY)


async def test_not_applied_transfers_are_unavailable_not_refused() -> None:
    s = _capture_step()
    n = len(ledger_transfers(s, PaymentsConfig()))
    ledger = AnsweringLedger([R.not_applied] * n)
    with pytest.raises(Unavailable):
        await _engine(ledger)._apply_ledger(s)
    assert len(ledger.sent) == 1


async def test_a_refusal_and_an_application_are_answered_as_before() -> None:
    s = _capture_step()
    n = len(ledger_transfers(s, PaymentsConfig()))
    assert await _engine(AnsweringLedger([R.ok] * n))._apply_ledger(s) == R.ok
    refused = [R.exceeds_credits] + [R.linked_event_failed] * (n - 1)
    assert await _engine(AnsweringLedger(refused))._apply_ledger(s) == R.exceeds_credits
