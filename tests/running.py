"""A running processor for actor and end-to-end tests: real Ray, real PostgreSQL, real sockets.

One processor per session (Ray takes seconds to start on two cores); tests keep apart by
using their own account and transfer ids, drawn from ``ids``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors.app.runtime import Processor, start_processor
from actors.database import (
    APP_PASSWORD_FILE_NAME,
    APP_ROLE,
    create_database,
    drop_database,
    read_password_file,
    write_password_file,
)
from actors.ledger.store import LedgerStore
from processor.client import Client
from processor.config import (
    Config,
    FrontConfig,
    ObservabilityConfig,
    PaymentsSection,
    ShardConfig,
)
from processor.identity import DEFAULT_TENANT, SCOPES, issue_token, load_or_create_ring

__all__ = ["ExtraFront", "IdSource", "client", "create_eur_accounts", "extra_front", "ids",
           "ledger_store", "processor", "token_for"]

SHARDS = 2


class IdSource:
    """Unique ids for the session, so tests sharing one ledger never collide."""

    def __init__(self) -> None:
        self._next = itertools.count(int(time.time()) * 1_000_000)

    def take(self, n: int = 1) -> list[int]:
        return [next(self._next) for _ in range(n)]

    def one(self) -> int:
        return next(self._next)


@pytest.fixture(scope="session")
def ids() -> Iterator[IdSource]:
    yield IdSource()


@pytest.fixture(scope="session")
async def processor(
    pg_admin_url: str, app_password_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Processor]:
    """The session's processor: two shards, a front on free loopback ports; the service
    connects as the application role, with the session's password for it."""
    name = f"txproc_e2e_{uuid.uuid4().hex[:12]}"
    url = await create_database(pg_admin_url, name)
    data_dir = tmp_path_factory.mktemp("txproc")
    # A processor on a configured server keeps the role's password in its data directory;
    # the session's other tests use the same role, so it gets the same password.
    password = read_password_file(app_password_file, APP_ROLE)
    assert password is not None
    write_password_file(data_dir / APP_PASSWORD_FILE_NAME, APP_ROLE, password)
    config = Config(
        # A peer that does not answer a reserve within 10 s (30 by default) fails only
        # the legs sent to it: the tests that keep a peer down wait that long.
        shard=ShardConfig(database_url=url, shards=SHARDS, orphan_sweep_interval_s=0.2,
                          expiry_interval_s=0.1, recovery_deadline_s=30.0,
                          peer_call_timeout_s=10.0),
        front=FrontConfig(host="127.0.0.1", http_port=0, rpc_port=0, retry_deadline_s=30.0,
                          retry_attempts_max=5),
        data_dir=str(data_dir),
        observability=ObservabilityConfig(metrics_port=0),
        # A payment step whose runner died is taken over after its claim lapses: 10 s
        # rather than 30 keeps the recovery tests short.
        # Nice 0, not the default 19: the suite runs a processor per worker process, and
        # a nice-19 payments side (its database sessions too) would be starved by the
        # other worker's ledger tests, a ledger that is not its own. The lowering itself
        # is tested in tests/unit/test_priority.py and tests/db.
        payments=PaymentsSection(rules=msgspec.structs.replace(PaymentsSection().rules,
                                                               claim_ttl_s=10.0),
                                 cpu_nice=0),
    )
    running = await start_processor(config)
    try:
        yield running
    finally:
        await running.stop()
        await drop_database(pg_admin_url, name)


def token_for(processor: Processor, scopes: tuple[str, ...] = SCOPES, ttl_s: int = 900, *,
              tenant: str = DEFAULT_TENANT, subject: str = "local") -> str:
    # The ring's active key: tests that rotate keys (tests/e2e/test_key_rotation.py) leave
    # it verifying, and tokens issued after them are signed with whatever is active.
    ring = load_or_create_ring(Path(processor.config.data_dir), now_s=int(time.time()))
    return issue_token(ring.active.secret, scopes, ttl_s=ttl_s, now_s=int(time.time()),
                       tenant=tenant, subject=subject)


async def create_eur_accounts(client: Client, ids: list[int]) -> None:
    """Plain EUR accounts with these ids, each created."""
    from processor.codes import AccountResult
    from processor.types import Account

    codes = await client.create_accounts([Account(id=i, currency="EUR") for i in ids])
    assert codes == [AccountResult.ok] * len(ids)


@pytest.fixture
async def client(processor: Processor) -> AsyncIterator[Client]:
    async with Client("127.0.0.1", processor.rpc_port, token_for(processor)) as c:
        yield c


@pytest.fixture
async def ledger_store(processor: Processor) -> AsyncIterator[LedgerStore]:
    store = await LedgerStore.connect(processor.config.shard.database_url, pool_size_max=2,
                                      connect_timeout_s=10, command_timeout_s=120)
    try:
        yield store
    finally:
        await store.close()


@dataclass(frozen=True)
class ExtraFront:
    """The listeners of a front started beside the session's own, and a token for it."""

    http_port: int
    rpc_port: int
    token: str
    actor: Any = None  # its Ray handle (the pid to kill: ``actor.pid.remote()``)


@contextlib.asynccontextmanager
async def extra_front(processor: Processor, **front: Any) -> AsyncIterator[ExtraFront]:
    """A front with ``front``'s settings (free ports unless given, payments off) beside the
    session's own, sharing its shards; stopped and killed on the way out."""
    import msgspec
    import ray

    from actors.ledger.front import Front

    config = msgspec.structs.replace(
        processor.config,
        front=msgspec.structs.replace(processor.config.front,
                                      **{"http_port": 0, "rpc_port": 0, **front}),
        payments=msgspec.structs.replace(processor.config.payments, enabled=False),
    )
    config.check()
    # Unnamed (the session's front holds the name make_front gives) and never restarted.
    actor = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1000)(Front).remote(
        config, processor.channel_key)
    try:
        ports = await asyncio.wait_for(actor.start.remote(), timeout=120)
        yield ExtraFront(ports["http_port"], ports["rpc_port"], token_for(processor), actor)
    finally:
        try:
            await asyncio.wait_for(actor.stop.remote(), timeout=15)
        except ray.exceptions.RayActorError:
            pass  # the test killed it
        finally:
            ray.kill(actor, no_restart=True)
