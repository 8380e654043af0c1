"""Slash-command callbacks called directly with a fake Interaction (dpytest has none)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.adapters.discord.adapter import DiscordAdapter
from bot.app import App, running_app
from bot.core.commands import CommandContext, CommandResult, Commands
from tests.conftest import make_settings
from tests.discord_helpers import FakeInteraction, FakeRole, FakeUser
from tests.fakes.ollama import FakeOllama

ADMIN = 111
MOD_ROLE = 222
BLOCKED = 333
CHANNEL = 444


@dataclasses.dataclass
class Channel:
    id: int


@pytest.fixture
async def app(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    settings = make_settings(
        tmp_path,
        database_url,
        fake_ollama.url,
        discord_token="test-token",
        memory_enabled=False,
        discord_admin_users=[ADMIN],
        discord_admin_roles=[MOD_ROLE],
        discord_blocked_users=[BLOCKED],
    )
    async with running_app(settings) as running:
        yield running


@pytest.fixture
async def adapter(app: App) -> DiscordAdapter:
    client = discord.Client(intents=discord.Intents.default())
    return DiscordAdapter(app, client)


def command(adapter: DiscordAdapter, *path: str) -> Any:
    found: Any = adapter.tree.get_command(path[0])
    for name in path[1:]:
        found = found.get_command(name)
    assert found is not None, path
    return found.callback


def interaction(user_id: int = 5, *, roles: list[int] | None = None) -> FakeInteraction:
    user = FakeUser(user_id, f"user{user_id}", [FakeRole(r) for r in roles or []])
    return FakeInteraction(user, Channel(CHANNEL))


async def test_persona_list_is_deferred_and_private(adapter: DiscordAdapter) -> None:
    it = interaction()
    await command(adapter, "persona", "list")(it)
    assert it.log[0] == ("defer", True), "deferred first, inside Discord's 3 seconds"
    [(text, ephemeral)] = it.answers()
    assert ephemeral and "mimi" in text and "sage" in text


async def test_persona_show_describes_this_channels_persona(adapter: DiscordAdapter) -> None:
    it = interaction()
    await command(adapter, "persona", "show")(it, None)
    [(text, ephemeral)] = it.answers()
    current = adapter.app.engine.persona_named(None)
    assert ephemeral and current.display_name in text and current.description[:30] in text


async def test_persona_set_needs_an_admin(adapter: DiscordAdapter) -> None:
    it = interaction()
    await command(adapter, "persona", "set")(it, "sage")
    assert it.answers() == [("Only an admin can use /persona.", True)]
    conversation = await adapter.app.engine.conversation("discord", str(CHANNEL))
    assert conversation.persona is None


@pytest.mark.parametrize("who", [{"user_id": ADMIN}, {"roles": [MOD_ROLE]}])
async def test_admin_sets_the_channel_persona(adapter: DiscordAdapter, who: Any) -> None:
    it = interaction(**who)
    await command(adapter, "persona", "set")(it, "sage")
    [(text, ephemeral)] = it.answers()
    sage = adapter.app.engine.personas.get("sage")
    assert not ephemeral and sage.display_name in text
    assert (await adapter.app.engine.persona_for("discord", str(CHANNEL))).name == "sage"


async def test_errors_are_ephemeral_plain_words(adapter: DiscordAdapter) -> None:
    it = interaction(ADMIN)
    await command(adapter, "persona", "set")(it, "nobody")
    assert ("delete",) in it.log, "the public 'thinking…' placeholder is removed"
    [(text, ephemeral)] = it.answers()
    assert ephemeral and "no persona called 'nobody'" in text


async def test_reset_forgets_the_conversation(adapter: DiscordAdapter) -> None:
    engine = adapter.app.engine
    conversation = await engine.conversation("discord", str(CHANNEL))
    await engine.history.append_exchange(
        conversation.id, author_id="5", author_name="u", text="hi", persona="mimi", reply="yo"
    )
    it = interaction()
    await command(adapter, "reset")(it)
    [(text, _)] = it.answers()
    assert "2 messages" in text
    assert await engine.history.recent(conversation.id) == []


async def test_blocked_users_are_refused(adapter: DiscordAdapter) -> None:
    it = interaction(BLOCKED)
    await command(adapter, "reset")(it)
    assert it.answers() == [("You can't use my commands here.", True)]


async def test_commands_not_wired_in_say_not_available_yet(app: App) -> None:
    bare = dataclasses.replace(app, commands=Commands(app.engine))
    names = {c.name for c in bare.commands.all()}
    adapter = DiscordAdapter(bare, discord.Client(intents=discord.Intents.default()))
    for path, args in [(("imagine",), ("a fox", None, None)), (("admin", "spend"), (None,))]:
        name = path[-1]
        assert name not in names
        it = interaction(ADMIN)
        await command(adapter, *path)(it, *args)
        assert it.answers() == [(f"/{name} is not available yet.", True)]


async def test_commands_that_exist_are_mapped_onto_the_layer(adapter: DiscordAdapter) -> None:
    """/spend (admins) reaches the ledger's command when it is wired in: a private answer."""
    names = {c.name for c in adapter.app.commands.all()}
    if "spend" not in names:
        pytest.skip("the spend command is not in the command layer in this build")
    it = interaction()
    await command(adapter, "admin", "spend")(it, None)
    assert it.answers() == [("Only an admin can use /spend.", True)]
    it = interaction(ADMIN)
    await command(adapter, "admin", "spend")(it, None)
    answers = it.answers()
    assert answers and all(ephemeral for _, ephemeral in answers)
    assert "Traceback" not in answers[0][0]


