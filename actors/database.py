"""An embedded PostgreSQL server for development and tests, and helpers to create databases.

The server binaries come from the ``pgserver`` package (PostgreSQL 16, Unix socket only). We use
its binaries and its permission helpers but not its ``PostgresServer`` class, and run the
postmaster as our own child process instead, for three reasons:

- ``pg_ctl start`` daemonizes the postmaster, so once it exits it is reaped by PID 1. When
  PID 1 reaps slowly (containers, microVM inits) the dead postmaster lingers as a zombie for
  seconds, and ``psutil`` - which ``pgserver`` asks whether the pid in ``postmaster.pid`` runs -
  counts a zombie as running, so after a crash ``pgserver`` may not start the server again. As
  the parent we reap the postmaster ourselves: after ``stop()`` no process is left, not even a
  zombie.
- ``PostgresServer`` stops the server (at interpreter exit, or on ``cleanup()``) only when the
  calling process is the last one listed in ``<data_dir>/.handle_pids.json``. A process that
  only holds the URL (a Ray worker) is not listed, so the owner's exit stops the server under
  it; a process killed with SIGKILL stays listed forever, and then nobody stops the server.
- ``get_server`` returns its cached instance for a data directory without checking that the
  server still runs, and its start waits for readiness in a loop without a deadline.

Ownership here is explicit: the server belongs to the ``EmbeddedPostgres`` that started it.
``stop()``, or the normal exit of the owning process, stops it whoever still uses it; other
processes must only hold the URL and must not outlive the owner.

Running as root, PostgreSQL refuses to start, so (like ``pgserver``) the server runs as the
system user ``pgserver``, created with ``useradd`` if missing. For that user to reach the data
directory, every parent directory of it up to ``/`` gets ``g+rx,o+rx``, and the binaries inside
the installed ``pgserver`` package are made group and world readable.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import os
import re
import signal
import stat
import subprocess
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import psutil

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "ShutdownMode",
    "create_database",
    "database_url_with_name",
    "drop_database",
]

SUPERUSER = "postgres"
# The system user the server runs as when we are root; the same name pgserver uses, so data
# directories made by either stay readable by both.
SYSTEM_USER = "pgserver"
# No TCP listener; the port only names the socket file (.s.PGSQL.5432) in the socket directory.
PORT = 5432
LOG_FILE_NAME = "log"

STARTUP_TIMEOUT_S = 30.0
# A fast shutdown ends with a checkpoint, which is short for a development-sized cluster.
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.01
INITDB_TIMEOUT_S = 120.0

CONNECT_TIMEOUT_S = 10.0
STATEMENT_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 5.0
DROP_ATTEMPTS_MAX = 50
DROP_RETRY_DELAY_S = 0.05

# Lower case only, so the quoted identifier equals the name PostgreSQL would fold to anyway.
DATABASE_NAME_PATTERN = re.compile(r"[a-z_][a-z0-9_]{0,62}")

ShutdownMode = Literal["fast", "immediate"]
# fast: roll back open transactions, disconnect clients, checkpoint, exit.
# immediate: exit at once without a checkpoint, like a crash; the next start runs recovery.
_SHUTDOWN_SIGNALS: dict[ShutdownMode, signal.Signals] = {
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started or stopped as asked."""


