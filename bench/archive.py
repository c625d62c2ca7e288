"""``python -m bench.archive``: how fast ``txproc archive`` and ``txproc restore`` move
closed months (docs/design.md §16, "Archive and restore").

Builds a ledger of ``--transfers`` plain transfers between ``--accounts`` accounts of one
shard on an embedded PostgreSQL of its own (a temporary directory), written as a shard
writes them (ArrayBook plans each batch, LedgerStore.commit copies and chains it) with the
book's clock spread evenly over ``--months`` months from January 2026; then checkpoints
past the last month, lets the history indexer catch up, and times: the archive of every
month but the last, ``verify`` with the archive in force, the restore, and ``verify``
after it. ``--databases N`` deals N shards over N databases, each on an embedded server of
its own (shard s in the s-th: docs/design.md §12), the transfers split evenly, each
shard's between its own accounts; the archive and the restore then go over all of them
(§16, "Archive over several databases"). Figures are printed and written to ``--out``,
never asserted: this machine is shared. Nothing here touches the commit path, so the
write benchmark (``python -m bench``) is unaffected by construction.
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--databases", type=int, default=1,
                   help="databases (one embedded server and one shard each)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON results file (default bench/results/archive-<date>.json)")
    args = p.parse_args(argv)
    if args.months < 2:
        p.error("--months is at least 2: one to archive, one kept")
    if not 1 <= args.databases <= 8:
        p.error("--databases is 1 to 8")
    if args.out is None:
        args.out = RESULTS_DIR / f"archive-{dt.date.today().isoformat()}.json"
    return args


async def build(urls: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    """Write the ledger as its shards write it (one per database of ``urls``), the clock
    over ``--months`` months."""
    from actors.ledger.indexer import HistoryIndexer
    from processor.ledger import PartitionMap

    partitions = (PartitionMap.uniform(1) if len(urls) == 1
                  else PartitionMap.dealt(len(urls), tuple(urls)))
    ids = np.arange(1, args.accounts + 1)
    owners = partitions.shards_of(ids)
    started = time.perf_counter()
    for shard, (key, url) in enumerate(urls.items()):
        await _build_shard(url, key, partitions, shard, ids[owners == shard].tolist(), args)
    built_s = time.perf_counter() - started
    indexed = time.perf_counter()
    for url in urls.values():
        indexer = HistoryIndexer(url, connect_timeout_s=10, command_timeout_s=600)
        try:
            while not (await indexer.step())[1]:
                pass
        finally:
            await indexer.close()
    return {"build_seconds": round(built_s, 2),
            "build_transfers_per_s": round(args.transfers / built_s, 1),
            "index_seconds": round(time.perf_counter() - indexed, 2)}


async def _build_shard(url: str, key: str, partitions: Any, shard: int, accounts: list[int],
                       args: argparse.Namespace) -> None:
    """Shard ``shard``'s part: its accounts, its share of the transfers between them."""
    from actors.ledger import LedgerStore
    from processor.archive import month_start_ns
    from processor.ledger import ArrayBook, Known
    from processor.types import Account, Transfer

    start_ns = month_start_ns("2026-01")
    span_ns = args.months * 30 * DAY_NS
    count = args.transfers // args.databases
    store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                      command_timeout_s=600)
    try:
        await store.ensure_partition_map(partitions, key)
        epoch = await store.take_epoch(shard)
        book = ArrayBook(shard, partitions, recent_ids_max=args.batch * 2)
        _, batch = book.create_accounts(
            [[Account(id=i, currency="EUR", code=1) for i in accounts]], start_ns)
        await store.commit([batch], fences={shard: epoch}, shard=shard,
                           partition_map=partitions)
        book.accounts_committed(batch)
        rng = np.random.default_rng(args.seed + shard)
        mine = np.asarray(accounts)
        for first in range(0, count, args.batch):
            n = min(args.batch, count - first)
            debit = rng.integers(0, len(mine), n)
            credit = (debit + rng.integers(1, len(mine), n)) % len(mine)
            amount = rng.integers(1, 10_000, n)
            transfers = [Transfer(id=shard * count + first + k + 1, debit_account_id=d,
                                  credit_account_id=c, amount=a, currency="EUR", code=1)
                         for k, (d, c, a) in enumerate(zip(
                             mine[debit].tolist(), mine[credit].tolist(), amount.tolist(),
                             strict=True))]
            now = start_ns + span_ns * first // count + DAY_NS
            plan = book.plan_transfers([transfers], now, Known())
            batch = book.finalize(plan, {}, now)
            await store.commit([batch], fences={shard: epoch}, shard=shard,
                               partition_map=partitions)
            book.committed(batch)
        await store.checkpoint(shard, epoch, partitions.partitions_of_shard(shard),
                               floor_ns=start_ns + span_ns + 5 * DAY_NS)
        await store.anchor("operator")
    finally:
        await store.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from actors.app.verification import verify_all, verify_databases
    from actors.ledger.archive import archive_databases, restore_databases
    from bench.__main__ import machine_info

    results: dict[str, Any] = {"machine": machine_info(), "args": {
        "transfers": args.transfers, "accounts": args.accounts, "batch": args.batch,
        "months": args.months, "databases": args.databases}}
    async with contextlib.AsyncExitStack() as stack:
        urls: dict[str, str] = {}
        scratches: list[Path] = []
        for i in range(args.databases):
            url, scratch = await stack.enter_async_context(
                scratch_database(f"txproc_bench_archive{i or ''}"))
            urls["main" if i == 0 else f"db{i}"] = url
            scratches.append(scratch)
        directory = scratches[0]

        async def verify() -> Any:
            if len(urls) == 1:
                return await verify_all(urls["main"])
            return await verify_databases(urls)

        results["build"] = await build(urls, args)
        before = f"2026-{args.months:02d}" if args.months < 12 else "2026-12"
        parts = await archive_databases(urls, before, directory / "archives")
        rows = sum(p.manifest.transfers + p.manifest.resolutions for p in parts)
        size = sum(f.stat().st_size for p in parts for f in p.directory.iterdir())
        seconds = max(p.seconds for p in parts)
        results["archive"] = {
            "before": before, "transfers": sum(p.manifest.transfers for p in parts),
            "rows": rows, "seconds": round(seconds, 2), "rows_per_s": round(rows / seconds, 1),
            "bytes": size, "bytes_per_transfer": round(size / max(rows, 1), 1),
            "files": sum(len(p.manifest.files) for p in parts),
            "steps_s": {p.manifest.database: p.steps_s for p in parts}
            if len(parts) > 1 else parts[0].steps_s}
        archived = await verify()
        results["verify_archived"] = {"ok": archived.report.ok,
                                      "seconds": round(archived.seconds, 2),
                                      "problems": [p.kind for p in archived.report.problems[:5]]}
        where = parts[0].directory if len(parts) == 1 else parts[0].directory.parent
        back = await restore_databases(urls, where)
        seconds = max(b.seconds for b in back)
        results["restore"] = {"rows": rows, "seconds": round(seconds, 2),
                              "rows_per_s": round(rows / seconds, 1)}
        restored = await verify()
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
