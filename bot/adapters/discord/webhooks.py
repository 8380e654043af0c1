"""A cast's faces on Discord: webhooks the bot creates in a channel and reuses.

Each cast member's reply is posted through a channel webhook with the persona's display name,
and streamed by editing that webhook message. Discord takes a per-message avatar only as an
https URL, so:

- a persona whose `avatar` is an https URL (or who has none) speaks through the channel's one
  shared webhook (`personabot cast`), the URL sent with each message;
- a persona whose `avatar` is a picture file speaks through a webhook of its own in the channel
  (`personabot face NAME`), created with the picture as the webhook's own avatar; once a process
  the picture is set on it again (it may have changed while the bot was away), and again when
  the file changes. Where Discord refuses another webhook (15 a channel, its error 30007), that
  persona speaks through the shared webhook with the default avatar, said once in the log.

The bot needs Manage Webhooks in the channel; without it (or when a webhook was deleted) the
reply comes from the bot's own account with the persona's name in bold, and `lacking` lists the
channels so the operator can fix it. A thread speaks through its parent channel's webhooks.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import discord

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.reply import NO_MENTIONS, ReplyView
from bot.core.personas import Persona, has_local_avatar

log = logging.getLogger(__name__)

HOOK_NAME = "personabot cast"
FACE_PREFIX = "personabot face "  # a persona's own webhook: "personabot face mimi"
_RETRY_AFTER = 600.0  # seconds before asking again in a channel that refused us a webhook
_TOO_MANY_WEBHOOKS = 30007  # Discord's JSON error code: "Maximum number of webhooks reached (15)"


def face_name(persona: Persona) -> str:
    """The name of the persona's own webhook (Discord refuses names with "discord" or "clyde")."""
    return re.sub("(?i)discord|clyde", "-", FACE_PREFIX + persona.name)[:80]


Channel = discord.TextChannel | discord.ForumChannel


