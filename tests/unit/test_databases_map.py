"""The partition map over several databases (processor/ledger/partition.py): how shards
are dealt over databases, and which items of a request the front refuses because they
span two (docs/design.md §12)."""

from __future__ import annotations

import numpy as np
import pytest

from processor.codes import TransferResult
from processor.ledger import PartitionMap, crossing_mask, refused_across_databases

R = TransferResult
LINKED, PENDING = 1, 2
TWO = PartitionMap.dealt(4, ("main", "db1"))


def _account(shard: int, skip: int = 0) -> int:
    found = [i for i in range(1, 10_000) if TWO.shard_of(i) == shard]
    return found[skip]


def test_shards_are_dealt_round_robin_over_the_databases() -> None:
    """Shard s writes to database s mod n; one database is the old uniform map."""
    assert TWO.database_of_shard == ("main", "db1", "main", "db1")
    assert TWO.databases == ("main", "db1") and not TWO.single_database
    assert TWO.shards_of_database("db1") == [1, 3]
    assert PartitionMap.uniform(3) == PartitionMap.dealt(3, ("main",))
    assert PartitionMap.uniform(3).single_database
    rows = TWO.rows_of_database("db1")
    assert {s for _, s, _ in rows} == {1, 3} and {k for _, _, k in rows} == {"db1"}
    assert len(rows) + len(TWO.rows_of_database("main")) == 256


@pytest.mark.parametrize(("shards", "keys"), [
    (1, ("main", "db1")),        # a database without a shard
    (2, ("main", "main")),       # the same key twice
    (0, ("main",)),
])
def test_impossible_layouts_are_refused(shards: int, keys: tuple[str, ...]) -> None:
    """Every database needs a shard, keys are distinct."""
    with pytest.raises(ValueError):
        PartitionMap.dealt(shards, keys)


MAIN0, DB1, MAIN2, DB3 = _account(0), _account(1), _account(2), _account(3)
MAIN0B = _account(0, 1)


@pytest.mark.parametrize(("transfers", "expected"), [
    # (debit, credit, flags) per item -> refused index -> code
    ([(MAIN0, MAIN2, 0)], {}),                                      # within main, 2 shards
    ([(DB1, DB3, 0)], {}),                                          # within db1
    ([(MAIN0, DB1, 0)], {0: R.accounts_in_different_databases}),
    ([(MAIN0, MAIN2, LINKED), (MAIN2, DB3, 0), (DB1, DB3, 0)],     # a chain that leaves
     {0: R.linked_event_failed, 1: R.accounts_in_different_databases}),
    ([(DB1, DB3, LINKED), (DB3, DB1, 0), (MAIN0, MAIN0B, 0)], {}),  # chains stay home
    ([(MAIN0, 0, 0)], {}),                                          # id 0 names no database
    ([(DB3, MAIN2, PENDING)], {0: R.accounts_in_different_databases}),
])
def test_requests_spanning_databases(transfers: list[tuple[int, int, int]],
                                     expected: dict[int, R]) -> None:
    """A chain with a transfer outside its coordinator's database is refused whole; every
    other chain is routed."""
    refused = refused_across_databases(
        TWO, [d for d, _, _ in transfers], [c for _, c, _ in transfers],
        [f for _, _, f in transfers], crossing=int(R.accounts_in_different_databases),
        linked_failed=int(R.linked_event_failed))
    assert refused == {i: int(c) for i, c in expected.items()}


def test_one_database_refuses_nothing_and_columns_agree() -> None:
    """With one database nothing spans; in columns the mask matches the objects' rule."""
    one = PartitionMap.uniform(4)
    assert refused_across_databases(one, [MAIN0], [DB1], [0], crossing=52,
                                    linked_failed=1) == {}
    debit = np.array([MAIN0, DB1, DB3, MAIN2], dtype=np.int64)
    credit = np.array([MAIN2, MAIN0, DB1, DB3], dtype=np.int64)
    assert crossing_mask(TWO, debit, credit).tolist() == [False, True, False, True]
    assert not crossing_mask(one, debit, credit).any()


def test_transit_ids_land_in_their_database_and_stay_in_their_range() -> None:
    """Transit accounts are derived (every front agrees), in the reserved slice, each in
    the database of its side; a skip takes another candidate; compensation ids are in
    their own slice and differ per transfer."""
    from processor.ledger.transit import (
        COMPENSATION_ID_BASE,
        TRANSIT_ID_BASE,
        compensation_id,
        next_step,
        transit_account_id,
    )

    kw = {"tenant": 7, "debit_database": "main", "credit_database": "db1", "currency": "EUR"}
    out = transit_account_id(TWO, side="out", **kw)
    into = transit_account_id(TWO, side="in", **kw)
    assert TWO.database_of(out) == "main" and TWO.database_of(into) == "db1"
    assert out == transit_account_id(TWO, side="out", **kw)
    assert transit_account_id(TWO, side="out", skip=1, **kw) != out
    assert transit_account_id(TWO, side="out", tenant=8, debit_database="main",
                              credit_database="db1", currency="EUR") != out
    assert all(TRANSIT_ID_BASE <= i < COMPENSATION_ID_BASE for i in (out, into))
    ids = {compensation_id(t) for t in range(1, 1001)}
    assert len(ids) == 1000 and all(COMPENSATION_ID_BASE <= i < 2**63 for i in ids)
    assert [next_step(s) for s in ("started", "debited", "compensating", "credited",
                                   "refused", "compensated")] == [
        "debit", "credit", "compensate", "done", "done", "done"]


