"""Slash-command publishing, autocomplete, shutdown and gateway health (issue 17). Commands are
synced by discord.py's own CommandTree against FakeCommandsApi (Discord's side); callbacks run
with FakeInteraction; Postgres is real."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.adapters.discord.adapter import DiscordAdapter
from bot.adapters.discord.commands import RESTARTING
from bot.adapters.discord.gateway import Gateway
from bot.adapters.discord.render import CUT_OFF
from bot.adapters.discord.sync import sync_commands
from bot.app import App, running_app
from bot.core.commands import CommandContext, CommandResult
from bot.ops.web import adapter_state
from bot.runner import run
from tests.conftest import make_settings
from tests.discord_helpers import FakeCommandsApi, FakeInteraction, FakeUser
from tests.fakes.ollama import FakeOllama

GUILD_A, GUILD_B, NOT_OURS = 1573680000000000101, 1573680000000000102, 1573680000000000103


class Channel:
    id = 4040


@pytest.fixture
async def app(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[App]:
    settings = make_settings(
        tmp_path,
        database_url,
        fake_ollama.url,
        discord_token="test-token",
        discord_shutdown_grace=0.3,
    )
    async with running_app(settings) as running:
        yield running


def new_adapter(app: App, *, refused: frozenset[int] = frozenset()) -> tuple[Any, FakeCommandsApi]:
    """A fresh process's adapter (its own tree), and Discord's command store shared by all."""
    client = discord.Client(intents=discord.Intents.default())
    adapter = DiscordAdapter(app, client)
    return adapter, FakeCommandsApi(client, refused=refused)


async def test_switching_between_global_and_guild_commands_removes_the_old_set(app: App) -> None:
    first, api = new_adapter(app)
    await sync_commands(first.tree, [], app.pool)
    published = api.names()
    assert "reset" in published and "admin" in published and "spend" not in published

    second, api2 = new_adapter(app)
    api2.global_set = api.global_set  # the same Discord application
    await sync_commands(second.tree, [GUILD_A, GUILD_B], app.pool)
    assert api2.names() == [], "the global set is removed"
    assert api2.names(GUILD_A) == api2.names(GUILD_B) == published

    third, api3 = new_adapter(app)
    api3.guild_sets = api2.guild_sets
    await sync_commands(third.tree, [GUILD_B], app.pool)
    assert api3.names(GUILD_A) == [], "a guild no longer listed is emptied"
    assert api3.names(GUILD_B) == published

    fourth, api4 = new_adapter(app)
    api4.guild_sets = api3.guild_sets
    await sync_commands(fourth.tree, [], app.pool)
    assert api4.names(GUILD_B) == [] and api4.names() == published


async def test_one_bad_guild_does_not_stop_the_rest(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    adapter, api = new_adapter(app, refused=frozenset({NOT_OURS}))
    await sync_commands(adapter.tree, [NOT_OURS, GUILD_A], app.pool)
    assert api.names(GUILD_A) and NOT_OURS not in api.guild_sets
    assert any(str(NOT_OURS) in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


async def test_admin_commands_sit_under_a_group_with_default_permissions(app: App) -> None:
    adapter, api = new_adapter(app)
    await sync_commands(adapter.tree, [], app.pool)
    assert api.global_set is not None
    by_name = {c["name"]: c for c in api.global_set}
    admin = by_name["admin"]
    manage_guild = discord.Permissions(manage_guild=True).value
    assert int(admin["default_member_permissions"]) == manage_guild
    assert [o["name"] for o in admin["options"]] == ["spend"]
    assert by_name["reset"].get("default_member_permissions") is None, "others are for everyone"
    persona_set = next(o for o in by_name["persona"]["options"] if o["name"] == "set")
    assert persona_set["options"][0]["autocomplete"] is True


async def test_persona_set_autocompletes_persona_names(app: App) -> None:
    adapter, _ = new_adapter(app)
    group: Any = adapter.tree.get_command("persona")
    parameter = group.get_command("set")._params["name"]
    it = FakeInteraction(FakeUser(5, "user5"), Channel())
    choices = await parameter.autocomplete(it, "sa")
    assert [c.value for c in choices] == ["sage"]
    everyone = await parameter.autocomplete(it, "")
    assert {c.value for c in everyone} == {"mimi", "sage"}


async def test_commands_in_flight_at_shutdown_are_answered(app: App) -> None:
    adapter, _ = new_adapter(app)
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(ctx: CommandContext, args: list[str]) -> CommandResult:
        started.set()
        await release.wait()
        return CommandResult("finished")

    app.commands.register("slowtest", "slowtest", "a command that takes its time", slow)
    it = FakeInteraction(FakeUser(5, "user5"), Channel())
    running = asyncio.create_task(adapter.slash.run(it, "slowtest", []))
    await asyncio.wait_for(started.wait(), 10)
    await adapter.stop()  # the grace (0.3 s) runs out: the command is cut off
    with pytest.raises(asyncio.CancelledError):
        await running
    assert it.answers() == [(CUT_OFF, True)], "the user is told, not left with 'thinking…'"

    late = FakeInteraction(FakeUser(5, "user5"), Channel())
    await adapter.slash.run(late, "slowtest", [])
    assert late.answers() == [(RESTARTING, True)]


async def test_a_command_that_finishes_within_the_grace_is_answered(app: App) -> None:
    adapter, _ = new_adapter(app)

    async def quick(ctx: CommandContext, args: list[str]) -> CommandResult:
        await asyncio.sleep(0.1)
        return CommandResult("all done")

    app.commands.register("quicktest", "quicktest", "a short command", quick)
    it = FakeInteraction(FakeUser(5, "user5"), Channel())
    running = asyncio.create_task(adapter.slash.run(it, "quicktest", []))
    await asyncio.sleep(0.02)
    await adapter.stop()
    await running
    assert it.answers() == [("all done", False)]


def test_health_tolerates_a_short_reconnect_but_not_a_long_one() -> None:
    now = [0.0]
    gateway = Gateway(discord.Client(intents=discord.Intents.default()), clock=lambda: now[0])
    assert not gateway.healthy, "never connected"

    async def events() -> None:
        await gateway.on_ready()
        assert gateway.healthy
        await gateway.on_disconnect()
        now[0] += 30
        assert gateway.healthy, "half a minute of reconnecting is fine"
        now[0] += 31
        assert not gateway.healthy, "over a minute is not"
        await gateway.on_resumed()
        assert gateway.healthy

    asyncio.run(events())


async def test_a_fatal_close_marks_the_adapter_failed(
    app: App, caplog: pytest.LogCaptureFixture
) -> None:
    adapter, _ = new_adapter(app)
    await adapter.gateway.on_ready()
    assert adapter_state(adapter) == "connected"

    async def token_reset() -> None:  # how discord.py's connect() ends on close code 4004
        raise discord.ConnectionClosed(None, shard_id=None, code=4004)  # type: ignore[arg-type]

    connection = asyncio.create_task(token_reset())
    adapter.gateway.watch(connection)
    await asyncio.gather(connection, return_exceptions=True)
    await asyncio.sleep(0)
    assert adapter.fatal.is_set()
    assert adapter_state(adapter) == "disconnected"
    [line] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "DISCORD_TOKEN" in line.getMessage()


class Fails:
    """An adapter whose platform closes for good shortly after start."""

    name = "failing"

    def __init__(self) -> None:
        self.fatal = asyncio.Event()
        self.stopped = False

    async def start(self) -> None:
        asyncio.get_running_loop().call_later(0.1, self.fatal.set)

    async def stop(self) -> None:
        self.stopped = True


async def test_the_runner_exits_non_zero_after_a_fatal_close(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, web_enabled=False)
    adapter = Fails()
    code = await asyncio.wait_for(run(settings, asyncio.Event(), factories=[lambda a: adapter]), 60)
    assert code == 1 and adapter.stopped
