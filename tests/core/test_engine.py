"""The reply pipeline end to end: real Postgres, the fake Ollama over HTTP, the real client."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

from bot.app import App, running_app
from bot.brains.ollama_brain import OllamaBrain
from bot.config import Settings
from bot.core.engine import Delta, Done, Event, Failed, Incoming, Notice
from bot.core.prompts import user_seed
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama


def say(text: str, *, user: str = "alice", conversation: str = "c1") -> Incoming:
    return Incoming("test", conversation, user, user.title(), text)


async def collect(app: App, incoming: Incoming) -> list[Event]:
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        return [event async for event in events]


async def test_reply_streams_and_is_stored(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.token_delay = 0.02  # a model's tokens come apart; ones that arrive together are one
    fake_ollama.queue_reply("Hello there, friend!")
    events = await collect(app, say("hi"))
    deltas = [e.text for e in events if isinstance(e, Delta)]
    assert len(deltas) > 1, "the reply should arrive in pieces"
    assert "".join(deltas) == "Hello there, friend!"
    done = events[-1]
    assert isinstance(done, Done) and done.text == "Hello there, friend!"
    assert "Ollama" in done.answered_by
    conversation = await app.engine.conversation("test", "c1")
    turns = await app.engine.history.recent(conversation.id)
    assert [(t.role, t.content) for t in turns] == [
        ("user", "hi"),
        ("assistant", "Hello there, friend!"),
    ]


async def test_request_carries_persona_options_seed_and_history(
    app: App, fake_ollama: FakeOllama
) -> None:
    fake_ollama.queue_reply("first answer")
    await collect(app, say("first question"))
    fake_ollama.queue_reply("second answer")
    await collect(app, say("second question"))
    body = fake_ollama.chat_requests()[-1]
    persona = app.engine.persona_named(None)
    assert body["model"] == persona.model
    assert body["options"]["temperature"] == persona.temperature
    assert body["options"]["seed"] == user_seed("test", "alice")
    assert body["options"]["num_predict"] == persona.max_reply_tokens
    contents = [m["content"] for m in body["messages"]]
    assert body["messages"][0]["role"] == "system"
    assert contents[1:] == ["first question", "first answer", "second question"]


async def test_every_call_is_recorded(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.queue_reply("counted")
    await collect(app, say("count me"))
    await app.engine.drain()
    row = await app.pool.fetchrow("SELECT * FROM model_calls")
    assert row["ok"] is True and row["backend"].startswith("ollama:")
    assert row["completion_tokens"] and row["prompt_tokens"]
    assert row["total_ms"] > 0 and row["user_key"] == "test:alice"
    assert row["prompt"] is None, "prompts are kept only when LOG_PROMPTS is on"


async def test_two_conversations_stream_at_the_same_time(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.token_delay = 0.05
    fake_ollama.responder = lambda body: "one two three four five six seven eight"
    started = time.perf_counter()
    a, b = await asyncio.gather(
        collect(app, say("hi", conversation="x")), collect(app, say("hi", conversation="y"))
    )
    elapsed = time.perf_counter() - started
    assert isinstance(a[-1], Done) and isinstance(b[-1], Done)
    assert fake_ollama.max_active == 2
    single = 8 * 0.05
    assert elapsed < 2 * single, f"conversations waited on each other ({elapsed:.2f}s)"


async def test_one_conversation_answers_in_order(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.token_delay = 0.01
    fake_ollama.responder = lambda body: f"re: {body['messages'][-1]['content']}"
    results = await asyncio.gather(*(collect(app, say(f"m{i}")) for i in range(4)))
    assert fake_ollama.max_active == 1
    conversation = await app.engine.conversation("test", "c1")
    turns = await app.engine.history.recent(conversation.id)
    users = [t.content for t in turns if t.role == "user"]
    assert users == ["m0", "m1", "m2", "m3"]
    assert all(isinstance(r[-1], Done) for r in results)
    assert app.engine.live_conversations == 0


async def test_model_down_gives_a_plain_sentence(tmp_path: Path, database_url: str) -> None:
    settings = make_settings(tmp_path, database_url, dead_url())
    async with running_app(settings) as app:
        events = await collect(app, say("anyone there?"))
        await app.engine.drain()
        failed = events[-1]
        assert isinstance(failed, Failed)
        assert "model" in failed.text and "127.0.0.1" not in failed.text
        assert "Error" not in failed.text and "Traceback" not in failed.text
        row = await app.pool.fetchrow("SELECT ok, error FROM model_calls")
        assert row["ok"] is False and "nothing is listening" in row["error"]
        conversation = await app.engine.conversation("test", "c1")
        assert await app.engine.history.recent(conversation.id) == []


async def test_model_missing_and_http_errors_are_plain(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.fail_next(status=500, error="CUDA error: out of memory at /secret/path")
    events = await collect(app, say("hello"))
    assert isinstance(events[-1], Failed)
    assert "CUDA" not in events[-1].text and "/secret" not in events[-1].text
    fake_ollama.models = []
    events = await collect(app, say("hello again"))
    assert isinstance(events[-1], Failed)


async def test_stream_cut_off_mid_reply(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.queue_reply("this reply will be cut off before it ends properly")
    fake_ollama.break_stream_after(3)
    events = await collect(app, say("talk to me"))
    assert any(isinstance(e, Delta) for e in events)
    assert isinstance(events[-1], Failed) and "cut off" in events[-1].text
    conversation = await app.engine.conversation("test", "c1")
    assert await app.engine.history.recent(conversation.id) == []


async def test_falls_back_to_the_next_backend_with_a_notice(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    settings: Settings = make_settings(tmp_path, database_url, fake_ollama.url)
    brains = [OllamaBrain(dead_url()), OllamaBrain(fake_ollama.url)]
    async with running_app(settings, brains=list(brains)) as app:
        fake_ollama.queue_reply("the second one answered")
        events = await collect(app, say("hi"))
        notices = [e for e in events if isinstance(e, Notice)]
        assert len(notices) == 1 and "nothing is listening" in notices[0].text
        assert isinstance(events[-1], Done) and events[-1].text == "the second one answered"


async def test_slow_model_times_out_with_plain_words(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, ollama_read_timeout=0.3)
    async with running_app(settings) as app:
        fake_ollama.hang = True
        events = await collect(app, say("are you awake?"))
        assert isinstance(events[-1], Failed)
        fake_ollama.hang = False


async def test_unaddressed_and_empty_messages_get_nothing(app: App) -> None:
    assert await collect(app, Incoming("test", "c", "u", "U", "hi", addressed=False)) == []
    assert await collect(app, say("   ")) == []
