"""Discord: personas in a community's channels, threads and DMs (discord.py).

A thin translator. A message becomes an `Incoming` when the persona should answer
(bot/core/attention.py), the author may talk here (`DiscordPolicy`) and is within the rate limit
(bot/spend/ratelimit.py); the engine's events are rendered by `ReplyView`. Slash commands map onto
the command layer (discord_commands.py).

Conversations: a channel (or DM) is one conversation; a thread is its own, except that a reply
to a message the bot answered or sent, or a thread started from one, continues that message's
conversation (the platform_messages table). History always comes from our store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp
import discord
from discord import app_commands

from bot.adapters.discord.budget import ChannelBudget
from bot.adapters.discord.cast import CastPlayer, Faces, said_of
from bot.adapters.discord.commands import SlashCommands
from bot.adapters.discord.context import reply_context
from bot.adapters.discord.conversations import Conversations
from bot.adapters.discord.gateway import Gateway, describe
from bot.adapters.discord.policy import DiscordPolicy
from bot.adapters.discord.render import (
    CUT_OFF,
    rate_limited_notice,
    split_message,
)
from bot.adapters.discord.reply import NO_MENTIONS, ReplyView, send_plain
from bot.adapters.discord.sync import sync_commands
from bot.adapters.discord.text import message_text
from bot.adapters.discord.webhooks import Webhooks
from bot.adapters.message_map import MessageMap
from bot.app import App
from bot.core.attention import Attention
from bot.core.engine import Delta, Done, Failed, Incoming, Notice, Picture
from bot.core.events import user_key
from bot.errors import ConfigError
from bot.spend.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PLATFORM = "discord"
_READY_TIMEOUT = 60.0
# A 429 asking to wait longer than this raises RateLimited instead of stalling the request:
# a streaming reply then slows its edits down (reply.py).
_MAX_RATELIMIT_WAIT = 10.0


def create(app: App) -> DiscordAdapter | None:
    """The runner's factory: a Discord adapter when DISCORD_TOKEN is set."""
    if app.settings.discord_token is None:
        return None
    return DiscordAdapter(app)


def build_client(app: App) -> discord.Client:
    intents = discord.Intents.default()
    intents.message_content = True  # privileged: enable it in the developer portal
    settings = app.settings
    if settings.discord_sharded:
        return discord.AutoShardedClient(
            intents=intents,
            allowed_mentions=NO_MENTIONS,
            shard_count=settings.discord_shard_count,
            max_ratelimit_timeout=_MAX_RATELIMIT_WAIT,
        )
    return discord.Client(
        intents=intents, allowed_mentions=NO_MENTIONS, max_ratelimit_timeout=_MAX_RATELIMIT_WAIT
    )


def channel_ids(channel: object) -> list[int]:
    """The channel and, for a thread, its parent: permissions and listening apply to both."""
    ids = [int(getattr(channel, "id", 0))]
    parent = getattr(channel, "parent_id", None)
    if isinstance(channel, discord.Thread) and parent:
        ids.append(int(parent))
    return ids


def _mentions_me(message: discord.Message, my_id: int) -> bool:
    """An @mention of the bot, or of its own managed role (Discord often suggests that one)."""
    if any(user.id == my_id for user in message.mentions):
        return True
    return any(role.tags and role.tags.bot_id == my_id for role in message.role_mentions)


