"""``python -m bench.crossdb``: a ledger over two databases against one (docs/design.md §12).

Starts a processor with two shards on one embedded PostgreSQL (``one``), then one with two
shards over two embedded PostgreSQL servers, a shard on each (``two``; a second embedded
server is started for it, or ``--second-database-url`` is used), creates ``--accounts``
accounts on each and sends ``--transfers`` uniform transfers per phase as TransferBatch
columns (``--concurrency`` requests in flight), then ``--singles`` single transfers one
after another for request latency:

* ``one/same_shard``, ``one/cross_shard``: both accounts on one shard; on two shards of
  the one database (the coordinator's reserve and settle, §6);
* ``two/same_database``: both accounts in one database (its shard);
* ``two/cross_database``: accounts in two databases, ``--cross-transfers`` of them: each
  a saga (§12: a log row, a step in each database, the row moved after each), carried
  64 at a time per request by the front's general, per-object path.

Prints, per phase, the answered and durable transfers/s, the batch and single-request
latency (p50/p99) and the codes; writes them to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from bench import ledger
from processor.ledger import PartitionMap
from processor.service import BATCH_ITEMS_MAX
from processor.types import Transfer

__all__ = ["main", "parse_args"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9
SHARDS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.crossdb", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=100_000, help="per phase, in batches")
    p.add_argument("--cross-transfers", type=int, default=5_000,
                   help="of two/cross_database, in batches (each a saga: far slower)")
    p.add_argument("--singles", type=int, default=300, help="single requests per phase")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--second-database-url", default="",
                   help="the second database of 'two' (else a second embedded server)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 8 or min(args.transfers, args.cross_transfers, args.singles) < 1:
        p.error("--accounts at least 8, --transfers, --cross-transfers, --singles at least 1")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"crossdb-{day}.json"
    return args


def pairs(account_ids: list[int], count: int, *, first_id: int, rng: random.Random,
          partitions: PartitionMap, same: bool) -> list[Transfer]:
    """``count`` transfers with both accounts on one shard (``same``) or on two."""
    by_shard: list[list[int]] = [[] for _ in range(partitions.shards)]
    for a in account_ids:
        by_shard[partitions.shard_of(a)].append(a)
    out = []
    for i in range(count):
        shard = rng.randrange(partitions.shards)
        other = shard if same else (shard + 1) % partitions.shards
        debit = rng.choice(by_shard[shard])
        credit = rng.choice(by_shard[other])
        while credit == debit:
            credit = rng.choice(by_shard[other])
        out.append(Transfer(id=first_id + i, debit_account_id=debit, credit_account_id=credit,
                            amount=rng.randrange(1, 1_000), currency=ledger.CURRENCY))
    return out


@contextlib.contextmanager
def second_database(url: str) -> Iterator[str]:
    """``url``, or a second embedded server's, stopped and removed afterwards."""
    if url:
        yield url
        return
    from actors.database import EmbeddedPostgres

    scratch = Path(tempfile.mkdtemp(prefix="txproc-crossdb-pg-"))
    server = EmbeddedPostgres()
    server.start(scratch / "pg")
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.asynccontextmanager
async def _processor(args: argparse.Namespace, layout: str,
                     second_url: str) -> AsyncIterator[Any]:
    options = {"databases": {"db1": second_url}} if layout == "two" else {}
    # Each layout on a main database of its own (embedded): a ledger keeps its layout.
    # The ledger only, as several databases require (payments are not ready for them).
    async with ledger.scratch_processor("", SHARDS, shard_options=options, payments=False,
                                        prefix="txproc-crossdb-") as (processor, _):
        yield processor


async def _phase(client: Any, transfers: list[Transfer], singles: list[Transfer],
                 concurrency: int) -> dict[str, Any]:
    sent = await ledger.drive_batches(client, ledger.as_batch_columns(transfers),
                                      batch_size=BATCH_ITEMS_MAX, concurrency=concurrency)
    answered = sum(sent["codes"].values())
    latencies_ms = []
    codes: dict[str, int] = {}
    for t in singles:
        started = time.perf_counter()
        [code] = await client.create_transfers([t])
        latencies_ms.append((time.perf_counter() - started) * 1000)
        codes[code.name] = codes.get(code.name, 0) + 1
    return {
        "answered_per_s": round(answered / sent["elapsed_s"], 1),
        "durable_per_s": sent["durable_transfers_per_s"],
        "batch_latency_ms": sent["request_latency_ms"],
        "codes": sent["codes"],
        "single_latency_ms": ledger.latency_summary_ms(latencies_ms),
        "single_codes": codes,
    }


async def _layout(args: argparse.Namespace, layout: str, second_url: str,
                  first_id: int) -> dict[str, Any]:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    keys = ("main", "db1") if layout == "two" else ("main",)
    partitions = PartitionMap.dealt(SHARDS, keys)
    names = (("same_database", "cross_database") if layout == "two"
             else ("same_shard", "cross_shard"))
    out: dict[str, Any] = {}
    async with _processor(args, layout, second_url) as processor:
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        accounts = ledger.make_accounts(first_id, args.accounts)
        ids = [a.id for a in accounts]
        rng = random.Random(args.seed)
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=600.0) as client:
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            next_id = first_id + args.accounts
            for name, same in zip(names, (True, False), strict=True):
                count = args.cross_transfers if name == "cross_database" else args.transfers
                batch = pairs(ids, count, first_id=next_id, rng=rng,
                              partitions=partitions, same=same)
                next_id += count
                singles = pairs(ids, args.singles, first_id=next_id, rng=rng,
                                partitions=partitions, same=same)
                next_id += args.singles
                out[name] = await _phase(client, batch, singles, args.concurrency)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    first_id = int(time.time()) * ID_BLOCK
    with second_database(args.second_database_url) as second_url:
        out["one"] = await _layout(args, "one", second_url, first_id)
        out["two"] = await _layout(args, "two", second_url, first_id)
    return out


def main(argv: list[str] | None = None) -> int:
    ledger.run_benchmark(parse_args, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
