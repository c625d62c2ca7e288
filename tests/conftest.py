"""Fixtures shared by the whole suite: one PostgreSQL server per session, one database per test.

Set ``TXPROC_TEST_DATABASE_URL`` to an admin URL (a superuser, or a role that may create
databases and roles) to run against that server; otherwise an embedded PostgreSQL is started
once for the session. Tests that restart the server ask for ``embedded_pg`` and skip when it
is None. The application role (``txproc_app``) belongs to the whole server, so one password
file (``app_password_file``) serves every test and processor of the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from actors.database import (
    APP_PASSWORD_FILE_NAME,
    APP_ROLE,
    EmbeddedPostgres,
    app_role_url,
    create_database,
    drop_database,
    ensure_password_file,
)
from actors.migrate import migrate

__all__ = ["DATABASE_URL_ENV", "app_db_url", "app_password_file", "db_url", "embedded_pg",
           "empty_db_url", "pg_admin_url", "second_db_url", "second_pg_admin_url"]

pytest_plugins = ["tests.running", "tests.payments_support"]

DATABASE_URL_ENV = "TXPROC_TEST_DATABASE_URL"

# Only the server process crashing matters in tests, never the machine, and the operating
# system keeps unsynced writes across a server crash; skipping fsync makes CREATE DATABASE
# and commits much cheaper on slow disks.
EMBEDDED_SETTINGS = {"fsync": "off"}


@pytest.fixture(scope="session")
def embedded_pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres | None]:
    """Yield the session's embedded server, or None when an external server is configured."""
    if os.environ.get(DATABASE_URL_ENV):
        yield None
        return
    server = EmbeddedPostgres(settings=EMBEDDED_SETTINGS)
    data_dir = tmp_path_factory.mktemp("postgres") / "data"
    server.start(data_dir)
    try:
        yield server
    finally:
        server.stop()
        # pytest keeps the last few temporary directories; keep the server log for a failed
        # run but not the 40 MB cluster.
        with contextlib.suppress(FileNotFoundError):
            (data_dir / "log").rename(data_dir.parent / "postgres.log")
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_admin_url(embedded_pg: EmbeddedPostgres | None) -> str:
    """Return a URL of the session's server that may create and drop databases."""
    external_url = os.environ.get(DATABASE_URL_ENV)
    if external_url:
        return external_url
    assert embedded_pg is not None
    return embedded_pg.url


@pytest.fixture(scope="session")
def second_pg_admin_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A URL that may create databases on a second server, for the tests of a ledger over
    several databases (docs/design.md §12): a second embedded server, started only for the
    sessions that ask for it; with an external server configured, that same server (two
    databases of one server are as separate to the processor as two servers)."""
    external_url = os.environ.get(DATABASE_URL_ENV)
    if external_url:
        yield external_url
        return
    server = EmbeddedPostgres(settings=EMBEDDED_SETTINGS)
    data_dir = tmp_path_factory.mktemp("postgres2") / "data"
    server.start(data_dir)
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def app_password_file(
    embedded_pg: EmbeddedPostgres | None, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Return the application role's password file for the session's server."""
    if embedded_pg is not None:
        return embedded_pg.app_password_file
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp("credentials") / APP_PASSWORD_FILE_NAME
        ensure_password_file(path, APP_ROLE)
        return path
    # Workers share the external server, so they share the role's password: one file in the
    # run's directory (each worker's own is below it), made once under a lock. Each with a
    # file of its own would set the role's password from under the other's connections.
    shared = tmp_path_factory.getbasetemp().parent
    path = shared / APP_PASSWORD_FILE_NAME
    with (shared / "credentials.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_password_file(path, APP_ROLE)
    return path


@contextlib.asynccontextmanager
async def _scratch_database(admin_url: str) -> AsyncIterator[str]:
    """Create a uniquely named empty database, yield its URL, and drop it afterwards."""
    name = f"txproc_test_{uuid.uuid4().hex[:16]}"
    url = await create_database(admin_url, name)
    try:
        yield url
    finally:
        await drop_database(admin_url, name)


@pytest.fixture
async def empty_db_url(pg_admin_url: str) -> AsyncIterator[str]:
    """Yield the URL of a fresh database with no tables, dropped after the test."""
    async with _scratch_database(pg_admin_url) as url:
        yield url


@pytest.fixture
async def db_url(pg_admin_url: str) -> AsyncIterator[str]:
    """Yield the URL of a fresh, fully migrated database, dropped after the test."""
    async with _scratch_database(pg_admin_url) as url:
        await migrate(url)
        yield url


@pytest.fixture
async def second_db_url(second_pg_admin_url: str) -> AsyncIterator[str]:
    """Yield the URL of a fresh, fully migrated database on the second server (a further
    database of a ledger, docs/design.md §12), dropped after the test."""
    async with _scratch_database(second_pg_admin_url) as url:
        await migrate(url)
        yield url


@pytest.fixture
async def app_db_url(db_url: str, app_password_file: Path) -> str:
    """Return the URL of ``db_url``'s database as the application role, as the service
    connects to it."""
    return await app_role_url(db_url, app_password_file)


@pytest.fixture(autouse=True)
def _event_loop_policy_kept() -> Iterator[None]:
    """Put back the event loop policy a test found. ``txproc``'s ``main`` (run in-process by
    CLI tests) installs uvloop's policy for the process; left installed, it fails a later
    test's ``asyncio.create_subprocess_exec`` on the session's stdlib loop (uvloop's policy
    has no child watcher), and which test that is depends on the order tests run in."""
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many worker processes ``-n auto`` (pyproject.toml) starts: two, each with its own
    embedded PostgreSQL and Ray. The suite waits far more than it computes, so on two cores
    two workers take about half the time of one. None (0: the tests run in this process) on
    a one-core machine, and with ``TXPROC_TEST_DATABASE_URL``: sessions that share a server
    see each other's transactions in its snapshot horizon, which the ledger's posting folds
    wait on (tests/db/test_ledger_store.py)."""
    if os.environ.get(DATABASE_URL_ENV) or (os.cpu_count() or 1) < 2:
        return 0
    return 2


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Keep each phase's report on the test item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