class DiscordAdapter:
    name = "discord"

    def __init__(
        self,
        app: App,
        client: discord.Client | None = None,
        *,
        attention: Attention | None = None,
    ) -> None:
        self.app = app
        self.settings = app.settings
        self.client = client or build_client(app)
        self.policy = DiscordPolicy.from_settings(app.settings)
        self.attention = attention if attention is not None else Attention()
        self.limiter = RateLimiter(
            app.pool, app.settings.discord_rate_per_minute, app.settings.discord_rate_burst
        )
        self.messages = MessageMap(app.pool, PLATFORM)
        self.budget = ChannelBudget()
        self.conversations = Conversations(app.engine, self.messages)
        self._bot_turns: dict[int, int] = {}  # channel → answers to bots since a person spoke
        self.cast = CastPlayer(
            Faces(
                self.settings.discord_edit_interval,
                self.budget,
                Webhooks(self.settings.personas_dir),
            ),
            self.attention,
            answer_dms=self.settings.discord_answer_dms,
            answer_bots=self.settings.discord_answer_bots,
        )
        self.tree = app_commands.CommandTree(self.client)
        self.gateway = Gateway(self.client)
        self.fatal = self.gateway.fatal  # the runner exits non-zero when this is set
        self.slash = SlashCommands(self)
        self._inflight: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._connection: asyncio.Task[None] | None = None
        self.client.event(self.on_message)
        self.client.event(self.on_typing)
        self.client.event(self.on_raw_message_delete)
        self.client.event(self.on_raw_bulk_message_delete)
        self.client.event(self.on_raw_message_edit)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Connected, or reconnecting for under a minute (reported by /healthz)."""
        return self.gateway.healthy

    async def start(self) -> None:
        token = self.settings.discord_token
        if token is None:
            raise ConfigError("DISCORD_TOKEN is not set")
        try:
            await self.client.login(token.get_secret_value())
        except discord.LoginFailure:
            await self.client.close()
            raise ConfigError("Discord refused DISCORD_TOKEN; copy the bot token again") from None
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            await self.client.close()
            raise ConfigError(f"could not reach Discord: {type(exc).__name__}") from None
        await sync_commands(self.tree, self.settings.discord_command_guilds, self.app.pool)
        self._connection = asyncio.create_task(self.client.connect(reconnect=True))
        ready = asyncio.create_task(self.client.wait_until_ready())
        done, _ = await asyncio.wait(
            {self._connection, ready}, timeout=_READY_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        ready.cancel()
        if self._connection in done:
            with contextlib.suppress(Exception):
                await self.client.close()
            raise ConfigError(
                f"could not connect to Discord: {describe(self._connection.exception())}"
            )
        self.gateway.watch(self._connection)
        if not done:
            log.warning("Discord is slow to connect; carrying on while it retries")
        if self.settings.discord_admin_channel:
            self.app.notifier.register(PLATFORM, self.notify_admins)
        self.app.scheduler.every(3600, self._prune_buckets, name="discord-rate-buckets")

    async def _prune_buckets(self) -> None:
        await self.limiter.prune(f"{PLATFORM}:")

    async def stop(self) -> None:
        """Take no new messages; let replies in flight finish, cut off the rest; disconnect."""
        self._closing = True
        self.gateway.closing = True
        self.app.notifier.unregister(PLATFORM)
        pending = {task for task in self._inflight if not task.done()}
        if pending:
            _, late = await asyncio.wait(pending, timeout=self.settings.discord_shutdown_grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.client.close()
        if self._connection is not None:
            await asyncio.gather(self._connection, return_exceptions=True)

    async def notify_admins(self, text: str) -> None:
        channel_id = self.settings.discord_admin_channel
        if channel_id is None:
            return
        channel = self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)
        if not isinstance(channel, discord.abc.Messageable):
            raise ConfigError(f"DISCORD_ADMIN_CHANNEL {channel_id} is not a text channel")
        for chunk in split_message(text):
            await channel.send(chunk, allowed_mentions=NO_MENTIONS)

    # --- messages ----------------------------------------------------------------------------

    async def on_message(self, message: discord.Message) -> None:
        if self._closing:
            return
        task = asyncio.current_task()
        if task is not None:
            self.track(task)
        try:
            await self._on_message(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handling Discord message %s failed", message.id)

    @property
    def closing(self) -> bool:
        return self._closing

    def track(self, task: asyncio.Task[Any]) -> None:
        """A reply or slash command in flight: `stop` lets it finish or cuts it off."""
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.author.id == me.id or self.cast.faces.ours(message):
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        if not message.author.bot:
            self._bot_turns.pop(message.channel.id, None)  # a person spoke: bots may talk again
        is_dm = message.guild is None
        roles = [role.id for role in getattr(message.author, "roles", [])]
        ids = channel_ids(message.channel)
        if not self.policy.permits(message.author.id, roles, ids, is_dm=is_dm):
            return
        key = self.conversations.key_of(message.channel)
        cast = await self.conversations.cast(key, message.channel)
        mentioned = _mentions_me(message, me.id)
        reply_to_bot = await self.conversations.replies_to_bot(message, me.id)
        said = said_of(
            message,
            cast,
            self.cast.stage,
            reply_to_bot=reply_to_bot,
            mentioned=mentioned,
            always_listen=self.policy.listens(ids),
        )
        choices = self.cast.who_speaks(cast, said, key)
        if not choices or not self._bot_may_talk(message):
            return
        # Decided to answer: from here on the database is written.
        log.info("answering %s in %s: %s", message.author.id, key, choices[0].reason)
        if not await self.limiter.allow(user_key(PLATFORM, str(message.author.id))):
            if not choices[0].reason.startswith("following"):
                notice = rate_limited_notice(choices[0].persona.display_name)
                await send_plain(message, notice, self.budget)
            return
        await self.conversations.adopt(key, message.channel)
        text = await self._text_of(message)
        context = await reply_context(
            message, links=self.settings.discord_reply_chain, my_id=me.id, known=self._known
        )
        if not text and not context:
            if mentioned or reply_to_bot or is_dm:  # a bare "@Mimi": say hello
                await send_plain(message, choices[0].persona.greeting, self.budget)
            return
        text = "\n\n".join(part for part in (context, text) if part)
        incoming = self._incoming(message, key, text)
        await self.cast.play(message, incoming, cast, choices, self._reply)

    def _bot_may_talk(self, message: discord.Message) -> bool:
        """Two bots answering each other would talk forever: a few turns, then silence until a
        person speaks in the channel again."""
        if not message.author.bot:
            return True
        turns = self._bot_turns.get(message.channel.id, 0)
        if turns >= self.settings.discord_bot_turns:
            log.info(
                "not answering bot %s in %s: %d turns already",
                message.author.id,
                message.channel.id,
                turns,
            )
            return False
        self._bot_turns[message.channel.id] = turns + 1
        return True

    async def _known(self, message_id: str) -> bool:
        return await self.messages.lookup(message_id) is not None

    # Deletions and edits (issue 15): raw events, so that messages no longer in discord.py's
    # cache count too. The engine drops the message, its reply and what memory drew from it.

    async def on_raw_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        await self._deleted([payload.message_id])

    async def on_raw_bulk_message_delete(self, payload: discord.RawBulkMessageDeleteEvent) -> None:
        await self._deleted(sorted(payload.message_ids))

    async def on_raw_message_edit(self, payload: discord.RawMessageUpdateEvent) -> None:
        if "content" not in payload.data or payload.message.author.bot:
            return  # an embed appearing, a pin, our own streaming edits: not a user's edit
        try:
            text = await self._text_of(payload.message)  # as the message was first stored
            if text:
                await self.app.engine.message_edited(PLATFORM, str(payload.message_id), text)
        except Exception:
            log.exception("honouring the edit of Discord message %s failed", payload.message_id)

    async def _deleted(self, message_ids: list[int]) -> None:
        for message_id in message_ids:
            try:
                await self.app.engine.message_deleted(PLATFORM, str(message_id))
            except Exception:
                log.exception("honouring the deletion of Discord message %s failed", message_id)

    async def on_typing(self, channel: object, user: object, when: object) -> None:
        """Someone is typing where the persona would answer: wake a sleeping GPU now, so the
        reply does not wait for its cold start (issue #6). Never answers anything itself, and
        touches the database only to read a persona it has not cached."""
        me = self.client.user
        if self._closing or me is None or getattr(user, "bot", False):
            return
        try:
            is_dm = isinstance(channel, discord.DMChannel)
            ids = channel_ids(channel)
            roles = [role.id for role in getattr(user, "roles", [])]
            if not self.policy.permits(int(getattr(user, "id", 0)), roles, ids, is_dm=is_dm):
                return
            key = self.conversations.key_of(channel)
            persona = await self.conversations.persona(key, channel)
            likely = (
                (is_dm and self.settings.discord_answer_dms)
                or self.policy.listens(ids)
                or self.attention.probability(key, persona) > 0
            )
            if likely and await self.app.engine.router.prewake(persona.model):
                log.info("pre-waking a backend for %s: someone is typing in %s", persona.model, key)
        except Exception:
            log.exception("pre-wake on typing failed")

    async def conversation_for_channel(self, channel: object) -> str:
        """The conversation of a channel, DM or thread, made ready for a command."""
        key = self.conversations.key_of(channel)
        await self.conversations.adopt(key, channel)
        return key

    async def _text_of(self, message: discord.Message) -> str:
        me = self.client.user
        limit = self.settings.discord_attachment_max_bytes
        return await message_text(message, bot_id=me.id if me else None, limit=limit)

    def _incoming(self, message: discord.Message, key: str, text: str) -> Incoming:
        is_nsfw = getattr(message.channel, "is_nsfw", None)
        return Incoming(
            platform=PLATFORM,
            conversation=key,
            author_id=str(message.author.id),
            author_name=message.author.display_name,
            text=text,
            guild=str(message.guild.id) if message.guild else None,
            nsfw=bool(is_nsfw()) if callable(is_nsfw) else False,
            message_id=str(message.id),
        )

    async def _reply(
        self, message: discord.Message, incoming: Incoming, view: ReplyView | None = None
    ) -> str | None:
        """Render the engine's answer; returns the reply's text when one was given."""
        view = view or ReplyView(message, self.settings.discord_edit_interval, self.budget)
        answered: str | None = None
        await view.start_typing()
        try:
            async with contextlib.aclosing(self.app.engine.handle(incoming)) as events:
                async for event in events:
                    if isinstance(event, Delta):
                        await view.grow(event.text)
                    elif isinstance(event, Done):
                        await view.finish(event.text)
                        answered = event.text
                    elif isinstance(event, Failed):
                        await view.fail(event.text, retract=event.retract)
                    elif isinstance(event, Notice):
                        log.warning("notice for %s: %s", incoming.user_key, event.text)
                        if event.user_text:
                            await view.notice(event.user_text)
                    elif isinstance(event, Picture):  # drawn by the model: a file after the reply
                        await view.attach(event.path, spoiler=event.spoiler, caption=event.caption)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await view.close()
                await view.fail(CUT_OFF)
            raise
        finally:
            await view.close()
            await self._remember(incoming.conversation, message, view)
        return answered

    async def _remember(self, key: str, message: discord.Message, view: ReplyView) -> None:
        try:
            await self.messages.remember(key, [str(message.id)], from_bot=False)
            sent = [*view.sent, *view.files]
            await self.messages.remember(key, [str(m.id) for m in sent], from_bot=True)
        except Exception:
            log.exception("could not remember the messages of conversation %s", key)
