"""The Discord adapter through dpytest (Discord's side faked), the real engine, real Postgres
and the fake Ollama over HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend

from bot.adapters.discord.adapter import DiscordAdapter
from bot.adapters.discord.policy import DiscordPolicy
from bot.app import App, running_app
from bot.core.attention import Attention
from tests.conftest import make_settings
from tests.discord_helpers import Sent, make_bot_member, make_thread, record, reply_to
from tests.fakes.ollama import FakeOllama


class Dice:
    def __init__(self) -> None:
        self.value = 1.0  # never follows unless a test lowers it

    def __call__(self) -> float:
        return self.value


@dataclass(frozen=True)
class Reply:
    id: int
    channel_id: int
    content: str


@dataclass
class Env:
    app: App
    adapter: DiscordAdapter
    client: discord.Client
    sent: Sent
    ollama: FakeOllama
    channel: Any
    alice: discord.Member
    bob: discord.Member
    dice: Dice

    @property
    def mention(self) -> str:
        assert self.client.user is not None
        return f"<@{self.client.user.id}>"

    def bot_messages(self) -> list[Reply]:
        """What the bot sent since last asked, as it reads now (after edits and deletions)."""
        out = []
        while not dpytest.sent_queue.empty():
            message = dpytest.sent_queue.get_nowait()
            stored = backend._cur_config.messages.get(message.channel.id, [])
            now = next((data for data in stored if data["id"] == message.id), None)
            if now is not None:
                out.append(Reply(message.id, message.channel.id, now["content"]))
        return out

    def prompts(self) -> list[str]:
        """The last user message of each chat request the model got."""
        return [r["messages"][-1]["content"] for r in self.ollama.chat_requests()]


async def make_env(
    tmp_path: Path, database_url: str, ollama: FakeOllama, **overrides: object
) -> AsyncIterator[Env]:
    values: dict[str, object] = {
        "discord_token": "test-token",
        "discord_edit_interval": 1.0,
        "memory_enabled": False,
    }
    values.update(overrides)
    settings = make_settings(tmp_path, database_url, ollama.url, **values)
    async with running_app(settings) as app:
        client = discord.Client(intents=discord.Intents.all())
        await client._async_setup_hook()  # what login() does; dpytest never logs in
        dpytest.configure(client, members=["alice", "bob"])
        config = dpytest.get_config()
        dice = Dice()
        adapter = DiscordAdapter(app, client, attention=Attention(rng=dice))
        alice, bob = config.members
        env = Env(
            app, adapter, client, record(client), ollama, config.channels[0], alice, bob, dice
        )
        await dpytest.empty_queue()
        ollama.responder = lambda body: f"re: {body['messages'][-1]['content']}"
        try:
            yield env
        finally:
            await dpytest.empty_queue()


@pytest.fixture
async def env(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[Env]:
    async for made in make_env(tmp_path, database_url, fake_ollama):
        yield made


async def test_mention_gets_one_streamed_reply(env: Env) -> None:
    env.ollama.queue_reply("Hello Alice, nice to meet you!")
    await dpytest.message(f"{env.mention} hi there", env.channel, env.alice)
    replies = env.bot_messages()
    assert [m.content for m in replies] == ["Hello Alice, nice to meet you!"]
    assert env.prompts() == ["hi there"], "the bot's own mention is not shown to the model"
    assert env.sent.typing >= 1, "typing shows while the model thinks"
    conversation = await env.app.engine.conversation("discord", str(env.channel.id))
    turns = await env.app.engine.history.recent(conversation.id)
    assert [t.content for t in turns] == ["hi there", "Hello Alice, nice to meet you!"]


async def test_unaddressed_chatter_is_left_alone(env: Env) -> None:
    await dpytest.message("just talking among ourselves", env.channel, env.alice)
    assert env.bot_messages() == []
    assert env.prompts() == []


async def test_persona_name_in_the_text_is_enough(env: Env) -> None:
    persona = await env.app.engine.persona_for("discord", str(env.channel.id))
    await dpytest.message(f"what do you think, {persona.display_name}?", env.channel, env.bob)
    assert len(env.bot_messages()) == 1


async def test_reply_chain_continues_the_conversation(env: Env) -> None:
    await dpytest.message(f"{env.mention} remember the word pineapple", env.channel, env.alice)
    [bot_reply] = env.bot_messages()
    target = await env.channel.fetch_message(bot_reply.id)
    await reply_to(target, "what was the word?", env.alice, env.channel)
    [second] = env.bot_messages()
    assert second.content == "re: what was the word?"
    last = env.ollama.chat_requests()[-1]["messages"]
    assert any("pineapple" in m["content"] for m in last), "history came from our store"


async def test_following_after_being_addressed(env: Env) -> None:
    await dpytest.message(f"{env.mention} hello", env.channel, env.alice)
    env.bot_messages()
    env.dice.value = 0.1  # under the starting probability: the persona keeps following
    await dpytest.message("and another thing", env.channel, env.bob)
    [reply] = env.bot_messages()
    assert reply.content.startswith("re: ") and reply.content.endswith("and another thing")


async def test_dm_is_answered(env: Env) -> None:
    dm = await env.alice.create_dm()
    await dpytest.message("hello in private", dm, env.alice)
    replies = env.bot_messages()
    assert [m.content for m in replies] == ["re: hello in private"]
    assert replies[0].channel_id == dm.id


async def test_bots_are_ignored(env: Env) -> None:
    other_bot = make_bot_member(env.channel.guild, "otherbot")
    await dpytest.message(f"{env.mention} hello bot friend", env.channel, other_bot)
    assert env.bot_messages() == []
    assert env.prompts() == []


async def test_long_reply_is_split_with_code_fences_intact(env: Env) -> None:
    code = "\n".join(f"    total += item_{i}  # keep adding" for i in range(90))
    reply = "Here is the loop.\n\n```python\n" + code + "\n```\n\nHope that helps!"
    env.ollama.queue_reply(reply, chunks=reply.splitlines(keepends=True))
    await dpytest.message(f"{env.mention} show me code", env.channel, env.alice)
    messages = env.bot_messages()
    assert len(messages) >= 2
    for message in messages:
        assert len(message.content) <= 2000
        fences = [ln for ln in message.content.split("\n") if ln.startswith("```")]
        assert len(fences) % 2 == 0, "every message closes the code block it opens"
    lines = [ln for m in messages for ln in m.content.split("\n") if "item_" in ln]
    assert lines == code.split("\n")


async def test_no_mass_mention_can_be_produced(env: Env) -> None:
    role = env.channel.guild.roles[0]
    env.ollama.queue_reply(f"@everyone @here <@&{role.id}> <@{env.bob.id}> look!")
    await dpytest.message(f"{env.mention} ping @everyone for me", env.channel, env.alice)
    assert env.bot_messages()
    assert env.sent.payloads, "something was sent"
    for payload in env.sent.payloads + env.sent.edits:
        mentions = payload["allowed_mentions"]
        assert mentions["parse"] == [], payload
        assert not mentions.get("users") and not mentions.get("roles")
        assert not mentions.get("replied_user")


async def test_rate_limit_gets_an_in_character_notice(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(
        tmp_path, database_url, fake_ollama, discord_rate_burst=2, discord_rate_per_minute=1
    ):
        for i in range(3):
            await dpytest.message(f"{env.mention} message {i}", env.channel, env.alice)
        messages = [m.content for m in env.bot_messages()]
        persona = env.app.engine.persona_named(None)
        assert [m.endswith(f"message {i}") for i, m in enumerate(messages[:2])] == [True, True]
        assert persona.display_name in messages[2] and "try again" in messages[2]
        assert len(env.prompts()) == 2, "the refused message never reached the model"
        await dpytest.message(f"{env.mention} my turn", env.channel, env.bob)
        [other] = env.bot_messages()
        assert other.content.endswith("my turn"), "another user has a bucket of their own"


async def test_text_attachment_is_inlined(env: Env, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("the secret ingredient is cardamom")
    big = tmp_path / "big.log"
    big.write_text("x" * 40_000)
    await dpytest.message(
        f"{env.mention} read these", env.channel, env.alice, attachments=[str(notes), str(big)]
    )
    prompt = env.prompts()[-1]
    assert "cardamom" in prompt and 'Attached file "notes.txt"' in prompt
    assert "big.log (too large)" in prompt and "xxxx" not in prompt


async def test_model_failure_is_plain_words(env: Env) -> None:
    env.ollama.fail_next(status=500, error="CUDA out of memory at /secret/path", count=5)
    await dpytest.message(f"{env.mention} hello?", env.channel, env.alice)
    [message] = env.bot_messages()
    assert "/secret" not in message.content and "CUDA" not in message.content
    assert message.content


async def test_stop_cuts_off_replies_in_flight(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(tmp_path, database_url, fake_ollama, discord_shutdown_grace=0.3):
        words = [f"w{i} " for i in range(200)]
        env.ollama.queue_reply("".join(words), chunks=words)
        env.ollama.token_delay = 0.05
        talking = asyncio.create_task(
            dpytest.message(f"{env.mention} tell a long story", env.channel, env.alice)
        )
        for _ in range(200):  # until the reply has started
            if env.sent.payloads:
                break
            await asyncio.sleep(0.05)
        await env.adapter.stop()
        await talking
        last = env.sent.edits[-1]["content"] if env.sent.edits else env.sent.payloads[-1]["content"]
        assert "cut off" in last
        await dpytest.message(f"{env.mention} are you there?", env.channel, env.alice)
        assert env.prompts() == ["tell a long story"], "no new messages after stop"


async def test_thread_from_a_bot_reply_continues_that_conversation(env: Env) -> None:
    await dpytest.message(f"{env.mention} the password is swordfish", env.channel, env.alice)
    [bot_reply] = env.bot_messages()
    thread = make_thread(env.channel, bot_reply.id)
    await dpytest.message(f"{env.mention} what was the password?", thread, env.alice)
    [answer] = env.bot_messages()
    assert answer.channel_id == thread.id
    last = env.ollama.chat_requests()[-1]["messages"]
    assert any("swordfish" in m["content"] for m in last)


async def test_other_threads_are_new_conversations_with_the_channels_persona(env: Env) -> None:
    engine = env.app.engine
    channel_conversation = await engine.conversation("discord", str(env.channel.id))
    await engine.history.set_persona(channel_conversation.id, "sage")
    await dpytest.message(f"{env.mention} a secret: swordfish", env.channel, env.alice)
    env.bot_messages()
    thread = make_thread(env.channel, 1573680000000000001)
    await dpytest.message(f"{env.mention} what was the secret?", thread, env.alice)
    assert len(env.bot_messages()) == 1
    last = env.ollama.chat_requests()[-1]["messages"]
    assert not any("swordfish" in m["content"] for m in last), "a fresh conversation"
    assert (await engine.persona_for("discord", str(thread.id))).name == "sage"


async def test_stop_lets_short_replies_finish(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    async for env in make_env(tmp_path, database_url, fake_ollama, discord_shutdown_grace=10):
        words = [f"w{i} " for i in range(10)]
        env.ollama.queue_reply("".join(words), chunks=words)
        env.ollama.token_delay = 0.05
        talking = asyncio.create_task(
            dpytest.message(f"{env.mention} a short one", env.channel, env.alice)
        )
        for _ in range(200):
            if env.sent.payloads:
                break
            await asyncio.sleep(0.02)
        await env.adapter.stop()
        await talking
        [reply] = env.bot_messages()
        assert reply.content == "".join(words).strip()


async def test_admin_notices_go_to_the_admin_channel(env: Env) -> None:
    env.adapter.settings = env.app.settings.model_copy(
        update={"discord_admin_channel": env.channel.id}
    )
    await env.adapter.notify_admins("Budget at 80% @everyone")
    [notice] = env.bot_messages()
    assert notice.content == "Budget at 80% @everyone"
    assert env.sent.payloads[-1]["allowed_mentions"]["parse"] == []


async def test_listen_channels_and_blocked_channels(env: Env) -> None:
    env.adapter.policy = DiscordPolicy(listen_channels=frozenset({env.channel.id}))
    await dpytest.message("no mention at all", env.channel, env.alice)
    assert len(env.bot_messages()) == 1, "always listening here"
    env.adapter.policy = DiscordPolicy(blocked_channels=frozenset({env.channel.id}))
    await dpytest.message(f"{env.mention} hello?", env.channel, env.alice)
    assert env.bot_messages() == []
    env.adapter.policy = DiscordPolicy(blocked_users=frozenset({env.alice.id}))
    await dpytest.message(f"{env.mention} hello?", env.channel, env.alice)
    assert env.bot_messages() == []
