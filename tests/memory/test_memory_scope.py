"""Memories stay where they were told (issue 15, points 8 and 12): recalled and listed only in
the place they were learned, unless the persona widens it; and a message deleted or edited on
the platform is deleted or replaced here, with what memory drew from it.

The real engine and Postgres; the chat model is the fake Ollama on loopback (its embeddings of
the same text are the same vector, so a fact said again is recalled at similarity 1)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bot.app import App, running_app
from bot.core.commands import CommandContext
from bot.core.engine import Incoming
from bot.memory.store import Exchange, NewFact, scope_of
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import collect, exchange, facts, last_notes

SECRET = "Has a secret crush on Bo."


def dm(text: str, message_id: str | None = None) -> Incoming:
    return Incoming("test", "dm-alice", "alice", "Alice", text, message_id=message_id)


def server(text: str, channel: str = "general") -> Incoming:
    return Incoming("test", channel, "alice", "Alice", text, guild="g1")


async def said(app: App, fake: FakeOllama, incoming: Incoming) -> str:
    """The notes before the new message that the persona got for `incoming`, where recalled
    memories go (its extraction finds nothing)."""
    fake.queue_reply("Mm-hm.")
    fake.queue_reply(facts())
    await collect(app, incoming)
    await app.engine.drain()
    return last_notes(fake)


@pytest.fixture
async def mapp(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, memory_enabled=True)
    async with running_app(settings) as app:
        yield app


def test_scopes() -> None:
    assert scope_of("console", "terminal", None) == "console"
    assert scope_of("discord", "123", None) == "discord:conv:123", "a DM is its own place"
    assert scope_of("discord", "456", "9") == scope_of("discord", "789", "9"), "one server"
    assert scope_of("matrix", "!a:hs", "hs") != scope_of("matrix", "!b:hs", "hs"), "per room"
    assert scope_of("matrix", "!a:hs|$root", "hs") == scope_of("matrix", "!a:hs", "hs"), "threads"


async def test_a_fact_from_a_dm_stays_in_the_dm(mapp: App, fake_ollama: FakeOllama) -> None:
    await exchange(mapp, fake_ollama, dm("I have a crush on Bo"), facts(SECRET))
    assert SECRET not in await said(mapp, fake_ollama, server(SECRET))
    assert SECRET not in await said(mapp, fake_ollama, server(SECRET, "other")), "any channel"
    assert SECRET in await said(mapp, fake_ollama, dm(SECRET)), "recalled where it was said"
    here = CommandContext("test", "general", "alice", "Alice", guild="g1")
    listed = await mapp.commands.run(here, "memories", [])
    assert SECRET not in listed.text and "1 more fact" in listed.text
    there = CommandContext("test", "dm-alice", "alice", "Alice")
    listed = await mapp.commands.run(there, "memories", [])
    assert SECRET in listed.text and "more fact" not in listed.text


async def test_a_fact_from_a_server_stays_in_that_server(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await exchange(mapp, fake_ollama, server("I play the oboe"), facts("Plays the oboe."))
    assert "Plays the oboe." in await said(mapp, fake_ollama, server("Plays the oboe.", "other"))
    assert "Plays the oboe." not in await said(mapp, fake_ollama, dm("Plays the oboe."))
    elsewhere = Incoming("test", "x", "alice", "Alice", "Plays the oboe.", guild="g2")
    assert "Plays the oboe." not in await said(mapp, fake_ollama, elsewhere)


async def test_a_persona_may_widen_the_scope_to_the_user(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "pal.yaml").write_text(
        "name: pal\ndisplay_name: Pal\ndescription: d\ngreeting: g\nmemory_scope: user\n"
    )
    settings = make_settings(
        tmp_path, database_url, fake_ollama.url, memory_enabled=True, personas_dir=personas
    )
    async with running_app(settings) as app:
        await exchange(app, fake_ollama, dm("I have a crush on Bo"), facts(SECRET))
        assert SECRET in await said(app, fake_ollama, server(SECRET))


# ------------------------------------------------------------------ 12: deletions and edits


async def lisbon_then_porto(app: App, fake: FakeOllama) -> int:
    """Alice lives in Lisbon (m1), then moved to Porto (m2), which replaced it; Lisbon's id."""
    await exchange(app, fake, dm("I live in Lisbon", "m1"), facts("Lives in Lisbon."))
    lisbon = int(await app.pool.fetchval("SELECT id FROM memories"))
    await exchange(app, fake, dm("I moved to Porto", "m2"), facts(("Lives in Porto.", [lisbon])))
    return lisbon


