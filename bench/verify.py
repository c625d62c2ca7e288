"""``python -m bench.verify``: how fast ``txproc verify`` checks a ledger.

Builds a ledger of ``--transfers`` plain transfers between ``--accounts`` accounts of one
shard on an embedded PostgreSQL of its own (in a temporary directory), written the way a
shard writes them: ArrayBook plans each batch of ``--batch`` over columns and
LedgerStore.commit copies it and chains it, ``--batch`` transfers per link. Then a
checkpoint folds the balances (as a running shard does), an anchor records the chain's
head, and ``verify`` runs over the whole ledger with every check of ``txproc verify``
(actors/app/verification.py: every balance re-derived, every link re-hashed). Reported:
the build rate, verify's seconds and rows/s, and what it checked. Figures are printed
and written to ``--out``, never asserted: this machine is shared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import ledger
from bench.scratch import run_main, scratch_database

__all__ = ["main", "parse_args", "run"]

RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=1_000_000)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=8_000, help="transfers per commit (link)")
    p.add_argument("--chunk-rows", type=int, default=20_000,
                   help="rows verify fetches per round trip")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default bench/results/verify-<date>.json)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_DIR / f"verify-{dt.date.today().isoformat()}.json"
    return args


async def build(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Write the ledger as shard 0 writes it; returns how long that took."""
    from actors.ledger import LedgerStore
    from processor.ledger import ArrayBook, Known, PartitionMap
    from processor.types import Account, Transfer

    partitions = PartitionMap.uniform(1)
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=600)
    try:
        await store.ensure_partition_map(partitions)
        epoch = await store.take_epoch(0)
        book = ArrayBook(0, partitions, recent_ids_max=args.batch * 2)
        now = time.time_ns()
        _, batch = book.create_accounts(
            [[Account(id=i, currency="EUR", code=1) for i in range(1, args.accounts + 1)]], now)
        await store.commit([batch], fences={0: epoch}, shard=0, partition_map=partitions)
        book.accounts_committed(batch)
        rng = np.random.default_rng(args.seed)
        started = time.perf_counter()
        for first in range(0, args.transfers, args.batch):
            n = min(args.batch, args.transfers - first)
            debit = rng.integers(1, args.accounts + 1, n)
            credit = (debit + rng.integers(1, args.accounts, n) - 1) % args.accounts + 1
            amount = rng.integers(1, 10_000, n)
            transfers = [Transfer(id=first + k + 1, debit_account_id=d, credit_account_id=c,
                                  amount=a, currency="EUR", code=1)
                         for k, (d, c, a) in enumerate(zip(debit.tolist(), credit.tolist(),
                                                           amount.tolist(), strict=True))]
            plan = book.plan_transfers([transfers], time.time_ns(), Known())
            batch = book.finalize(plan, {}, time.time_ns())
            await store.commit([batch], fences={0: epoch}, shard=0, partition_map=partitions)
            book.committed(batch)
        built_s = time.perf_counter() - started
        await store.checkpoint(0, epoch, partitions.partitions_of_shard(0))
        await store.anchor("operator")
    finally:
        await store.close()
    return {"build_seconds": round(built_s, 2),
            "build_transfers_per_s": round(args.transfers / built_s, 1)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from actors.app.verification import verify_all
    from bench.__main__ import machine_info

    results: dict[str, Any] = {"machine": machine_info(), "args": {
        "transfers": args.transfers, "accounts": args.accounts, "batch": args.batch,
        "chunk_rows": args.chunk_rows}}
    async with scratch_database("txproc_bench_verify") as (url, _):
        results["build"] = await build(url, args)
        # Every check txproc verify runs (the audit log and the reconciliation records are
        # empty here: the ledger's are what a million transfers cost).
        result = await verify_all(url, chunk_rows=args.chunk_rows)
        results["verify"] = {
            "ok": result.report.ok, "seconds": round(result.seconds, 2),
            "rows": result.rows, "rows_per_s": round(result.rows_per_s, 1),
            "transfers_per_s": round(args.transfers / result.seconds, 1),
            "checked": result.report.checked,
            "problems": [p.kind for p in result.report.problems[:10]],
        }
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    results = run_main(lambda: run(args))
    ledger.write_results(args.out, results)
    v = results["verify"]
    print(f"\nverify of {args.transfers:,} transfers: ok={v['ok']} in {v['seconds']} s, "
          f"{v['rows_per_s']:,.0f} rows/s ({v['transfers_per_s']:,.0f} transfers/s)")
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
