"""The application role and the embedded server's logins, against a real PostgreSQL: what
``txproc_app`` may and may not do, that every login needs its password, that the password
files and the socket are private, and that the binaries come without pgserver's private
modules."""

from __future__ import annotations

import logging
import os
import pwd
import re
import shutil
import stat
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from actors.app.runtime import Processor
from actors.database import (
    APP_PASSWORD_FILE_NAME,
    APP_ROLE,
    CONNECT_TIMEOUT_S,
    HBA_FILE_NAME,
    SOCKET_NAME,
    SUPERUSER,
    SUPERUSER_PASSWORD_FILE_NAME,
    SYSTEM_USER,
    DatabaseCredentialsError,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    app_role_url,
    create_database,
    drop_database,
    read_password_file,
    scram_verifier,
    url_with_credentials,
    write_password_file,
)
from actors.migrate import migrate

REPOSITORY = Path(__file__).parents[2]

# Every table and view of the schema, with exactly the privileges txproc_app holds on it
# (migration 0015). A new table must be added here, with a decision.
ALL_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
READ = frozenset({"SELECT"})
APPEND = frozenset({"SELECT", "INSERT"})
CHANGE = frozenset({"SELECT", "INSERT", "UPDATE"})
EVERY_ROW_CHANGE = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
EXPECTED_PRIVILEGES: dict[str, frozenset[str]] = {
    "schema_migrations": frozenset(),
    # The ledger's history: append-only by privilege as well as by trigger.
    "transfers": APPEND,
    "failed_transfers": APPEND,
    "pending_resolutions": APPEND,
    "audit_requests": APPEND,
    "audit_events": APPEND,
    # The hash chain over the ledger's commits and its anchors (0024).
    "ledger_chain": APPEND,
    "ledger_anchors": APPEND,
    # Balance rows: UPDATE of the four sums only (column privileges, checked below).
    "accounts": APPEND,
    # Posting blocks are folded by a horizon, never deleted (0027); the horizons likewise.
    "remote_posting_blocks": APPEND,
    "posting_folds": APPEND,
    "shard_epochs": CHANGE,
    "partition_checkpoints": frozenset({"SELECT", "UPDATE"}),
    "partition_map": READ,
    "account_balances": READ,
    "remote_postings_unfolded": READ,
    "payments": CHANGE,
    "payouts": CHANGE,
    # Data subjects' keys (0029): created (an upsert, hence UPDATE), never deleted, since
    # an erased key's row is the erasure's tombstone.
    "subject_keys": CHANGE,
    # Personal user_data (0036): the edge reads which tenants opted in (the operator's
    # command marks them) and stores sealed values it never changes; erasure deletes them.
    "tenant_privacy": READ,
    # Transfers mirrored where an account of theirs moved (0037): written by the
    # operator's move only; the views beside them read.
    "mirrored_transfers": READ,
    "mirrored_resolutions": READ,
    "transfers_and_mirrors": READ,
    "resolutions_and_mirrors": READ,
    "personal_values": APPEND,
    "payment_steps": CHANGE,
    "payment_step_keys": APPEND,
    "payment_step_log": APPEND,
    "webhook_events": APPEND,
    "idempotency_keys": EVERY_ROW_CHANGE,
    "events": APPEND,
    "dead_letters": APPEND,
    "event_subscribers": CHANGE,
    "outbox_deliveries": EVERY_ROW_CHANGE,
    "revoked_tokens": READ,
    "client_keys": READ,
    "request_nonces": frozenset({"SELECT", "INSERT", "DELETE"}),
    # Tables of migrations after 0015 get the default privileges.
    "tenant_accounts": EVERY_ROW_CHANGE,
    # Disputes (0022) change status but are never deleted.
    "disputes": CHANGE,
    # Reconciliation (0023): history, append-only by privilege and by trigger.
    "reconciliation_runs": APPEND,
    "reconciliation_exceptions": APPEND,
    "reconciliation_resolutions": APPEND,
    "reconciliation_matches": APPEND,
    "reconciliation_fees": APPEND,
    # Leases (0030): taken over and renewed, never deleted, so a fence never goes back.
    "leases": CHANGE,
    # Account history (0028): derived rows the indexer appends, and its position; a
    # rebuild (TRUNCATE, position to 0) is the owner's.
    "account_history": APPEND,
    "account_history_position": frozenset({"SELECT", "UPDATE"}),
    # Transfers between databases (0032): a row written once, its state moved forward
    # (UPDATE of state, result and updated_at only, checked below), never deleted.
    "crossdb_transfers": APPEND,
    # Archives (0033): written by `txproc archive` and `restore` as the owner; the service
    # reads them (the shards' id reads, history's `archived` answers) and writes none.
    "ledger_archives": READ,
    "archive_checkpoints": READ,
    "archived_transfer_ids": READ,
    # Payments' clearing layout (0034): read by the payments actor, changed by the owner.
    "payments_layout": READ,
}
BALANCE_COLUMNS = {"debits_pending", "debits_posted", "credits_pending", "credits_posted"}
SEQUENCES_USED = {"payment_step_ids", "payment_transfer_ids", "reconciliation_runs_id_seq",
                  "reconciliation_exceptions_id_seq", "subject_keys_id_seq"}

