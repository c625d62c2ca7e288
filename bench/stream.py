"""``python -m bench.stream``: throughput of the change stream (processor/stream.py).

Starts a processor with two shards on embedded PostgreSQL (or ``--database-url``), creates
``--accounts`` accounts, commits ``--transfers`` uniform transfers over RPC, then reads the
whole stream from the beginning, one consumer at a time, and prints transfers per second:

* ``rpc_catch_up``: ``Client.stream_transfers`` in pages of ``--page`` (what a consumer
  that fell behind, or starts from nothing, gets);
* ``http_catch_up``: ``GET /v1/transfers/stream`` in pages of ``--page``, newline-
  delimited JSON parsed line by line;
* ``rpc_tail``: one consumer on ``subscribe_transfers`` while the load commits, counted
  from the first transfer to the last one sent (delivery keeps up, or the figure is the
  stream's).

Each catch-up reads exactly ``--transfers`` transfers; a count that differs fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import random
import time
from pathlib import Path
from typing import Any

from bench import ledger
from bench.history import _columns
from processor.service import BATCH_ITEMS_MAX

__all__ = ["main", "parse_args"]

RESULTS_DIR = Path(__file__).parent / "results"
ID_BLOCK = 10**9
SHARDS = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.stream", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--transfers", type=int, default=100_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--page", type=int, default=BATCH_ITEMS_MAX, help="transfers per page")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--database-url", default="")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.accounts < 2 or args.transfers < 1 or not 1 <= args.page <= BATCH_ITEMS_MAX:
        p.error("--accounts at least 2, --transfers at least 1, --page 1 to 8189")
    if args.out is None:
        day = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
        args.out = RESULTS_DIR / f"stream-{day}.json"
    return args


async def _rpc_catch_up(client: Any, page_size: int, expected: int) -> dict[str, float]:
    started, count, pages, after = time.perf_counter(), 0, 0, ""
    while True:
        page = await client.stream_transfers(after, limit=page_size)
        count, pages, after = count + len(page.data), pages + 1, page.next_cursor
        if not page.data:
            break
    return _rate(started, count, pages, expected)


async def _http_catch_up(url: str, token: str, page_size: int,
                         expected: int) -> dict[str, float]:
    import httpx
    import msgspec

    started, count, pages, after = time.perf_counter(), 0, 0, ""
    async with httpx.AsyncClient(base_url=url, timeout=600,
                                 headers={"Authorization": f"Bearer {token}"}) as http:
        while True:
            r = await http.get("/v1/transfers/stream",
                               params={"after": after, "limit": page_size, "wait": 0})
            r.raise_for_status()
            *lines, end = [msgspec.json.decode(line) for line in r.content.splitlines()]
            count, pages, after = count + len(lines), pages + 1, end["next_cursor"]
            if not lines:
                break
    return _rate(started, count, pages, expected)


def _rate(started: float, count: int, pages: int, expected: int) -> dict[str, float]:
    seconds = time.perf_counter() - started
    if count != expected:
        raise SystemExit(f"the stream gave {count} transfers, not {expected}")
    return {"transfers": count, "pages": pages, "seconds": round(seconds, 2),
            "transfers_per_s": round(count / seconds)}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from processor.client import Client
    from processor.identity import SCOPES, issue_token, signing_key

    out: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                           "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "reads": {}}
    rng = random.Random(args.seed)
    async with ledger.scratch_processor(args.database_url, SHARDS,
                                        prefix="txproc-stream-") as (processor, _):
        key = signing_key(Path(processor.config.data_dir), now_s=int(time.time()))
        token = issue_token(key, SCOPES, ttl_s=3600, now_s=int(time.time()))
        first_id = int(time.time()) * ID_BLOCK
        accounts = ledger.make_accounts(first_id, args.accounts)
        ids = [a.id for a in accounts]
        transfers = ledger.uniform_transfers(ids, args.transfers,
                                             first_id=first_id + args.accounts, rng=rng)
        async with Client("127.0.0.1", processor.rpc_port, token, timeout_s=600.0) as client:
            for i in range(0, len(accounts), BATCH_ITEMS_MAX):
                await client.create_accounts(accounts[i:i + BATCH_ITEMS_MAX])
            tail = asyncio.create_task(_tail(client, args.transfers))
            started = time.perf_counter()
            sent = await ledger.drive_batches(client, _columns(transfers),
                                              batch_size=BATCH_ITEMS_MAX,
                                              concurrency=args.concurrency)
            load_s = time.perf_counter() - started
            out["load"] = {"transfers_ok": sent["codes"].get("ok", 0),
                           "seconds": round(load_s, 1)}
            out["reads"]["rpc_tail"] = await tail
            out["reads"]["rpc_catch_up"] = await _rpc_catch_up(client, args.page,
                                                               args.transfers)
            out["reads"]["http_catch_up"] = await _http_catch_up(
                f"http://127.0.0.1:{processor.http_port}", token, args.page, args.transfers)
    return out


async def _tail(client: Any, expected: int) -> dict[str, float]:
    """A live consumer: from the first transfer it sees to the ``expected``-th."""
    count, started = 0, 0.0
    async for _ in client.subscribe_transfers("", limit=BATCH_ITEMS_MAX, wait_s=5.0):
        if count == 0:
            started = time.perf_counter()
        count += 1
        if count == expected:
            break
    return _rate(started, count, 0, expected)


def main(argv: list[str] | None = None) -> int:
    ledger.run_benchmark(parse_args, run, argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
