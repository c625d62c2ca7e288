"""An embedded PostgreSQL server for development and tests, its passwords, and helpers to
create databases and to connect as the application's role.

Binaries. The server is the PostgreSQL 16 of the ``pgserver`` wheel, used as a package of
binaries only: the directory holding ``postgres`` and ``initdb`` is found in the installed
distribution's file list (``importlib.metadata``) and no module of ``pgserver`` is imported,
so a release that reorganizes its private modules changes nothing here. We run the
postmaster as our own child process rather than through ``pgserver.PostgresServer``, for
three reasons:

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

Passwords. Every login needs a password, checked with SCRAM-SHA-256: the cluster is made by
``initdb --auth-local=scram-sha-256 --auth-host=scram-sha-256 --pwfile``, and
``pg_hba.conf`` belongs to this module (rewritten at every start to exactly its
``HBA_CONF``: local SCRAM logins, nothing else). The data directory keeps two random
passwords in pgpass files, mode 0600, owned by the server's user: ``postgres.pgpass`` for
the superuser, which ``url`` names (``passfile=``) so that no URL of the embedded server
carries it, and ``txproc_app.pgpass`` for the application's role (``APP_ROLE``; see
``app_role_url``). A data directory made before passwords existed (trust authentication, by
an earlier txproc or by ``pgserver`` itself) is upgraded at its first start: having no
``postgres.pgpass``, its superuser gets a new password in single-user mode (no listener, the
server not yet started), then the file is written; a crash in between only repeats the step.

Socket. The server listens on a Unix socket only (no TCP), in the data directory (mode 0700)
or, when that path is too long for a socket, in ``txproc-pg-<digest>`` under the temporary
directory, made 0700 and owned by the server's user (an existing one with another owner or
mode is refused); the socket itself is 0700 (``unix_socket_permissions``). So only the
server's user reaches it, and root, which passes every file permission: run as root, the
server runs as the system user below while the processes that connect (the CLI, Ray
workers) stay root, so no group is shared and nothing is opened to one.

Running as root, PostgreSQL refuses to start, so (like ``pgserver``) the server runs as the
system user ``pgserver``, created with ``useradd`` if missing (a system account without a
login shell). For that user to reach the data directory, every parent directory of it up to
``/`` gets ``g+rx,o+rx``, and the binaries, libraries and data files inside the installed
``pgserver`` package are made group and world readable (the binaries also executable).
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import functools
import hashlib
import hmac
import importlib.metadata
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import asyncpg
import psutil

__all__ = [
    "APP_PASSWORD_FILE_NAME",
    "APP_ROLE",
    "DatabaseCredentialsError",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "ShutdownMode",
    "app_role_url",
    "bounded_pool",
    "create_database",
    "database_url_with_name",
    "drop_database",
    "ensure_password_file",
    "keep_session",
    "read_password_file",
    "scram_verifier",
    "url_with_credentials",
    "write_password_file",
]

log = logging.getLogger("txproc.database")

SUPERUSER = "postgres"
# The role the service connects as (migration 0015 creates it and grants it what the
# service's statements need, and nothing of the ledger's history to change).
APP_ROLE = "txproc_app"
# The system user the server runs as when we are root; the same name pgserver uses, so data
# directories made by either stay readable by both.
SYSTEM_USER = "pgserver"
# No TCP listener; the port only names the socket file (.s.PGSQL.5432) in the socket directory.
PORT = 5432
LOG_FILE_NAME = "log"
SUPERUSER_PASSWORD_FILE_NAME = f"{SUPERUSER}.pgpass"
APP_PASSWORD_FILE_NAME = f"{APP_ROLE}.pgpass"
HBA_FILE_NAME = "pg_hba.conf"
HBA_CONF = """\
# Written by txproc (actors/database.py) at every start; edits here are replaced.
# Unix socket only (the server has no TCP listener), every role with a SCRAM password.
# TYPE  DATABASE     USER  METHOD
local   all          all   scram-sha-256
local   replication  all   scram-sha-256
"""
SOCKET_NAME = f".s.PGSQL.{PORT}"
# sun_path holds 108 bytes on Linux, the terminating NUL included.
SOCKET_PATH_BYTES_MAX = 107
PRIVATE_MODE = 0o700
SECRET_FILE_MODE = 0o600

# 256 random bits, URL-safe: a password never needs escaping in a URL or a pgpass line.
PASSWORD_BYTES = 32
# PostgreSQL's own defaults for the verifiers it makes (scram_iterations, a 16-byte salt).
SCRAM_ITERATIONS = 4096
SCRAM_SALT_BYTES = 16
# What a verifier is made of: base64, digits and separators, never a quote or a backslash.
SCRAM_VERIFIER_PATTERN = re.compile(r"SCRAM-SHA-256\$[0-9]+:[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=:]+")

STARTUP_TIMEOUT_S = 30.0
# A fast shutdown ends with a checkpoint, which is short for a development-sized cluster.
STOP_TIMEOUT_S = 30.0
KILL_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.01
INITDB_TIMEOUT_S = 120.0
# Single-user mode replays the WAL of a crashed cluster before it runs the statement.
SINGLE_USER_TIMEOUT_S = 120.0
USERADD_TIMEOUT_S = 30.0

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

# A uid and gid to run PostgreSQL as (root dropping to the system user), or None for "as we are".
RunAs = tuple[int, int] | None


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be started or stopped as asked."""


