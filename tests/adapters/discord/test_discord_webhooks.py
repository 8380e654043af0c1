"""A cast's faces on Discord: the channel webhook path, a persona's own webhook for a picture
file, driven by discord.py's own client and Webhook classes against a loopback fake of
Discord's REST API (tests/fakes/discord_rest.py), and the fallback to the bot's account with the
name in bold."""

from __future__ import annotations

import base64
import io
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import discord
import pytest
from discord.http import Route

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.cast import Faces, NamedReplyView, replied_persona
from bot.adapters.discord.webhooks import HOOK_NAME, WebhookReplyView, Webhooks, face_name
from bot.core.cast import Stage
from bot.core.personas import Persona
from tests.fakes.discord_rest import WEBHOOKS_PER_CHANNEL, FakeDiscord, avatar_hash

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


def test_an_avatar_file_without_a_webhook_of_its_own_is_not_sent_and_said_once(
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


def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    picture = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(picture, format="PNG")
    return picture.getvalue()


def mimi_with_picture(directory: Path) -> Persona:
    """Mimi, whose avatar is a picture file (blue) in `directory`."""
    (directory / "mimi.png").write_bytes(png((40, 90, 160)))
    return persona("mimi", "mimi.png")


def webhook_edits(fake: FakeDiscord) -> list[dict[str, object]]:
    """Modify Webhook calls (PATCH /webhooks/{id}), not the edits of webhook messages."""
    return [b for m, path, b in fake.calls if m == "PATCH" and re.fullmatch(r"/webhooks/\d+", path)]


def data_uri_bytes(body: dict[str, object]) -> bytes:
    return base64.b64decode(str(body["avatar"]).split(",", 1)[1])


async def test_a_picture_file_is_the_face_of_a_webhook_of_the_personas_own(
    discord_api: tuple[FakeDiscord, discord.Client],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, client = discord_api
    mimi = mimi_with_picture(tmp_path)
    source = await source_in(fake, client, ALLOWED)
    hooks = Webhooks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bot.adapters.discord.webhooks"):
        view = await Faces(0.0, ChannelBudget(), hooks).view(source, mimi, True)
        assert isinstance(view, WebhookReplyView)
        await view.finish("Nya.")
        shared = await Faces(0.0, ChannelBudget(), hooks).view(source, SAGE, True)
        await shared.finish("Good day.")
    assert caplog.records == [], "the picture is shown: nothing to say"
    created = fake.seen("POST", f"/channels/{ALLOWED}/webhooks")
    assert [c["name"] for c in created] == [HOOK_NAME, "personabot face mimi"]
    assert data_uri_bytes(created[1]) == (tmp_path / "mimi.png").read_bytes()
    posted = fake.seen("POST", "/webhooks/")
    assert posted[0]["username"] == "Mimi" and "avatar_url" not in posted[0]
    assert posted[1]["username"] == "Sage"
    assert posted[1]["avatar_url"] == "https://example.org/sage.png"
    mimi_message = fake.messages[view.sent[0].id]
    assert mimi_message["author"]["avatar"] == avatar_hash(png((40, 90, 160)))
    sage_message = fake.messages[shared.sent[0].id]
    assert sage_message["webhook_id"] != mimi_message["webhook_id"]
    assert hooks.ids == {int(mimi_message["webhook_id"]), int(sage_message["webhook_id"])}

    again = await Faces(0.0, ChannelBudget(), hooks).view(source, mimi, True)
    await again.finish("Still me.")
    assert len(fake.seen("POST", f"/channels/{ALLOWED}/webhooks")) == 2, "reused"
    assert webhook_edits(fake) == [], "the picture is not sent again while the file is the same"

    # A restart: the webhook is found by its name and given the picture once more.
    restarted = Webhooks(tmp_path)
    await (await Faces(0.0, ChannelBudget(), restarted).view(source, mimi, True)).finish("Hi.")
    assert len(fake.seen("POST", f"/channels/{ALLOWED}/webhooks")) == 2
    [refreshed] = webhook_edits(fake)
    assert data_uri_bytes(refreshed) == png((40, 90, 160))

    # The file changes: the next reply sets the new picture, and the message shows it.
    (tmp_path / "mimi.png").write_bytes(png((200, 30, 30)))
    os.utime(tmp_path / "mimi.png", ns=(1, 1))
    changed = await Faces(0.0, ChannelBudget(), restarted).view(source, mimi, True)
    await changed.finish("New look.")
    assert data_uri_bytes(webhook_edits(fake)[-1]) == png((200, 30, 30))
    assert fake.messages[changed.sent[0].id]["author"]["avatar"] == avatar_hash(png((200, 30, 30)))


async def test_when_discord_refuses_a_persona_its_own_webhook_it_speaks_through_the_shared_one(
    discord_api: tuple[FakeDiscord, discord.Client],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake, client = discord_api
    for n in range(WEBHOOKS_PER_CHANNEL - 1):  # other integrations' webhooks fill the channel
        fake.add_webhook(ALLOWED, f"another integration {n}")
    mimi = mimi_with_picture(tmp_path)
    source = await source_in(fake, client, ALLOWED)
    hooks = Webhooks(tmp_path)
    with caplog.at_level(logging.WARNING, logger="bot.adapters.discord.webhooks"):
        view = await Faces(0.0, ChannelBudget(), hooks).view(source, mimi, True)
        await view.finish("Nya.")
        again = await Faces(0.0, ChannelBudget(), hooks).view(source, mimi, True)
        await again.finish("Nya nya.")
    created = fake.seen("POST", f"/channels/{ALLOWED}/webhooks")
    assert [c["name"] for c in created] == [HOOK_NAME, "personabot face mimi"], "tried once"
    assert fake.messages[view.sent[0].id]["author"]["username"] == "Mimi"
    assert fake.messages[view.sent[0].id]["author"]["avatar"] is None
    assert (
        fake.messages[again.sent[0].id]["webhook_id"]
        == fake.messages[view.sent[0].id]["webhook_id"]
    ), "both through the shared webhook"
    said = [r.getMessage() for r in caplog.records]
    assert any("30007" in line for line in said), said
    assert sum("default avatar" in line for line in said) == 1, said


async def test_a_face_webhooks_name_keeps_clear_of_the_words_discord_refuses(
    discord_api: tuple[FakeDiscord, discord.Client], tmp_path: Path
) -> None:
    fake, client = discord_api
    (tmp_path / "d.png").write_bytes(png((1, 2, 3)))
    clyde = persona("discord-clyde", "d.png")
    assert face_name(clyde) == "personabot face ---"
    source = await source_in(fake, client, ALLOWED)
    view = await Faces(0.0, ChannelBudget(), Webhooks(tmp_path)).view(source, clyde, True)
    await view.finish("Hello.")
    assert fake.messages[view.sent[0].id]["author"]["avatar"] == avatar_hash(png((1, 2, 3)))


async def test_a_picture_file_that_is_no_picture_costs_the_face_not_the_reply(
    discord_api: tuple[FakeDiscord, discord.Client], tmp_path: Path
) -> None:
    fake, client = discord_api
    (tmp_path / "mimi.png").write_bytes(b"not a picture at all")
    source = await source_in(fake, client, ALLOWED)
    view = await Faces(0.0, ChannelBudget(), Webhooks(tmp_path)).view(
        source, persona("mimi", "mimi.png"), True
    )
    await view.finish("Nya.")
    assert [c["name"] for c in fake.seen("POST", f"/channels/{ALLOWED}/webhooks")] == [HOOK_NAME]
    assert fake.messages[view.sent[0].id]["content"] == "Nya."


async def test_room_is_made_by_deleting_the_webhooks_of_personas_no_longer_in_the_cast(
    discord_api: tuple[FakeDiscord, discord.Client], tmp_path: Path
) -> None:
    fake, client = discord_api
    for n in range(WEBHOOKS_PER_CHANNEL - 3):  # other integrations' webhooks
        fake.add_webhook(ALLOWED, f"another integration {n}")
    ghost = fake.add_webhook(ALLOWED, "personabot face ghost")  # a persona that left the cast
    sage_face = fake.add_webhook(ALLOWED, "personabot face sage")  # one still in it
    mimi = mimi_with_picture(tmp_path)
    cast = [mimi, persona("sage", "sage.png")]
    source = await source_in(fake, client, ALLOWED)
    view = await Faces(0.0, ChannelBudget(), Webhooks(tmp_path)).view(source, mimi, True, cast)
    await view.finish("Nya.")
    names = {h["name"] for h in fake.webhooks.values()}
    assert "personabot face ghost" not in names and "personabot face mimi" in names
    assert int(sage_face["id"]) in fake.webhooks, "a cast member's webhook is kept"
    assert [path for m, path, _ in fake.calls if m == "DELETE"] == [f"/webhooks/{ghost['id']}"]
    assert fake.messages[view.sent[0].id]["author"]["avatar"] == avatar_hash(png((40, 90, 160)))
    assert len(fake.webhooks) == WEBHOOKS_PER_CHANNEL
