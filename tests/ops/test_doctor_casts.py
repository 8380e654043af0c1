"""Doctor on Discord casts: the channels with a cast of two or more where the bot lacks Manage
Webhooks (asked through discord.py's own REST client, pointed at the loopback fake of Discord's
API in tests/fakes/discord_rest.py)."""

from __future__ import annotations

from pathlib import Path

from discord.http import Route

from bot.app import running_app
from bot.core.commands import CommandContext
from bot.ops.doctor_casts import check_discord_casts
from tests.conftest import make_settings
from tests.fakes.discord_rest import FakeDiscord
from tests.fakes.ollama import FakeOllama
from tests.ops.test_doctor import TOKEN

ALLOWED, FORBIDDEN, ALONE = 100, 200, 300


async def test_cast_channels_without_manage_webhooks_are_listed(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, discord_token=TOKEN)
    async with running_app(settings) as app:
        for channel in (ALLOWED, FORBIDDEN, ALONE):
            admin = CommandContext("discord", str(channel), "1", "admin", is_admin=True)
            await app.commands.run(admin, "persona", ["mimi"])
            if channel != ALONE:  # a cast of one needs no webhook
                await app.commands.run(admin, "persona", ["cast", "add", "sage"])
    [offline] = await check_discord_casts(settings, online=False)
    assert (offline.status, offline.name) == ("ok", "discord casts")
    assert offline.detail.startswith("2 channel(s) with a cast")
    async with FakeDiscord(forbidden={FORBIDDEN, ALONE}) as fake:
        base = Route.BASE  # discord.py's one knob for where the REST API lives
        Route.BASE = f"{fake.url}/api/v10"
        try:
            [online] = await check_discord_casts(settings, online=True)
            fake.forbidden.clear()
            [fixed] = await check_discord_casts(settings, online=True)
        finally:
            Route.BASE = base
    assert online.status == "warn"
    assert online.detail == f"no Manage Webhooks in channel(s) {FORBIDDEN}"
    assert "Manage Webhooks" in online.fix
    assert len(fake.seen("GET", f"/channels/{ALLOWED}/webhooks")) == 2
    assert fake.seen("GET", f"/channels/{ALONE}/webhooks") == [], "a cast of one is not asked"
    assert fixed.status == "ok" and "all 2" in fixed.detail
