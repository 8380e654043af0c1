"""Recall never writes `memories` (migration 0019): what it found is stamped in
`memory_recalls`, and the stamps of replies made close together wait for a moment without
replies and go in as one statement (bot/memory/service.py). A fact's row then changes only when
it is learned, replaced or forgotten, so the covering recall index and the visibility map stay
as recall left them. Real engine, Postgres and the fake Ollama."""

from __future__ import annotations

import asyncio
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg

from bot import db
from bot.app import App
from bot.config import REPO_ROOT
from bot.core.engine import Done
from bot.memory.store import MemoryStore, NewFact
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import collect, memory_of, near, say

MODEL = "ollama:nomic-embed-text"


async def learned(app: App, fake: FakeOllama, user: str, texts: list[str], query: str) -> None:
    """Facts of `user` close to `query`, learned in the conversation `say` speaks in."""
    base = fake.embedding_for(query)
    facts = [NewFact(t, near(base, 0.9 - i / 100, i)) for i, t in enumerate(texts)]
    await memory_of(app).store.add(
        f"test:{user}", facts, model=MODEL, persona="mimi", scope=f"test:conv:{user}"
    )


async def versions(app: App) -> list[tuple[Any, ...]]:
    """Each fact's row version: its place in the table and the transaction that wrote it."""
    return [tuple(r) for r in await app.pool.fetch("SELECT id, ctid, xmin::text FROM memories")]


async def stamps(app: App) -> dict[int, datetime]:
    rows = await app.pool.fetch("SELECT memory_id, last_recalled_at FROM memory_recalls")
    return {r["memory_id"]: r["last_recalled_at"] for r in rows}


async def replied(app: App, fake: FakeOllama, user: str, text: str) -> None:
    fake.queue_reply("Sure.")
    events = await collect(app, say(text, user=user, conv=user))
    assert isinstance(events[-1], Done)


async def test_replies_stamp_what_they_recalled_together_and_never_write_the_facts(
    held_app: App, fake_ollama: FakeOllama
) -> None:
    users = ["alice", "bob", "carol"]
    for user in users:
        await learned(
            held_app, fake_ollama, user, [f"{user} likes tea.", f"{user} has a cat."], "hi"
        )
    before = await versions(held_app)
    started = datetime.now(UTC)
    await asyncio.gather(*(replied(held_app, fake_ollama, user, "hi") for user in users))
    for user in users:  # and one more each, recalling the same facts again
        await replied(held_app, fake_ollama, user, "hi")
    await asyncio.sleep(0.2)
    assert await stamps(held_app) == {}, "stamps wait for a moment without replies"
    await held_app.engine.drain()
    after = await stamps(held_app)
    assert sorted(after) == sorted(row[0] for row in before), "every recalled fact is stamped"
    assert all(started <= at <= datetime.now(UTC) for at in after.values())
    statements = await held_app.pool.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM memory_recalls"
    )
    assert statements == 1, "all the replies' stamps went in as one statement"
    assert await versions(held_app) == before, "no fact's row was written by recall"
    # what the user sees of it: the stamp in their memories' export
    exported = await memory_of(held_app).export("test:alice")
    assert all(m["last_recalled_at"] is not None for m in exported)


async def test_a_stamp_needs_the_fact_to_be_the_users_and_goes_with_it(
    held_app: App, fake_ollama: FakeOllama
) -> None:
    await learned(held_app, fake_ollama, "alice", ["Alice likes tea.", "Alice has a cat."], "hi")
    await learned(held_app, fake_ollama, "bob", ["Bob likes coffee."], "hi")
    ids = {r["text"]: r["id"] for r in await held_app.pool.fetch("SELECT id, text FROM memories")}
    store = MemoryStore(held_app.pool)
    now = datetime.now(UTC)
    await store.touch(
        {
            ids["Alice likes tea."]: ("test:alice", now),
            ids["Bob likes coffee."]: ("test:alice", now),  # not alice's: no stamp
            10**9: ("test:alice", now),  # no such fact: no stamp
        }
    )
    assert await stamps(held_app) == {ids["Alice likes tea."]: now}
    # a later stamp replaces an earlier one; an earlier one written late does not
    later = now + timedelta(seconds=5)
    await store.touch({ids["Alice likes tea."]: ("test:alice", later)})
    await store.touch({ids["Alice likes tea."]: ("test:alice", now)})
    assert await stamps(held_app) == {ids["Alice likes tea."]: later}
    # forgetting the fact takes its stamp with it
    await store.touch({ids["Alice has a cat."]: ("test:alice", now)})
    assert await memory_of(held_app).forget("test:alice", ids["Alice likes tea."]) == 1
    assert await stamps(held_app) == {ids["Alice has a cat."]: now}
    await memory_of(held_app).forget("test:alice")
    assert await stamps(held_app) == {}


async def test_the_migration_moves_the_stamps_already_written(
    database_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted((REPO_ROOT / "migrations").glob("*.sql")):
        if path.name < "0019":
            shutil.copy(path, before)
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, before)
        at = datetime(2026, 11, 1, tzinfo=UTC)
        await conn.execute(
            "INSERT INTO memories (user_key, text, text_hash, embed_model, embedding,"
            " last_recalled_at) VALUES ('test:a', 'Stamped.', 'h1', $1, '[1,0]', $2),"
            " ('test:a', 'Never recalled.', 'h2', $1, '[0,1]', NULL)",
            MODEL,
            at,
        )
        applied = await db.migrate(conn, REPO_ROOT / "migrations")
        assert applied[0] == "0019_memory_recalls.sql"
        rows = await conn.fetch(
            "SELECT m.text, r.last_recalled_at FROM memory_recalls r JOIN memories m"
            " ON m.id = r.memory_id"
        )
        assert [tuple(r) for r in rows] == [("Stamped.", at)]
        columns = await conn.fetchval(
            "SELECT count(*) FROM information_schema.columns"
            " WHERE table_name = 'memories' AND column_name = 'last_recalled_at'"
        )
        assert columns == 0
    finally:
        await conn.close()
