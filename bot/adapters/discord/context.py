"""A reply brings its context: the messages a Discord reply points at, quoted for the model.

"@Mimi what do you think of this?" sent as a reply to Bob's message is meaningless without Bob's
message. Like llmcord, the chain of replies is followed a few links up (the message cache first,
then the API), each quote cut short, and it stops at a message the conversation's history already
holds (one the bot sent or answered), at a forward, or at a message that is gone.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import discord

from bot.adapters.discord.conversations import replied_to
from bot.adapters.discord.render import clean_text

log = logging.getLogger(__name__)

QUOTE_CHARS = 600  # per quoted message; the chain as a whole is at most links times this


async def _resolve(
    channel: discord.abc.Messageable, reference: discord.MessageReference
) -> discord.Message | None:
    resolved = reference.resolved or reference.cached_message
    if isinstance(resolved, discord.Message):
        return resolved
    if isinstance(resolved, discord.DeletedReferencedMessage) or reference.message_id is None:
        return None
    try:
        return await channel.fetch_message(reference.message_id)
    except discord.HTTPException:  # deleted, or no permission to read history
        return None


def _quote(message: discord.Message) -> str:
    text = clean_text(
        message.content,
        bot_id=None,
        users={user.id: user.display_name for user in message.mentions},
        roles={role.id: role.name for role in message.role_mentions},
        channels={c.id: getattr(c, "name", "channel") for c in message.channel_mentions},
    )
    if not text and message.attachments:
        text = "(" + ", ".join(a.filename for a in message.attachments) + ")"
    text = " ".join(text.split())
    if len(text) > QUOTE_CHARS:
        text = text[: QUOTE_CHARS - 1].rstrip() + "…"
    return f"> {message.author.display_name}: {text}"


async def reply_context(
    message: discord.Message,
    *,
    links: int,
    my_id: int,
    known: Callable[[str], Awaitable[bool]],
) -> str:
    """Quotes of the messages `message` replies to, oldest first ("" when there are none).
    `known(message_id)` says whether the conversation's history already holds a message."""
    quotes: list[str] = []
    current = message
    for _ in range(links):
        reference = replied_to(current)
        if reference is None:
            break
        target = await _resolve(message.channel, reference)
        if target is None or target.author.id == my_id or await known(str(target.id)):
            break
        quotes.append(_quote(target))
        current = target
    if not quotes:
        return ""
    return "(in reply to)\n" + "\n".join(reversed(quotes))
