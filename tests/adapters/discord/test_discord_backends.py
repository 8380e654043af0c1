"""Discord meets the backend pool: typing pre-wakes a sleeping GPU, and the user is told
("waking up…") in the reply's own message, which the reply then replaces."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import discord.ext.test as dpytest
import pytest

from tests.adapters.discord.test_discord import Env, make_env
from tests.brains.test_backends import fly_backend
from tests.fakes.fly import FakeFly, MachineOllama
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama


@pytest.fixture
async def machine() -> AsyncIterator[tuple[FakeFly, MachineOllama]]:
    async with MachineOllama() as ollama, FakeFly(ollama=ollama, boot_seconds=0.2) as fly:
        yield fly, ollama


@pytest.fixture
async def env(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> AsyncIterator[Env]:
    fly, ollama = machine
    overrides = {
        "backends": [fly_backend(fly, ollama)],
        "fly_api_token": "fly-test-token-123",
        "backend_wake_poll": 0.02,
        "backend_wake_timeout": 5.0,
    }
    unused = FakeOllama()
    unused.url = dead_url()  # the pool replaces OLLAMA_HOST; nothing listens here
    async for made in make_env(tmp_path, database_url, unused, **overrides):
        made.ollama = ollama
        yield made


async def test_typing_prewakes_only_where_the_persona_would_answer(
    env: Env, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, _ = machine
    now = datetime.now(UTC)
    await env.adapter.on_typing(env.channel, env.alice, now)
    assert fly.count("POST", "start") == 0, "nobody talked to the persona here"
    key = await env.adapter.conversation_for_channel(env.channel)
    persona = await env.app.engine.persona_for("discord", key)
    env.adapter.attention.addressed(key, persona)  # the persona was just talked to here
    await env.adapter.on_typing(env.channel, env.alice, now)
    async with asyncio.timeout(5):
        while True:
            if fly.count("POST", "start") > 0:
                break
            await asyncio.sleep(0.01)
    assert env.app.backends is not None
    async with asyncio.timeout(5):
        while True:
            if env.app.backends.backends[0].state == "up":
                break
            await asyncio.sleep(0.01)
    await env.adapter.on_typing(env.channel, env.alice, now)
    assert fly.count("POST", "start") == 1, "an awake machine is not woken again"


async def test_wake_notice_shows_then_the_reply_replaces_it(env: Env) -> None:
    env.ollama.queue_reply("Good morning!")
    await dpytest.message(f"{env.mention} are you up?", member=env.alice)
    await asyncio.sleep(0)
    [reply] = env.bot_messages()
    assert reply.content == "Good morning!"
    first = env.sent.payloads[0]["content"]
    assert first.startswith("*Waking up") and first.endswith("*")
    for payload in env.sent.payloads + env.sent.edits:
        assert payload["allowed_mentions"]["parse"] == []
    assert env.sent.edits[-1]["content"] == "Good morning!"