class DatabaseCredentialsError(RuntimeError):
    """A password file or a role is not as it must be; the message names it and the fix."""


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
    def socket_dir(self) -> Path:
        """The directory of the server's Unix socket."""
        if self._socket_dir is None:
            raise EmbeddedPostgresError("the server was never started")
        return self._socket_dir

    @property
    def url(self) -> str:
        """An asyncpg and libpq DSN for the ``postgres`` database as superuser.

        Its password is read from the superuser's password file (``passfile=``), never
        carried in the URL. It stays the same across stops and restarts of the same data
        directory.
        """
        host = quote(str(self.socket_dir), safe="/")
        passfile = quote(str(self.data_dir / SUPERUSER_PASSWORD_FILE_NAME), safe="/")
        return f"postgresql://{SUPERUSER}@/{SUPERUSER}?host={host}&port={PORT}&passfile={passfile}"

    @property
    def app_password_file(self) -> Path:
        """The password file of ``APP_ROLE`` on this server (made at start, mode 0600)."""
        return self.data_dir / APP_PASSWORD_FILE_NAME

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while the server runs, else None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def start(self, data_dir: Path) -> None:
        """Start the server on ``data_dir``, creating and initializing it if needed.

        Returns once the server accepts connections. Raises ``EmbeddedPostgresError`` if it
        is already running, if the binaries are not installed, if initdb or the password
        upgrade fails, if the socket directory is refused, or if PostgreSQL exits or is not
        ready within the startup timeout (the message carries the end of its log);
        ``DatabaseCredentialsError`` if a password file in ``data_dir`` is refused.
        """
        if self._process is not None:
            raise EmbeddedPostgresError(f"already running on {self._data_dir}")
        bin_dir = _bin_dir()
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        run_as = _prepare_for_root(data_dir, bin_dir) if os.geteuid() == 0 else None
        if not (data_dir / "PG_VERSION").exists():
            _initdb(bin_dir, data_dir, run_as)
        elif not (data_dir / SUPERUSER_PASSWORD_FILE_NAME).exists():
            _set_superuser_password(bin_dir, data_dir, run_as)
        _write_if_changed(data_dir / HBA_FILE_NAME, HBA_CONF, run_as)
        ensure_password_file(data_dir / APP_PASSWORD_FILE_NAME, APP_ROLE, owner=run_as)
        socket_dir = _socket_dir(data_dir, run_as)

        command = [str(bin_dir / "postgres"), "-D", str(data_dir)]
        command += ["-c", "listen_addresses=", "-k", str(socket_dir), "-p", str(PORT)]
        command += ["-c", f"unix_socket_permissions={PRIVATE_MODE:04o}"]
        for name, value in self._settings.items():
            command += ["-c", f"{name}={value}"]
        with open(data_dir / LOG_FILE_NAME, "ab") as log_file:
            # A new session keeps a Ctrl-C meant for the owner from shutting the server down
            # behind its back; the owner stops it in stop() or at exit.
            process = subprocess.Popen(  # noqa: S603 - fixed arguments: the PostgreSQL binaries
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
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
def _bin_dir() -> Path:
    """Return the directory of the PostgreSQL binaries shipped in the pgserver wheel.

    Found in the distribution's list of installed files, which names them whatever
    ``pgserver``'s modules are called; no module of it is imported.
    """
    try:
        distribution = importlib.metadata.distribution("pgserver")
    except importlib.metadata.PackageNotFoundError as exc:
        raise EmbeddedPostgresError(
            "the pgserver package, which ships the PostgreSQL binaries, is not installed"
        ) from exc
    for file in distribution.files or ():
        if file.name == "postgres" and file.parent.name == "bin":
            bin_dir = Path(str(distribution.locate_file(file))).parent
            if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
                return bin_dir
    raise EmbeddedPostgresError("no bin/postgres and bin/initdb among pgserver's files")


def _system_user() -> tuple[int, int]:
    """Return the uid and gid of the system user, creating it if missing."""
    try:
        entry = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedPostgresError(
                f"running as root needs the system user {SYSTEM_USER}, and useradd is missing"
            ) from None
        try:
            subprocess.run(  # noqa: S603 - fixed arguments
                [useradd, "--system", "--user-group", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                check=True, capture_output=True, text=True, timeout=USERADD_TIMEOUT_S,
            )
        except subprocess.CalledProcessError as exc:
            raise EmbeddedPostgresError(
                f"could not create system user {SYSTEM_USER}: {exc.stderr}") from exc
        entry = pwd.getpwnam(SYSTEM_USER)
    return entry.pw_uid, entry.pw_gid


def _open_prefix(path: Path) -> None:
    """Let other users traverse to ``path``: ``g+rx,o+rx`` on every parent up to ``/``."""
    traverse = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for parent in path.parents:
        _add_mode_bits(parent, traverse)


def _open_tree(root: Path, file_bits: int) -> None:
    """Add ``g+rx,o+rx`` to the directories under ``root`` and ``file_bits`` to its files."""
    traverse = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
    for directory, _, files in os.walk(root):
        _add_mode_bits(Path(directory), traverse)
        for name in files:
            path = Path(directory, name)
            if not path.is_symlink():
                _add_mode_bits(path, file_bits)


def _add_mode_bits(path: Path, bits: int) -> None:
    """Add ``bits`` to the mode of ``path``, writing it only if some are missing."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & bits != bits:
        path.chmod(mode | bits)


@functools.cache
def _prepare_binaries_for_system_user(bin_dir: Path) -> None:
    """Let the system user traverse to and run the binaries; done once per process."""
    read = stat.S_IRGRP | stat.S_IROTH
    execute = stat.S_IXGRP | stat.S_IXOTH
    _open_prefix(bin_dir)
    _open_tree(bin_dir, read | execute)
    _open_tree(bin_dir.parent / "lib", read)
    _open_tree(bin_dir.parent / "share", read)


def _prepare_for_root(data_dir: Path, bin_dir: Path) -> tuple[int, int]:
    """Create the system user and give it the data directory; return its uid and gid."""
    uid, gid = _system_user()
    _prepare_binaries_for_system_user(bin_dir)
    _open_prefix(data_dir)
    os.chown(data_dir, uid, gid)
    return uid, gid


def _run_as_kwargs(run_as: RunAs) -> dict[str, Any]:
    """Return the subprocess arguments that drop root to the system user, or none."""
    if run_as is None:
        return {}
    uid, gid = run_as
    # Setting only user= would keep root's group and supplementary groups.
    return {"user": uid, "group": gid, "extra_groups": []}


def _initdb(bin_dir: Path, data_dir: Path, run_as: RunAs) -> None:
    """Create a cluster in ``data_dir`` whose every login needs a SCRAM password, and keep
    the superuser's password in its password file."""
    password = _new_password()
    # initdb wants an empty data directory, so the password reaches it through a file of a
    # private directory outside, removed as soon as initdb has read it.
    with tempfile.TemporaryDirectory(prefix="txproc-initdb-") as scratch:
        pwfile = Path(scratch) / "pwfile"
        if run_as is not None:
            os.chown(scratch, *run_as)
        _write_secret(pwfile, password + "\n", run_as)
        command = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", SUPERUSER]
        command += ["--auth-local=scram-sha-256", "--auth-host=scram-sha-256"]
        command += [f"--pwfile={pwfile}", "--encoding=UTF8", "--locale=C"]
        _run_binary(command, data_dir, run_as, timeout_s=INITDB_TIMEOUT_S, what="initdb")
    # A crash before this line leaves a cluster without the file, which the next start
    # treats as a cluster from before passwords: it sets a new one.
    write_password_file(data_dir / SUPERUSER_PASSWORD_FILE_NAME, SUPERUSER, password,
                        owner=run_as)


def _run_binary(command: list[str], data_dir: Path, run_as: RunAs, *, timeout_s: float,
                what: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary in ``data_dir`` as the server's user; raise
    ``EmbeddedPostgresError`` naming ``what`` with its output if it fails."""
    try:
        return subprocess.run(  # noqa: S603 - fixed arguments: the PostgreSQL binaries
            command,
            input=stdin,
            check=True,
            capture_output=True,
            text=True,
            cwd=data_dir,
            timeout=timeout_s,
            **_run_as_kwargs(run_as),
        )
    except subprocess.CalledProcessError as exc:
        raise EmbeddedPostgresError(f"{what} failed:\n{exc.stdout}\n{exc.stderr}") from exc


def _set_superuser_password(bin_dir: Path, data_dir: Path, run_as: RunAs) -> None:
    """Give the superuser of a stopped cluster made without passwords a new one, and keep it.

    Single-user mode needs no login and opens no socket. The statement carries a SCRAM
    verifier, not the password, so not even the server's log could reveal it.
    """
    password = _new_password()
    verifier = scram_verifier(password, salt=secrets.token_bytes(SCRAM_SALT_BYTES))
    # Single-user mode takes no parameters; a verifier is safe between single quotes.
    if SCRAM_VERIFIER_PATTERN.fullmatch(verifier) is None:
        raise AssertionError("a SCRAM verifier holds only base64, digits and separators")
    statement = f"ALTER ROLE {SUPERUSER} WITH LOGIN PASSWORD '{verifier}';\n"
    command = [str(bin_dir / "postgres"), "--single", "-D", str(data_dir)]
    command += ["-c", "listen_addresses=", "-c", "log_statement=none", SUPERUSER]
    done = _run_binary(command, data_dir, run_as, timeout_s=SINGLE_USER_TIMEOUT_S,
                       what="setting the superuser's password", stdin=statement)
    # Single-user mode reports a failed statement and still exits 0.
    if "ERROR:" in done.stderr or "FATAL:" in done.stderr:
        raise EmbeddedPostgresError(f"setting the superuser's password failed:\n{done.stderr}")
    write_password_file(data_dir / SUPERUSER_PASSWORD_FILE_NAME, SUPERUSER, password,
                        owner=run_as)


def _socket_dir(data_dir: Path, run_as: RunAs) -> Path:
    """Return the data directory, or a private short path if the socket path would be too
    long there."""
    if len(os.fsencode(data_dir / SOCKET_NAME)) <= SOCKET_PATH_BYTES_MAX:
        return data_dir
    # One directory per data directory (its path and inode), so that servers on two data
    # directories never share a socket.
    identity = f"{data_dir}-{data_dir.stat().st_ino}".encode()
    digest = hashlib.sha256(identity).hexdigest()[:16]
    socket_dir = Path(tempfile.gettempdir()) / f"txproc-pg-{digest}"
    if len(os.fsencode(socket_dir / SOCKET_NAME)) > SOCKET_PATH_BYTES_MAX:
        raise EmbeddedPostgresError(f"no socket path short enough for {data_dir}")
    _private_directory(socket_dir, run_as)
    if run_as is not None:
        _open_prefix(socket_dir)
    return socket_dir


def _private_directory(path: Path, run_as: RunAs) -> None:
    """Make ``path`` a directory only the server's user may use, or check that it is one.

    Raises ``EmbeddedPostgresError`` if it exists as something else: a symbolic link, or a
    directory of another user or open to others (made by someone else in a shared
    temporary directory, perhaps to listen in place of the server).
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=PRIVATE_MODE)
        if run_as is not None:
            os.chown(path, *run_as)
    info = path.lstat()
    uid = run_as[0] if run_as is not None else os.geteuid()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise EmbeddedPostgresError(
            f"refusing the socket directory {path}: it must be a directory owned by uid "
            f"{uid} with mode 0700; remove it and start again"
        )


def _write_if_changed(path: Path, text: str, run_as: RunAs) -> None:
    """Replace ``path`` by ``text`` (mode 0600, owned by the server's user) unless equal."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return
    _write_secret(path, text, run_as)


def _write_secret(path: Path, text: str, owner: RunAs) -> None:
    """Write ``path`` atomically, mode 0600, owned by ``owner`` (or by us).

    The content goes to a new file made 0600 from the start, which then replaces ``path``:
    no moment exists at which another user could read it, or at which ``path`` is partial.
    """
    scratch = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, SECRET_FILE_MODE)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            if owner is not None:
                os.fchown(file.fileno(), *owner)
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(scratch, path)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise


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


def _new_password() -> str:
    """A new random password: 256 bits, URL-safe (no escaping in a URL or a pgpass line)."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


def scram_verifier(password: str, *, salt: bytes, iterations: int = SCRAM_ITERATIONS) -> str:
    """Return the SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802, 7677).

    Given to ``ALTER ROLE ... PASSWORD``, it sets the password without the password itself
    reaching the server (or any statement log). ``password`` must be printable ASCII, which
    SASLprep leaves as it is (PostgreSQL would normalize other text first). Raises
    ``ValueError`` for another password, a salt under 16 bytes or under 4,096 iterations.
    """
    if not (password.isascii() and password.isprintable() and password):
        raise ValueError("a SCRAM password here must be non-empty printable ASCII")
    if len(salt) < SCRAM_SALT_BYTES or iterations < SCRAM_ITERATIONS:
        raise ValueError(f"salt_bytes >= {SCRAM_SALT_BYTES} and iterations >= "
                         f"{SCRAM_ITERATIONS} required")
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("ascii"), salt, iterations)
    stored_key = hashlib.sha256(hmac.digest(salted, b"Client Key", "sha256")).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def _pgpass_escape(text: str) -> str:
    """``text`` as one field of a pgpass line (backslash escapes itself and the colon)."""
    if "\n" in text or "\r" in text:
        raise ValueError("a pgpass field cannot hold a line break")
    return text.replace("\\", "\\\\").replace(":", "\\:")


def _pgpass_fields(line: str) -> list[str]:
    """The fields of one pgpass line, unescaped."""
    fields: list[str] = []
    current: list[str] = []
    chars = iter(line)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            fields.append("".join(current))
            current = []
        else:
            current.append(char)
    fields.append("".join(current))
    return fields


def write_password_file(path: Path, role: str, password: str, *,
                        owner: tuple[int, int] | None = None) -> None:
    """Write ``role``'s password to ``path`` as a pgpass file (``*:*:*:role:password``).

    The file is replaced atomically, mode 0600, owned by ``owner`` (uid, gid) or by us, and
    is usable as libpq's and asyncpg's ``passfile``. Raises ``ValueError`` for a password
    with a line break, ``OSError`` if the directory is not writable.
    """
    line = f"*:*:*:{_pgpass_escape(role)}:{_pgpass_escape(password)}\n"
    _write_secret(path, line, owner)


def read_password_file(path: Path, role: str) -> str | None:
    """Return ``role``'s password in the pgpass file ``path``, or None if there is no file.

    Raises ``DatabaseCredentialsError`` if ``path`` is a symbolic link or not a regular
    file, if its group or others have any access to it (libpq and asyncpg ignore such a
    file), or if it has no line for ``role``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DatabaseCredentialsError(
            f"cannot open the password file {path} (a symbolic link is refused): {exc}"
        ) from exc
    with os.fdopen(fd, encoding="utf-8") as file:
        mode = os.fstat(file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise DatabaseCredentialsError(f"the password file {path} is not a regular file")
        if mode & 0o077:
            raise DatabaseCredentialsError(
                f"the password file {path} is open to its group or others (mode "
                f"{stat.S_IMODE(mode):04o}); chmod 600 it")
        lines = file.read().splitlines()
    for line in lines:
        fields = _pgpass_fields(line)
        if not line.startswith("#") and len(fields) == 5 and fields[3] == role:
            return fields[4]
    raise DatabaseCredentialsError(f"the password file {path} has no line for {role}")


def ensure_password_file(path: Path, role: str, *,
                         owner: tuple[int, int] | None = None) -> str:
    """Return ``role``'s password from ``path``, first writing a new random one there if
    the file does not exist. Raises as ``read_password_file`` and ``write_password_file``."""
    password = read_password_file(path, role)
    if password is None:
        password = _new_password()
        write_password_file(path, role, password, owner=owner)
    return password


def url_with_credentials(url: str, user: str, password: str) -> str:
    """Return ``url`` logging in as ``user`` with ``password``; host, database and options stay.

    The user, password and password file of ``url`` (in its user part or its query) are
    dropped. Raises ``ValueError`` if ``url`` is not a PostgreSQL URL.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"not a postgresql:// URL: {_without_userinfo(url)!r}")
    address = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{address}"
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(key, value) for key, value in pairs if key not in ("user", "password", "passfile")]
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    if kept:
        # %20, not +, for a space: libpq does not read + as one.
        rebuilt += f"?{urlencode(kept, safe='/', quote_via=quote)}"
    return rebuilt


