"""A cast's faces on Discord: one channel webhook the bot creates and reuses.

Each cast member's reply is posted through the channel's webhook with the persona's display name
(and its avatar when `avatar` is an https URL; Discord takes avatars per message only by URL: a
picture file is logged once and the webhook's default avatar is used), and
streamed by editing that webhook message. The bot needs Manage Webhooks in the channel; without it
(or when the webhook was deleted) the reply comes from the bot's own account with the persona's
name in bold, and `lacking` lists the channels so the operator can fix it. A thread speaks
through its parent channel's webhook.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import discord

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.reply import NO_MENTIONS, ReplyView
from bot.core.personas import Persona, has_local_avatar

log = logging.getLogger(__name__)

HOOK_NAME = "personabot cast"
_RETRY_AFTER = 600.0  # seconds before asking again in a channel that refused us a webhook


class Webhooks:
    """The webhook of each channel, found or created once and then reused."""

    def __init__(self) -> None:
        self._hooks: dict[int, discord.Webhook] = {}
        self._refused: dict[int, float] = {}  # channel id → when Discord said Forbidden
        self._lock = asyncio.Lock()
        self._unshown: set[str] = set()  # personas whose avatar file Discord cannot take

    def avatar(self, persona: Persona) -> str | None:
        """The avatar URL to post with; a picture file is not (said once per persona)."""
        if has_local_avatar(persona) and persona.name not in self._unshown:
            self._unshown.add(persona.name)
            log.warning(
                "the avatar of %s is a file: Discord webhooks take avatars by URL only, so on "
                "Discord %s speaks with the webhook's default avatar (Matrix shows the file)",
                persona.name,
                persona.name,
            )
        return avatar_url(persona)

    @property
    def ids(self) -> set[int]:
        """Our webhooks' ids: their messages come back through the gateway and are ours."""
        return {hook.id for hook in self._hooks.values()}

    @property
    def lacking(self) -> list[int]:
        """Channels where the bot may not manage webhooks (personas fall back to bold names)."""
        return sorted(self._refused)

    def forget(self, channel_id: int) -> None:
        self._hooks.pop(channel_id, None)

    async def hook(self, channel: object) -> discord.Webhook | None:
        """The webhook to speak through in `channel` (a thread: its parent's), or None."""
        parent = channel.parent if isinstance(channel, discord.Thread) else channel
        if not isinstance(parent, discord.TextChannel | discord.ForumChannel):
            return None  # DMs and other channels have no webhooks
        async with self._lock:
            if parent.id in self._hooks:
                return self._hooks[parent.id]
            refused = self._refused.get(parent.id)
            if refused is not None and time.monotonic() - refused < _RETRY_AFTER:
                return None
            found = await self._find_or_create(parent)
            if found is not None:
                self._hooks[parent.id] = found
            return found

    async def _find_or_create(
        self, channel: discord.TextChannel | discord.ForumChannel
    ) -> discord.Webhook | None:
        me = channel.guild.me if channel.guild is not None else None
        if me is not None and not channel.permissions_for(me).manage_webhooks:
            self._refuse(channel.id)  # known from the cache: no need to ask Discord
            return None
        try:
            hooks = await channel.webhooks()
            mine = next((h for h in hooks if h.name == HOOK_NAME and h.token), None)
            if mine is None:
                mine = await channel.create_webhook(
                    name=HOOK_NAME, reason="personabot: personas speak under their own names"
                )
        except discord.Forbidden:
            self._refuse(channel.id)
            return None
        except discord.HTTPException as exc:
            log.warning("could not set up the webhook in channel %s (%s)", channel.id, exc.status)
            return None
        self._refused.pop(channel.id, None)
        return mine

    def _refuse(self, channel_id: int) -> None:
        log.warning(
            "no Manage Webhooks permission in channel %s: personas speak from the bot's "
            "account with their names in bold",
            channel_id,
        )
        self._refused[channel_id] = time.monotonic()


def avatar_url(persona: Persona) -> str | None:
    return persona.avatar if persona.avatar.startswith("https://") else None


class WebhookReplyView(ReplyView):
    """A reply posted through the channel's webhook under the persona's name and face, edited
    as it streams. Should the webhook fail, it carries on from the bot's account, name in bold."""

    def __init__(
        self,
        source: discord.Message,
        interval: float,
        budget: ChannelBudget,
        *,
        hook: discord.Webhook,
        persona: Persona,
        hooks: Webhooks,
    ) -> None:
        super().__init__(source, interval, budget)
        self.hook = hook
        self.name = persona.display_name[:80]  # Discord's limit for a webhook username
        self.avatar = hooks.avatar(persona)
        self._hooks = hooks
        self._fallen_back = False

    async def _show_now(self, text: str) -> None:
        if self._fallen_back and text:
            text = f"**{self.name}**: {text}"
        await super()._show_now(text)

    async def _send(self, chunk: str) -> discord.Message:
        if not self._fallen_back:
            extra: dict[str, Any] = {}
            if isinstance(self.source.channel, discord.Thread):
                extra["thread"] = self.source.channel
            try:
                self.budget.spend(self._channel_id)
                return await self.hook.send(
                    chunk,
                    username=self.name,
                    avatar_url=self.avatar or discord.utils.MISSING,
                    allowed_mentions=NO_MENTIONS,
                    wait=True,
                    **extra,
                )
            except discord.HTTPException as exc:
                log.warning(
                    "the webhook in %s failed (%s); using the bot", self.hook.channel_id, exc.status
                )
                self._hooks.forget(self.hook.channel_id or 0)
                self._fallen_back = True
                chunk = f"**{self.name}**: {chunk}"
        return await super()._send(chunk)
