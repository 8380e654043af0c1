"""The pool gives connections back without asyncpg's reset query (issue 22: it doubled the round
trips of every query), and still never hands out a connection inside a transaction."""

from __future__ import annotations

from bot import db
from bot.config import REPO_ROOT


async def test_release_sends_no_reset_query(database_url: str) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            pid = conn.get_server_pid()
            await conn.execute("SET application_name = 'kept-as-is'")
        # The one connection, released: its session is as it was (RESET ALL would have cleared
        # it), so no reset query went to the server.
        async with pool.acquire() as conn:
            assert conn.get_server_pid() == pid
            assert await conn.fetchval("SHOW application_name") == "kept-as-is"
            await conn.execute("RESET application_name")
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_on_release(database_url: str) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("BEGIN")
            await conn.execute(
                "INSERT INTO conversations (platform, external_id) VALUES ('t', 'left-open')"
            )
        assert await pool.fetchval("SELECT count(*) FROM conversations") == 0
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
    finally:
        await pool.close()
