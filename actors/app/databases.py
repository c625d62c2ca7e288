"""Which database the processor and the operator commands use: the one configured, or
the embedded server of the data directory.

Apart from ``actors.app.runtime`` because the operator commands (``txproc migrate``,
``audit``, ``token revoke``, ...) need only this, not Ray and the actors the runtime
starts, and they start faster without them.
"""

from __future__ import annotations

from pathlib import Path

from actors.database import APP_PASSWORD_FILE_NAME, EmbeddedPostgres
from processor.config import Config

__all__ = ["app_password_file", "ensure_database"]


def ensure_database(config: Config) -> tuple[str, EmbeddedPostgres | None]:
    """The administrative URL of the database (migrations, operator commands): the one
    configured, or the embedded server's, which this call starts if none was configured."""
    if config.shard.database_url:
        return config.shard.database_url, None
    embedded = EmbeddedPostgres()
    embedded.start(Path(config.data_dir) / "pg")
    return embedded.url, embedded


def app_password_file(config: Config, embedded: EmbeddedPostgres | None) -> Path:
    """Where the application role's password is kept: beside the embedded server's data, or
    in the data directory for a configured server (which every processor sharing that
    server must share, docs/security.md "The database")."""
    if embedded is not None:
        return embedded.app_password_file
    return Path(config.data_dir) / APP_PASSWORD_FILE_NAME
