"""The pure parts of `python -m bench.chaos`: its durations, its schedule, the gateways'
model of the balances, the merchants' check against their payments and the RSS growth
measure. The run itself is tests/e2e/test_chaos.py."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.chaos import (
    Fault,
    Model,
    inject,
    merchant_disagreements,
    parse_args,
    parse_duration,
    rss_growth,
    schedule,
)
from processor.history import balances_at
from processor.types import Account, Transfer, TransferFlags


def test_durations() -> None:
    assert parse_duration("60s") == 60 and parse_duration("10m") == 600
    assert parse_duration("1h") == 3600 and parse_duration("90") == 90
    for bad in ("", "5s", "ten minutes", "-60s", "10x"):
        with pytest.raises(ValueError):
            parse_duration(bad)


@given(st.floats(min_value=10, max_value=3600), st.floats(min_value=0.5, max_value=120),
       st.integers(min_value=1, max_value=8))
def test_the_schedule_fits_the_run_and_leaves_its_last_quarter_quiet(
        duration: float, pg_stop: float, shards: int) -> None:
    faults = schedule(duration, pg_stop_s=pg_stop, shards=shards)
    assert [f.at_s for f in faults] == sorted(f.at_s for f in faults)
    assert all(0 < f.at_s and f.at_s + f.hold_s <= 0.76 * duration for f in faults)
    kinds = {f.label for f in faults}
    assert {"sigkill front", "sigkill payments", "sigkill provider acme", "sigstop postgres",
            "outage provider acme", "slow provider globex", "sigkill shard 0"} <= kinds
    (stop,) = [f for f in faults if f.kind == "sigstop"]
    assert stop.hold_s == min(pg_stop, duration / 5)
    assert all(int(f.target.split()[1]) < shards for f in faults if "shard" in f.target)


def test_node_removal_is_scheduled_only_with_several_nodes() -> None:
    assert not [f for f in schedule(600, pg_stop_s=30, shards=2) if f.kind == "remove"]
    assert [f for f in schedule(600, pg_stop_s=30, shards=2, nodes=3) if f.kind == "remove"]


_ACCOUNTS = (1, 2, 3)


@st.composite
def _workloads(draw: st.DrawFn) -> list[Transfer]:
    """Acknowledged transfers in a gateway's order: plain, holds, and posts or voids of
    earlier holds, each hold resolved at most once."""
    out: list[Transfer] = []
    open_holds: list[Transfer] = []
    for i in range(draw(st.integers(min_value=0, max_value=30))):
        kind = draw(st.sampled_from(("plain", "hold", "post", "void")))
        a, b = draw(st.permutations(_ACCOUNTS))[:2]
        amount = draw(st.integers(min_value=1, max_value=1_000))
        tid = 100 + i
        if kind in ("post", "void") and open_holds:
            hold = open_holds.pop(draw(st.integers(0, len(open_holds) - 1)))
            post = kind == "post"
            out.append(Transfer(
                id=tid, debit_account_id=hold.debit_account_id,
                credit_account_id=hold.credit_account_id, currency="EUR",
                amount=draw(st.integers(1, hold.amount)) if post else hold.amount,
                pending_id=hold.id,
                flags=int(TransferFlags.POST_PENDING if post else TransferFlags.VOID_PENDING)))
        elif kind == "hold":
            t = Transfer(id=tid, debit_account_id=a, credit_account_id=b, amount=amount,
                         currency="EUR", flags=int(TransferFlags.PENDING))
            open_holds.append(t)
            out.append(t)
        else:
            out.append(Transfer(id=tid, debit_account_id=a, credit_account_id=b,
                                amount=amount, currency="EUR"))
    return [Transfer(**{**{f: getattr(t, f) for f in t.__struct_fields__},
                        "timestamp": 1_000 + n}) for n, t in enumerate(out)]


@given(_workloads())
def test_the_model_equals_the_ledgers_reference_replay(transfers: list[Transfer]) -> None:
    """The auditor's arithmetic agrees with the ledger's reference model of balances
    (processor.history.balances_at, itself held to the ledger by its own tests)."""
    model = Model()
    for t in transfers:
        model.apply(t)
    for account in _ACCOUNTS:
        ref = balances_at(transfers, [], account, at_ns=10**18)
        assert model.balances[account] == [ref.debits_pending, ref.debits_posted,
                                           ref.credits_pending, ref.credits_posted]


def test_rss_growth_compares_the_last_fifth_with_the_second() -> None:
    assert rss_growth([(i, 100.0) for i in range(9)]) is None
    assert rss_growth([(i, 100.0) for i in range(50)]) == pytest.approx(1.0)
    leaking = [(i, 100.0 + 10 * i) for i in range(50)]
    growth = rss_growth(leaking)
    assert growth is not None and growth > 2.0
    warm_then_flat = [(i, 50.0 if i < 10 else 300.0) for i in range(50)]
    assert rss_growth(warm_then_flat) == pytest.approx(1.0)


def test_three_nodes_by_default_and_a_removal_needs_a_cluster() -> None:
    assert parse_args([]).nodes == 3
    assert parse_args(["--nodes", "1"]).nodes == 1
    remove = Fault(1.0, "remove", "worker node")
    assert asyncio.run(inject(remove, None, None, None)) == "not run: one Ray node"
    with pytest.raises(ValueError, match="unknown fault"):
        asyncio.run(inject(Fault(1.0, "melt", "front"), None, None, None))


def test_a_merchant_agrees_only_when_it_holds_and_posted_exactly_its_payments() -> None:
    """Authorized 300 (held), captured 500, declined 700: the merchant holds 300 and has
    500 posted. A hold left over (pending credits above what is held), a missing capture,
    a debit or an account not found each show, naming the merchant."""
    views = [{"merchant_account_id": 7, "capturable_amount": 300, "captured_amount": 0},
             {"merchant_account_id": 7, "capturable_amount": 0, "captured_amount": 500},
             {"merchant_account_id": 7, "capturable_amount": 0, "captured_amount": 0},
             {"merchant_account_id": 9, "capturable_amount": 40, "captured_amount": 0}]

    def account(i: int, dp: int = 0, dP: int = 0, cp: int = 0, cP: int = 0) -> Account:
        return Account(id=i, currency="USD", debits_pending=dp, debits_posted=dP,
                       credits_pending=cp, credits_posted=cP)

    assert merchant_disagreements(views, {7: account(7, cp=300, cP=500),
                                          9: account(9, cp=40)}) == []
    for wrong in (account(7, cp=1_000, cP=500), account(7, cp=300),
                  account(7, dp=1, cp=300, cP=500)):
        [line] = merchant_disagreements(views, {7: wrong, 9: account(9, cp=40)})
        assert line.startswith("merchant 7:")
    [line] = merchant_disagreements(views, {7: account(7, cp=300, cP=500)})
    assert line.startswith("merchant 9: balances None")
