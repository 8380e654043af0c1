"""A cast's faces on Discord: the channel webhook path, driven by discord.py's own client and
Webhook classes against a loopback fake of Discord's REST API (tests/fakes/discord_rest.py),
and the fallback to the bot's account with the name in bold."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import discord
import pytest
from discord.http import Route

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.cast import Faces, NamedReplyView, replied_persona
from bot.adapters.discord.webhooks import HOOK_NAME, WebhookReplyView, Webhooks
from bot.core.cast import Stage
from bot.core.personas import Persona
from tests.fakes.discord_rest import FakeDiscord

ALLOWED, FORBIDDEN = 100, 200


def persona(name: str, avatar: str = "") -> Persona:
    return Persona.model_validate(
        {
            "name": name,
            "display_name": name.title(),
            "description": "someone",
            "greeting": "hi",
            "avatar": avatar,
        }
    )


SAGE = persona("sage", "https://example.org/sage.png")
MIMI = persona("mimi")


@pytest.fixture
async def discord_api() -> AsyncIterator[tuple[FakeDiscord, discord.Client]]:
    async with FakeDiscord(forbidden={FORBIDDEN}) as fake:
        # discord.py's one knob for where the REST API lives: the Route.BASE class attribute.
        base = Route.BASE
        Route.BASE = f"{fake.url}/api/v10"
        client = discord.Client(intents=discord.Intents.none())
        try:
            await client.login("test-token")
            yield fake, client
        finally:
            await client.close()
            Route.BASE = base


async def source_in(fake: FakeDiscord, client: discord.Client, channel_id: int) -> discord.Message:
    """A person's message in the channel, as discord.py fetches it."""
    channel = await client.fetch_channel(channel_id)
    assert isinstance(channel, discord.TextChannel)
    return await channel.fetch_message(fake.add_message(channel_id, 42, "hello both"))


async def test_webhook_speaks_with_name_and_face_and_streams_edits(
    discord_api: tuple[FakeDiscord, discord.Client],
) -> None:
    fake, client = discord_api
    source = await source_in(fake, client, ALLOWED)
    faces = Faces(0.0, ChannelBudget())
    view = await faces.view(source, SAGE, True)
    assert isinstance(view, WebhookReplyView)
    await view.grow("Hello")
    await view.finish("Hello there, friend.")
    [created] = fake.seen("POST", f"/channels/{ALLOWED}/webhooks")
    assert created["name"] == HOOK_NAME
    [sent] = fake.seen("POST", "/webhooks/")
    assert sent["username"] == "Sage" and sent["avatar_url"] == "https://example.org/sage.png"
    assert sent["content"] == "Hello" and sent["allowed_mentions"]["parse"] == []
    [edit] = fake.seen("PATCH", "/webhooks/")
    assert edit["content"] == "Hello there, friend."
    message = fake.messages[view.sent[0].id]
    assert message["content"] == "Hello there, friend." and message["webhook_id"]
    assert faces.webhooks.ids == {int(message["webhook_id"])}

    other = await faces.view(source, MIMI, True)
    await other.finish("Nya.")
    assert len(fake.seen("GET", f"/channels/{ALLOWED}/webhooks")) == 1, "cached, not asked again"
    assert fake.seen("POST", "/webhooks/")[-1]["username"] == "Mimi"
    assert "avatar_url" not in fake.seen("POST", "/webhooks/")[-1], "no https avatar: none sent"

    after_restart = await Faces(0.0, ChannelBudget()).view(source, SAGE, True)
    assert isinstance(after_restart, WebhookReplyView)
    assert len(fake.seen("POST", f"/channels/{ALLOWED}/webhooks")) == 1, "the webhook is reused"
    assert len(fake.seen("POST", f"/channels/{ALLOWED}/messages")) == 0, "nothing from the bot"


async def test_without_manage_webhooks_the_bot_speaks_with_the_name_in_bold(
    discord_api: tuple[FakeDiscord, discord.Client],
) -> None:
    fake, client = discord_api
    source = await source_in(fake, client, FORBIDDEN)
    hooks = Webhooks()
    view = await Faces(0.0, ChannelBudget(), hooks).view(source, SAGE, True)
    assert isinstance(view, NamedReplyView)
    await view.finish("Hello.")
    [sent] = fake.seen("POST", f"/channels/{FORBIDDEN}/messages")
    assert sent["content"] == "**Sage**: Hello."
    assert hooks.lacking == [FORBIDDEN]
    await Faces(0.0, ChannelBudget(), hooks).view(source, MIMI, True)
    assert len(fake.seen("GET", f"/channels/{FORBIDDEN}/webhooks")) == 1, "not asked again soon"


async def test_a_deleted_webhook_falls_back_mid_reply(
    discord_api: tuple[FakeDiscord, discord.Client],
) -> None:
    fake, client = discord_api
    source = await source_in(fake, client, ALLOWED)
    hooks = Webhooks()
    view = await Faces(0.0, ChannelBudget(), hooks).view(source, SAGE, True)
    fake.webhooks.clear()  # an admin deleted the webhook
    await view.grow("Hel")
    await view.finish("Hello.")
    sent = fake.seen("POST", f"/channels/{ALLOWED}/messages")
    assert [s["content"] for s in sent] == ["**Sage**: Hel"]
    assert fake.messages[view.sent[0].id]["content"] == "**Sage**: Hello."
    assert hooks.ids == set(), "the dead webhook is forgotten; the next reply makes a new one"


async def test_replies_to_a_persona_message_are_known_without_the_stage(
    discord_api: tuple[FakeDiscord, discord.Client],
) -> None:
    """After a restart the stage is empty: the webhook's name or the bold name tells."""
    fake, client = discord_api
    source = await source_in(fake, client, ALLOWED)
    webhook_view = await Faces(0.0, ChannelBudget()).view(source, SAGE, True)
    await webhook_view.finish("Good day.")
    fallback = NamedReplyView(source, 0.0, "Mimi", ChannelBudget())
    await fallback.finish("Nya.")
    channel = source.channel
    cast = [MIMI, SAGE]
    for target, expected in ((webhook_view.sent[0].id, "sage"), (fallback.sent[0].id, "mimi")):
        reply_id = fake.add_message(ALLOWED, 42, "really?", reply_to=target)
        reply = await channel.fetch_message(reply_id)
        assert replied_persona(reply, cast, Stage(), reply_to_bot=True) == expected
    plain = await channel.fetch_message(fake.add_message(ALLOWED, 42, "no reply"))
    assert replied_persona(plain, cast, Stage(), reply_to_bot=False) is None


def test_an_avatar_file_is_not_sent_to_discord_and_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hooks = Webhooks()
    mimi = persona("mimi", "mimi.png")
    with caplog.at_level(logging.WARNING, logger="bot.adapters.discord.webhooks"):
        assert hooks.avatar(mimi) is None
        assert hooks.avatar(mimi) is None
        assert hooks.avatar(SAGE) == "https://example.org/sage.png"
    [record] = caplog.records
    assert "avatar of mimi is a file" in record.getMessage()