def _without_userinfo(url: str) -> str:
    """``url`` without its user part, for messages: it may carry a password."""
    parts = urlsplit(url)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1) if parts.netloc else url


async def app_role_url(
    admin_url: str,
    password_file: Path,
    *,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    statement_timeout_s: float = STATEMENT_TIMEOUT_S,
) -> str:
    """Return the URL the service connects with: ``admin_url``'s server and database as
    ``APP_ROLE``, with the password kept in ``password_file``.

    ``admin_url`` is a URL of the role that migrated the database (migration 0015 creates
    ``APP_ROLE``). The file is made (mode 0600, a new random password) if it does not exist.
    The password is set on the role only when the role does not already log in with it, so
    every processor sharing a server must share the file; an operator who manages the role
    may write the file and the role is left alone. If ``admin_url``'s role may not change
    ``APP_ROLE`` (neither superuser nor its admin), one warning is logged and ``admin_url``
    is returned: the service then runs as that role.

    Raises ``DatabaseCredentialsError`` if the file is refused (see ``read_password_file``),
    if ``APP_ROLE`` does not exist (the database is not migrated) or if it holds an
    attribute it must not (superuser, createrole, createdb, replication, bypassrls);
    ``asyncpg`` errors and ``TimeoutError`` if a server cannot be reached.
    """
    password = ensure_password_file(password_file, APP_ROLE)
    url = url_with_credentials(admin_url, APP_ROLE, password)
    try:
        await _check_app_role(url, connect_timeout_s, statement_timeout_s)
        return url
    except asyncpg.InvalidAuthorizationSpecificationError:
        pass  # the role does not log in with this password (yet): set it below
    admin = await asyncpg.connect(admin_url, timeout=connect_timeout_s)
    try:
        verifier = scram_verifier(password, salt=secrets.token_bytes(SCRAM_SALT_BYTES))
        # A DDL statement takes no parameters: PostgreSQL quotes the literal itself.
        statement = await admin.fetchval(
            "SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', $1::text, $2::text)",
            APP_ROLE, verifier, timeout=statement_timeout_s)
        await admin.execute(statement, timeout=statement_timeout_s)
    except asyncpg.InsufficientPrivilegeError:
        log.warning("the database URL's role may not set the password of %s: the service "
                    "connects as that role instead; give the role CREATEROLE, or write %s "
                    "with %s's password", APP_ROLE, password_file, APP_ROLE)
        return admin_url
    except asyncpg.UndefinedObjectError as exc:
        raise DatabaseCredentialsError(
            f"the role {APP_ROLE} does not exist: migrate the database first") from exc
    finally:
        await admin.close(timeout=CLOSE_TIMEOUT_S)
    await _check_app_role(url, connect_timeout_s, statement_timeout_s)
    return url


