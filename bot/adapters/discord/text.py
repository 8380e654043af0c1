"""What a Discord message says, as the model reads it: mentions turned into names, and text
attachments inlined (up to DISCORD_ATTACHMENT_MAX_BYTES), the others named as skipped."""

from __future__ import annotations

import discord

from bot.adapters.discord.render import (
    clean_text,
    inline_attachment,
    is_text_attachment,
    with_attachments,
)


async def message_text(message: discord.Message, *, bot_id: int | None, limit: int) -> str:
    text = clean_text(
        message.content,
        bot_id=bot_id,
        users={user.id: user.display_name for user in message.mentions},
        roles={role.id: role.name for role in message.role_mentions},
        channels={c.id: getattr(c, "name", "channel") for c in message.channel_mentions},
    )
    inlined: list[str] = []
    skipped: list[str] = []
    for attachment in message.attachments:
        if not is_text_attachment(attachment.filename, attachment.content_type):
            skipped.append(f"{attachment.filename} (not a text file)")
            continue
        if attachment.size > limit:
            skipped.append(f"{attachment.filename} (too large)")
            continue
        try:
            data = await attachment.read()
        except discord.HTTPException:
            skipped.append(f"{attachment.filename} (could not be downloaded)")
            continue
        if len(data) > limit:
            skipped.append(f"{attachment.filename} (too large)")
        else:
            inlined.append(inline_attachment(attachment.filename, data))
    return with_attachments(text, inlined, skipped)