@pytest.mark.parametrize(("databases", "shards", "payments", "complaint"), [
    ({"db1": "postgresql://b/x"}, 1, False, "at most one database per shard"),
    ({"main": "postgresql://b/x"}, 2, False, "further database keys"),
    ({"DB1": "postgresql://b/x"}, 2, False, "further database keys"),
    ({"db1": ""}, 2, False, "every further database has a URL"),
    ({"db1": "postgresql://b/x"}, 2, True, None),  # payments: the layout is checked at start
    ({"db1": "postgresql://b/x"}, 2, False, None),
    ({}, 2, True, None),
])
def test_configuration_of_several_databases(databases: dict[str, str], shards: int,
                                            payments: bool, complaint: str | None) -> None:
    """Config.check refuses a layout that cannot run, naming what is wrong."""
    from processor.config import Config, FrontConfig, PaymentsSection, ShardConfig

    config = Config(shard=ShardConfig(database_url="postgresql://a/x", shards=shards,
                                      databases=databases),
                    front=FrontConfig(), data_dir="/tmp/x",
                    payments=PaymentsSection() if payments else PaymentsSection(
                        enabled=False, providers=()))
    if complaint is None:
        config.check()
    else:
        with pytest.raises(ValueError, match=complaint):
            config.check()


MOVED = TWO.with_shard_in(2, "db2")   # shard 2 moved from main to a third database


def _recorded(layout: PartitionMap) -> dict[str, list[tuple[int, int, str]]]:
    return {key: layout.rows_of_database(key) for key in ("main", "db1", "db2")
            if layout.rows_of_database(key)}


def test_the_recorded_layout_is_the_union_of_each_databases_rows() -> None:
    """Each database's own rows together give the layout back, a moved shard where its rows
    are (not where dealing would put it); the partitions stay dealt over the shards."""
    assert PartitionMap.recorded(_recorded(TWO)) == TWO
    assert MOVED.database_of_shard == ("main", "db1", "db2", "db1")
    assert PartitionMap.recorded(_recorded(MOVED)) == MOVED
    assert MOVED.shard_of_partition == TWO.shard_of_partition
    with pytest.raises(ValueError, match=r"shard must be in 0\.\.3"):
        TWO.with_shard_in(4, "db1")


def _swapped() -> dict[str, list[tuple[int, int, str]]]:
    rows = _recorded(TWO)
    return {"main": rows["db1"], "db1": rows["main"]}


def _interrupted() -> dict[str, list[tuple[int, int, str]]]:
    rows = _recorded(MOVED)
    return {**rows, "main": rows["main"] + [(p, s, "main") for p, s, _ in rows["db2"]]}


@pytest.mark.parametrize(("rows", "complaint"), [
    ({"main": TWO.rows_of_database("main")}, "128 partitions are recorded in none"),
    (_swapped(), "holds the partitions of database 'db1'"),
    (_interrupted(), "shard 2 is recorded in databases 'main' and 'db2'"),
    ({**_recorded(TWO), "db2": []}, "database 'db2' holds no shard"),
    ({"main": [(p, p % 3, "main") for p in range(256)], "db1": [(5, 3, "db1")]},
     "not dealt over 4 shards"),
    ({"main": []}, "no database holds a partition map"),
])
def test_a_recorded_layout_that_cannot_be_served_is_refused(
        rows: dict[str, list[tuple[int, int, str]]], complaint: str) -> None:
    """A database left out, URLs in another order, an interrupted move, a database without
    a shard, partitions not dealt: each refused, naming what is wrong."""
    with pytest.raises(ValueError, match=complaint):
        PartitionMap.recorded(rows)


def test_a_recorded_layout_is_what_the_actors_derive() -> None:
    """ShardConfig.layout, once set from the databases' record, is the map every actor
    derives; empty, the dealt one."""
    from processor.ledger.config import ShardConfig

    config = ShardConfig(database_url="postgresql://a/x", shards=4,
                         databases={"db1": "postgresql://b/x", "db2": "postgresql://c/x"})
    assert config.partition_map() == PartitionMap.dealt(4, ("main", "db1", "db2"))
    moved = ShardConfig(database_url="postgresql://a/x", shards=4,
                        databases={"db1": "postgresql://b/x", "db2": "postgresql://c/x"},
                        layout=MOVED.database_of_shard)
    assert moved.partition_map() == MOVED
