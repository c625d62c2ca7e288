"""``python -m bench.memory``: what a shard keeps in memory per account and per open hold.

A shard's memory should grow with its accounts and its open holds only (docs/design.md
§5), never with the transfers it has processed. This starts a processor on embedded
PostgreSQL (or ``--database-url``), reads the shard processes' resident memory at rest,
after creating ``--accounts`` accounts, after ``--holds`` pending transfers between them
(holds that stay open), and after ``--transfers`` plain transfers (which should add only
the bounded memory of recent ids), and prints MiB per million of each. Figures are
resident set sizes summed over the shard processes, so they include the allocator's
slack: read them as an upper bound of the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path
from typing import Any

import psutil

from bench import ledger
from processor.service import BATCH_ITEMS_MAX
from processor.types import Transfer, TransferFlags

__all__ = ["main", "parse_args", "per_million_mib"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--accounts", type=int, default=200_000)
    p.add_argument("--holds", type=int, default=200_000, help="open pending transfers")
    p.add_argument("--transfers", type=int, default=400_000,
                   help="plain transfers after the holds (recent-id memory is bounded)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--database-url", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 2 or args.holds < 0 or args.transfers < 0:
        p.error("--accounts must be at least 2; --holds and --transfers at least 0")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"memory-{day}.json"
    return args


def per_million_mib(before_bytes: int, after_bytes: int, count: int) -> float | None:
    """The growth from ``before_bytes`` to ``after_bytes``, in MiB per million items."""
    if count <= 0:
        return None
    return round((after_bytes - before_bytes) / 2**20 * 1_000_000 / count, 1)


def _shard_rss_bytes(pids: list[int]) -> int:
    return sum(psutil.Process(pid).memory_info().rss for pid in pids)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    async with ledger.scratch_processor(args.database_url, args.shards,
                                        prefix="txproc-memory-") as (processor, _):
        pids = [int(s["pid"]) for s in await ledger.shard_stats(processor.shards)]
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        rss = {"rest": _shard_rss_bytes(pids)}
        next_id = int(time.time()) * ID_BLOCK
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=120.0) as client:
            accounts = ledger.make_accounts(next_id, args.accounts)
            next_id += args.accounts
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            rss["accounts"] = _shard_rss_bytes(pids)
            ids = [a.id for a in accounts]
            holds = [Transfer(id=next_id + k, debit_account_id=ids[k % len(ids)],
                              credit_account_id=ids[(k + 1) % len(ids)], amount=1,
                              currency=ledger.CURRENCY, flags=int(TransferFlags.PENDING))
                     for k in range(args.holds)]
            next_id += args.holds
            await _send(client, holds)
            rss["holds"] = _shard_rss_bytes(pids)
            plain = [Transfer(id=next_id + k, debit_account_id=ids[(k * 7) % len(ids)],
                              credit_account_id=ids[(k * 7 + 3) % len(ids)], amount=1,
                              currency=ledger.CURRENCY) for k in range(args.transfers)]
            await _send(client, plain)
            rss["transfers"] = _shard_rss_bytes(pids)
        stats = await ledger.shard_stats(processor.shards)
    out["shard_rss_mib"] = {k: round(v / 2**20, 1) for k, v in rss.items()}
    out["open_holds"] = sum(int(s["open_holds"]) for s in stats)
    out["recent_ids"] = sum(int(s["recent_ids"]) for s in stats)
    out["mib_per_million_accounts"] = per_million_mib(rss["rest"], rss["accounts"],
                                                      args.accounts)
    out["mib_per_million_holds"] = per_million_mib(rss["accounts"], rss["holds"], args.holds)
    out["mib_per_million_transfers"] = per_million_mib(rss["holds"], rss["transfers"],
                                                       args.transfers)
    return out


async def _send(client: Any, transfers: list[Transfer]) -> None:
    for i in range(0, len(transfers), BATCH_ITEMS_MAX):
        codes = await client.create_transfers(transfers[i:i + BATCH_ITEMS_MAX])
        if any(int(c) for c in codes):
            raise RuntimeError(f"transfers refused: {sorted({c.name for c in codes if c})}")


def main(argv: list[str] | None = None) -> int:
    ledger.run_benchmark(parse_args, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
