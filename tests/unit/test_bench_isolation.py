"""The pure parts of ``python -m bench.isolation``: arguments, requests and figures."""

from __future__ import annotations

import json
import random

import pytest

from bench.isolation import parse_args, server_figures, transfer_body


def test_defaults_and_quick() -> None:
    args = parse_args([])
    assert (args.rate, args.seconds, args.payments_rate) == (200.0, 20.0, 400.0)
    assert args.out.name.startswith("isolation-")
    quick = parse_args(["--quick"])
    assert quick.seconds == 3.0 and quick.out.name.endswith("-quick.json")
    with pytest.raises(SystemExit):
        parse_args(["--rate", "0"])


def test_a_transfer_moves_between_two_distinct_accounts() -> None:
    rng = random.Random(3)
    for transfer_id in range(200):
        body = json.loads(transfer_body(transfer_id, rng, [10, 11, 12]))
        assert body["id"] == transfer_id and body["currency"] == "USD"
        assert body["debit_account_id"] != body["credit_account_id"]
        assert 1 <= body["amount"] <= 100


def test_server_figures_are_deltas_of_the_histograms() -> None:
    commit = "txproc_ledger_commit_duration_seconds"
    request = "txproc_transfer_request_duration_seconds"
    before = {(f"{commit}_count", ()): 10.0, (f"{commit}_sum", ()): 0.02,
              ("txproc_ledger_commit_transfers_sum", ()): 10.0,
              (f"{request}_count", (("api", "http"),)): 5.0,
              (f"{request}_sum", (("api", "http"),)): 0.01}
    after = {(f"{commit}_count", ()): 30.0, (f"{commit}_sum", ()): 0.12,
             ("txproc_ledger_commit_transfers_sum", ()): 50.0,
             (f"{request}_count", (("api", "http"),)): 25.0,
             (f"{request}_sum", (("api", "http"),)): 0.21}
    assert server_figures(before, after) == {
        "commits": 20, "commit_mean_ms": 5.0, "transfers_per_commit": 2.0,
        "http_transfer_mean_ms": 10.0, "rpc_transfer_mean_ms": None}
