"""Which embedding models a user's memories have is asked once and kept (bot/memory/known.py):
recall then goes straight to the embedding. A no is never kept; what this process writes drops
the answer at once; another process's writes are seen within the ttl."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import App, running_app
from bot.memory.known import KnownModels
from bot.memory.store import NewFact, RecallAsk
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import context, memory_of, near

MODEL = "ollama:nomic-embed-text"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_yes_is_kept_for_its_ttl_a_no_never() -> None:
    clock = Clock()
    known = KnownModels(ttl=60.0, clock=clock)
    known.put("u", "here", [], known.version())
    assert known.get("u", "here") is None
    known.put("u", "here", [MODEL], known.version())
    assert known.get("u", "here") == [MODEL]
    assert known.get("u", None) is None, "another scope is another question"
    clock.now += 59.9
    assert known.get("u", "here") == [MODEL]
    clock.now += 0.2
    assert known.get("u", "here") is None


def test_an_answer_read_before_a_write_is_not_kept() -> None:
    known = KnownModels()
    version = known.version()
    known.forget("someone else")  # a write while the answer was on its way
    known.put("u", "here", [MODEL], version)
    assert known.get("u", "here") is None
    known.put("u", "here", [MODEL], known.version())
    known.forget("u")
    assert known.get("u", "here") is None
    known.put("u", "here", [MODEL], known.version())
    known.forget()
    assert known.get("u", "here") is None


def test_the_least_recently_asked_users_go_first() -> None:
    known = KnownModels(size=2)
    for user in ("a", "b"):
        known.put(user, None, [MODEL], known.version())
    assert known.get("a", None) == [MODEL]  # a asked last: b is the oldest
    known.put("c", None, [MODEL], known.version())
    assert known.get("b", None) is None
    assert known.get("a", None) == known.get("c", None) == [MODEL]


@pytest.fixture
async def mapp(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, memory_enabled=True)
    async with running_app(settings) as app:
        yield app


async def test_recall_keeps_the_answer_and_this_processs_writes_drop_it(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    memory = memory_of(mapp)
    clock = Clock()
    memory.known = KnownModels(ttl=60.0, clock=clock)
    query = "What do I drink?"
    user = "test:alice"

    async def recall() -> tuple[list[str], int]:
        """What recall found, and how many embedding calls it made."""
        before = len(fake_ollama.embed_requests())
        found = await memory.recall(user, query, context=context(user))
        return [m.text for m in found], len(fake_ollama.embed_requests()) - before

    assert await recall() == ([], 0), "no memories: no embedding"
    fact = NewFact("Drinks tea.", near(fake_ollama.embedding_for(query), 0.9, 1))
    await memory.store.add(user, [fact], model=MODEL, persona="mimi")  # another process
    assert await recall() == (["Drinks tea."], 1), "a no was not kept"
    # another process forgets it: the kept yes still sends recall to the embedding, for ttl
    await mapp.pool.execute("DELETE FROM memories WHERE user_key = $1", user)
    assert await recall() == ([], 1)
    clock.now += 61
    assert await recall() == ([], 0), "after the ttl the database is asked again"
    # this process's own writes: the answer is dropped at once
    await memory.store.add(user, [fact], model=MODEL, persona="mimi")
    assert await recall() == (["Drinks tea."], 1)
    assert await memory.forget(user) == 1
    assert await recall() == ([], 0)


async def test_an_embedding_of_a_model_the_answer_does_not_name_asks_again(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """Memories moved to the configured model by another process (`memories reembed`)."""
    memory = memory_of(mapp)
    user, query = "test:bob", "Where do I live?"
    vector = near(fake_ollama.embedding_for(query), 0.9, 2)
    fact = NewFact("Lives in Oslo.", vector)
    await memory.store.add(user, [fact], model="ollama:older-model", persona="mimi")
    assert await memory.recall(user, query, context=context(user)) == []
    assert memory.known.get(user, None) == ["ollama:older-model"]
    await mapp.pool.execute("UPDATE memories SET embed_model = $1 WHERE user_key = $2", MODEL, user)
    found = await memory.recall(user, query, context=context(user))
    assert [m.text for m in found] == ["Lives in Oslo."]
    assert memory.known.get(user, None) == [MODEL]


async def test_many_users_asked_at_once_each_get_their_own_answer(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """`models_of_many` answers as `models_of` does for each (user, scope); recalls made while
    one question is out ask theirs together, and each finds only its own user's facts."""
    memory = memory_of(mapp)
    store = memory.store
    query = "What do I like?"
    users = [f"test:user{n}" for n in range(12)]
    for n, user in enumerate(users[:8]):  # the last four have no memories
        fact = NewFact(f"Likes number {n}.", near(fake_ollama.embedding_for(query), 0.9, n))
        await store.add(user, [fact], model=MODEL, persona="mimi", scope="here" if n % 2 else None)
    await store.add(users[0], [NewFact("Old.", fact.vector)], model="ollama:older", persona="mimi")
    asked = [(user, scope) for user in users for scope in (None, "here", "elsewhere")]
    many = await store.models_of_many(asked)
    expected = [sorted(await store.models_of(user, scope)) for user, scope in asked]
    assert [sorted(models) for models in many] == expected
    assert sorted(many[0]) == sorted([MODEL, "ollama:older"])  # two models, one user
    assert many[asked.index((users[1], "here"))] == [MODEL]
    assert many[asked.index((users[1], "elsewhere"))] == []
    assert many[asked.index((users[11], None))] == []

    found = await asyncio.gather(
        *(memory.recall(user, query, context=context(user), scope="here") for user in users)
    )
    assert [[m.text for m in f] for f in found] == [
        [f"Likes number {n}."] if n < 8 and n % 2 else [] for n in range(12)
    ]


