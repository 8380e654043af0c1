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

import aiohttp
import discord
from discord import app_commands

from bot.adapters.discord.cast import CastPlayer, Faces, said_of
from bot.adapters.discord.commands import SlashCommands
from bot.adapters.discord.policy import DiscordPolicy
from bot.adapters.discord.render import (
    CUT_OFF,
    clean_text,
    inline_attachment,
    is_text_attachment,
    rate_limited_notice,
    split_message,
    with_attachments,
)
from bot.adapters.discord.reply import NO_MENTIONS, ReplyView, send_plain
from bot.adapters.message_map import MessageMap
from bot.app import App
from bot.core.attention import Attention
from bot.core.engine import Delta, Done, Failed, Incoming, Notice, Picture
from bot.core.events import user_key
from bot.core.personas import Persona
from bot.errors import ConfigError
from bot.spend.ratelimit import RateLimiter

log = logging.getLogger(__name__)

PLATFORM = "discord"
_READY_TIMEOUT = 60.0


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
        )
    return discord.Client(intents=intents, allowed_mentions=NO_MENTIONS)


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
        self.cast = CastPlayer(
            Faces(self.settings.discord_edit_interval),
            self.attention,
            answer_dms=self.settings.discord_answer_dms,
            answer_bots=self.settings.discord_answer_bots,
        )
        self.tree = app_commands.CommandTree(self.client)
        self.slash = SlashCommands(self)
        self._inflight: set[asyncio.Task[object]] = set()
        self._closing = False
        self._connection: asyncio.Task[None] | None = None
        self.client.event(self.on_message)
        self.client.event(self.on_typing)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """The gateway session is up (reported by /healthz)."""
        return self.client.is_ready() and not self.client.is_closed()

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
        await self._sync_commands()
        self._connection = asyncio.create_task(self.client.connect(reconnect=True))
        ready = asyncio.create_task(self.client.wait_until_ready())
        done, _ = await asyncio.wait(
            {self._connection, ready}, timeout=_READY_TIMEOUT, return_when="FIRST_COMPLETED"
        )
        ready.cancel()
        if self._connection in done:
            with contextlib.suppress(Exception):
                await self.client.close()
            self._connection_failed(self._connection)
        if not done:
            log.warning("Discord is slow to connect; carrying on while it retries")
        if self.settings.discord_admin_channel:
            self.app.notifier.register(PLATFORM, self.notify_admins)
        self.app.scheduler.every(3600, self._prune_buckets, name="discord-rate-buckets")

    async def _prune_buckets(self) -> None:
        await self.limiter.prune(f"{PLATFORM}:")

    @staticmethod
    def _connection_failed(task: asyncio.Task[None]) -> None:
        error = task.exception()
        if isinstance(error, discord.PrivilegedIntentsRequired):
            raise ConfigError(
                "Discord refused the message content intent: enable it for the bot in the "
                "developer portal (Bot → Privileged Gateway Intents)"
            )
        raise ConfigError(f"could not connect to Discord: {type(error).__name__}")

    async def _sync_commands(self) -> None:
        try:
            if self.settings.discord_command_guilds:
                for guild_id in self.settings.discord_command_guilds:
                    guild = discord.Object(id=guild_id)
                    self.tree.copy_global_to(guild=guild)
                    await self.tree.sync(guild=guild)
            else:
                await self.tree.sync()
        except discord.HTTPException as exc:
            log.warning("slash commands were not synced (%s); old ones may show", exc.status)

    async def stop(self) -> None:
        """Take no new messages; let replies in flight finish, cut off the rest; disconnect."""
        self._closing = True
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
            self._inflight.add(task)
        try:
            await self._on_message(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handling Discord message %s failed", message.id)
        finally:
            if task is not None:
                self._inflight.discard(task)

    async def _on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if me is None or message.author.id == me.id or self.cast.faces.ours(message):
            return
        if message.type not in (discord.MessageType.default, discord.MessageType.reply):
            return
        is_dm = message.guild is None
        roles = [role.id for role in getattr(message.author, "roles", [])]
        ids = channel_ids(message.channel)
        if not self.policy.permits(message.author.id, roles, ids, is_dm=is_dm):
            return
        key, reply_to_bot = await self._conversation_of(message)
        await self._persona(key, message.channel)  # a new thread takes its channel's persona
        cast = await self.app.engine.cast_for(PLATFORM, key)
        said = said_of(
            message,
            cast,
            self.cast.stage,
            reply_to_bot=reply_to_bot,
            mentioned=_mentions_me(message, me.id),
            always_listen=self.policy.listens(ids),
        )
        choices = self.cast.who_speaks(cast, said, key)
        if not choices:
            return
        log.info("answering %s in %s: %s", message.author.id, key, choices[0].reason)
        if not await self.limiter.allow(user_key(PLATFORM, str(message.author.id))):
            if not choices[0].reason.startswith("following"):
                await send_plain(message, rate_limited_notice(choices[0].persona.display_name))
            return
        text = await self._text_of(message)
        if text:
            incoming = self._incoming(message, key, text)
            await self.cast.play(message, incoming, cast, choices, self._reply)

    async def on_typing(self, channel: object, user: object, when: object) -> None:
        """Someone is typing where the persona would answer: wake a sleeping GPU now, so the
        reply does not wait for its cold start (issue #6). Never answers anything itself."""
        me = self.client.user
        if self._closing or me is None or getattr(user, "bot", False):
            return
        try:
            key = await self.conversation_for_channel(channel)
            persona = await self._persona(key, channel)
            is_dm = isinstance(channel, discord.DMChannel)
            ids = channel_ids(channel)
            roles = [role.id for role in getattr(user, "roles", [])]
            if not self.policy.permits(int(getattr(user, "id", 0)), roles, ids, is_dm=is_dm):
                return
            likely = (
                (is_dm and self.settings.discord_answer_dms)
                or self.policy.listens(ids)
                or self.attention.probability(key, persona) > 0
            )
            if likely and await self.app.engine.router.prewake(persona.model):
                log.info("pre-waking a backend for %s: someone is typing in %s", persona.model, key)
        except Exception:
            log.exception("pre-wake on typing failed")

    async def _conversation_of(self, message: discord.Message) -> tuple[str, bool]:
        """(conversation key, is it a reply to the bot?) for a message."""
        me = self.client.user
        reference = message.reference
        if reference is not None and reference.message_id is not None:
            mapped = await self.messages.lookup(str(reference.message_id))
            resolved = reference.resolved
            to_bot = (
                isinstance(resolved, discord.Message)
                and me is not None
                and resolved.author.id == me.id
            )
            if mapped is not None:
                return mapped.conversation, to_bot or mapped.from_bot
            return await self.conversation_for_channel(message.channel), to_bot
        return await self.conversation_for_channel(message.channel), False

    async def conversation_for_channel(self, channel: object) -> str:
        """A thread started from a message we know continues its conversation."""
        channel_id = str(getattr(channel, "id", ""))
        if isinstance(channel, discord.Thread):
            mapped = await self.messages.lookup(channel_id)
            if mapped is not None:
                return mapped.conversation
        return channel_id

    async def _persona(self, key: str, channel: object) -> Persona:
        """The conversation's persona; a new thread takes its parent channel's."""
        engine = self.app.engine
        conversation = await engine.conversation(PLATFORM, key)
        parent = getattr(channel, "parent_id", None)
        if conversation.persona is None and isinstance(channel, discord.Thread) and parent:
            inherited = (await engine.conversation(PLATFORM, str(parent))).persona
            if inherited is not None:
                await engine.history.set_persona(conversation.id, inherited)
                return engine.persona_named(inherited)
        return engine.persona_named(conversation.persona)

    async def _text_of(self, message: discord.Message) -> str:
        me = self.client.user
        text = clean_text(
            message.content,
            bot_id=me.id if me else None,
            users={user.id: user.display_name for user in message.mentions},
            roles={role.id: role.name for role in message.role_mentions},
            channels={c.id: getattr(c, "name", "channel") for c in message.channel_mentions},
        )
        inlined: list[str] = []
        skipped: list[str] = []
        limit = self.settings.discord_attachment_max_bytes
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
        )

    async def _reply(
        self, message: discord.Message, incoming: Incoming, view: ReplyView | None = None
    ) -> str | None:
        """Render the engine's answer; returns the reply's text when one was given."""
        view = view or ReplyView(message, self.settings.discord_edit_interval)
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
                await view.fail(CUT_OFF)
            raise
        finally:
            await view.stop_typing()
            await self._remember(incoming.conversation, message, view)
        return answered

    async def _remember(self, key: str, message: discord.Message, view: ReplyView) -> None:
        try:
            await self.messages.remember(key, [str(message.id)], from_bot=False)
            sent = [*view.sent, *view.files]
            await self.messages.remember(key, [str(m.id) for m in sent], from_bot=True)
        except Exception:
            log.exception("could not remember the messages of conversation %s", key)
