"""``python -m bench.archive``: how fast ``txproc archive`` and ``txproc restore`` move
closed months (docs/design.md §16, "Archive and restore").

Builds a ledger of ``--transfers`` plain transfers between ``--accounts`` accounts of one
shard on an embedded PostgreSQL of its own (a temporary directory), written as a shard
writes them (ArrayBook plans each batch, LedgerStore.commit copies and chains it) with the
book's clock spread evenly over ``--months`` months from January 2026; then checkpoints
past the last month, lets the history indexer catch up, and times: the archive of every
month but the last, ``verify`` with the archive in force, the restore, and ``verify``
after it. Figures are printed and written to ``--out``, never asserted: this machine is
shared. Nothing here touches the commit path, so the write benchmark (``python -m bench``)
is unaffected by construction.
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
DAY_NS = 86_400 * 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=200_000)
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=8_000, help="transfers per commit (link)")
    p.add_argument("--months", type=int, default=3, help="months the clock spans (>= 2)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default bench/results/archive-<date>.json)")
    args = p.parse_args(argv)
    if args.months < 2:
        p.error("--months is at least 2: one to archive, one kept")
    if args.out is None:
        args.out = RESULTS_DIR / f"archive-{dt.date.today().isoformat()}.json"
    return args


async def build(url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Write the ledger as shard 0 writes it, its clock over ``--months`` months."""
    from actors.ledger import LedgerStore
    from actors.ledger.indexer import HistoryIndexer
    from processor.archive import month_start_ns
    from processor.ledger import ArrayBook, Known, PartitionMap
    from processor.types import Account, Transfer

    start_ns = month_start_ns("2026-01")
    span_ns = args.months * 30 * DAY_NS
    partitions = PartitionMap.uniform(1)
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=600)
    try:
        await store.ensure_partition_map(partitions)
        epoch = await store.take_epoch(0)
        book = ArrayBook(0, partitions, recent_ids_max=args.batch * 2)
        _, batch = book.create_accounts(
            [[Account(id=i, currency="EUR", code=1) for i in range(1, args.accounts + 1)]],
            start_ns)
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
            now = start_ns + span_ns * first // args.transfers + DAY_NS
            plan = book.plan_transfers([transfers], now, Known())
            batch = book.finalize(plan, {}, now)
            await store.commit([batch], fences={0: epoch}, shard=0, partition_map=partitions)
            book.committed(batch)
        built_s = time.perf_counter() - started
        await store.checkpoint(0, epoch, partitions.partitions_of_shard(0),
                               floor_ns=start_ns + span_ns + 5 * DAY_NS)
        await store.anchor("operator")
    finally:
        await store.close()
    indexer = HistoryIndexer(url, connect_timeout_s=10, command_timeout_s=600)
    indexed = time.perf_counter()
    try:
        while not (await indexer.step())[1]:
            pass
    finally:
        await indexer.close()
    return {"build_seconds": round(built_s, 2),
            "build_transfers_per_s": round(args.transfers / built_s, 1),
            "index_seconds": round(time.perf_counter() - indexed, 2)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from actors.app.verification import verify_all
    from actors.ledger.archive import archive, restore
    from bench.__main__ import machine_info

    results: dict[str, Any] = {"machine": machine_info(), "args": {
        "transfers": args.transfers, "accounts": args.accounts, "batch": args.batch,
        "months": args.months}}
    async with scratch_database("txproc_bench_archive") as (url, directory):
        results["build"] = await build(url, args)
        before = f"2026-{args.months:02d}" if args.months < 12 else "2026-12"
        done = await archive(url, before, directory / "archives")
        rows = done.manifest.transfers + done.manifest.resolutions
        size = sum(f.stat().st_size for f in done.directory.iterdir())
        results["archive"] = {
            "before": before, "transfers": done.manifest.transfers, "rows": rows,
            "seconds": round(done.seconds, 2), "rows_per_s": round(rows / done.seconds, 1),
            "bytes": size, "bytes_per_transfer": round(size / max(rows, 1), 1),
            "files": len(done.manifest.files), "steps_s": done.steps_s}
        archived = await verify_all(url)
        results["verify_archived"] = {"ok": archived.report.ok,
                                      "seconds": round(archived.seconds, 2),
                                      "problems": [p.kind for p in archived.report.problems[:5]]}
        back = await restore(url, done.directory)
        results["restore"] = {"rows": rows, "seconds": round(back.seconds, 2),
                              "rows_per_s": round(rows / back.seconds, 1)}
        restored = await verify_all(url)
        results["verify_restored"] = {"ok": restored.report.ok,
                                      "seconds": round(restored.seconds, 2),
                                      "problems": [p.kind for p in restored.report.problems[:5]]}
    return results


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    results = run_main(lambda: run(args))
    ledger.write_results(args.out, results)
    a, r = results["archive"], results["restore"]
    print(f"\narchive of {a['transfers']:,} transfers ({a['rows']:,} rows, {a['files']} files,"
          f" {a['bytes_per_transfer']} bytes a row): {a['seconds']} s, "
          f"{a['rows_per_s']:,.0f} rows/s; verify with it in force ok="
          f"{results['verify_archived']['ok']}")
    print(f"restore: {r['seconds']} s, {r['rows_per_s']:,.0f} rows/s; verify after it ok="
          f"{results['verify_restored']['ok']}")
    ok = results["verify_archived"]["ok"] and results["verify_restored"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
