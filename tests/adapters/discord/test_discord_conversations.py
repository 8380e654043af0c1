"""Discord conversations as a community sees them (issue 17): reply context, threads that fork,
forwards, triggers read like a person reads, bare mentions, bot-to-bot loops, no writes per
message. dpytest plays Discord; the engine, Postgres and the fake Ollama are real."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import discord.ext.test as dpytest
import pytest
from pydantic import ValidationError

from tests.adapters.discord.test_discord import Env, make_env
from tests.conftest import make_settings
from tests.discord_helpers import (
    FakeInteraction,
    FakeUser,
    make_bot_member,
    make_thread,
    reply_to,
)
from tests.fakes.ollama import FakeOllama

ADMIN = 777


@pytest.fixture
async def env(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[Env]:
    async for made in make_env(tmp_path, database_url, fake_ollama, discord_admin_users=[ADMIN]):
        yield made


def last_prompt(env: Env) -> str:
    return str(env.ollama.chat_requests()[-1]["messages"][-1]["content"])


async def test_a_reply_brings_the_replied_message_and_its_chain(env: Env) -> None:
    first = await dpytest.message("cats are basically liquid", env.channel, env.alice)
    second = await reply_to(first, "no, pineapples belong on pizza", env.bob, env.channel)
    assert env.bot_messages() == [], "nobody called the bot yet"
    await reply_to(second, f"{env.mention} what do you think of this?", env.alice, env.channel)
    [answer] = env.bot_messages()
    prompt = last_prompt(env)
    assert answer.content.endswith("what do you think of this?")
    cats = prompt.index(f"{env.alice.display_name}: cats are basically liquid")
    pizza = prompt.index(f"{env.bob.display_name}: no, pineapples belong on pizza")
    assert cats < pizza < prompt.index("what do you think of this?"), prompt


async def test_reply_chain_is_cut_at_the_setting(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(tmp_path, database_url, fake_ollama, discord_reply_chain=1):
        first = await dpytest.message("the oldest word is aardvark", env.channel, env.alice)
        second = await reply_to(first, "the middle word is badger", env.bob, env.channel)
        await reply_to(second, f"{env.mention} thoughts?", env.alice, env.channel)
        prompt = last_prompt(env)
        assert "badger" in prompt and "aardvark" not in prompt


async def test_a_forward_is_not_a_reply(env: Env) -> None:
    await dpytest.message(f"{env.mention} hello", env.channel, env.alice)
    [bot_reply] = env.bot_messages()
    target = await env.channel.fetch_message(bot_reply.id)
    await reply_to(target, "", env.bob, env.channel, forward=True)
    await reply_to(target, "look what it said", env.bob, env.channel, forward=True)
    assert env.bot_messages() == [], "forwarding the bot's message does not call it"


async def test_names_in_emoji_links_code_and_mentions_do_not_call_the_persona(env: Env) -> None:
    for text in (
        "<:mimi:1234567890123> lol",
        "<a:mimi:1234567890123>",
        "look at https://example.com/mimi/pics",
        "the file `mimi.yaml` is broken",
        "```\nmimi = load()\n```",
    ):
        await dpytest.message(text, env.channel, env.alice)
    assert env.bot_messages() == []
    await dpytest.message("thanks Mimi!", env.channel, env.bob)
    assert len(env.bot_messages()) == 1, "her name as a word still calls her"


async def test_a_bare_mention_gets_the_greeting(env: Env) -> None:
    await dpytest.message(env.mention, env.channel, env.alice)
    [answer] = env.bot_messages()
    persona = env.app.engine.persona_named(None)
    assert answer.content == persona.greeting
    assert env.prompts() == [], "a greeting needs no model call"


async def test_two_bots_stop_after_a_few_turns(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(
        tmp_path, database_url, fake_ollama, discord_answer_bots=True, discord_bot_turns=2
    ):
        other = make_bot_member(env.channel.guild, "chattybot")
        for i in range(4):
            await dpytest.message(f"{env.mention} bot line {i}", env.channel, other)
        assert len(env.bot_messages()) == 2, "two turns, then silence"
        await dpytest.message("hey everyone", env.channel, env.alice)  # a person speaks
        env.bot_messages()
        await dpytest.message(f"{env.mention} bot line again", env.channel, other)
        assert len(env.bot_messages()) == 1


async def test_unaddressed_messages_and_typing_write_nothing(env: Env) -> None:
    async def next_xid() -> int:  # advances only when a transaction writes
        return int(await env.app.pool.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())"))

    before = await next_xid()
    for i in range(5):
        await dpytest.message(f"just chatting {i}", env.channel, env.alice)
    thread = make_thread(env.channel, 1573680000000000077)
    await dpytest.message("chatter in a thread", thread, env.bob)
    await env.adapter.on_typing(env.channel, env.alice, time.time())
    assert env.bot_messages() == []
    assert await next_xid() == before, "no transaction wrote anything"
    found = await env.app.engine.history.find("discord", str(env.channel.id))
    assert found is None, "not even a conversation row"


async def test_a_thread_forks_its_conversation(env: Env) -> None:
    engine = env.app.engine
    await dpytest.message(f"{env.mention} the password is swordfish", env.channel, env.alice)
    [bot_reply] = env.bot_messages()
    thread = make_thread(env.channel, bot_reply.id)
    await dpytest.message(f"{env.mention} what was the password?", thread, env.alice)
    env.bot_messages()
    assert "swordfish" in str(env.ollama.chat_requests()[-1]["messages"]), "continues"

    admin = FakeInteraction(FakeUser(ADMIN, "admin"), thread)
    await env.adapter.tree.get_command("reset").callback(admin)  # type: ignore[union-attr]
    persona_group = env.adapter.tree.get_command("persona")
    set_command = persona_group.get_command("set")  # type: ignore[union-attr]
    await set_command.callback(FakeInteraction(FakeUser(ADMIN, "admin"), thread), "sage")

    channel = await engine.conversation("discord", str(env.channel.id))
    turns = await engine.history.recent(channel.id)
    assert turns[0].content == "the password is swordfish", "the channel keeps its history"
    assert channel.persona in (None, "mimi"), "the channel keeps its persona"
    assert (await engine.persona_for("discord", str(thread.id))).name == "sage"
    await dpytest.message(f"{env.mention} and now?", thread, env.alice)
    assert "swordfish" not in str(env.ollama.chat_requests()[-1]["messages"])


def test_edit_interval_is_at_least_a_second(tmp_path: Path, database_url: str) -> None:
    with pytest.raises(ValidationError):
        make_settings(tmp_path, database_url, "http://127.0.0.1:9", discord_edit_interval=0.5)
    settings = make_settings(tmp_path, database_url, "http://127.0.0.1:9")
    assert settings.discord_edit_interval >= 1.0


async def test_a_bare_mention_in_reply_answers_the_replied_message(env: Env) -> None:
    question = await dpytest.message("is a hot dog a sandwich?", env.channel, env.bob)
    await reply_to(question, env.mention, env.alice, env.channel)
    [answer] = env.bot_messages()
    assert "hot dog" in last_prompt(env) and env.bob.display_name in last_prompt(env)
    assert answer.content != env.app.engine.persona_named(None).greeting