async def test_a_deleted_message_leaves_history_and_memory(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await lisbon_then_porto(mapp, fake_ollama)
    await exchange(mapp, fake_ollama, dm("I like tea", "m3"), facts("Likes tea."))
    await mapp.engine.message_deleted("test", "m2")
    conversation = await mapp.engine.conversation("test", "dm-alice")
    history = [t.content for t in await mapp.engine.history.recent(conversation.id)]
    assert "I moved to Porto" not in history and "I live in Lisbon" in history
    assert len(history) == 4, "the reply to it went too"
    rows = await mapp.pool.fetch("SELECT text, superseded_by FROM memories ORDER BY id")
    assert [(r["text"], r["superseded_by"]) for r in rows] == [
        ("Lives in Lisbon.", None),  # what the deleted fact had replaced holds again
        ("Likes tea.", None),
    ]
    await mapp.engine.message_deleted("test", "unknown-id")  # nothing to do: no error


async def pending(app: App, text: str, reply: str, message_id: str) -> None:
    """An exchange in Alice's DM whose extraction is queued and taken, as a reply leaves it."""
    assert app.memory is not None
    conversation = await app.engine.conversation("test", "dm-alice")
    row = await app.engine.history.append_exchange(
        conversation.id,
        author_id="alice",
        author_name="Alice",
        text=text,
        persona="mimi",
        reply=reply,
        message_id=message_id,
    )
    job = Exchange(
        "test:alice", "Alice", "mimi", "llama3.2:3b", "test", conversation.id,
        text, reply, "test:conv:dm-alice", row,
    )  # fmt: skip
    await app.memory.store.enqueue_held(job, 300)


async def test_a_deleted_message_stops_its_pending_extraction(mapp: App) -> None:
    await mapp.engine.message_deleted("test", "nothing")
    await pending(mapp, "my PIN is 1234", "Noted.", "m9")
    await mapp.engine.message_deleted("test", "m9")
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0
    assert await mapp.pool.fetchval("SELECT count(*) FROM messages") == 0


async def test_an_edited_message_replaces_the_stored_text(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await exchange(mapp, fake_ollama, dm("I like cofee", "m1"), json.dumps({"facts": []}))
    asked = len(fake_ollama.chat_requests())
    await mapp.engine.message_edited("test", "m1", "I like coffee")
    await mapp.engine.drain()
    conversation = await mapp.engine.conversation("test", "dm-alice")
    history = [t.content for t in await mapp.engine.history.recent(conversation.id)]
    assert history[0] == "I like coffee" and "I like cofee" not in history
    assert len(fake_ollama.chat_requests()) == asked, "nothing was drawn from it: nothing to redo"
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0


def extractions(fake: FakeOllama) -> list[str]:
    """What each memory extraction call was shown (its messages, the facts known among them)."""
    return [
        "\n".join(str(m["content"]) for m in b["messages"])
        for b in fake.chat_requests()
        if b.get("format")
    ]


async def current(app: App) -> list[tuple[str, str | None]]:
    rows = await app.pool.fetch(
        "SELECT text, scope FROM memories WHERE superseded_by IS NULL ORDER BY id"
    )
    return [(r["text"], r["scope"]) for r in rows]


async def test_an_edit_after_extraction_draws_the_facts_again_from_the_new_text(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await exchange(mapp, fake_ollama, dm("I live in Paris", "m1"), facts("Lives in Paris."))
    await exchange(mapp, fake_ollama, dm("I like tea", "m2"), facts("Likes tea."))
    fake_ollama.queue_reply(facts("Lives in Berlin."))  # the new text's extraction
    await mapp.engine.message_edited("test", "m1", "I live in Berlin")
    await mapp.engine.drain()
    place = "test:conv:dm-alice"
    assert await current(mapp) == [("Likes tea.", place), ("Lives in Berlin.", place)]
    shown = extractions(fake_ollama)[-1]
    assert "I live in Berlin" in shown and "Got it!" in shown, "the new text and its reply"
    assert "Paris" not in shown, "the old fact is gone before the new text is read"
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0
    assert "Lives in Berlin." in await said(mapp, fake_ollama, dm("Lives in Berlin."))


async def test_an_edit_undoes_what_the_old_text_replaced_before_reading_the_new(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    lisbon = await lisbon_then_porto(mapp, fake_ollama)
    fake_ollama.queue_reply(facts(("Lives in Faro.", [lisbon])))
    await mapp.engine.message_edited("test", "m2", "I moved to Faro")
    await mapp.engine.drain()
    assert "Lives in Lisbon." in extractions(fake_ollama)[-1], "current again when re-read"
    assert [text for text, _ in await current(mapp)] == ["Lives in Faro."]
    rows = await mapp.pool.fetch("SELECT text FROM memories ORDER BY id")
    assert [r["text"] for r in rows] == ["Lives in Lisbon.", "Lives in Faro."]


async def test_an_edit_of_a_message_still_waiting_is_read_once_as_it_is_now(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    """A pending extraction reads the new text; nothing is queued a second time."""
    await pending(mapp, "I live in Oslo", "Nice.", "m7")
    await mapp.engine.message_edited("test", "m7", "I live in Bergen")
    [(text,)] = await mapp.pool.fetch("SELECT message FROM memory_jobs")
    assert text == "I live in Bergen"


async def test_a_fact_said_twice_outlives_the_deletion_of_one_message(
    mapp: App, fake_ollama: FakeOllama
) -> None:
    await exchange(mapp, fake_ollama, dm("I have a cat", "m1"), facts("Has a cat."))
    await exchange(mapp, fake_ollama, dm("my cat, again", "m2"), facts("Has a cat."))
    await exchange(mapp, fake_ollama, server("I have a cat"), facts("Has a cat."))
    assert await mapp.pool.fetchval("SELECT count(*) FROM memories") == 2, "one per place"
    await mapp.engine.message_deleted("test", "m1")
    rows = await mapp.pool.fetch("SELECT scope FROM memories ORDER BY scope")
    assert [r["scope"] for r in rows] == ["test:conv:dm-alice", "test:guild:g1"]


async def test_an_exchange_is_queued_already_taken_by_the_process_that_answered_it(
    mapp: App,
) -> None:
    """`enqueue_held` writes the job and its lease in one statement: no other worker takes it
    (nor lists it as pending) until it is given back."""
    assert mapp.memory is not None
    store = mapp.memory.store
    job = Exchange(
        "test:alice", "Alice", "mimi", "llama3.2:3b", "test", None,
        "I like tea", "Noted.", "test:conv:dm-alice", None, "mimi",
    )  # fmt: skip
    held = await store.enqueue_held(job, 300.0)
    assert held.exchange == job and held.attempts == 0
    assert await store.claim(held.id, 300.0) is None
    assert await store.pending() == []
    await store.release([held.id])
    assert await store.pending() == [held.id]
    claimed = await store.claim(held.id, 300.0)
    assert claimed is not None and claimed.exchange == job


async def test_exchanges_queued_together_are_each_held_as_one_queued_alone(mapp: App) -> None:
    """`enqueue_held_many` (the jobs of replies answered at once): one job per exchange, in
    their order, each as `enqueue_held` writes it (taken for the lease, not pending), and
    a conversation that does not exist fails the statement (the caller then writes each
    alone, bot/core/together.py)."""
    assert mapp.memory is not None
    store = mapp.memory.store
    conversation = await mapp.pool.fetchval(
        "INSERT INTO conversations (platform, external_id) VALUES ('test', 'q') RETURNING id"
    )
    jobs = [
        Exchange(
            f"test:user{n}",
            f"User {n}",
            "mimi",
            "llama3.2:3b",
            "test",
            conversation if n % 2 else None,
            f"message {n}",
            f"reply {n}",
            "test:guild:g1" if n % 3 else None,
            n * 10 if n % 2 else None,
            "mimi" if n % 4 else None,
        )
        for n in range(7)
    ]
    held = await store.enqueue_held_many(jobs, 300.0)
    assert [h.exchange for h in held] == jobs
    assert [h.id for h in held] == sorted(h.id for h in held)
    assert all(h.attempts == 0 for h in held)
    assert await store.pending() == []
    for h in held:
        assert await store.claim(h.id, 300.0) is None, "held already"
    alone = await store.enqueue_held(jobs[1], 300.0)
    row = dict(await mapp.pool.fetchrow("SELECT * FROM memory_jobs WHERE id = $1", alone.id))
    together = dict(await mapp.pool.fetchrow("SELECT * FROM memory_jobs WHERE id = $1", held[1].id))
    for column in ("id", "created_at", "locked_until"):
        assert row.pop(column) is not None and together.pop(column) is not None
    assert row == together
    bad = Exchange("test:x", "X", "mimi", "llama3.2:3b", "test", 10**12, "m", "r", None, None, None)
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await store.enqueue_held_many([jobs[0], bad], 300.0)
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 8, "none of those"


async def test_facts_stored_with_finish_end_their_job_in_the_same_transaction(
    mapp: App,
) -> None:
    """`add(..., finish=True)` deletes the job with the facts it stores; a job already gone
    (forgotten meanwhile) stores nothing."""
    assert mapp.memory is not None
    store = mapp.memory.store
    job = Exchange(
        "test:alice", "Alice", "mimi", "llama3.2:3b", "test", None,
        "I like tea", "Noted.", "test:conv:dm-alice", None,
    )  # fmt: skip
    held = await store.enqueue_held(job, 300.0)
    fact = NewFact("Likes tea.", [0.1, 0.2, 0.3], ())
    ids = await store.add("test:alice", [fact], model="m", persona="mimi", job_id=held.id,
                          finish=True)  # fmt: skip
    assert len(ids) == 1
    assert await mapp.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0
    again = NewFact("Likes green tea.", [0.1, 0.2, 0.3], ())
    assert await store.add("test:alice", [again], model="m", persona="mimi", job_id=held.id,
                           finish=True) == []  # fmt: skip
    assert [r.text for r in await store.all_rows("test:alice")] == ["Likes tea."]
