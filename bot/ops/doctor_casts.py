"""Doctor checks for casts of personas on Discord: Manage Webhooks.

A Discord channel with a cast of two or more speaks through a channel webhook; without Manage
Webhooks each persona speaks from the bot's account with its name in bold. Offline the doctor
counts those channels; `--online` asks Discord, with discord.py's own REST client as the bot does
(`GET /channels/{id}/webhooks` needs Manage Webhooks), and lists the channels that refuse.

A persona whose `avatar` is a picture file speaks through a webhook of its own in the channel,
made with the same permission (bot/adapters/discord/webhooks.py), so there is nothing more to
check for avatars.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import discord

from bot import db
from bot.config import Settings
from bot.errors import BotError
from bot.ops.diagnostics import Check

log = logging.getLogger(__name__)

_DB_TIMEOUT = 5.0
_CAST_CHANNELS = (
    "SELECT c.external_id FROM conversations c JOIN conversation_cast k"
    " ON k.conversation_id = c.id WHERE c.platform = 'discord'"
    " GROUP BY c.external_id HAVING count(*) > 1 ORDER BY c.external_id"
)
_WEBHOOK_FIX = (
    "give the bot's role Manage Webhooks in those channels (or add 536870912 to the invite "
    "URL's permissions); until then each persona speaks from the bot's account, name in bold"
)


async def check_discord_casts(settings: Settings, *, online: bool) -> list[Check]:
    """Channels with a cast of two or more, and (online) those lacking Manage Webhooks."""
    if settings.discord_token is None:
        return []
    channels = await _cast_channels(settings)
    if not channels:
        return []
    if not online:
        return [
            Check(
                "ok",
                "discord casts",
                f"{len(channels)} channel(s) with a cast of two or more; "
                "`doctor --online` checks Manage Webhooks there",
            )
        ]
    lacking = await _lacking_webhooks(settings.discord_token.get_secret_value(), channels)
    if lacking is None:
        return []  # not logged in: the discord login row says why
    if lacking:
        return [
            Check(
                "warn",
                "discord casts",
                f"no Manage Webhooks in channel(s) {', '.join(lacking)}",
                _WEBHOOK_FIX,
            )
        ]
    return [Check("ok", "discord casts", f"Manage Webhooks in all {len(channels)} cast channel(s)")]


async def _cast_channels(settings: Settings) -> list[str]:
    try:
        url = await asyncio.to_thread(db.database_url, settings)
        conn = await asyncpg.connect(url, timeout=_DB_TIMEOUT)
    except (BotError, OSError, TimeoutError, asyncpg.PostgresError):
        return []  # the database row says what is wrong
    try:
        return [str(r["external_id"]) for r in await conn.fetch(_CAST_CHANNELS)]
    except asyncpg.PostgresError:
        return []  # not migrated yet: no casts
    finally:
        await conn.close()


async def _lacking_webhooks(token: str, channels: list[str]) -> list[str] | None:
    """The channels (a thread: its parent) whose webhooks Discord refuses to show us."""
    client = discord.Client(intents=discord.Intents.none())
    lacking: list[str] = []
    try:
        try:
            await client.login(token)
        except (discord.LoginFailure, discord.HTTPException, OSError):
            return None
        for channel_id in channels:
            if not channel_id.isdigit():
                continue
            try:
                channel = await client.fetch_channel(int(channel_id))
                if isinstance(channel, discord.Thread) and channel.parent_id:
                    channel = await client.fetch_channel(channel.parent_id)
                if isinstance(channel, discord.TextChannel | discord.ForumChannel):
                    await channel.webhooks()
            except discord.Forbidden:
                lacking.append(channel_id)
            except (discord.HTTPException, OSError) as exc:
                log.info("could not check channel %s: %s", channel_id, type(exc).__name__)
    finally:
        await client.close()
    return lacking
