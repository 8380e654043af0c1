"""The prompt's layout for a model's prompt cache, end to end: real Postgres, memory on, the fake
Ollama over HTTP through the real client. Over a long conversation every prompt must begin with
the previous prompt's messages (all but the new message and its notes), except on the turns
where the history window steps forward, and those must be few."""

from __future__ import annotations

import contextlib
import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from bot.app import App, running_app
from bot.config import REPO_ROOT
from bot.core.engine import Done, Incoming
from bot.core.ports import scope_of
from bot.memory.store import NewFact
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama

TURNS = 24


def small_window_personas(tmp_path: Path) -> Path:
    data = yaml.safe_load((REPO_ROOT / "personas" / "mimi.yaml").read_text(encoding="utf-8"))
    data.update(context_window=1024, max_reply_tokens=200, include_time=False)
    folder = tmp_path / "personas"
    folder.mkdir()
    (folder / "mimi.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return folder


def responder(body: dict[str, Any]) -> str:
    if body.get("format"):
        return json.dumps({"facts": []})
    return "That sounds lovely! Tell me a little more about how it went, nya~ " * 2


async def reply(app: App, text: str) -> None:
    incoming = Incoming("test", "long", "alice", "Alice", text)
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        last = [e async for e in events][-1]
    assert isinstance(last, Done)
    await app.engine.drain()


async def test_each_prompt_begins_with_the_last_one_but_for_a_few_steps(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    settings = make_settings(
        tmp_path,
        database_url,
        fake_ollama.url,
        memory_enabled=True,
        memory_min_similarity=-1.0,  # every turn recalls (a changing order of) facts
        personas_dir=small_window_personas(tmp_path),
    )
    fake_ollama.responder = responder
    async with running_app(settings) as app:
        assert app.memory is not None
        facts = ["Lives in Lisbon.", "Has a cat called Miso.", "Plays the guitar."]
        vectors = [fake_ollama.embedding_for(f) for f in facts]
        await app.memory.store.add(
            "test:alice",
            [NewFact(f, v) for f, v in zip(facts, vectors, strict=True)],
            model="ollama:nomic-embed-text",
            persona="mimi",
            scope=scope_of("test", "long", None),  # learned in this conversation
        )
        for n in range(TURNS):
            await reply(app, f"Turn {n}: today I painted a little more of my pixel-art castle.")
        prompts = [b["messages"] for b in fake_ollama.chat_requests() if not b.get("format")]
        window_from = await app.pool.fetchval("SELECT history_from FROM conversations")
    assert len(prompts) == TURNS
    system = prompts[0][0]
    assert all(p[0] == system for p in prompts), "the system prompt never changes"
    assert "Lives in Lisbon" not in system["content"]
    for p in prompts:
        assert "> Lives in Lisbon." in p[-1]["content"], "memories sit next to the new message"
        assert p[-1]["content"].endswith("my pixel-art castle.")
    kept = sum(prev[1:-1] == cur[1 : len(prev) - 1] for prev, cur in itertools.pairwise(prompts))
    steps = TURNS - 1 - kept
    assert 1 <= steps <= 3, f"the window moved {steps} times in {TURNS} turns"
    assert window_from is not None, "the window's start is kept in the database"
    # old turns come back without their notes: only the newest message carries any
    assert all("[Notes for" not in m["content"] for m in prompts[-1][1:-1])
