"""Publishing the slash commands to Discord: globally, or to the guilds DISCORD_COMMAND_GUILDS
names (guild commands appear at once; global ones are for every guild and DMs).

Discord keeps whatever set was last published in each scope, so a switch must remove the old
one: in guild mode the global set is overwritten with nothing, and any guild synced before but no
longer listed (remembered in the discord_command_guilds table) is emptied. A guild that refuses
(the bot is not in it, or was invited without the applications.commands scope) is logged and
skipped; the rest are still synced.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import discord
from discord import app_commands

log = logging.getLogger(__name__)


async def _sync(tree: app_commands.CommandTree[Any], guild_id: int | None) -> bool:
    guild = discord.Object(id=guild_id) if guild_id is not None else None
    where = f"guild {guild_id}" if guild_id is not None else "all guilds"
    try:
        await tree.sync(guild=guild)
    except discord.Forbidden:
        log.warning(
            "slash commands were not published to %s: is the bot in it, invited with the "
            "applications.commands scope?",
            where,
        )
        return False
    except discord.HTTPException as exc:
        log.warning("slash commands were not published to %s (HTTP %s)", where, exc.status)
        return False
    return True


async def sync_commands(
    tree: app_commands.CommandTree[Any], guild_ids: Sequence[int], pool: Any
) -> None:
    rows = await pool.fetch("SELECT guild_id FROM discord_command_guilds")
    previous = {int(row["guild_id"]) for row in rows}
    synced: list[int] = []
    if guild_ids:
        for guild_id in guild_ids:
            tree.copy_global_to(guild=discord.Object(id=guild_id))
            if await _sync(tree, guild_id):
                synced.append(guild_id)
        tree.clear_commands(guild=None)  # the guild copies answer; the global set goes
    await _sync(tree, None)
    for guild_id in previous - set(guild_ids):
        tree.clear_commands(guild=discord.Object(id=guild_id))
        if not await _sync(tree, guild_id):
            synced.append(guild_id)  # still has our commands: try again next start
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("DELETE FROM discord_command_guilds")
        await conn.executemany(
            "INSERT INTO discord_command_guilds (guild_id) VALUES ($1)",
            [(guild_id,) for guild_id in synced],
        )
