"""``python -m bench.crossshard``: what a cross-shard transfer costs against a same-shard one.

A transfer whose credit account lives on another shard than its debit account takes a
reserve and a settle on the other shard and leaves a posting for it to fold (docs/design.md
§5a, §6). This starts a processor with two shards on embedded PostgreSQL (or
``--database-url``), creates ``--accounts`` accounts, and sends the same number of uniform
transfers three times as TransferBatch columns: with both accounts of every transfer on
one shard (local), with them on different shards (cross), and drawn from all accounts
(mixed, about half of them cross, as in ``python -m bench``). It prints each phase's
transfers/s and server CPU per transfer (shards, front, PostgreSQL and Ray's other
processes) and the ratio cross / local, which issue 8 bounds at 1.5.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from pathlib import Path
from typing import Any

from bench import ledger
from processor.ledger import PartitionMap
from processor.service import BATCH_ITEMS_MAX
from processor.types import Transfer

__all__ = ["local_and_cross", "main", "parse_args"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9
SHARDS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.crossshard", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=400_000, help="per phase")
    p.add_argument("--accounts", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--phases", default="local,cross,mixed",
                   help="which phases to run, in this order (the ratio needs local and cross)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 4 or args.transfers < 1:
        p.error("--accounts must be at least 4 and --transfers at least 1")
    args.phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    if not args.phases or set(args.phases) - {"local", "cross", "mixed"}:
        p.error("--phases names local, cross and mixed")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"crossshard-{day}.json"
    return args


def local_and_cross(
    account_ids: list[int], count: int, *, first_id: int, rng: random.Random,
    partitions: PartitionMap,
) -> tuple[list[Transfer], list[Transfer]]:
    """``count`` transfers with both accounts on one shard, then ``count`` with them on two
    different shards; each debit account drawn uniformly, ids from ``first_id`` on."""
    by_shard: list[list[int]] = [[] for _ in range(partitions.shards)]
    for a in account_ids:
        by_shard[partitions.shard_of(a)].append(a)
    if min(len(ids) for ids in by_shard) < 2:
        raise ValueError("every shard needs at least two accounts")
    local, cross = [], []
    for i in range(count):
        shard = rng.randrange(partitions.shards)
        debit = rng.choice(by_shard[shard])
        credit = rng.choice(by_shard[shard])
        while credit == debit:
            credit = rng.choice(by_shard[shard])
        local.append(Transfer(id=first_id + i, debit_account_id=debit,
                              credit_account_id=credit, amount=rng.randrange(1, 1_000),
                              currency=ledger.CURRENCY))
        other = (shard + 1 + rng.randrange(partitions.shards - 1)) % partitions.shards
        cross.append(Transfer(id=first_id + count + i, debit_account_id=debit,
                              credit_account_id=rng.choice(by_shard[other]),
                              amount=rng.randrange(1, 1_000), currency=ledger.CURRENCY))
    return local, cross


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "phases": {}}
    async with ledger.scratch_processor(args.database_url, SHARDS,
                                        prefix="txproc-crossshard-") as (processor, _):
        url = processor.config.shard.database_url
        stats0 = await ledger.shard_stats(processor.shards)
        postmaster = (processor.embedded.pid if processor.embedded
                      else ledger.postmaster_pid_of(url))
        processes = ledger.ServerProcesses(
            shard_pids=[int(s["pid"]) for s in stats0],
            front_pid=ledger.listening_pid(processor.http_port), postmaster_pid=postmaster)
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        first_id = int(time.time()) * ID_BLOCK
        accounts = ledger.make_accounts(first_id, args.accounts)
        local, cross = local_and_cross(
            [a.id for a in accounts], args.transfers, first_id=first_id + args.accounts,
            rng=random.Random(args.seed), partitions=PartitionMap.uniform(SHARDS))
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=600.0) as client:
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            mixed = ledger.uniform_transfers(
                [a.id for a in accounts], args.transfers,
                first_id=first_id + args.accounts + 2 * args.transfers,
                rng=random.Random(args.seed + 1))
            workloads = {"local": local, "cross": cross, "mixed": mixed}
            for name in args.phases:
                transfers = workloads[name]
                batch = ledger.as_batch_columns(transfers)
                before = processes.cpu_by_pid()
                started = time.perf_counter()
                sent = await ledger.drive_batches(client, batch, batch_size=BATCH_ITEMS_MAX,
                                                  concurrency=args.concurrency)
                wall_s = time.perf_counter() - started
                cpu = ledger.cpu_delta_s(before, processes.cpu_by_pid())
                ok = sent["codes"].get("ok", 0)
                out["phases"][name] = {
                    "transfers_ok": ok,
                    "transfers_per_s": round(ok / wall_s, 1),
                    "cpu_us_per_transfer": {
                        group: round(seconds * 1e6 / ok, 2) for group, seconds in cpu.items()
                        if group != "client"} if ok else {},
                    "codes": sent["codes"],
                }
    phases = out["phases"]
    if "local" in phases and "cross" in phases:
        out["cross_over_local_cpu"] = round(phases["cross"]["cpu_us_per_transfer"]["server"]
                                            / phases["local"]["cpu_us_per_transfer"]["server"],
                                            2)
        out["local_over_cross_rate"] = round(phases["local"]["transfers_per_s"]
                                             / phases["cross"]["transfers_per_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ledger.run_benchmark(parse_args, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
