"""The files that hold signing keys: read only when private, written whole or not at all.

A key file is read only if it is a regular file (not a symbolic link, which could point
the server at a file someone else controls), owned by the user the process runs as, and
readable by nobody else; anything else is refused with ``KeyFileError``, whose message
names the file and what to change. Writes go to a private temporary file in the same
directory, are synced, and are then linked (for a file that must not exist yet) or
renamed (to replace one) into place, so a reader sees either the old or the new content.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import pathlib
import stat
import tempfile
from collections.abc import Iterator

__all__ = [
    "KEY_FILE_BYTES_MAX",
    "KeyFileError",
    "file_problem",
    "key_files_locked",
    "read_private_file",
    "write_private_file",
]

# A key ring holds a few dozen keys at most (processor/identity/keyring.py); a file larger
# than this is not one of ours and is not read into memory.
KEY_FILE_BYTES_MAX = 1024 * 1024
_PRIVATE_MODE = 0o600
_LOCK_FILE_NAME = ".jwt.keys.lock"


class KeyFileError(ValueError):
    """A key file is refused: a symbolic link, not a regular file, owned by another user,
    readable by group or others, too large, or not in the expected format."""


def file_problem(mode: int, owner_uid: int, user_uid: int) -> str | None:
    """What is wrong with a key file of ``mode`` owned by ``owner_uid`` for a process
    running as ``user_uid``, as the end of a sentence starting with the file's name;
    None if nothing is."""
    if not stat.S_ISREG(mode):
        return "is not a regular file"
    if owner_uid != user_uid:
        return (f"is owned by uid {owner_uid}, not by the server's user (uid {user_uid}); "
                "chown it to that user")
    if stat.S_IMODE(mode) & 0o077:
        return "must not be readable by group or others; chmod 600 it"
    return None


def read_private_file(path: pathlib.Path) -> bytes:
    """The content of the key file at ``path``.

    Raises ``FileNotFoundError`` if there is none, ``KeyFileError`` if it is a symbolic
    link, not a regular file, owned by another user than the effective one, readable by
    group or others, or larger than ``KEY_FILE_BYTES_MAX``, and ``OSError`` if it cannot be
    read.
    """
    try:
        # O_NOFOLLOW refuses a symbolic link as the last component; O_NONBLOCK keeps a FIFO
        # planted under the name from blocking the open (fstat then refuses it).
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeyFileError(f"the key file {path} is a symbolic link; key files must be "
                               "regular files in the data directory") from exc
        raise
    try:
        status = os.fstat(descriptor)
        problem = file_problem(status.st_mode, status.st_uid, os.geteuid())
        if problem is not None:
            raise KeyFileError(f"the key file {path} {problem}")
        if status.st_size > KEY_FILE_BYTES_MAX:
            raise KeyFileError(f"the key file {path} is larger than {KEY_FILE_BYTES_MAX} bytes")
        chunks = []
        size_bytes = 0
        while chunk := os.read(descriptor, KEY_FILE_BYTES_MAX + 1 - size_bytes):
            chunks.append(chunk)
            size_bytes += len(chunk)
            if size_bytes > KEY_FILE_BYTES_MAX:
                raise KeyFileError(
                    f"the key file {path} is larger than {KEY_FILE_BYTES_MAX} bytes")
        return b"".join(chunks)
    finally:
        os.close(descriptor)


def write_private_file(path: pathlib.Path, content: bytes, *, replace: bool) -> bool:
    """Write ``content`` to ``path`` with mode 0600, atomically; whether it was written.

    With ``replace`` an existing file is replaced (rename); without, an existing file is
    kept and False returned (link), so two racing creators agree on one content. Creates
    the directory if missing. Raises ``OSError`` if the file cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file with mode 0600 from the start, so the content is never
    # visible to others, whatever the umask.
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    written = True
    try:
        os.fchmod(descriptor, _PRIVATE_MODE)
        view = memoryview(content)
        while view:
            view = view[os.write(descriptor, view):]
        os.fsync(descriptor)
        os.close(descriptor)
        descriptor = -1
        if replace:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)
            except FileExistsError:
                written = False
        _sync_directory(path.parent)
    finally:
        if descriptor >= 0:
            os.close(descriptor)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return written


@contextlib.contextmanager
def key_files_locked(directory: pathlib.Path) -> Iterator[None]:
    """Hold the key files of ``directory`` for one read-modify-write (an exclusive
    ``flock`` on a private lock file beside them), so two rotations never lose one."""
    directory.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(directory / _LOCK_FILE_NAME,
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _PRIVATE_MODE)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # closing releases the lock


def _sync_directory(directory: pathlib.Path) -> None:
    # The new name is durable only once the directory's entry is: a crash right after a
    # rotation must not bring back the previous ring.
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
