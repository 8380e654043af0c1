"""A cast of two personas in one Discord channel, through dpytest, the real engine and Postgres,
and the fake Ollama: naming one gets that one, an unaddressed message gets at most one, and
persona-to-persona turns stop at the budget."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import discord.ext.test as dpytest

from bot.adapters.discord.policy import DiscordPolicy
from bot.config import REPO_ROOT
from bot.core.commands import CommandContext
from tests.adapters.discord.test_discord import Env, make_env
from tests.discord_helpers import FakeInteraction, FakeUser, make_thread, reply_to
from tests.fakes.ollama import FakeOllama


def personas_dir(tmp_path: Path, extra: str = "") -> Path:
    """Copies of the shipped mimi and sage, with `extra` YAML lines appended to each."""
    directory = tmp_path / "personas"
    directory.mkdir()
    for name in ("mimi", "sage"):
        text = (REPO_ROOT / "personas" / f"{name}.yaml").read_text()
        (directory / f"{name}.yaml").write_text(text.rstrip("\n") + "\n" + extra)
    return directory


async def cast_env(
    tmp_path: Path, database_url: str, ollama: FakeOllama, extra: str = ""
) -> AsyncIterator[Env]:
    async for env in make_env(
        tmp_path, database_url, ollama, personas_dir=personas_dir(tmp_path, extra)
    ):
        admin = CommandContext("discord", str(env.channel.id), "1", "admin", is_admin=True)
        await env.app.commands.run(admin, "persona", ["mimi"])
        await env.app.commands.run(admin, "persona", ["cast", "add", "sage"])
        yield env


async def test_naming_one_gets_that_one(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in cast_env(tmp_path, database_url, fake_ollama):
        await dpytest.message("Sage, what is two and two?", env.channel, env.alice)
        [reply] = env.bot_messages()
        assert reply.content == "**Sage**: re: Sage, what is two and two?"
        system = env.ollama.chat_requests()[-1]["messages"][0]["content"]
        assert "Sage" in system and "Mimi" not in system
        sage_reply = await env.channel.fetch_message(reply.id)
        await reply_to(sage_reply, "and three and three?", env.bob, env.channel)
        [again] = env.bot_messages()
        assert again.content.startswith("**Sage**: "), "a reply to Sage's message goes to Sage"


async def test_unaddressed_message_gets_at_most_one(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in cast_env(tmp_path, database_url, fake_ollama, "max_persona_turns: 0\n"):
        key = str(env.channel.id)
        for persona in await env.app.engine.cast_for("discord", key):
            env.adapter.attention.addressed(key, persona)  # both are following the talk
        env.dice.value = 0.0  # and either would follow
        await dpytest.message("lovely weather today", env.channel, env.alice)
        replies = env.bot_messages()
        assert len(replies) == 1
        assert replies[0].content.startswith(("**Mimi**: ", "**Sage**: "))
        env.dice.value = 1.0
        await dpytest.message("nobody listens to this", env.channel, env.alice)
        assert env.bot_messages() == []


async def test_persona_turns_stop_at_the_budget(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in cast_env(tmp_path, database_url, fake_ollama):
        env.ollama.queue_reply("Sage, what do you think?")
        env.ollama.queue_reply("Mimi, I think it is fine.")
        env.ollama.queue_reply("Sage, are you sure?")  # turn 3: over the budget of 2
        await dpytest.message("Mimi, hello!", env.channel, env.alice)
        replies = [m.content for m in env.bot_messages()]
        assert replies == [
            "**Mimi**: Sage, what do you think?",
            "**Sage**: Mimi, I think it is fine.",
        ]
        assert len(env.ollama.chat_requests()) == 2
        assert env.prompts()[-1] == "Mimi: Sage, what do you think?", "Sage hears Mimi by name"
        conversation = await env.app.engine.conversation("discord", str(env.channel.id))
        turns = await env.app.engine.history.recent(conversation.id)
        assert [(t.role, t.author_name) for t in turns] == [
            ("user", env.alice.display_name),
            ("assistant", "mimi"),
            ("assistant", "sage"),
        ]


async def test_the_budget_counts_every_branch_after_one_message(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in cast_env(tmp_path, database_url, fake_ollama):
        env.ollama.queue_reply("Sage, fish tonight?")  # Mimi answers Alice: 1
        env.ollama.queue_reply("Mimi, yes, fish.")  # Sage answers Mimi: 2, the budget
        env.ollama.queue_reply("Mimi, hello to you too, Alice.")  # Sage answers Alice herself
        env.ollama.queue_reply("Sage, again!")  # Mimi would answer that: over the budget
        await dpytest.message("Mimi and Sage, hello!", env.channel, env.alice)
        replies = [m.content for m in env.bot_messages()]
        assert replies == [
            "**Mimi**: Sage, fish tonight?",
            "**Sage**: Mimi, yes, fish.",
            "**Sage**: Mimi, hello to you too, Alice.",
        ]
        assert len(env.ollama.chat_requests()) == 3
        conversation = await env.app.engine.conversation("discord", str(env.channel.id))
        turns = await env.app.engine.history.recent(conversation.id)
        assert [t.author_name for t in turns] == [env.alice.display_name, "mimi", "sage", "sage"]


async def test_a_thread_plays_its_channels_cast(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in cast_env(tmp_path, database_url, fake_ollama, "max_persona_turns: 0\n"):
        thread = make_thread(env.channel, 1573680000000000123)
        env.ollama.queue_reply("Hello from the thread.")
        await dpytest.message("Sage, are you here too?", thread, env.alice)
        [reply] = env.bot_messages()
        assert reply.content == "**Sage**: Hello from the thread.", "the channel's cast plays"
        own = await env.app.engine.cast_for("discord", str(thread.id))
        assert [p.name for p in own] == ["mimi", "sage"], "the thread keeps a copy of the cast"
        admin = CommandContext("discord", str(thread.id), "1", "admin", is_admin=True)
        await env.app.commands.run(admin, "persona", ["cast", "remove", "sage"])
        channel_cast = await env.app.engine.cast_for("discord", str(env.channel.id))
        assert [p.name for p in channel_cast] == ["mimi", "sage"], "the channel keeps its own"


async def test_slash_persona_cast_maps_onto_the_command_layer(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(tmp_path, database_url, fake_ollama):
        cast = env.adapter.tree.get_command("persona").get_command("cast").callback  # type: ignore[union-attr]
        key = str(env.channel.id)
        admin = FakeUser(1, "admin")
        env.adapter.policy = DiscordPolicy(admin_users=frozenset({1}))
        it = FakeInteraction(admin, env.channel)
        await cast(it, "add", "sage")
        [(text, ephemeral)] = it.answers()
        assert "joins the cast" in text and not ephemeral
        assert "sage" in [p.name for p in await env.app.engine.cast_for("discord", key)]
        refused = FakeInteraction(FakeUser(2, "member"), env.channel)
        await cast(refused, "remove", "sage")
        assert refused.answers() == [("Only an admin can use /persona.", True)]
        listing = FakeInteraction(FakeUser(2, "member"), env.channel)
        await cast(listing, "list", None)
        [(text, ephemeral)] = listing.answers()
        assert ephemeral and "Sage" in text
