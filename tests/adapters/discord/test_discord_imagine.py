"""/imagine on Discord (issue 16): progress edits throttled and off the command's path, and a
final post Discord refuses (the message was deleted, the file over the upload limit) answered
in words after the picture was booked. The slash callbacks are called with a fake Interaction
(dpytest has none); the picture comes from the fake Fal through the real image service."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import discord
import pytest

from bot.adapters.discord.adapter import DiscordAdapter
from bot.adapters.discord.commands import PROGRESS_EVERY
from bot.app import App
from bot.core.commands import CommandContext, CommandResult
from tests.discord_helpers import FakeInteraction, FakeUser
from tests.fakes.fal import FakeFal
from tests.fakes.ollama import FakeOllama
from tests.fal_fixtures import start_app


@dataclasses.dataclass
class Channel:
    id: int


class RefusingInteraction(FakeInteraction):
    """Discord refuses the edit that carries the picture, as it does for a deleted message
    (404, code 10008 Unknown Message) or a file over the upload limit (413, code 40005)."""

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(FakeUser(5, "user5"), Channel(444), guild_id=77)
        self.error = (status, code, message)

    async def edit_original_response(self, **kwargs: Any) -> None:
        if kwargs.get("attachments"):
            status, code, message = self.error
            response: Any = SimpleNamespace(status=status, reason=message)
            kind = discord.NotFound if status == 404 else discord.HTTPException
            raise kind(response, {"code": code, "message": message})
        await super().edit_original_response(**kwargs)


@pytest.fixture
async def app(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, fake_fal: FakeFal
) -> AsyncIterator[App]:
    async with await start_app(
        tmp_path, database_url, fake_ollama, discord_token="test-token"
    ) as running:
        yield running


@pytest.fixture
def adapter(app: App) -> DiscordAdapter:
    return DiscordAdapter(app, discord.Client(intents=discord.Intents.default()))


async def test_progress_edits_are_throttled_to_the_latest_text(adapter: DiscordAdapter) -> None:
    async def slow(ctx: CommandContext, args: list[str]) -> CommandResult:
        assert ctx.progress is not None
        for step in ("Queued: 3 ahead…", "Queued: 2 ahead…", "Queued: 1 ahead…"):
            await ctx.progress(step)
            await asyncio.sleep(0.05)  # a status every 50 ms: far faster than Discord allows
        await asyncio.sleep(PROGRESS_EVERY + 0.3)
        return CommandResult("Done drawing.")

    adapter.app.commands.register("slowtest", "slowtest", "test progress", slow)
    it = FakeInteraction(FakeUser(5, "user5"), Channel(444), guild_id=77)
    await adapter.slash.run(it, "slowtest", [])
    edits = [entry[1]["content"] for entry in it.log if entry[0] == "edit"]
    assert edits == ["Queued: 3 ahead…", "Queued: 1 ahead…", "Done drawing."]


@pytest.mark.parametrize(
    ("status", "code", "message", "words"),
    [
        (404, 10008, "Unknown Message", "is gone"),
        (413, 40005, "Request entity too large", "upload limit"),
    ],
)
async def test_a_refused_final_post_is_answered_after_booking(
    adapter: DiscordAdapter, app: App, status: int, code: int, message: str, words: str
) -> None:
    it = RefusingInteraction(status, code, message)
    await adapter.slash.run(it, "imagine", ["a red fox"])
    [(text, private)] = it.answers()
    assert words in text and "drew" in text and not private
    assert message not in text  # Discord's own words stay in the log
    cost = await app.pool.fetchval(
        "SELECT sum(cost) FROM ledger WHERE kind = 'image' AND status = 'settled'"
    )
    assert cost == Decimal("0.003")  # drawn and paid for before the post failed
