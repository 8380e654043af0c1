"""Memory extraction waits for a moment without replies, and reads a burst of one user's
messages to one persona in one call (bot/memory/learning.py): fewer model calls, none made
while people wait for replies, and never two users' words in one call. Real engine, Postgres
and the fake Ollama."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from bot.app import App
from bot.core.engine import Done, Incoming
from bot.memory.extract import BATCH_EXTRACTION_SCHEMA, EXTRACTION_SCHEMA
from tests.fakes.ollama import FakeOllama
from tests.memory.test_memory import collect, extraction_requests


def dm(text: str, message_id: str, user: str = "alice") -> Incoming:
    return Incoming("test", f"dm-{user}", user, user.title(), text, message_id=message_id)


def sourced(*items: tuple[str, int]) -> str:
    return json.dumps({"facts": [{"fact": f, "replaces": [], "message": n} for f, n in items]})


async def said(app: App, fake: FakeOllama, incoming: Incoming) -> None:
    fake.queue_reply("Noted!")
    events = await collect(app, incoming)
    assert isinstance(events[-1], Done)


async def queued(app: App, jobs: int) -> None:
    """Until `jobs` exchanges are queued (each reply queues its own in the background)."""
    for _ in range(200):
        if await app.pool.fetchval("SELECT count(*) FROM memory_jobs") == jobs:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{jobs} jobs were not queued")


async def rows(app: App, sql: str) -> list[Any]:
    return [tuple(r) for r in await app.pool.fetch(sql)]


async def test_a_burst_of_messages_is_read_in_one_call_and_each_fact_keeps_its_message(
    held_app: App, fake_ollama: FakeOllama
) -> None:
    for n, text in enumerate(["I live in Lisbon", "what's up?", "I have a cat called Miso"], 1):
        await said(held_app, fake_ollama, dm(text, f"m{n}"))
    await queued(held_app, 3)  # safe in Postgres while they wait
    assert extraction_requests(fake_ollama) == []  # waiting for a quiet moment
    fake_ollama.queue_reply(sourced(("Lives in Lisbon.", 1), ("Has a cat called Miso.", 3)))
    await held_app.engine.drain()

    [body] = extraction_requests(fake_ollama)
    assert body["format"] == BATCH_EXTRACTION_SCHEMA
    prompt = body["messages"][-1]["content"]
    assert "Message 1:\nI live in Lisbon" in prompt and "Message 3:\nI have a cat" in prompt
    assert "messages" in body["messages"][0]["content"]  # the batch's instructions
    assert await held_app.pool.fetchval("SELECT count(*) FROM memory_jobs") == 0
    assert await rows(held_app, "SELECT count(*) FROM model_calls WHERE purpose = 'memory'") == [
        (1,)
    ]

    await held_app.engine.message_deleted("test", "m1")  # the Lisbon fact goes with its message
    assert await rows(held_app, "SELECT text FROM memories") == [("Has a cat called Miso.",)]


async def test_one_message_alone_is_read_as_before(held_app: App, fake_ollama: FakeOllama) -> None:
    await said(held_app, fake_ollama, dm("I play the cello", "m1"))
    fake_ollama.queue_reply(json.dumps({"facts": [{"fact": "Plays the cello.", "replaces": []}]}))
    await held_app.engine.drain()
    [body] = extraction_requests(fake_ollama)
    assert body["format"] == EXTRACTION_SCHEMA
    assert await rows(held_app, "SELECT text FROM memories") == [("Plays the cello.",)]


async def test_two_users_are_never_read_in_one_call(held_app: App, fake_ollama: FakeOllama) -> None:
    await said(held_app, fake_ollama, dm("I live in Lisbon", "a1"))
    await said(held_app, fake_ollama, dm("I live in Oslo", "b1", user="bob"))
    await said(held_app, fake_ollama, dm("I like tea", "a2"))
    await queued(held_app, 3)

    def answer(body: dict[str, Any]) -> str:
        prompt = body["messages"][-1]["content"]
        if "Oslo" in prompt:
            return sourced(("Lives in Oslo.", 1))
        return sourced(("Lives in Lisbon.", 1), ("Likes tea.", 2))

    fake_ollama.responder = answer
    await held_app.engine.drain()
    bodies = extraction_requests(fake_ollama)
    assert len(bodies) == 2
    for body in bodies:
        prompt = body["messages"][-1]["content"]
        assert ("Oslo" in prompt) != ("Lisbon" in prompt or "tea" in prompt)
    assert await rows(held_app, "SELECT user_key, text FROM memories ORDER BY text") == [
        ("test:alice", "Likes tea."),
        ("test:alice", "Lives in Lisbon."),
        ("test:bob", "Lives in Oslo."),
    ]


async def test_a_message_edited_or_deleted_while_waiting_is_read_as_it_is_now(
    held_app: App, fake_ollama: FakeOllama
) -> None:
    await said(held_app, fake_ollama, dm("I live in Lisbn", "m1"))
    await said(held_app, fake_ollama, dm("my PIN is 1234", "m2"))
    await queued(held_app, 2)
    await held_app.engine.message_edited("test", "m1", "I live in Lisbon")
    await held_app.engine.message_deleted("test", "m2")
    fake_ollama.queue_reply(json.dumps({"facts": [{"fact": "Lives in Lisbon.", "replaces": []}]}))
    await held_app.engine.drain()
    [body] = extraction_requests(fake_ollama)
    prompt = body["messages"][-1]["content"]
    assert "I live in Lisbon" in prompt and "Lisbn" not in prompt and "PIN" not in prompt
    assert body["format"] == EXTRACTION_SCHEMA  # one message left


async def test_no_extraction_runs_while_a_reply_is_in_flight(
    held_app: App, fake_ollama: FakeOllama
) -> None:
    """Extraction waits for the replies, not the other way round: its model call starts only
    once nobody is waiting for an answer (here: after a settling time of 0.2 s)."""
    held_app.engine.quiet.settle = 0.2
    await said(held_app, fake_ollama, dm("I live in Lisbon", "m1"))
    fake_ollama.first_token_delay = 0.6
    fake_ollama.queue_reply("Hello Bob, a slow answer.")
    slow = asyncio.create_task(collect(held_app, dm("hi", "b1", user="bob")))
    await asyncio.sleep(0.4)  # Alice's settling time has passed, but Bob is waiting
    assert extraction_requests(fake_ollama) == []
    fake_ollama.first_token_delay = 0.0
    fake_ollama.responder = lambda body: json.dumps({"facts": []})
    await slow

    def alices() -> list[dict[str, Any]]:
        bodies = extraction_requests(fake_ollama)
        return [b for b in bodies if "I live in Lisbon" in b["messages"][-1]["content"]]

    for _ in range(100):  # a settling time after Bob's reply, without a drain
        if alices():
            break
        await asyncio.sleep(0.02)
    assert len(alices()) == 1
    await held_app.engine.drain()
