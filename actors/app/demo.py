"""``txproc demo``: start a processor on embedded defaults and push a workload through it.

The workload is what a gateway does: fund customer accounts from an operator account, then
move money between customers over the batched RPC client, some transfers two-phase, some
refused for want of funds; then a few payments through the simulated providers. It ends
with a settlement reconciliation of each provider's report of the day (the payments just
made), the database's own invariant check and a ``txproc verify`` of the live deployment
with every check (actors/app/verification.py: every balance re-derived, every chain link
checked, the audit log's chain, the reconciliation records' links).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import secrets
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn
from rich.table import Table

from processor.client import Client, PaymentAnswer
from processor.codes import TransferResult
from processor.config import Config
from processor.identity import SCOPES, issue_token, load_or_create_ring
from processor.types import Account, AccountFlags, Transfer, TransferFlags

__all__ = ["run_demo", "workload"]

OPERATOR_ID = 1
CUSTOMER_FIRST_ID = 1_000


def _letters(count: int = 16) -> str:
    """A token's random part, as the providers mint it: letters only, so it never holds a
    digit run the card-number scan would refuse."""
    return "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(count))


def workload(accounts: int, transfers: int, seed: int = 7) -> tuple[list[Account], list[Transfer]]:
    """Accounts and transfers of the demo, deterministic for a seed."""
    rng = random.Random(seed)  # noqa: S311 - jitter, not a secret
    accts = [Account(id=OPERATOR_ID, currency="EUR")]
    accts += [
        Account(id=CUSTOMER_FIRST_ID + i, currency="EUR",
                flags=int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
        for i in range(accounts)
    ]
    moves: list[Transfer] = []
    next_id = 1
    for i in range(accounts):
        moves.append(Transfer(id=next_id, debit_account_id=OPERATOR_ID,
                              credit_account_id=CUSTOMER_FIRST_ID + i, amount=100_000,
                              currency="EUR"))
        next_id += 1
    while len(moves) < transfers:
        a, b = rng.sample(range(accounts), 2)
        amount = rng.randint(1, 5_000)
        flags = int(TransferFlags.PENDING) if rng.random() < 0.05 else 0
        moves.append(Transfer(id=next_id, debit_account_id=CUSTOMER_FIRST_ID + a,
                              credit_account_id=CUSTOMER_FIRST_ID + b, amount=amount,
                              currency="EUR", flags=flags, timeout_s=3600 if flags else 0))
        next_id += 1
    return accts, moves[:transfers]


async def run_demo(config: Config, *, accounts: int, transfers: int, batch: int) -> int:
    from actors.app.cli import verify_summary
    from actors.app.runtime import start_processor
    from actors.app.verification import verify_all
    from actors.ledger import LedgerStore

    # Piped output (CI logs, files) gets room for the tables; a terminal keeps its width.
    console = Console()
    if not console.is_terminal:
        console = Console(width=110)
    where = "an existing database" if config.shard.database_url else "embedded PostgreSQL"
    console.print(f"[bold]txproc demo[/]: starting {config.shard.shards} shards on {where}, "
                  f"data in {config.data_dir}")
    started = time.perf_counter()
    processor = await start_processor(config)
    console.print(f"ready in {time.perf_counter() - started:.1f} s: http port "
                  f"{processor.http_port}, rpc port {processor.rpc_port}")
    ring = load_or_create_ring(config.keys_path, now_s=int(time.time()))
    token = issue_token(ring.active.secret, SCOPES, ttl_s=900, now_s=int(time.time()))
    accts, moves = workload(accounts, transfers)
    # Ids must be new on every run over the same data directory.
    offset = int(time.time() * 1000) * 1_000_000
    moves = [_shift(t, offset) for t in moves]
    latencies_ms: list[float] = []
    outcomes: dict[str, int] = {}
    try:
        async with Client("127.0.0.1", processor.rpc_port, token, in_flight_max=64) as client:
            await client.create_accounts(accts)
            funding, rest = moves[:accounts], moves[accounts:]
            chunks = [funding] + [rest[i:i + batch] for i in range(0, len(rest), batch)]
            sem = asyncio.Semaphore(4)
            with Progress("[progress.description]{task.description}", BarColumn(),
                          MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
                task = bar.add_task("transfers", total=len(moves))

                async def send(chunk: list[Transfer]) -> None:
                    async with sem:
                        t0 = time.perf_counter()
                        codes = await client.create_transfers(chunk)
                        latencies_ms.append((time.perf_counter() - t0) * 1000)
                    for c in codes:
                        outcomes[c.name] = outcomes.get(c.name, 0) + 1
                    bar.advance(task, len(chunk))

                t_start = time.perf_counter()
                # The funding batch goes first: later transfers spend what it credits.
                await send(chunks[0])
                await asyncio.gather(*[send(c) for c in chunks[1:]])
                elapsed_s = time.perf_counter() - t_start
            payments = await _payments_tour(client, processor, offset) if (
                processor.provider_urls) else []
        runs = await _reconcile(processor) if payments else []
        store = await LedgerStore.connect(processor.config.shard.database_url, pool_size_max=2,
                                          connect_timeout_s=10, command_timeout_s=120)
        try:
            audit = await store.audit()
            # Every shard's chain head, so the verify below vouches for the whole run.
            await store.anchor("operator")
        finally:
            await store.close()
        # On the live deployment, as an operator would run `txproc verify`.
        proof = await verify_all(processor.admin_database_url)
    finally:
        await processor.stop()
    latencies_ms.sort()
    table = Table(title="txproc demo summary")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("transfers submitted", f"{len(moves):,}")
    table.add_row("accepted (ok)", f"{outcomes.get(TransferResult.ok.name, 0):,}")
    for name, n in sorted(outcomes.items()):
        if name != TransferResult.ok.name:
            table.add_row(f"refused: {name}", f"{n:,}")
    table.add_row("durable transfers/s", f"{len(moves) / elapsed_s:,.0f}")
    table.add_row(f"batch latency p50 (batch {batch:,})", f"{_pct(latencies_ms, 50):.1f} ms")
    table.add_row(f"batch latency p99 (batch {batch:,})", f"{_pct(latencies_ms, 99):.1f} ms")
    table.add_row("accounts / transfers in database", f"{audit.accounts:,} / {audit.transfers:,}")
    table.add_row("invariant check", "[green]passed[/]" if audit.passed else "[red]FAILED[/]")
    console.print(table)
    if payments:
        tour = Table(title="payments through the simulated providers")
        for column in ("what", "via", "status", "amount", "captured / refunded", "HTTP"):
            tour.add_column(column, no_wrap=column != "what")
        for row in payments:
            tour.add_row(*row)
        console.print(tour)
    if runs:
        console.print(_reconciliation_table(runs))
    console.print(verify_summary(proof), markup=False)
    return 0 if audit.passed and proof.report.ok else 1


async def _reconcile(processor: Any) -> list[Any]:
    """Each provider's settlement report of today (UTC: the day the tour's payments
    settled), fetched and reconciled now, as the schedule does once the day is over."""
    day = dt.datetime.now(dt.UTC).date().isoformat()
    return [await processor.payments.reconcile.remote(name, day, "demo")
            for name in sorted(processor.provider_urls)]


def _reconciliation_table(runs: list[Any]) -> Table:
    """One row per run (actors.payments.RunView): what the report held, what matched, the
    exceptions found (open ones by kind) and the fees posted to the ledger."""
    table = Table(title="settlement reconciliation (docs/reconciliation.md)")
    if any(e.kind == "missing" and e.status == "open" for run in runs
           for e in run.exceptions or ()):
        # What a second demo over the same data directory on the same day shows.
        table.caption = ("missing: in our records, not in the provider's report (the "
                         "simulated providers forget their transactions when they stop, so "
                         "an earlier demo's payments of the day are missing from theirs)")
    for column in ("provider", "date", "status", "lines", "matched", "exceptions",
                   "fees posted"):
        table.add_column(column, justify="left" if column in (
            "provider", "date", "status", "exceptions") else "right")
    for run in runs:
        kinds: dict[str, int] = {}
        for exception in run.exceptions or ():
            if exception.status == "open":
                kinds[exception.kind] = kinds.get(exception.kind, 0) + 1
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) or "none open"
        status = run.status if not run.error else f"{run.status}: {run.error[:40]}"
        table.add_row(run.provider, run.date, status, f"{run.lines:,}",
                      f"{run.matched_count:,}", found, f"{run.fees_posted:,}")
    return table


async def _payments_tour(client: Client, processor: Any, offset: int) -> list[tuple[str, ...]]:
    """A few payments through both providers, one declined and one failing over."""
    import httpx

    merchant_usd, merchant_eur, bank = offset + 900_001, offset + 900_002, offset + 900_003
    limited = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    await client.create_accounts([
        Account(id=merchant_usd, currency="USD", flags=limited),
        Account(id=merchant_eur, currency="EUR", flags=limited),
        Account(id=bank, currency="USD")])
    rows: list[tuple[str, ...]] = []

    def token(last4: str) -> str:
        return f"pm_{last4}_{_letters()}"

    async def settle(answer: PaymentAnswer, get: str) -> dict[str, Any]:
        """The object once it and its operations have left ``processing`` (webhooks and
        the recovery worker finish what a provider settles later)."""
        body: dict[str, Any] = answer.body.get("payment") or answer.body.get("payout") or (
            answer.body)
        for _ in range(150):
            busy = body.get("status") == "processing" or any(
                op.get("status") == "processing" for op in body.get("operations", ()))
            if not busy:
                break
            await asyncio.sleep(0.1)
            fetched = await (client.get_payout(body["id"]) if get == "payout"
                             else client.get_payment(body["id"]))
            body = fetched.body
        return body

    def money(value: Any, currency: str) -> str:
        if not isinstance(value, int):
            return ""
        return f"{value // 100}.{value % 100:02d} {currency}"

    def row(what: str, body: dict[str, Any], answer: PaymentAnswer) -> None:
        currency = str(body.get("currency", ""))
        settled = (f"{money(body.get('captured_amount'), '')}/"
                   f"{money(body.get('refunded_amount'), '')}".replace(" ", "")
                   if "captured_amount" in body else "")
        rows.append((what, str(body.get("provider", "")), str(body.get("status", "")),
                     money(body.get("amount"), currency), settled, str(answer.status)))

    card = await client.authorize_payment(
        idempotency_key=secrets.token_hex(16), amount=12_50, currency="USD",
        payment_method=token("4242"), merchant_account_id=merchant_usd, capture=True,
        provider="acme")
    body = await settle(card, "payment")
    refund = await client.refund_payment(body["id"], idempotency_key=secrets.token_hex(16),
                                         amount=2_50)
    row("card: capture, refund", await settle(refund, "payment"), refund)
    eur = await client.authorize_payment(
        idempotency_key=secrets.token_hex(16), amount=40_00, currency="EUR",
        payment_method=token("5555"), merchant_account_id=merchant_eur, provider="globex")
    eur_body = await settle(eur, "payment")
    captured = await client.capture_payment(eur_body["id"],
                                            idempotency_key=secrets.token_hex(16))
    row("EUR, settles by webhook", await settle(captured, "payment"), captured)
    declined = await client.authorize_payment(
        idempotency_key=secrets.token_hex(16), amount=9_99, currency="USD",
        payment_method=token("0002"), merchant_account_id=merchant_usd)
    row("declined test card", await settle(declined, "payment"), declined)
    secrets_file = Path(processor.config.data_dir) / "providers" / "acme.json"
    admin = {"authorization": "Bearer " + json.loads(secrets_file.read_text())["admin_token"]}
    url = processor.provider_urls["acme"] + "/_sim/faults"
    async with httpx.AsyncClient() as http:
        await http.put(url, json={"outage": "unavailable"}, headers=admin)
        try:
            failover = await client.authorize_payment(
                idempotency_key=secrets.token_hex(16), amount=75_00, currency="USD",
                payment_method=token("4242"), merchant_account_id=merchant_usd,
                capture=True, provider="acme")
        finally:
            await http.put(url, json={}, headers=admin)
    row("acme down: failover", await settle(failover, "payment"), failover)
    await client.create_transfers([Transfer(
        id=offset + 900_010, debit_account_id=bank, credit_account_id=merchant_usd,
        amount=50_00, currency="USD")])
    payout = await client.create_payout(
        idempotency_key=secrets.token_hex(16), amount=50_00, currency="USD",
        merchant_account_id=merchant_usd, destination=f"ba_6789_{_letters()}")
    row("payout to a bank", await settle(payout, "payout"), payout)
    return rows


def _pct(sorted_values: list[float], p: int) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, len(sorted_values) * p // 100)]


def _shift(t: Transfer, offset: int) -> Transfer:
    return Transfer(id=t.id + offset, debit_account_id=t.debit_account_id,
                    credit_account_id=t.credit_account_id, amount=t.amount,
                    currency=t.currency, flags=t.flags, timeout_s=t.timeout_s)
