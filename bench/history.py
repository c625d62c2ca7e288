"""``python -m bench.history``: latency of account history and balances at an instant.

Starts a processor with two shards on embedded PostgreSQL (or ``--database-url``), creates
``--accounts`` accounts, commits ``--transfers`` uniform transfers over RPC (a tenth of
them touching one hot account), waits for the history horizon to pass them, then times
``--samples`` calls of each read over RPC, one at a time, and prints p50 / p99 in ms:

* ``history_first_page``: an account's first page (limit 100), oldest first;
* ``history_newest_page``: the same, newest first;
* ``history_from_instant``: the first page from a random instant;
* ``balances_at``: a random account's balances at a random instant (the SUM over its
  transfers up to that instant: its cost grows with the account's transfers);
* ``hot_balances_at``: the hot account's, at a random instant;
* ``query_by_code``: the first page of transfers with a code (one in ten has it);
* ``flagged_balances_at``: the same for an account with the ``history`` flag (one in ten
  accounts has it): one index lookup of its stored balances.

It also waits for the account-history indexer (actors/ledger/indexer.py) to pass the last
transfer and reports, under ``indexer``, how long that took after the load ended and the
PostgreSQL CPU its backend spent (psutil, when the server runs on this machine) per
transfer indexed. The reads are timed once the indexer has caught up.

README's figures use ``--transfers 1000000``; the default is small.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import ledger
from processor.service import BATCH_ITEMS_MAX
from processor.types import AccountFlags

__all__ = ["main", "parse_args"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9
SHARDS = 2
HOT_SHARE = 10  # one transfer in this many touches the hot account
CODE = 17
HISTORY = int(AccountFlags.HISTORY)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=100_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--samples", type=int, default=200, help="calls timed per read")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 4 or args.transfers < 1 or args.samples < 1:
        p.error("--accounts must be at least 4, --transfers and --samples at least 1")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"history-{day}.json"
    return args


def _columns(transfers: list[Any]) -> Any:
    """The transfers as a TransferBatch, codes included."""
    import numpy as np

    from processor.batch import TransferBatch

    def column(name: str) -> Any:
        return np.fromiter((getattr(t, name) for t in transfers), np.int64, len(transfers))

    return TransferBatch.from_arrays(
        id=column("id"), debit_account_id=column("debit_account_id"),
        credit_account_id=column("credit_account_id"), amount=column("amount"),
        currency=ledger.CURRENCY, code=column("code").astype(np.uint32))


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 2),
            "p99_ms": round(p99 * 1e3, 2), "samples": len(ordered)}


async def _timed(samples: int, call: Callable[[], Awaitable[object]]) -> dict[str, float]:
    took: list[float] = []
    for _ in range(samples):
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)
    return _percentiles(took)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import msgspec

    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "reads": {}}
    rng = random.Random(args.seed)
    async with ledger.scratch_processor(args.database_url, SHARDS,
                                        prefix="txproc-history-") as (processor, _):
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        first_id = int(time.time()) * ID_BLOCK
        accounts = [msgspec.structs.replace(a, flags=HISTORY if i % 10 == 1 else 0)
                    for i, a in enumerate(ledger.make_accounts(first_id, args.accounts))]
        flagged = [a.id for a in accounts if a.flags]
        ids = [a.id for a in accounts]
        hot = ids[0]
        transfers = ledger.uniform_transfers(ids, args.transfers,
                                             first_id=first_id + args.accounts, rng=rng)
        transfers = [msgspec.structs.replace(
            t, code=CODE if i % 10 == 3 else 0,
            **({"debit_account_id": hot} if i % HOT_SHARE == 0 and t.credit_account_id != hot
               else {})) for i, t in enumerate(transfers)]
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=600.0) as client:
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            started = time.perf_counter()
            sent = await ledger.drive_batches(client, _columns(transfers),
                                              batch_size=BATCH_ITEMS_MAX,
                                              concurrency=args.concurrency)
            out["load"] = {"transfers_ok": sent["codes"].get("ok", 0),
                           "seconds": round(time.perf_counter() - started, 1)}
            stored = await client.lookup_transfers([transfers[0].id, transfers[-1].id])
            first_ns = min(t.timestamp for t in stored if t is not None)
            last_ns = max(t.timestamp for t in stored if t is not None)
            # Until every shard's horizon passed the last transfer (a checkpoint or two).
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                page = await client.get_account_transfers(hot, order="desc", limit=1)
                if page.data and page.data[0].timestamp >= last_ns - 10**9:
                    break
                await asyncio.sleep(0.5)

            out["indexer"] = await _indexer_caught_up(processor.config.shard.database_url,
                                                      last_ns, len(transfers))

            def instant() -> int:
                return rng.randrange(first_ns, last_ns + 1)

            reads: dict[str, Callable[[], Awaitable[object]]] = {
                "history_first_page": lambda: client.get_account_transfers(rng.choice(ids)),
                "history_newest_page": lambda: client.get_account_transfers(
                    rng.choice(ids), order="desc"),
                "history_from_instant": lambda: client.get_account_transfers(
                    rng.choice(ids), from_ns=instant()),
                "balances_at": lambda: client.get_account_balances(rng.choice(ids), instant()),
                "hot_balances_at": lambda: client.get_account_balances(hot, instant()),
                "query_by_code": lambda: client.query_transfers(code=CODE),
                "flagged_balances_at": lambda: client.get_account_balances(
                    rng.choice(flagged), instant()),
            }
            for name, call in reads.items():
                out["reads"][name] = await _timed(args.samples, call)
    return out


async def _indexer_caught_up(url: str, last_ns: int, transfers: int) -> dict[str, Any]:
    """Waits for the indexer's position to pass ``last_ns``; its catch-up time and its
    backend's CPU per transfer (every transfer of the run, the accounts' none)."""
    import asyncpg
    import psutil

    conn = await asyncpg.connect(url)
    try:
        started = time.perf_counter()
        # The greatest timestamp of the run (the last transfer sent need not have it).
        last_ns = max(last_ns, int(await conn.fetchval('SELECT max("timestamp") FROM transfers')))
        position = 0
        while time.perf_counter() - started < 600:
            position = int(await conn.fetchval(
                'SELECT "timestamp" FROM account_history_position'))
            if position >= last_ns:
                break
            await asyncio.sleep(0.1)
        waited_s = time.perf_counter() - started
        pid = await conn.fetchval("SELECT pid FROM pg_stat_activity "
                                  "WHERE application_name = 'txproc-history-indexer'")
        rows = await conn.fetchval("SELECT count(*) FROM account_history")
    finally:
        await conn.close()
    out: dict[str, Any] = {"caught_up": position >= last_ns,
                           "waited_after_load_s": round(waited_s, 2), "rows": rows}
    try:
        times = psutil.Process(pid).cpu_times()
    except (psutil.Error, TypeError, ValueError):
        return out  # not on this machine
    cpu_s = times.user + times.system
    out["backend_cpu_s"] = round(cpu_s, 3)
    out["backend_cpu_us_per_transfer"] = round(cpu_s * 1e6 / transfers, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ledger.run_benchmark(parse_args, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
