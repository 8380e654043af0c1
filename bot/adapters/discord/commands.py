"""Slash commands, mapped onto the platform-neutral command layer (bot/core/commands.py).

`/persona list|show|set|cast` (names autocomplete), `/reset`, `/memories`, `/forget`, `/imagine`,
and under `/admin` (default permission: Manage Server) `/admin spend`. A command
the layer does not have yet (memory, images or the ledger are not wired in) answers that it is
"not available yet". Every command defers first, inside Discord's 3-second window; errors reach
the user as ephemeral messages in plain words. Nothing sent can mention anyone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands

from bot.adapters.discord.render import CUT_OFF, split_message
from bot.adapters.discord.reply import NO_MENTIONS
from bot.core.commands import CommandContext, CommandResult
from bot.errors import BotError, user_message

if TYPE_CHECKING:
    from bot.adapters.discord.adapter import DiscordAdapter

log = logging.getLogger(__name__)

RESTARTING = "I'm restarting right now. Please try again in a minute."
# Commands whose answer only the caller should see.
_PRIVATE = frozenset({"memories", "forget", "spend", "help"})
PROGRESS_EVERY = 1.0  # seconds between progress edits of one answer, at most one each
_TOO_BIG = "(The picture is over Discord's upload limit here, so I couldn't post it.)"
_GONE = "(I couldn't post the picture: the message I was writing it into is gone.)"


class SlashCommands:
    def __init__(self, adapter: DiscordAdapter) -> None:
        self.adapter = adapter
        self._register(adapter.tree)

    def _register(self, tree: app_commands.CommandTree[Any]) -> None:
        persona = app_commands.Group(name="persona", description="Who answers in this channel")

        @persona.command(name="list", description="The personas you can talk to")
        async def persona_list(interaction: discord.Interaction) -> None:
            await self.run(interaction, "persona", [], private=True)

        @persona.command(name="show", description="Who a persona is (this channel's by default)")
        @app_commands.describe(name="a persona's name")
        async def persona_show(interaction: discord.Interaction, name: str | None = None) -> None:
            await self.show_persona(interaction, name)

        @persona.command(name="set", description="Switch this channel's persona (admins)")
        @app_commands.describe(name="the persona's name")
        async def persona_set(interaction: discord.Interaction, name: str) -> None:
            await self.run(interaction, "persona", [name], admin_only=True)

        persona_set.autocomplete("name")(self.persona_names)
        persona_show.autocomplete("name")(self.persona_names)

        @persona.command(name="cast", description="This channel's cast; add or remove (admins)")
        @app_commands.describe(action="list, add or remove", name="the persona (add, remove)")
        async def persona_cast(
            interaction: discord.Interaction,
            action: Literal["list", "add", "remove"] = "list",
            name: str | None = None,
        ) -> None:
            if action == "list":
                await self.run(interaction, "persona", ["cast"], private=True)
                return
            args = ["cast", action, *([name] if name else [])]
            await self.run(interaction, "persona", args, admin_only=True)

        @app_commands.command(name="reset", description="Forget this conversation's history")
        async def reset(interaction: discord.Interaction) -> None:
            await self.run(interaction, "reset", [])

        @app_commands.command(name="memories", description="What the bot remembers about you")
        async def memories(interaction: discord.Interaction) -> None:
            await self.run(interaction, "memories", [], private=True)

        @app_commands.command(name="forget", description="Delete your memories: all, or one id")
        @app_commands.describe(what="'all', or the id of one memory from /memories")
        async def forget(interaction: discord.Interaction, what: str) -> None:
            await self.run(interaction, "forget", [what], private=True)

        @app_commands.command(name="imagine", description="Draw a picture")
        @app_commands.describe(
            prompt="what to draw",
            size="the picture's shape",
            seed="repeatable",
            model="schnell (fast, cheap) or dev (finer, dearer)",
        )
        async def imagine(
            interaction: discord.Interaction,
            prompt: str,
            size: Literal["square", "portrait", "landscape"] | None = None,
            seed: int | None = None,
            model: Literal["schnell", "dev"] | None = None,
        ) -> None:
            args = [f"prompt:{prompt}"]
            args += [f"size:{size}"] if size else []
            args += [f"seed:{seed}"] if seed is not None else []
            args += [f"model:{model}"] if model else []
            await self.run(interaction, "imagine", args)

        # Admin commands: hidden from members without Manage Server unless a server admin
        # allows them (Server Settings → Integrations); our own admin list still decides.
        admin = app_commands.Group(
            name="admin",
            description="Run the bot (admins)",
            default_permissions=discord.Permissions(manage_guild=True),
        )

        @admin.command(name="spend", description="This month's spend")
        @app_commands.describe(month="YYYY-MM; this month by default")
        async def spend(interaction: discord.Interaction, month: str | None = None) -> None:
            await self.run(interaction, "spend", [month] if month else [], admin_only=True)

        tree.add_command(persona)
        tree.add_command(admin)
        commands: list[app_commands.Command[Any, Any, None]] = [
            reset,
            memories,
            forget,
            imagine,
        ]
        for command in commands:
            tree.add_command(command)

    async def persona_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        """Persona names for autocomplete: those whose name or display name contains `current`."""
        typed = current.strip().lower()
        choices = []
        for persona in self.adapter.app.engine.personas.all():
            label = f"{persona.display_name} ({persona.name})"
            if typed in persona.name.lower() or typed in persona.display_name.lower():
                choices.append(app_commands.Choice(name=label[:100], value=persona.name))
        return choices[:25]  # Discord shows at most 25

    # --- running -------------------------------------------------------------------------------

    def is_admin(self, interaction: discord.Interaction) -> bool:
        roles = [role.id for role in getattr(interaction.user, "roles", [])]
        return self.adapter.policy.is_admin(interaction.user.id, roles)

    def permitted(self, interaction: discord.Interaction) -> bool:
        roles = [role.id for role in getattr(interaction.user, "roles", [])]
        ids = _channel_ids(interaction)
        is_dm = interaction.guild_id is None
        return self.adapter.policy.permits(interaction.user.id, roles, ids, is_dm=is_dm)

    async def context(
        self, interaction: discord.Interaction, progress: _Progress | None = None
    ) -> CommandContext:
        key = await self.adapter.conversation_for_channel(interaction.channel)
        return CommandContext(
            platform="discord",
            conversation=key,
            author_id=str(interaction.user.id),
            author_name=interaction.user.display_name,
            is_admin=self.is_admin(interaction),
            progress=progress,
            nsfw=_is_nsfw(interaction.channel),
            guild=str(interaction.guild_id) if interaction.guild_id else None,
        )

    async def run(
        self,
        interaction: discord.Interaction,
        name: str,
        args: list[str],
        *,
        private: bool = False,
        admin_only: bool = False,
    ) -> None:
        """Defer, run `name` on the command layer, answer; errors privately, in plain words.
        At shutdown a command in flight is finished, or told it was cut off."""
        if self.adapter.closing:
            await self.respond(interaction, RESTARTING, private=True)
            return
        task = asyncio.current_task()
        if task is not None:
            self.adapter.track(task)
        try:
            await self._run(interaction, name, args, private=private, admin_only=admin_only)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await self.respond(interaction, CUT_OFF, private=True)
            raise

    async def _run(
        self,
        interaction: discord.Interaction,
        name: str,
        args: list[str],
        *,
        private: bool,
        admin_only: bool,
    ) -> None:
        if not self.permitted(interaction):
            await self.respond(interaction, "You can't use my commands here.", private=True)
            return
        if name not in {command.name for command in self.adapter.app.commands.all()}:
            await self.respond(interaction, f"/{name} is not available yet.", private=True)
            return
        if admin_only and not self.is_admin(interaction):
            await self.respond(interaction, f"Only an admin can use /{name}.", private=True)
            return
        private = private or name in _PRIVATE
        await interaction.response.defer(ephemeral=private, thinking=True)
        progress = _Progress(interaction)
        try:
            context = await self.context(interaction, progress)
            result = await self.adapter.app.commands.run(context, name, args)
            if name == "persona" and args:
                self.adapter.conversations.forget()
        except BotError as exc:
            await self.fail(interaction, user_message(exc), deferred_private=private)
            return
        except Exception:
            log.exception("/%s failed", name)
            await self.fail(interaction, user_message(Exception()), deferred_private=private)
            return
        await self.answer(interaction, name, result, progress, private=private)

    async def answer(
        self,
        interaction: discord.Interaction,
        name: str,
        result: CommandResult,
        progress: _Progress,
        *,
        private: bool,
    ) -> None:
        """Post the result; a post Discord refuses (the message was deleted, the file is over
        the upload limit) is answered in words: whatever it cost is already booked."""
        file = _file_of(result)
        try:
            if progress.used:
                await progress.finish(result.text, file)
            else:
                await self.respond(interaction, result.text, private=private, file=file)
        except discord.HTTPException as exc:
            log.warning(
                "/%s: Discord refused the answer (HTTP %s, code %s)", name, exc.status, exc.code
            )
            why = _TOO_BIG if exc.status == 413 else _GONE
            with contextlib.suppress(discord.HTTPException):
                await interaction.followup.send(
                    f"{result.text}\n{why}" if file is not None else result.text,
                    ephemeral=private,
                    allowed_mentions=NO_MENTIONS,
                )

    async def show_persona(self, interaction: discord.Interaction, name: str | None) -> None:
        engine = self.adapter.app.engine
        await interaction.response.defer(ephemeral=True, thinking=True)
        if name:
            persona = engine.personas.find(name)
            if persona is None:
                names = ", ".join(engine.personas.names())
                text = f"There is no persona called {name!r}. Choose one of: {names}."
                await self.respond(interaction, text, private=True)
                return
        else:
            key = await self.adapter.conversation_for_channel(interaction.channel)
            persona = await engine.persona_for("discord", key)
        text = f"**{persona.display_name}** ({persona.name})\n{persona.description}"
        await self.respond(interaction, text, private=True)

    async def fail(
        self, interaction: discord.Interaction, text: str, *, deferred_private: bool
    ) -> None:
        """An error, ephemeral even when the deferred answer was going to be public."""
        if not deferred_private and interaction.response.is_done():
            try:
                await interaction.delete_original_response()
            except discord.HTTPException:
                log.warning("could not remove the deferred answer of a failed command")
        await self.respond(interaction, text, private=True)

    async def respond(
        self,
        interaction: discord.Interaction,
        text: str,
        *,
        private: bool,
        file: discord.File | None = None,
    ) -> None:
        chunks = split_message(text) or ["Done."]
        extra: dict[str, Any] = {"file": file} if file is not None else {}
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            kwargs = extra if last else {}
            if not interaction.response.is_done():
                await interaction.response.send_message(
                    chunk, ephemeral=private, allowed_mentions=NO_MENTIONS, **kwargs
                )
            else:
                await interaction.followup.send(
                    chunk, ephemeral=private, allowed_mentions=NO_MENTIONS, **kwargs
                )


def _channel_ids(interaction: discord.Interaction) -> list[int]:
    ids = [interaction.channel_id] if interaction.channel_id else []
    parent = getattr(interaction.channel, "parent_id", None)
    if isinstance(interaction.channel, discord.Thread) and parent:
        ids.append(int(parent))
    return ids


def _file_of(result: CommandResult) -> discord.File | None:
    if result.attachment is None:
        return None
    return discord.File(result.attachment, spoiler=result.spoiler)


def _is_nsfw(channel: Any) -> bool:
    """NSFW channels, and threads under one."""
    checker = getattr(channel, "is_nsfw", None)
    return bool(checker()) if callable(checker) else False


class _Progress:
    """Shows a long command's progress by editing its one deferred answer, then the result.

    Edits run in the background, never on the command's own (time-limited) path, at most one
    per PROGRESS_EVERY seconds and always the latest text; the result's edit replaces any
    still waiting."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self._interaction = interaction
        self._last: str | None = None
        self._shown: str | None = None
        self._next_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.used = False

    async def __call__(self, text: str) -> None:
        if text == self._last:
            return
        self._last = text
        self.used = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._show())

    async def _show(self) -> None:
        loop = asyncio.get_running_loop()
        while self._last is not None and self._last != self._shown:
            wait = self._next_at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            text = self._shown = self._last
            self._next_at = loop.time() + PROGRESS_EVERY
            try:
                await self._interaction.edit_original_response(
                    content=text[:2000], allowed_mentions=NO_MENTIONS
                )
            except discord.HTTPException:
                log.warning("could not show a command's progress")

    async def finish(self, text: str, file: discord.File | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        chunks = split_message(text) or ["Done."]
        await self._interaction.edit_original_response(
            content=chunks[0],
            attachments=[file] if file is not None else [],
            allowed_mentions=NO_MENTIONS,
        )
        for chunk in chunks[1:]:
            await self._interaction.followup.send(chunk, allowed_mentions=NO_MENTIONS)