class Webhooks:
    """The webhooks of each channel, found or created once and then reused."""

    def __init__(self, personas_dir: Path | None = None) -> None:
        self.personas_dir = personas_dir  # where avatar files are (None: no face webhooks)
        self._hooks: dict[int, discord.Webhook] = {}
        # (channel id, persona) → (the picture's mtime ns, its webhook or None: Discord refused
        # one, and when)
        self._faces: dict[tuple[int, str], tuple[int, discord.Webhook | None, float]] = {}
        self._refused: dict[int, float] = {}  # channel id → when Discord said Forbidden
        self._lock = asyncio.Lock()
        self._unshown: set[str] = set()  # personas whose avatar file Discord did not take

    def avatar(self, persona: Persona, hook: discord.Webhook | None = None) -> str | None:
        """The avatar URL to post with through `hook`: the https one; none for a picture file,
        whose face is the webhook's own (unless `hook` is the shared one: said once)."""
        if (
            has_local_avatar(persona)
            and (hook is None or not _is_face(hook))
            and persona.name not in self._unshown
        ):
            self._unshown.add(persona.name)
            log.warning(
                "the avatar of %s is a file, and it has no webhook of its own here: on Discord "
                "%s speaks with the webhook's default avatar (Matrix shows the file)",
                persona.name,
                persona.name,
            )
        return avatar_url(persona)

    @property
    def ids(self) -> set[int]:
        """Our webhooks' ids: their messages come back through the gateway and are ours."""
        faces = {hook.id for _, hook, _ in self._faces.values() if hook is not None}
        return {hook.id for hook in self._hooks.values()} | faces

    @property
    def lacking(self) -> list[int]:
        """Channels where the bot may not manage webhooks (personas fall back to bold names)."""
        return sorted(self._refused)

    def forget(self, channel_id: int) -> None:
        self._hooks.pop(channel_id, None)
        for key in [key for key in self._faces if key[0] == channel_id]:
            del self._faces[key]

    async def hook(
        self, channel: object, persona: Persona | None = None, cast: Sequence[Persona] = ()
    ) -> discord.Webhook | None:
        """The webhook to speak through in `channel` (a thread: its parent's), or None: the
        persona's own when its avatar is a picture file, else the channel's shared one. `cast`:
        the channel's personas, whose own webhooks are kept when room must be made."""
        parent = channel.parent if isinstance(channel, discord.Thread) else channel
        if not isinstance(parent, Channel):
            return None  # DMs and other channels have no webhooks
        shared = await self._shared(parent)
        if shared is None or persona is None or not has_local_avatar(persona):
            return shared
        return await self._face(parent, persona, cast) or shared

    async def _shared(self, parent: Channel) -> discord.Webhook | None:
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

    async def _find_or_create(self, channel: Channel) -> discord.Webhook | None:
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

    async def _face(
        self, parent: Channel, persona: Persona, cast: Sequence[Persona] = ()
    ) -> discord.Webhook | None:
        """The persona's own webhook in the channel, its picture the webhook's avatar; None
        when there is no picture file to show or Discord refused (tried again in 10 minutes,
        or when the file changes)."""
        if self.personas_dir is None:
            return None
        path = self.personas_dir / persona.avatar
        try:
            version = path.stat().st_mtime_ns
        except OSError:
            return None
        key = (parent.id, persona.name)
        async with self._lock:
            seen, kept, when = self._faces.get(key, (None, None, 0.0))
            if seen == version and (kept is not None or time.monotonic() - when < _RETRY_AFTER):
                return kept
            found = await self._set_face(parent, persona, path, cast)
            self._faces[key] = (version, found, time.monotonic())
            return found

    async def _set_face(
        self, parent: Channel, persona: Persona, path: Path, cast: Sequence[Persona] = ()
    ) -> discord.Webhook | None:
        name = face_name(persona)
        reason = f"personabot: {persona.name} speaks with its own picture"
        try:
            picture = await asyncio.to_thread(path.read_bytes)
            hooks = await parent.webhooks()
            mine = next((h for h in hooks if h.name == name and h.token), None)
            if mine is not None:
                return await mine.edit(avatar=picture, reason=reason)
            try:
                return await parent.create_webhook(name=name, avatar=picture, reason=reason)
            except discord.HTTPException as exc:
                if exc.code != _TOO_MANY_WEBHOOKS or not await self._make_room(parent, hooks, cast):
                    raise
                return await parent.create_webhook(name=name, avatar=picture, reason=reason)
        except OSError:
            log.warning("the avatar %s of %s cannot be read", path, persona.name)
        except ValueError:  # discord.py reads the type from the bytes: PNG, JPEG, GIF, WebP
            log.warning("the avatar %s of %s is not a picture Discord takes", path, persona.name)
        except discord.HTTPException as exc:
            log.warning(
                "could not give %s a webhook of its own in channel %s (%s, code %s)",
                persona.name,
                parent.id,
                exc.status,
                exc.code,
            )
        return None

    async def _make_room(
        self, parent: Channel, hooks: list[discord.Webhook], cast: Sequence[Persona]
    ) -> bool:
        """Delete our own webhooks in the channel of personas no longer in its cast; True when
        one went. Without the cast nothing is deleted."""
        if not cast:
            return False
        keep = {face_name(p) for p in cast}
        stale = [h for h in hooks if _is_face(h) and h.token and h.name not in keep]
        for hook in stale:
            await hook.delete(reason="personabot: its persona left this channel's cast")
            log.info("deleted the webhook %r in channel %s to make room", hook.name, parent.id)
        gone = {hook.id for hook in stale}
        for key in [k for k, (_, h, _) in self._faces.items() if h is not None and h.id in gone]:
            del self._faces[key]
        return bool(stale)

    def _refuse(self, channel_id: int) -> None:
        log.warning(
            "no Manage Webhooks permission in channel %s: personas speak from the bot's "
            "account with their names in bold",
            channel_id,
        )
        self._refused[channel_id] = time.monotonic()


def avatar_url(persona: Persona) -> str | None:
    return persona.avatar if persona.avatar.startswith("https://") else None


def _is_face(hook: discord.Webhook) -> bool:
    return bool(hook.name and hook.name.startswith(FACE_PREFIX))


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
        self.avatar = hooks.avatar(persona, hook)
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