async def test_spend_shows_the_month_per_persona(adapter: DiscordAdapter) -> None:
    """/spend's breakdown per persona (issue 21): what each cast member's pictures and per-token
    calls cost, and the rows of no persona (a cloud machine's time) apart."""
    ledger = adapter.app.ledger
    assert ledger is not None
    flux = {"kind": "image", "provider": "fal", "model": "fal-ai/flux/dev"}
    await ledger.record(**flux, units=Decimal(4), request_id="i-1", persona="mimi")
    await ledger.record(**flux, units=Decimal(1), request_id="i-2", persona="sage")
    await ledger.record(**flux, units=Decimal(2), request_id="i-3")
    it = interaction(ADMIN)
    await command(adapter, "admin", "spend")(it, None)
    text = "\n".join(answer for answer, _ in it.answers())
    lines = text.split("By persona (settled)", 1)[1].splitlines()
    rows = [line.split()[:3] for line in lines if line.startswith(("mimi", "sage"))]
    assert rows == [["mimi", "1", "$0.1000"], ["sage", "1", "$0.0250"]], "most first"
    assert any(line.startswith("(none: shared GPU time)") and "$0.0500" in line for line in lines)


async def test_runner_starts_discord_only_when_a_token_is_set(app: App) -> None:
    from bot.adapters.discord.adapter import build_client
    from bot.runner import adapter_factories

    made = [factory(app) for factory in adapter_factories()]
    discord_adapters = [a for a in made if isinstance(a, DiscordAdapter)]
    assert len(discord_adapters) == 1
    assert discord_adapters[0].client.allowed_mentions is not None
    assert discord_adapters[0].client.allowed_mentions.to_dict() == {"parse": []}
    assert discord_adapters[0].client.intents.message_content
    without = dataclasses.replace(
        app, settings=app.settings.model_copy(update={"discord_token": None})
    )
    assert not any(isinstance(factory(without), DiscordAdapter) for factory in adapter_factories())
    sharded = dataclasses.replace(
        app, settings=app.settings.model_copy(update={"discord_sharded": True})
    )
    assert isinstance(build_client(sharded), discord.AutoShardedClient)


@dataclasses.dataclass
class NsfwChannel:
    id: int

    def is_nsfw(self) -> bool:
        return True


async def test_long_commands_edit_one_message_then_attach_with_spoiler(
    adapter: DiscordAdapter, tmp_path: Path
) -> None:
    """/imagine-style commands: progress edits the deferred answer, the file lands in it."""
    picture = tmp_path / "fox.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n")
    seen: list[CommandContext] = []

    async def draw(ctx: CommandContext, args: list[str]) -> CommandResult:
        seen.append(ctx)
        assert ctx.progress is not None
        for step in ("1 ahead of you…", "1 ahead of you…", "Drawing…"):
            await ctx.progress(step)
        return CommandResult("Here is your fox.", attachment=picture, spoiler=True)

    adapter.app.commands.register("drawtest", "drawtest", "test drawing", draw)
    it = FakeInteraction(FakeUser(5, "user5"), NsfwChannel(CHANNEL), guild_id=77)
    await adapter.slash.run(it, "drawtest", [])
    assert it.log[0] == ("defer", False)
    edits = [entry[1] for entry in it.log if entry[0] == "edit"]
    # Progress is shown in the background; a result that comes at once replaces it.
    assert [e["content"] for e in edits][-1] == "Here is your fox."
    [file] = edits[-1]["attachments"]
    assert file.spoiler and file.filename == "SPOILER_fox.png"
    assert not [entry for entry in it.log if entry[0] in ("send", "followup")]
    assert seen[0].nsfw is True and seen[0].guild == "77"


async def test_health_reports_a_client_that_never_connected(adapter: DiscordAdapter) -> None:
    from bot.ops.web import adapter_state  # what /healthz reports for each adapter

    assert adapter.connected is False
    assert adapter_state(adapter) == "disconnected"
