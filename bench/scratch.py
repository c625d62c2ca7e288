"""What the single-database benchmarks share: a scratch ledger database and the way they run.

``scratch_database`` starts an embedded PostgreSQL server in a fresh temporary directory,
creates and migrates one database on it, and removes all of it afterwards, whatever
happened; ``run_main`` runs a benchmark's coroutine on uvloop when it is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["run_main", "scratch_database"]

T = TypeVar("T")


@contextlib.asynccontextmanager
async def scratch_database(name: str) -> AsyncIterator[tuple[str, Path]]:
    """A migrated database ``name`` on a new embedded server: its administrative URL, and
    the temporary directory (for the benchmark's own files), removed on exit."""
    from actors.database import EmbeddedPostgres, create_database
    from actors.migrate import migrate

    directory = Path(tempfile.mkdtemp(prefix=f"{name.replace('_', '-')}-"))
    server = EmbeddedPostgres()
    server.start(directory / "pg")
    try:
        url = await create_database(server.url, name)
        await migrate(url)
        yield url, directory
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def run_main(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main()`` to completion, on uvloop when it is installed (as the service runs)."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    return asyncio.run(main())