class EmbeddedPostgres:
    """One PostgreSQL server on a local data directory, reachable through a Unix socket.

    Not thread-safe: start, stop and restart it from one thread. They block for as long as
    PostgreSQL takes (about 0.1 s to restart, 1-2 s for a first start with initdb); from a
    running event loop call them through ``asyncio.to_thread`` so the loop keeps serving.
    """

    def __init__(
        self,
        *,
        settings: Mapping[str, str] | None = None,
        startup_timeout_s: float = STARTUP_TIMEOUT_S,
        stop_timeout_s: float = STOP_TIMEOUT_S,
    ) -> None:
        """Configure, without starting, a server.

        ``settings`` are passed to the postmaster as ``-c name=value`` on every start.
        """
        if startup_timeout_s <= 0 or stop_timeout_s <= 0:
            raise ValueError("startup_timeout_s and stop_timeout_s must be positive")
        self._settings = dict(settings or {})
        self._startup_timeout_s = startup_timeout_s
        self._stop_timeout_s = stop_timeout_s
        self._data_dir: Path | None = None
        self._socket_dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        # The process that started the server; only it can reap the postmaster.
        self._owner_pid = 0

    @property
    def data_dir(self) -> Path:
        """The data directory given to the last ``start()``."""
        if self._data_dir is None:
            raise EmbeddedPostgresError("the server was never started")
        return self._data_dir

    @property
    def url(self) -> str:
        """An asyncpg and libpq DSN for the ``postgres`` database as superuser.

        It stays the same across stops and restarts of the same data directory.
        """
        if self._socket_dir is None:
            raise EmbeddedPostgresError("the server was never started")
        host = quote(str(self._socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{SUPERUSER}?host={host}&port={PORT}"

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs, else None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def start(self, data_dir: Path) -> None:
        """Start the server on ``data_dir``, creating and initializing it if needed.

        Returns once the server accepts connections. Raises ``EmbeddedPostgresError`` if it
        is already running, or if PostgreSQL exits or is not ready within the startup timeout
        (the message carries the end of its log).
        """
        if self._process is not None:
            raise EmbeddedPostgresError(f"already running on {self._data_dir}")
        _import_pgserver()
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        run_as = _prepare_for_root(data_dir) if os.geteuid() == 0 else None
        if not (data_dir / "PG_VERSION").exists():
            _initdb(data_dir, run_as)
        socket_dir = _socket_dir(data_dir, run_as)

        command = [str(_bin_path() / "postgres"), "-D", str(data_dir)]
        command += ["-c", "listen_addresses=", "-k", str(socket_dir), "-p", str(PORT)]
        for name, value in self._settings.items():
            command += ["-c", f"{name}={value}"]
        with open(data_dir / LOG_FILE_NAME, "ab") as log:
            # A new session keeps a Ctrl-C meant for the owner from shutting the server down
            # behind its back; the owner stops it in stop() or at exit.
            process = subprocess.Popen(  # noqa: S603 - fixed arguments: the PostgreSQL binaries
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=data_dir,
                start_new_session=True,
                **_run_as_kwargs(run_as),
            )
        self._process = process
        self._owner_pid = os.getpid()
        self._data_dir = data_dir
        self._socket_dir = socket_dir
        atexit.register(self._stop_at_exit)
        try:
            self._wait_ready(data_dir, process)
        except BaseException:
            self.stop(mode="immediate")
            raise

    def stop(self, *, mode: ShutdownMode = "fast") -> None:
        """Stop the server and reap its postmaster; do nothing if it is not running.

        ``mode="fast"`` disconnects clients and checkpoints; ``"immediate"`` behaves like a
        crash. If the postmaster does not exit within the stop timeout it is sent SIGQUIT,
        then SIGKILL. On return no server process is left. Raises ``EmbeddedPostgresError``
        if one survives SIGKILL, or if called in another process than the one that started
        the server (a forked child), which cannot reap it.
        """
        process = self._process
        if process is None:
            return
        if os.getpid() != self._owner_pid:
            # In a forked child, Popen.poll() reports the postmaster as exited (ECHILD), and
            # the survivors' cleanup below would then kill the owner's live backends.
            raise EmbeddedPostgresError("only the process that started the server can stop it")
        backends = _children(process.pid)
        escalation = [(_SHUTDOWN_SIGNALS[mode], self._stop_timeout_s)]
        escalation += [(signal.SIGQUIT, KILL_TIMEOUT_S), (signal.SIGKILL, KILL_TIMEOUT_S)]
        for signal_number, timeout_s in escalation:
            if process.poll() is not None:
                break
            process.send_signal(signal_number)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                continue
        if process.poll() is None:
            raise EmbeddedPostgresError(f"postmaster {process.pid} survived SIGKILL")
        # A postmaster that exits normally has already waited for its backends; one that was
        # killed leaves them behind, and a start would then find the old shared memory in use.
        _kill_survivors(backends)
        self._process = None
        atexit.unregister(self._stop_at_exit)

    def restart(self, *, mode: ShutdownMode = "fast") -> None:
        """Stop the server as ``stop(mode=...)`` does and start it again on the same data.

        Connections open before the restart are broken; the URL stays valid.
        """
        data_dir = self.data_dir
        self.stop(mode=mode)
        self.start(data_dir)

    def _stop_at_exit(self) -> None:
        """Stop the server when its owner exits; a forked child exiting leaves it alone."""
        if os.getpid() == self._owner_pid:
            self.stop()

    def _wait_ready(self, data_dir: Path, process: subprocess.Popen[bytes]) -> None:
        """Wait until ``postmaster.pid`` names this process and says it is ready."""
        deadline_s = time.monotonic() + self._startup_timeout_s
        pid_file = data_dir / "postmaster.pid"
        while True:
            if process.poll() is not None:
                raise EmbeddedPostgresError(
                    f"postgres exited with code {process.returncode}:\n{_log_tail(data_dir)}"
                )
            # Line 1 is the postmaster's pid and line 8 its status; a stale file left by a
            # crash names another pid, and the file is rewritten while the server starts.
            lines = _read_lines(pid_file)
            if len(lines) >= 8 and lines[0].strip() == str(process.pid):
                if lines[7].strip() == "ready":
                    return
            if time.monotonic() > deadline_s:
                raise EmbeddedPostgresError(
                    f"postgres not ready after {self._startup_timeout_s} s:\n{_log_tail(data_dir)}"
                )
            time.sleep(POLL_INTERVAL_S)


@functools.cache
def _import_pgserver() -> None:
    """Import pgserver once, without the warning it gives when XDG_RUNTIME_DIR is unset."""
    # Imported late, because processes that only create databases have no use for it. At
    # import it asks platformdirs for the runtime directory, which warns when XDG_RUNTIME_DIR
    # is unset (as in containers); pgserver only needs the fallback, so the warning is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import pgserver  # noqa: F401


def _bin_path() -> Path:
    """Return the directory of the PostgreSQL binaries shipped in the pgserver wheel."""
    from pgserver._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


@functools.cache
def _prepare_binaries_for_system_user() -> None:
    """Let the system user traverse to and run the binaries; done once per process."""
    from pgserver.utils import ensure_folder_permissions, ensure_prefix_permissions

    bin_path = _bin_path()
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    ensure_prefix_permissions(bin_path)
    ensure_folder_permissions(bin_path, read | execute)
    ensure_folder_permissions(bin_path.parent / "lib", read)


def _prepare_for_root(data_dir: Path) -> tuple[int, int]:
    """Create the system user and give it the data directory; return its uid and gid."""
    from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

    entry = ensure_user_exists(SYSTEM_USER)
    if entry is None:
        raise EmbeddedPostgresError(f"could not create system user {SYSTEM_USER}")
    _prepare_binaries_for_system_user()
    ensure_prefix_permissions(data_dir)
    os.chown(data_dir, entry.pw_uid, entry.pw_gid)
    return entry.pw_uid, entry.pw_gid


def _run_as_kwargs(run_as: tuple[int, int] | None) -> dict[str, Any]:
    """Return the subprocess arguments that drop root to the system user, or none."""
    if run_as is None:
        return {}
    uid, gid = run_as
    # Setting only user= would keep root's group and supplementary groups.
    return {"user": uid, "group": gid, "extra_groups": []}


def _initdb(data_dir: Path, run_as: tuple[int, int] | None) -> None:
    """Create a cluster in ``data_dir`` whose local connections need no password."""
    command = [str(_bin_path() / "initdb"), "-D", str(data_dir), "-U", SUPERUSER]
    command += ["--auth=trust", "--encoding=UTF8", "--locale=C"]
    try:
        subprocess.run(  # noqa: S603 - fixed arguments: the PostgreSQL binaries
            command,
            check=True,
            capture_output=True,
            text=True,
            cwd=data_dir,
            timeout=INITDB_TIMEOUT_S,
            **_run_as_kwargs(run_as),
        )
    except subprocess.CalledProcessError as exc:
        raise EmbeddedPostgresError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from exc


def _socket_dir(data_dir: Path, run_as: tuple[int, int] | None) -> Path:
    """Return the data directory, or a short runtime path if the socket path would be too long."""
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import ensure_prefix_permissions, find_suitable_socket_dir

    socket_dir = Path(find_suitable_socket_dir(data_dir, PostgresServer.runtime_path))
    if run_as is not None and socket_dir != data_dir:
        ensure_prefix_permissions(socket_dir)
        socket_dir.chmod(0o777)
    return socket_dir


def _children(pid: int) -> list[psutil.Process]:
    """Return the processes the postmaster has forked, or none if it is gone."""
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


def _alive(process: psutil.Process) -> bool:
    """Tell whether ``process`` still runs; a zombie waiting for its reaper does not."""
    try:
        return bool(process.is_running() and process.status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _kill_survivors(processes: list[psutil.Process]) -> None:
    """Give orphaned backends a moment to exit by themselves, then SIGKILL the rest."""
    survivors = _wait_gone(processes, KILL_TIMEOUT_S)
    for process in survivors:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    survivors = _wait_gone(survivors, KILL_TIMEOUT_S)
    if survivors:
        pids = [process.pid for process in survivors]
        raise EmbeddedPostgresError(f"server processes survived SIGKILL: {pids}")


def _wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` for ``processes`` to exit; return those still alive."""
    deadline_s = time.monotonic() + timeout_s
    survivors = [process for process in processes if _alive(process)]
    while survivors and time.monotonic() < deadline_s:
        time.sleep(POLL_INTERVAL_S)
        survivors = [process for process in survivors if _alive(process)]
    return survivors


def _read_lines(path: Path) -> list[str]:
    """Return the lines of ``path``, or none if it does not exist yet."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def _log_tail(data_dir: Path, lines_max: int = 40) -> str:
    """Return the last ``lines_max`` lines of the server log, for error messages."""
    return "\n".join(_read_lines(data_dir / LOG_FILE_NAME)[-lines_max:])


def database_url_with_name(url: str, name: str) -> str:
    """Return ``url`` with its database replaced by ``name``; host, user and options stay.

    Works for socket URLs (``postgresql://postgres@/postgres?host=/run/pg``) and TCP URLs
    (``postgresql://postgres@127.0.0.1:5432/postgres``). A ``dbname`` or ``database`` query
    parameter, which would override the path, is dropped. Raises ``ValueError`` if ``url``
    is not a PostgreSQL URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {url!r}")
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key in ("dbname", "database") for key, _ in pairs):
        kept = [(key, value) for key, value in pairs if key not in ("dbname", "database")]
        query = urlencode(kept, safe="/")
    # Built by hand: urlunsplit drops the "//" before an empty host for schemes it does not
    # know, which turns postgresql:///db?host=... into a relative URL.
    rebuilt = f"{parts.scheme}://{parts.netloc}/{quote(name, safe='')}"
    if query:
        rebuilt += f"?{query}"
    if parts.fragment:
        rebuilt += f"#{parts.fragment}"
    return rebuilt


def _check_database_name(name: str) -> None:
    """Raise ``ValueError`` unless ``name`` is safe to splice into SQL as an identifier."""
    if DATABASE_NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"database name must match {DATABASE_NAME_PATTERN.pattern}: {name!r}")


async def create_database(
    admin_url: str,
    name: str,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
) -> str:
    """Create the empty database ``name`` on the server of ``admin_url``; return its URL.

    ``admin_url`` names any database its user may connect to and create databases from.
    Raises ``ValueError`` for a name outside ``[a-z_][a-z0-9_]*`` (63 characters at most),
    ``asyncpg.DuplicateDatabaseError`` if it exists, and ``TimeoutError`` on a timeout.
    """
    _check_database_name(name)
    connection = await asyncpg.connect(admin_url, timeout=connect_timeout_s)
    try:
        await connection.execute(f'CREATE DATABASE "{name}"', timeout=statement_timeout_s)
    finally:
        await connection.close(timeout=CLOSE_TIMEOUT_S)
    return database_url_with_name(admin_url, name)


async def drop_database(
    admin_url: str,
    name: str,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
) -> None:
    """Drop the database ``name`` if it exists, ending every session connected to it.

    New connections are refused first, so a pool that reconnects cannot keep it alive.
    Raises ``ValueError`` for an invalid name, ``asyncpg.ObjectInUseError`` if sessions
    still hold it after ``DROP_ATTEMPTS_MAX`` attempts, and ``TimeoutError`` on a timeout.
    """
    _check_database_name(name)
    connection = await asyncpg.connect(admin_url, timeout=connect_timeout_s)
    try:
        exists = await connection.fetchval(
            "SELECT true FROM pg_database WHERE datname = $1", name, timeout=statement_timeout_s
        )
        if not exists:
            return
        await connection.execute(
            f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false', timeout=statement_timeout_s
        )
        for attempt in range(1, DROP_ATTEMPTS_MAX + 1):
            # pg_terminate_backend only signals; a backend may take a moment to exit, and
            # DROP DATABASE fails while one is still there.
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
                timeout=statement_timeout_s,
            )
            try:
                await connection.execute(
                    f'DROP DATABASE IF EXISTS "{name}"', timeout=statement_timeout_s
                )
                return
            except asyncpg.ObjectInUseError:
                if attempt == DROP_ATTEMPTS_MAX:
                    raise
                await asyncio.sleep(DROP_RETRY_DELAY_S)
    finally:
        await connection.close(timeout=CLOSE_TIMEOUT_S)
