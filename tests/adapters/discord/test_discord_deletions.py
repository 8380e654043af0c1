"""Discord deletions and edits are honoured (issue 15): a message deleted by its author or a
moderator leaves the history with the reply to it; an edit replaces the stored text. Driven
through discord.py's own gateway parsing (dpytest's backend for the delete; the state's
`parse_message_update` with a MESSAGE_UPDATE payload for the edit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend, factories

from tests.adapters.discord.test_discord import Env, make_env
from tests.fakes.ollama import FakeOllama


@pytest.fixture
async def env(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[Env]:
    async for made in make_env(tmp_path, database_url, fake_ollama):
        yield made


async def history(env: Env) -> list[str]:
    conversation = await env.app.engine.conversation("discord", str(env.channel.id))
    return [t.content for t in await env.app.engine.history.recent(conversation.id)]


async def eventually(env: Env, wanted: list[str], wait: float = 10.0) -> list[str]:
    """The history once it is `wanted`, or as it is when `wait` seconds have passed."""
    deadline = asyncio.get_running_loop().time() + wait
    while (found := await history(env)) != wanted and asyncio.get_running_loop().time() < deadline:
        await env.app.engine.drain()
        await asyncio.sleep(0.05)
    return found


async def test_a_deleted_message_leaves_the_history(env: Env) -> None:
    env.ollama.queue_reply("Noted!")
    said = await dpytest.message(f"{env.mention} my PIN is 1234", env.channel, env.alice)
    env.ollama.queue_reply("Hi!")
    await dpytest.message(f"{env.mention} hello", env.channel, env.alice)
    assert await history(env) == ["my PIN is 1234", "Noted!", "hello", "Hi!"]
    backend.delete_message(said)  # the gateway's MESSAGE_DELETE → on_raw_message_delete
    await dpytest.run_all_events()  # the event handler runs as its own task
    assert await eventually(env, ["hello", "Hi!"]) == ["hello", "Hi!"]


async def test_an_edited_message_replaces_the_stored_text(env: Env) -> None:
    env.ollama.queue_reply("Coffee it is.")
    said = await dpytest.message(f"{env.mention} I like cofee", env.channel, env.alice)
    data = factories.dict_from_message(said)
    data["channel_id"] = str(env.channel.id)  # MESSAGE_UPDATE carries it (Discord API docs)
    data["content"] = f"{env.mention} I like coffee"
    backend.get_state().parse_message_update(data)  # MESSAGE_UPDATE → on_raw_message_edit
    await dpytest.run_all_events()
    wanted = ["I like coffee", "Coffee it is."]
    assert await eventually(env, wanted) == wanted
