"""``python -m bench.recovery``: how long shards take to recover with N transfers unfolded.

A shard's balance rows are checkpoints; what it committed after its last checkpoint is
replayed at recovery (docs/design.md §7). This starts a processor on embedded PostgreSQL
(or ``--database-url``) whose shards checkpoint only at start (the interval is a day), sends
``--transfers`` uniform transfers as TransferBatch columns, SIGKILLs every shard process at
once, and measures the time until each is back and ready, with its own account of the
steps (connect, the checkpoint that folds the unfolded rows, the load). The audit then
checks that the balances equal the full recomputation. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg

from bench import ledger
from processor.service import BATCH_ITEMS_MAX

__all__ = ["main", "parse_args"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9
UNFOLDED_SQL = """
SELECT count(*) FROM transfers t JOIN partition_checkpoints c ON c.partition = t.partition
WHERE t."timestamp" > c."timestamp"
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=1_000_000,
                   help="transfers committed after the last checkpoint")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 3 or args.transfers < 1:
        p.error("--accounts must be at least 3 and --transfers at least 1")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"recovery-{day}.json"
    return args


async def _back(shards: list[Any], old_pids: set[int], deadline_s: float) -> list[dict]:
    """Every shard's stats once it runs in a new process and has recovered."""
    import ray

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            stats = await ledger.shard_stats(shards)
            if not {int(s["pid"]) for s in stats} & old_pids:
                return stats
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"the shards were not back within {deadline_s:.0f} s")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    options = {"checkpoint_interval_s": 86_400.0, "checkpoint_interval_max_s": 86_400.0,
               "recovery_deadline_s": 600.0, "command_timeout_s": 600.0}
    async with ledger.scratch_processor(args.database_url, args.shards,
                                        prefix="txproc-recovery-",
                                        shard_options=options) as (processor, _):
        url = processor.config.shard.database_url
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        first_id = int(time.time()) * ID_BLOCK
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=600.0) as client:
            accounts = ledger.make_accounts(first_id, args.accounts)
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            transfers = ledger.uniform_transfers(
                [a.id for a in accounts], args.transfers, first_id=first_id + args.accounts,
                rng=random.Random(args.seed))
            sent = await ledger.drive_batches(
                client, ledger.as_batch_columns(transfers), batch_size=BATCH_ITEMS_MAX,
                concurrency=4)
        out["transfers_ok"] = sent["codes"].get("ok", 0)
        conn = await asyncpg.connect(url)
        try:
            out["unfolded_transfers"] = int(await conn.fetchval(UNFOLDED_SQL))
            before = await ledger.shard_stats(processor.shards)
            pids = {int(s["pid"]) for s in before}
            killed = time.perf_counter()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            after = await _back(processor.shards, pids, deadline_s=900.0)
            out["seconds_until_all_ready"] = round(time.perf_counter() - killed, 2)
            out["unfolded_after"] = int(await conn.fetchval(UNFOLDED_SQL))
        finally:
            await conn.close()
        out["shards"] = [{k: v for k, v in s.items() if k.startswith("recovery_")}
                         | {"shard": s["shard"], "accounts": s["accounts"]} for s in after]
        from actors.ledger import LedgerStore

        store = await LedgerStore.connect(url, pool_size_max=2, connect_timeout_s=10,
                                          command_timeout_s=600)
        try:
            audit = await store.audit()
        finally:
            await store.close()
        out["audit_passed"] = audit.passed
    return out


def main(argv: list[str] | None = None) -> int:
    results = ledger.run_benchmark(parse_args, run, argv)
    return 0 if results["audit_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
