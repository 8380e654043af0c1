from pathlib import Path

import asyncpg
import pytest

from bot import db
from bot.config import REPO_ROOT
from bot.errors import MigrationError

MIGRATIONS = REPO_ROOT / "migrations"


async def test_migrations_apply_once_then_no_op(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        first = await db.migrate(conn, MIGRATIONS)
        assert first and first[0] == "0001_init.sql"
        assert await db.migrate(conn, MIGRATIONS) == []
        recorded = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert recorded == len(first)
        assert await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL")
    finally:
        await conn.close()


async def test_failing_migration_changes_nothing_and_names_the_file(
    database_url: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE kept (id int);")
    (tmp_path / "0002_broken.sql").write_text(
        "CREATE TABLE half_done (id int);\nINSERT INTO no_such_table VALUES (1);"
    )
    conn = await asyncpg.connect(database_url)
    try:
        with pytest.raises(MigrationError) as caught:
            await db.migrate(conn, tmp_path)
        assert "0002_broken.sql" in str(caught.value)
        assert await conn.fetchval("SELECT to_regclass('kept') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half_done') IS NULL")
        names = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")]
        assert names == ["0001_ok.sql"]
    finally:
        await conn.close()


async def test_database_newer_than_code_is_refused(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "0001_a.sql").write_text("SELECT 1;")
    (tmp_path / "0002_b.sql").write_text("SELECT 1;")
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, tmp_path)
        (tmp_path / "0002_b.sql").unlink()
        with pytest.raises(MigrationError, match=r"0002_b\.sql"):
            await db.migrate(conn, tmp_path)
    finally:
        await conn.close()


def test_badly_named_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"init\.sql"):
        db.discover_migrations(tmp_path)


async def test_pool_speaks_pgvector(database_url: str) -> None:
    from pgvector import HalfVector, Vector

    pool = await db.connect(database_url, MIGRATIONS)
    try:
        async with pool.acquire() as conn:
            await conn.execute("CREATE TEMP TABLE v (e vector(3), h halfvec)")
            await conn.execute(
                "INSERT INTO v VALUES ($1, $2)", Vector([1.0, 2.0, 3.0]), HalfVector([0.5, 0.25])
            )
            row = await conn.fetchrow("SELECT e, h, e <=> $1 AS d FROM v", Vector([1, 2, 3]))
            assert row["e"].to_list() == [1.0, 2.0, 3.0]
            assert row["h"].to_list() == [0.5, 0.25]
            assert abs(row["d"]) < 1e-6
            version = await conn.fetchval(
                "SELECT extversion FROM pg_extension WHERE extname = 'vector'"
            )
            assert version is not None
    finally:
        await pool.close()


async def test_embedded_server_keeps_data_across_restarts(tmp_path: Path) -> None:
    """DATABASE_URL unset: the embedded server's data lives in DATA_DIR and survives."""
    import pgserver

    url = db.embedded_url(tmp_path)
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE survivor (x int); INSERT INTO survivor VALUES (42)")
    await conn.close()
    server = pgserver.get_server(tmp_path / "pgdata")
    server.cleanup()  # stops it: the last handle in this process
    url = db.embedded_url(tmp_path)
    conn = await asyncpg.connect(url)
    try:
        assert await conn.fetchval("SELECT x FROM survivor") == 42
    finally:
        await conn.close()
    pgserver.get_server(tmp_path / "pgdata").cleanup()