ACCOUNT_SQL = (
    "INSERT INTO accounts (id, currency, flags, code, user_data, timestamp, partition, tenant)"
    " VALUES ($1, 'EUR', 0, 1, '', 1, 0, 1)"
)
TRANSFER_SQL = (
    "INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, currency, flags,"
    " pending_id, timeout_s, code, user_data, timestamp, partition, local_legs, tenant)"
    " VALUES ($1, 1, 2, 5, 'EUR', 0, 0, 0, 1, '', 1, 0, 3, 1)"
)


async def _connect(url: str) -> asyncpg.Connection:
    """Open a connection with an explicit timeout."""
    return await asyncpg.connect(url, timeout=CONNECT_TIMEOUT_S)


@pytest.fixture(scope="module")
async def shared_app_url(pg_admin_url: str, app_password_file: Path) -> AsyncIterator[str]:
    """Yield a migrated database as txproc_app, shared by this module's table-style cases."""
    name = f"txproc_test_{uuid.uuid4().hex[:16]}"
    url = await create_database(pg_admin_url, name)
    try:
        await migrate(url)
        yield await app_role_url(url, app_password_file)
    finally:
        await drop_database(pg_admin_url, name)


async def test_app_role_holds_exactly_the_privileges_of_migration_0015(
    shared_app_url: str,
) -> None:
    """Every table and view grants txproc_app exactly its listed privileges (no table is
    left without a decision), UPDATE on accounts covers the four balance sums only, and
    the only sequences it may draw from are the payments' ids."""
    connection = await _connect(shared_app_url)
    try:
        rows = await connection.fetch(
            "SELECT c.relname, p.privilege FROM pg_class c"
            " CROSS JOIN unnest($1::text[]) AS p(privilege)"
            " WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'v')"
            " AND has_table_privilege(c.oid, p.privilege)", list(ALL_PRIVILEGES),
            timeout=CONNECT_TIMEOUT_S)
        tables = await connection.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
            " AND relkind IN ('r', 'v')", timeout=CONNECT_TIMEOUT_S)
        updatable = await connection.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'accounts'::regclass"
            " AND attnum > 0 AND NOT attisdropped"
            " AND has_column_privilege('accounts'::regclass, attnum, 'UPDATE')",
            timeout=CONNECT_TIMEOUT_S)
        sequences = await connection.fetch(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace"
            " AND CASE WHEN relkind = 'S' THEN has_sequence_privilege(oid, 'USAGE') END",
            timeout=CONNECT_TIMEOUT_S)
        crossdb_updatable = await connection.fetch(
            "SELECT attname FROM pg_attribute WHERE attrelid = 'crossdb_transfers'::regclass"
            " AND attnum > 0 AND NOT attisdropped"
            " AND has_column_privilege('crossdb_transfers'::regclass, attnum, 'UPDATE')",
            timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)
    held: dict[str, set[str]] = {row["relname"]: set() for row in tables}
    for row in rows:
        held[row["relname"]].add(row["privilege"])
    assert held == {name: set(privileges) for name, privileges in EXPECTED_PRIVILEGES.items()}
    assert {row["attname"] for row in updatable} == BALANCE_COLUMNS
    assert {row["relname"] for row in sequences} == SEQUENCES_USED
    assert {row["attname"] for row in crossdb_updatable} == {"state", "result", "updated_at"}


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE transfers SET amount = amount + 1 WHERE id = 91",
        "DELETE FROM transfers WHERE id = 91",
        "TRUNCATE transfers",
        "UPDATE failed_transfers SET result = 1",
        "DELETE FROM failed_transfers",
        "UPDATE pending_resolutions SET kind = 2",
        "DELETE FROM pending_resolutions",
        "UPDATE audit_requests SET subject = 'someone else'",
        "DELETE FROM audit_requests",
        "UPDATE audit_events SET actor_subject = 'someone else'",
        "DELETE FROM audit_events",
        "TRUNCATE audit_events",
        "UPDATE events SET payload = '{}'",
        "DELETE FROM payment_step_log",
        "DELETE FROM accounts WHERE id = 91",
        "TRUNCATE accounts CASCADE",
        "UPDATE accounts SET tenant = 2 WHERE id = 91",
        "UPDATE accounts SET currency = 'USD' WHERE id = 91",
        "UPDATE accounts SET flags = 0 WHERE id = 91",
        "UPDATE partition_map SET shard = 0",
        "DELETE FROM partition_checkpoints",
        "DELETE FROM shard_epochs",
        "UPDATE ledger_chain SET digest = prev_digest",
        "DELETE FROM ledger_chain",
        "UPDATE ledger_anchors SET reason = 'operator'",
        "DELETE FROM ledger_anchors",
        "DELETE FROM revoked_tokens",
        "INSERT INTO client_keys (key_id, tenant, tenant_slot, subject, secret) VALUES"
        " ('ck_00000000000000000000000000000000', 't', 1, 's', '\\x00'::bytea)",
        "SELECT * FROM schema_migrations",
        "ALTER TABLE transfers DISABLE TRIGGER transfers_append_only",
        "DROP TRIGGER transfers_append_only ON transfers",
        "CREATE TABLE shadow (id bigint)",
        "CREATE ROLE txproc_test_intruder SUPERUSER",
        "SELECT brin_summarize_new_values('transfers_timestamp')",
    ],
)
async def test_app_role_cannot_change_history_or_the_schema(
    shared_app_url: str, statement: str
) -> None:
    """The service's role is refused by privilege, before any trigger runs, every change to
    the ledger's history, to an account other than its balance sums, to what operators
    write, and to the schema itself."""
    connection = await _connect(shared_app_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(ACCOUNT_SQL, 91, timeout=CONNECT_TIMEOUT_S)
        await connection.execute(TRANSFER_SQL, 91, timeout=CONNECT_TIMEOUT_S)
        # The privilege error, not the append-only trigger's TXA01 (test_database.py): the
        # rows are protected even with the triggers disabled.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await connection.execute(statement, timeout=CONNECT_TIMEOUT_S)
    finally:
        await transaction.rollback()
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_app_role_writes_the_ledger_and_folds_balances(shared_app_url: str) -> None:
    """What the service needs of the ledger works as txproc_app: appending accounts and
    transfers, folding into the balance sums, summarizing the timestamp indexes through
    the owner's function, and appending links and anchors of the hash chain."""
    connection = await _connect(shared_app_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        await connection.execute(ACCOUNT_SQL, 92, timeout=CONNECT_TIMEOUT_S)
        await connection.execute(TRANSFER_SQL, 92, timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            "UPDATE accounts SET debits_posted = debits_posted + 5, credits_posted ="
            " credits_posted + 5 WHERE id = 92", timeout=CONNECT_TIMEOUT_S)
        await connection.execute(
            'UPDATE partition_checkpoints SET "timestamp" = 1 WHERE partition = 0',
            timeout=CONNECT_TIMEOUT_S)
        assert await connection.fetchval(
            "SELECT debits_posted FROM account_balances WHERE id = 92",
            timeout=CONNECT_TIMEOUT_S) == 5
        await connection.execute("SELECT ledger_summarize_new_ranges()",
                                 timeout=CONNECT_TIMEOUT_S)
        # A link of the chain and an anchor (the anchor's id from its identity column,
        # with no privilege on the sequence behind it).
        await connection.execute(
            "INSERT INTO ledger_chain VALUES (0, 1, 1, 1, 1, 0, 0, 0,"
            " decode(repeat('00', 32), 'hex'), decode(repeat('11', 32), 'hex'),"
            " decode(repeat('22', 128), 'hex'))", timeout=CONNECT_TIMEOUT_S)
        assert await connection.fetchval(
            "INSERT INTO ledger_anchors (at, reason, shards, seqs, digests)"
            " VALUES (now(), 'periodic', '{0}', '{1}', ARRAY[decode(repeat('11', 32), 'hex')])"
            " RETURNING id", timeout=CONNECT_TIMEOUT_S) > 0
    finally:
        await transaction.rollback()
        await connection.close(timeout=CONNECT_TIMEOUT_S)


async def test_app_role_is_no_superuser_and_owns_nothing(shared_app_url: str) -> None:
    """The service's role logs in as txproc_app, holds no attribute beyond LOGIN, is a
    member of no other role, and owns no table, view, sequence or function."""
    connection = await _connect(shared_app_url)
    try:
        role = await connection.fetchrow(
            "SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication,"
            " rolbypassrls, rolcanlogin FROM pg_roles WHERE rolname = current_user",
            timeout=CONNECT_TIMEOUT_S)
        memberships = await connection.fetchval(
            "SELECT count(*) FROM pg_auth_members WHERE member = current_user::regrole",
            timeout=CONNECT_TIMEOUT_S)
        owned = await connection.fetchval(
            "SELECT (SELECT count(*) FROM pg_class WHERE relowner = current_user::regrole)"
            " + (SELECT count(*) FROM pg_proc WHERE proowner = current_user::regrole)",
            timeout=CONNECT_TIMEOUT_S)
    finally:
        await connection.close(timeout=CONNECT_TIMEOUT_S)
    assert dict(role) == {
        "rolname": APP_ROLE, "rolsuper": False, "rolcreaterole": False, "rolcreatedb": False,
        "rolreplication": False, "rolbypassrls": False, "rolcanlogin": True,
    }
    assert memberships == 0
    assert owned == 0


async def test_every_actor_of_the_service_connects_as_the_app_role(
    processor: Processor,
) -> None:
    """The session's processor (shards, front, payments, outbox, audit, watches, metrics)
    holds its sessions as txproc_app; only operators use the administrative URL."""
    # Compared apart from the assertion, which would print the service's password.
    shared = processor.admin_database_url == processor.config.shard.database_url
    assert not shared, "the service connects with the administrative URL"
    admin = await _connect(processor.admin_database_url)
    try:
        users = await admin.fetch(
            "SELECT DISTINCT usename FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()",
            timeout=CONNECT_TIMEOUT_S)
    finally:
        await admin.close(timeout=CONNECT_TIMEOUT_S)
    assert {row["usename"] for row in users} == {APP_ROLE}


def _server_uid() -> int:
    """The uid the embedded server runs as: the system user when we are root."""
    return pwd.getpwnam(SYSTEM_USER).pw_uid if os.geteuid() == 0 else os.geteuid()


def _without_passfile(url: str) -> str:
    return re.sub(r"&passfile=[^&]*", "", url)


async def test_every_login_needs_its_password(
    embedded_pg: EmbeddedPostgres | None, shared_app_url: str
) -> None:
    """The embedded server refuses (SCRAM) the superuser and txproc_app without their
    password or with another one, and admits them with theirs."""
    if embedded_pg is None:
        pytest.skip("the authentication of an external server is its own")
    app_password = shared_app_url.split("@", 1)[0].rsplit(":", 1)[1]
    refused = [
        _without_passfile(embedded_pg.url),
        url_with_credentials(embedded_pg.url, SUPERUSER, app_password),
        _without_passfile(shared_app_url.replace(f":{app_password}@", "@")),
        shared_app_url.replace(f":{app_password}@", ":not-its-password@"),
    ]
    for url in refused:
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _connect(url)
    for url in (embedded_pg.url, shared_app_url):
        connection = await _connect(url)
        await connection.close(timeout=CONNECT_TIMEOUT_S)
    rules = [line.split() for line in (embedded_pg.data_dir / HBA_FILE_NAME).read_text()
             .splitlines() if line.strip() and not line.startswith("#")]
    assert rules and all(rule[0] == "local" and rule[-1] == "scram-sha-256" for rule in rules)


def test_password_files_and_socket_are_the_servers_users_only(
    embedded_pg: EmbeddedPostgres | None,
) -> None:
    """Both password files and pg_hba.conf are mode 0600 and the socket's directory 0700,
    all owned by the server's user, and the socket itself is 0700."""
    if embedded_pg is None:
        pytest.skip("only the embedded server's files are ours")
    for path in (embedded_pg.data_dir / SUPERUSER_PASSWORD_FILE_NAME,
                 embedded_pg.data_dir / APP_PASSWORD_FILE_NAME,
                 embedded_pg.data_dir / HBA_FILE_NAME):
        info = path.lstat()
        assert (stat.S_ISREG(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid) == \
            (True, 0o600, _server_uid()), path
    directory = embedded_pg.socket_dir.lstat()
    assert (stat.S_ISDIR(directory.st_mode), stat.S_IMODE(directory.st_mode),
            directory.st_uid) == (True, 0o700, _server_uid())
    socket = (embedded_pg.socket_dir / SOCKET_NAME).lstat()
    assert stat.S_ISSOCK(socket.st_mode) and stat.S_IMODE(socket.st_mode) == 0o700


async def test_cluster_from_before_passwords_is_upgraded(tmp_path: Path) -> None:
    """A data directory left by a version with trust authentication (no superuser password
    file, a trusting pg_hba.conf) starts with a new superuser password, kept 0600, and
    SCRAM for every login."""
    server = EmbeddedPostgres()
    data_dir = tmp_path / "data"
    server.start(data_dir)
    server.stop()
    (data_dir / SUPERUSER_PASSWORD_FILE_NAME).unlink()
    (data_dir / HBA_FILE_NAME).write_text("local all all trust\n")
    server.start(data_dir)
    try:
        password_file = data_dir / SUPERUSER_PASSWORD_FILE_NAME
        assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
        assert read_password_file(password_file, SUPERUSER)
        connection = await _connect(server.url)
        await connection.close(timeout=CONNECT_TIMEOUT_S)
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _connect(_without_passfile(server.url))
        assert "trust" not in (data_dir / HBA_FILE_NAME).read_text()
    finally:
        server.stop()


def test_a_long_data_directory_gets_a_private_socket_directory(tmp_path: Path) -> None:
    """When the data directory's path is too long for a socket, the socket goes to a short
    directory of the temporary directory, 0700 and the server's user's; one found open to
    others (someone else's, in a shared directory) is refused rather than used."""
    server = EmbeddedPostgres()
    data_dir = tmp_path / ("a-long-directory-name-" * 5) / "data"
    server.start(data_dir)
    socket_dir = server.socket_dir
    try:
        server.stop()
        info = socket_dir.lstat()
        assert socket_dir != data_dir and len(str(socket_dir / SOCKET_NAME)) < 108
        assert (stat.S_IMODE(info.st_mode), info.st_uid) == (0o700, _server_uid())
        socket_dir.chmod(0o777)
        with pytest.raises(EmbeddedPostgresError, match="refusing the socket directory"):
            server.start(data_dir)
    finally:
        server.stop()
        shutil.rmtree(socket_dir, ignore_errors=True)


async def test_a_role_that_cannot_set_the_password_keeps_its_url(
    embedded_pg: EmbeddedPostgres | None, db_url: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given the URL of a role without CREATEROLE and a password file that does not log
    txproc_app in, the service keeps that URL, with one warning, and txproc_app's password
    is left as it was."""
    if embedded_pg is None:
        pytest.skip("needs password authentication, which the embedded server has")
    role = f"txproc_test_owner_{uuid.uuid4().hex[:8]}"
    password = "owner-" + uuid.uuid4().hex
    admin = await _connect(db_url)
    try:
        verifier = scram_verifier(password, salt=os.urandom(16))
        await admin.execute(await admin.fetchval(
            "SELECT format('CREATE ROLE %I LOGIN NOCREATEROLE PASSWORD %L', $1::text, $2::text)",
            role, verifier), timeout=CONNECT_TIMEOUT_S)
        owner_url = url_with_credentials(db_url, role, password)
        password_file = tmp_path / APP_PASSWORD_FILE_NAME
        write_password_file(password_file, APP_ROLE, "not-its-password")
        # A dictConfig elsewhere in the session (the import-contract check runs one) may
        # have disabled the loggers that existed then.
        monkeypatch.setattr(logging.getLogger("txproc.database"), "disabled", False)
        with caplog.at_level(logging.WARNING, logger="txproc.database"):
            assert await app_role_url(owner_url, password_file) == owner_url
        assert [r.levelno for r in caplog.records if r.name == "txproc.database"] == \
            [logging.WARNING]
        with pytest.raises(asyncpg.InvalidPasswordError):
            await _connect(url_with_credentials(db_url, APP_ROLE, "not-its-password"))
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"', timeout=CONNECT_TIMEOUT_S)
        await admin.close(timeout=CONNECT_TIMEOUT_S)


@pytest.mark.parametrize("problem", ["group_readable", "symlink", "no_line"])
def test_password_file_is_refused_unless_private(tmp_path: Path, problem: str) -> None:
    """A password file readable by others, reached through a symbolic link, or without a
    line for the role is refused with a message naming it, not used."""
    path = tmp_path / APP_PASSWORD_FILE_NAME
    write_password_file(path, APP_ROLE, "secret-value")
    if problem == "group_readable":
        path.chmod(0o640)
    elif problem == "symlink":
        link = tmp_path / "link.pgpass"
        link.symlink_to(path)
        path = link
    else:
        write_password_file(path, "someone_else", "secret-value")
    with pytest.raises(DatabaseCredentialsError, match=re.escape(str(path))):
        read_password_file(path, APP_ROLE)


def test_password_file_round_trips_escaped_fields(tmp_path: Path) -> None:
    """A password with pgpass's separators is written escaped and read back unchanged."""
    path = tmp_path / APP_PASSWORD_FILE_NAME
    write_password_file(path, APP_ROLE, "a:b\\c")
    assert read_password_file(path, APP_ROLE) == "a:b\\c"
    assert read_password_file(tmp_path / "missing.pgpass", APP_ROLE) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://postgres@/postgres?host=/tmp/pg%20x&port=5432"
         "&passfile=/tmp/pg%20x/postgres.pgpass",
         "postgresql://txproc_app:s3cret@/postgres?host=/tmp/pg%20x&port=5432"),
        ("postgresql://admin:pw@[::1]:5433/ledger?sslmode=require&user=bob&password=x",
         "postgresql://txproc_app:s3cret@[::1]:5433/ledger?sslmode=require"),
        ("postgres://db.example/ledger", "postgres://txproc_app:s3cret@db.example/ledger"),
    ],
)
def test_url_with_credentials_replaces_only_the_login(url: str, expected: str) -> None:
    """The service's URL keeps the administrative URL's server, database and options, and
    drops every other way of naming a user or a password."""
    assert url_with_credentials(url, APP_ROLE, "s3cret") == expected


def test_no_private_module_of_pgserver_is_imported() -> None:
    """No source file reaches into pgserver's private modules (``_commands``, ``utils``,
    ``postgres_server``), which any release may rename; the binaries are found through
    the installed distribution's file list instead."""
    private = re.compile(
        r"(?:from|import)\s+pgserver\s*\.\s*(?:_\w*|utils|postgres_server)\b"
        r"|from\s+pgserver\s+import\s+[^\n]*\b(?:_\w*|utils|postgres_server)\b"
        r"|pgserver\s*\.\s*(?:_\w+|utils|postgres_server)\s*\.")
    offenders = []
    for directory in ("actors", "adapters", "processor", "bench", "loadtests", "tests"):
        for path in sorted((REPOSITORY / directory).rglob("*.py")):
            if path.resolve() == Path(__file__).resolve():
                continue
            if private.search(path.read_text(encoding="utf-8")):
                offenders.append(str(path.relative_to(REPOSITORY)))
    assert offenders == []
