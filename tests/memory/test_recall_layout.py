"""Recall's layout (issue 22, point 3): one user's current memories are read from the few leaf
pages of memories_recall_idx (an index-only scan), vectors too wide for a B-tree entry are still
stored and recalled, and a user with no memories in the place they speak costs no embedding.

The real Postgres with pgvector (migration 0018) and the real store; the memory service's
embeddings come from the fake Ollama on loopback."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pgvector import HalfVector

from bot import db
from bot.app import App, running_app
from bot.config import REPO_ROOT
from bot.memory.store import INDEXED_DIMS, MemoryStore, NewFact, recall_query, scope_of
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import (
    context,
    exchange,
    extraction_requests,
    facts,
    memory_of,
    near,
    say,
)

MODEL = "ollama:nomic-embed-text"


@pytest.fixture
async def mapp(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, memory_enabled=True)
    async with running_app(settings) as app:
        yield app


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations")
    try:
        yield pool
    finally:
        await pool.close()


def unit(dims: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    v = [rng.gauss(0, 1) for _ in range(dims)]
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v]


async def plan(
    pool: Any, dims: int, user: str, scope: str | None, persona: str | None = None
) -> str:
    """The recall query's plan, with sequential scans off: whether the index can serve it,
    whatever the planner would pick on a table this small."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        rows = await conn.fetch(
            "EXPLAIN (COSTS OFF) " + recall_query(dims),
            user,
            HalfVector(unit(dims, 0)),
            MODEL,
            -1.0,
            0.05,
            30.0,
            5,
            scope,
            persona,
        )
    return "\n".join(r[0] for r in rows)


async def test_recall_reads_one_users_rows_from_the_index_alone(pool: Any) -> None:
    store = MemoryStore(pool)
    for user in ("test:alice", "test:bob"):
        new = [NewFact(f"{user} fact {i}.", unit(768, i)) for i in range(20)]
        await store.add(user, new, model=MODEL, persona="mimi", scope="test:conv:c1")
    await pool.execute("VACUUM ANALYZE memories")
    for scope in (None, "test:conv:c1"):
        for persona in (None, "mimi"):  # a persona sees shared facts and its own (0017)
            shown = await plan(pool, 768, "test:alice", scope, persona)
            assert "Index Only Scan using memories_recall_idx" in shown, shown
    models = "EXPLAIN (COSTS OFF) SELECT DISTINCT embed_model FROM memories WHERE user_key = $1"
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL enable_seqscan = off")
        await conn.execute("SET LOCAL enable_bitmapscan = off")
        shown = "\n".join(
            r[0]
            for r in await conn.fetch(
                models + " AND superseded_by IS NULL AND ($2::text IS NULL OR scope = $2)",
                "test:alice",
                None,
            )
        )
    assert "Index Only Scan using memories_current_idx" in shown, shown
    found = await store.recall(
        "test:alice",
        unit(768, 3),
        MODEL,
        top_k=3,
        floor=-1.0,
        recency_weight=0.0,
        half_life_days=30,
    )
    assert found[0].text == "test:alice fact 3." and found[0].similarity == pytest.approx(1, 1e-3)
    assert all(m.text.startswith("test:alice ") for m in found) and len(found) == 3


async def test_wide_vectors_are_stored_and_recalled_without_the_index(pool: Any) -> None:
    """A 1,536-d vector does not fit a B-tree entry: the row stays out of the index (no
    "index row size" error) and recall finds it through the user's B-tree as before."""
    store = MemoryStore(pool)
    wide = "openai:text-embedding-3-small"
    base = unit(1536, 1)
    rows = [("Close.", 0.9), ("Middling.", 0.5), ("Far.", 0.1)]
    new = [NewFact(text, near(base, s, 10 + i)) for i, (text, s) in enumerate(rows)]
    ids = await store.add("test:carol", new, model=wide, persona="mimi")
    assert len(ids) == 3, ids
    assert INDEXED_DIMS < 1536
    found = await store.recall(
        "test:carol", base, wide, top_k=2, floor=0.3, recency_weight=0.0, half_life_days=30
    )
    assert [m.text for m in found] == ["Close.", "Middling."]
    assert "memories_recall_idx" not in await plan(pool, 1536, "test:carol", None)
    indexed = await pool.fetchval(
        "SELECT count(*) FROM memories WHERE superseded_by IS NULL"
        f" AND vector_dims(embedding) <= {INDEXED_DIMS}"
    )
    assert indexed == 0


async def test_no_memories_in_this_place_costs_no_embedding(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    memory = memory_of(mapp)
    query = "what should we talk about?"
    fact = NewFact("Likes tea.", near(fake_ollama.embedding_for(query), 0.9, 0))
    await memory.store.add("test:alice", [fact], model=MODEL, persona="mimi", scope="test:conv:c1")
    assert await memory.store.models_of("test:alice", "test:conv:c2") == []
    before = len(fake_ollama.embed_requests())
    assert await memory.recall("test:alice", query, context=context(), scope="test:conv:c2") == []
    assert len(fake_ollama.embed_requests()) == before, "nothing here: no query to embed"
    found = await memory.recall("test:alice", query, context=context(), scope="test:conv:c1")
    assert [m.text for m in found] == ["Likes tea."]
    assert len(fake_ollama.embed_requests()) == before + 1


async def test_a_message_is_embedded_once_for_recall_and_extraction(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """Extraction compares the user's facts with the vector recall made of the same message."""
    memory = memory_of(mapp)
    query = "Tea or coffee this morning?"
    fact = NewFact("Likes tea.", near(fake_ollama.embedding_for(query), 0.9, 0))
    here = scope_of("test", "c1", None)
    await memory.store.add("test:alice", [fact], model=MODEL, persona="mimi", scope=here)
    await exchange(mapp, fake_ollama, say(query), facts("Drinks coffee in the morning."))
    inputs = [body["input"] for body in fake_ollama.embed_requests()]
    assert inputs.count([query]) == 1, inputs
    assert ["Drinks coffee in the morning."] in inputs
    shown = json.dumps(extraction_requests(fake_ollama)[-1])
    assert "Likes tea." in shown, "the nearest facts, found with recall's vector"
    rows = await mapp.pool.fetch("SELECT text FROM memories WHERE user_key = 'test:alice'")
    assert {r["text"] for r in rows} == {"Likes tea.", "Drinks coffee in the morning."}
    calls = await mapp.pool.fetchval("SELECT count(*) FROM model_calls WHERE purpose = 'embed'")
    assert calls == 2, "one embedding of the message, one of the new fact"