async def _check_app_role(url: str, connect_timeout_s: float, statement_timeout_s: float) -> None:
    """Log in at ``url`` and make sure the role may do no more than a table's owner grants.

    Raises ``DatabaseCredentialsError`` naming the attributes it must not hold.
    """
    connection = await asyncpg.connect(url, timeout=connect_timeout_s)
    try:
        row = await connection.fetchrow(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls"
            " FROM pg_roles WHERE rolname = current_user", timeout=statement_timeout_s)
    finally:
        await connection.close(timeout=CLOSE_TIMEOUT_S)
    held = [name for name, value in (row or {}).items() if value]
    if row is None or held:
        raise DatabaseCredentialsError(
            f"the role {APP_ROLE} must hold none of {held or 'its attributes'}: ALTER ROLE "
            f"{APP_ROLE} NOSUPERUSER NOCREATEROLE NOCREATEDB NOREPLICATION NOBYPASSRLS")


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool ``reset`` for txproc's pools: nothing beyond what asyncpg always does when a
    connection goes back (roll back an open transaction).

    None of txproc's pools leaves session state behind (no LISTEN, advisory lock, open
    cursor or session-level SET; settings are SET LOCAL or fixed when the pool connects),
    and asyncpg's default reset costs a round trip on every release: one more per commit
    on the ledger, several per authorization, one per audited request.
    """


class _KeepingPool(asyncpg.Pool):  # type: ignore[misc]
    """An ``asyncpg.Pool`` whose ``acquire`` (and so every ``fetch``/``execute`` on the
    pool) waits at most ``acquire_timeout_s`` (None: without limit) for a connection unless
    told otherwise.

    A connection that comes back cleanly (no exception in its ``async with``, open, no
    transaction left) is kept aside, and the next ``acquire`` takes it without asyncpg's
    queue, timeout task and shielded release: those cost about 75 µs of CPU around each
    statement, as much as a short statement itself (docs/design.md §14). Anything else
    goes back through asyncpg's release, which rolls back or terminates as it always did.
    Kept connections count as in use to asyncpg, so ``max_size`` still bounds them all;
    while an acquire waits in asyncpg's queue nothing is kept, and ``close`` and
    ``expire_connections`` hand kept ones back first.
    """

    def __init__(self, *args: Any, acquire_timeout_s: float | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout_s = acquire_timeout_s
        self._kept: list[Any] = []
        self._waiting = 0  # acquires in asyncpg's queue

    def acquire(self, *, timeout: float | None = None) -> _Lease:
        return _Lease(self, self._acquire_timeout_s if timeout is None else timeout)

    async def _take(self, wait_s: float | None) -> Any:
        kept = self._kept
        while kept:
            proxy = kept.pop()
            if _open(proxy):
                return proxy
            await self.release(proxy)  # asyncpg reconnects it (nothing if it did already)
        self._waiting += 1
        try:
            return await self._acquire(wait_s)
        finally:
            self._waiting -= 1

    async def _give_back(self, proxy: Any, *, clean: bool) -> None:
        # While anyone waits in asyncpg's queue, a connection goes back there: a kept one
        # would reach only the next new acquire, and the waiters would time out.
        if (clean and not self._waiting and not self._closing and _open(proxy)
                and not proxy.is_in_transaction()):
            self._kept.append(proxy)
            return
        await self.release(proxy)

    async def _release_kept(self) -> None:
        kept, self._kept = self._kept, []
        for proxy in kept:
            await self.release(proxy)

    async def expire_connections(self) -> None:
        await self._release_kept()
        await super().expire_connections()

    async def close(self) -> None:
        await self._release_kept()
        await super().close()

    def terminate(self) -> None:
        self._kept.clear()
        super().terminate()


def _open(proxy: Any) -> bool:
    """Whether a pool's connection is still open. asyncpg detaches the proxy of a
    connection that closed (the server ended it, the network dropped), and every method of
    a detached proxy raises, so its connection is looked at directly."""
    conn = proxy._con
    return conn is not None and not conn.is_closed()


class _Lease:
    """``_KeepingPool.acquire``'s answer: ``async with`` it (or await it, and release the
    connection to the pool yourself)."""

    __slots__ = ("_pool", "_proxy", "_timeout")

    def __init__(self, pool: _KeepingPool, timeout: float | None) -> None:
        self._pool, self._timeout, self._proxy = pool, timeout, None

    async def __aenter__(self) -> Any:
        self._proxy = await self._pool._take(self._timeout)
        return self._proxy

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        proxy, self._proxy = self._proxy, None
        await self._pool._give_back(proxy, clean=exc_type is None)

    def __await__(self) -> Any:
        return self._pool._take(self._timeout).__await__()


async def keeping_pool(dsn: str, *, min_size: int, max_size: int,
                       acquire_timeout_s: float | None = None,
                       **connect_kwargs: Any) -> asyncpg.Pool:
    """``asyncpg.create_pool`` (``connect_kwargs`` are its ``timeout``, ``command_timeout``,
    ``server_settings``, ``init``, ``reset``, ...) that keeps clean connections aside for
    the next ``acquire`` (``_KeepingPool``), every pool on txproc's request paths."""
    pool = _KeepingPool(
        dsn, acquire_timeout_s=acquire_timeout_s, min_size=min_size, max_size=max_size,
        max_queries=50_000, max_inactive_connection_lifetime=300.0, loop=None,
        connection_class=asyncpg.Connection, record_class=asyncpg.Record, **connect_kwargs)
    await pool
    return pool


async def bounded_pool(dsn: str, *, acquire_timeout_s: float, min_size: int, max_size: int,
                       **connect_kwargs: Any) -> asyncpg.Pool:
    """``keeping_pool`` with a deadline on waiting for a connection.

    asyncpg waits for a free connection without limit; when the server hangs, every
    caller's request would wait behind the connections stuck in it, and memory would grow
    with them. Here the wait ends in ``TimeoutError`` after ``acquire_timeout_s`` (the
    payments routes answer it 503 with Retry-After).
    """
    return await keeping_pool(dsn, acquire_timeout_s=acquire_timeout_s, min_size=min_size,
                              max_size=max_size, **connect_kwargs)