async def test_recalls_asked_together_find_what_each_finds_alone(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """`recall_many` answers each question as `recall` does: its user's facts only, in its
    scope, those its persona may see, over the floor, the top k by score; a wide model's
    vectors (read from the table, not the covering index) in the same statement; and replies
    recalling at once each get their own."""
    memory = memory_of(mapp)
    store = memory.store
    query = "What do I like?"
    base = fake_ollama.embedding_for(query)
    wide_model, wide = "ollama:wide", [v / 2 for v in base + base]  # 1,536 dimensions
    users = [f"test:r{n}" for n in range(6)]
    for n, user in enumerate(users[:5]):
        facts = [
            NewFact(f"{user} fact {k}.", near(base, 0.95 - 0.1 * k, 7 * n + k)) for k in range(7)
        ]
        await store.add(user, facts, model=MODEL, persona="mimi", scope="here" if n % 2 else None)
        kept = [NewFact(f"{user} keeps {k}.", near(base, 0.9, 99 + k)) for k in range(2)]
        await store.add(user, kept, model=MODEL, persona="rex", scope="here", private_to="rex")
    await store.add(users[0], [NewFact("Wide.", wide)], model=wide_model, persona="mimi")
    asked = [
        RecallAsk(user, base, MODEL, scope, persona)
        for user in users
        for scope in (None, "here")
        for persona in (None, "mimi", "rex")
    ] + [RecallAsk(users[0], wide, wide_model), RecallAsk(users[0], base, "ollama:none")]
    settings = {"top_k": 3, "recency_weight": 0.05, "half_life_days": 30.0}
    many = await store.recall_many(asked, floor=0.5, **settings)
    alone = [
        await store.recall(a.user_key, a.vector, a.model, scope=a.scope, persona=a.persona,
                           floor=0.5, **settings)
        for a in asked
    ]  # fmt: skip
    assert [[m.text for m in f] for f in many] == [[m.text for m in f] for f in alone]
    for together, one in zip(many, alone, strict=True):  # now() moves between statements
        assert all(abs(a.score - b.score) < 1e-6 for a, b in zip(together, one, strict=True))
    texts = {
        (a.user_key, a.scope, a.persona, a.model): [m.text for m in f]
        for a, f in zip(asked, many, strict=True)
    }
    first, *kept = texts[(users[1], "here", "rex", MODEL)]
    assert first == f"{users[1]} fact 0." and sorted(kept) == [
        f"{users[1]} keeps 0.",
        f"{users[1]} keeps 1.",
    ]
    assert all("keeps" not in t for t in texts[(users[1], "here", "mimi", MODEL)])
    assert texts[(users[0], None, None, wide_model)] == ["Wide."]
    assert texts[(users[5], None, None, MODEL)] == []
    assert texts[(users[0], None, None, "ollama:none")] == []

    found = await asyncio.gather(
        *(memory.recall(user, query, context=context(user), scope="here", persona="mimi")
          for user in users)
    )  # fmt: skip
    own = {
        "top_k": memory.top_k,
        "floor": memory.min_similarity,
        "recency_weight": memory.recency_weight,
        "half_life_days": memory.half_life_days,
    }
    expected = [
        await store.recall(user, base, MODEL, scope="here", persona="mimi", **own) for user in users
    ]
    assert [[m.text for m in f] for f in found] == [[m.text for m in f] for f in expected]
    assert [len(f) for f in found] == [0, own["top_k"], 0, own["top_k"], 0, 0]
