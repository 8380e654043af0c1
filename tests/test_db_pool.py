"""The pool gives connections back without asyncpg's reset query (issue 22: it doubled the round
trips of every query), and still never hands out a connection inside a transaction; its
statements take kept connections directly (bot/db.py `Pool`), within the limit, and a failed,
cancelled or ended connection goes back through asyncpg."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

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


async def test_statements_share_kept_connections_within_the_limit(database_url: str) -> None:
    """30 statements at once on a pool of 3: all answered, on at most 3 connections, and the
    next statements go on the same connections (kept checked out between statements)."""
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=3)
    try:
        pids = await asyncio.gather(
            *(pool.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.02)") for _ in range(30))
        )
        assert 1 <= len(set(pids)) <= 3
        again = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(10)}
        assert again <= set(pids)
        assert await pool.fetchval("SELECT $1::int + 1", 41) == 42
        assert [r["n"] for r in await pool.fetch("SELECT generate_series(1, 3) AS n")] == [1, 2, 3]
        assert (await pool.fetchrow("SELECT 'x' AS a"))["a"] == "x"
        assert await pool.execute("SELECT 1") == "SELECT 1"
    finally:
        await pool.close()


async def test_a_failed_statement_leaves_the_pool_whole(database_url: str) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        with pytest.raises(asyncpg.PostgresSyntaxError):
            await pool.fetch("SELEC 1")
        with pytest.raises(asyncpg.DivisionByZeroError):
            await pool.fetchval("SELECT 1 / $1::int", 0)
        assert await pool.fetchval("SELECT 2") == 2
    finally:
        await pool.close()


async def test_a_cancelled_statement_does_not_leak_into_the_next(database_url: str) -> None:
    """Cancelled mid-query, the connection goes back through asyncpg, which waits the query
    out: the next statement on the pool's one connection gets its own answer, at once."""
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        slow = asyncio.create_task(pool.fetchval("SELECT 'slow' FROM pg_sleep(5)"))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        async with asyncio.timeout(3):
            assert await pool.fetchval("SELECT 'next'") == "next"
    finally:
        await pool.close()


async def test_a_connection_cancelled_in_use_goes_back_through_asyncpg(database_url: str) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)

    async def holds() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT pg_sleep(5)")

    try:
        task = asyncio.create_task(holds())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(3):
            assert await pool.fetchval("SELECT 'after'") == "after"
    finally:
        await pool.close()


async def test_a_connection_the_server_ended_is_replaced(database_url: str) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        other = await asyncpg.connect(database_url)
        try:
            assert await other.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await other.close()
        await asyncio.sleep(0.2)
        async with asyncio.timeout(5):
            assert await pool.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await pool.close()


async def test_waiters_are_served_and_a_cancelled_one_loses_no_connection(
    database_url: str,
) -> None:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=1)
    try:
        first = asyncio.create_task(pool.fetchval("SELECT 1 FROM pg_sleep(0.2)"))
        await asyncio.sleep(0.05)
        waiting = [asyncio.create_task(pool.fetchval("SELECT $1::int", n)) for n in range(5)]
        gives_up = asyncio.create_task(pool.fetchval("SELECT 99"))
        await asyncio.sleep(0.05)
        gives_up.cancel()
        assert await first == 1
        assert await asyncio.gather(*waiting) == [0, 1, 2, 3, 4]
        with pytest.raises(asyncio.CancelledError):
            await gives_up
        async with asyncio.timeout(3):
            assert await pool.fetchval("SELECT 7") == 7
    finally:
        await pool.close()


async def test_a_transaction_and_statements_share_a_small_pool(database_url: str) -> None:
    """A held connection (a transaction) and statements at once on a pool of 2: the
    statements go on the other connection, then the transaction's comes back for reuse."""
    pool = await db.connect(database_url, REPO_ROOT / "migrations", min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO conversations (platform, external_id) VALUES ('t', 'pool-tx')"
            )
            seen = await asyncio.gather(
                *(pool.fetchval("SELECT count(*) FROM conversations") for _ in range(10))
            )
            assert seen == [0] * 10  # not committed yet
        assert await pool.fetchval("SELECT count(*) FROM conversations") == 1
        await pool.execute("DELETE FROM conversations WHERE external_id = 'pool-tx'")
    finally:
        async with asyncio.timeout(5):
            await pool.close()
