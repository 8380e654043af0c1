"""The platform-neutral command layer.

Adapters map their own syntax onto it: "/" lines in the terminal, Discord slash commands,
Matrix "!" commands. A command gets a `CommandContext` and returns a `CommandResult`; errors
are `CommandError`s whose message tells the user how to do it right.
"""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bot.core.engine import Engine
from bot.core.events import user_key
from bot.core.personas import Persona
from bot.errors import CommandError


@dataclass(frozen=True)
class CommandContext:
    platform: str
    conversation: str
    author_id: str
    author_name: str
    is_admin: bool = False
    # Images (issue 8): adapters edit one message with `progress`; `nsfw` marks NSFW channels
    progress: Callable[[str], Awaitable[None]] | None = None
    nsfw: bool = False
    guild: str | None = None  # Discord guild or Matrix server, for per-guild budgets

    @property
    def user_key(self) -> str:
        return user_key(self.platform, self.author_id)


@dataclass(frozen=True)
class CommandResult:
    text: str
    private: bool = False  # an ephemeral reply where the platform has them
    attachment: Path | None = None  # a file to send with the text (the /spend chart)
    spoiler: bool = False  # show the attachment behind a spoiler (a flagged /imagine picture)


Handler = Callable[[CommandContext, list[str]], Awaitable[CommandResult]]


@dataclass(frozen=True)
class Command:
    name: str
    usage: str
    summary: str
    handler: Handler


def parse(text: str, prefix: str = "/") -> tuple[str, list[str]] | None:
    """'/persona sage' → ('persona', ['sage']); None when the text is not a command."""
    if not text.startswith(prefix) or len(text) <= len(prefix):
        return None
    try:
        words = shlex.split(text[len(prefix) :])
    except ValueError:
        words = text[len(prefix) :].split()
    if not words:
        return None
    return words[0].lower(), words[1:]


class Commands:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._commands: dict[str, Command] = {}
        self.register("help", "help", "list the commands", self._help)
        self.register(
            "persona",
            "persona [NAME] | persona cast [add|remove NAME]",
            "show the personas, switch this conversation to NAME, or show and change its cast",
            self._persona,
        )
        self.register("reset", "reset", "forget this conversation's history", self._reset)
        # Capabilities add their own (/memories, /forget, /spend, /imagine) from bot/app.py.

    def register(self, name: str, usage: str, summary: str, handler: Handler) -> None:
        self._commands[name] = Command(name, usage, summary, handler)

    def all(self) -> list[Command]:
        return list(self._commands.values())

    async def run(self, context: CommandContext, name: str, args: list[str]) -> CommandResult:
        command = self._commands.get(name)
        if command is None:
            raise CommandError(f"There is no command {name!r}. Try help for the list.")
        return await command.handler(context, args)

    async def _help(self, context: CommandContext, args: list[str]) -> CommandResult:
        lines = [f"{c.usage} — {c.summary}" for c in self._commands.values()]
        return CommandResult("\n".join(lines), private=True)

    async def _persona(self, context: CommandContext, args: list[str]) -> CommandResult:
        if args and args[0].lower() == "cast":
            return await self._cast(context, args[1:])
        conversation = await self.engine.conversation(context.platform, context.conversation)
        current = self.engine.persona_named(conversation.persona)
        if not args:
            return CommandResult(await self._personas_here(context, current), private=True)
        if len(args) > 1:
            raise CommandError("Usage: persona [NAME]")
        if not context.is_admin:
            raise CommandError("Only an admin can change the persona here.")
        chosen = self.engine.personas.find(args[0])
        if chosen is None:
            names = ", ".join(self.engine.personas.names())
            raise CommandError(f"There is no persona called {args[0]!r}. Choose one of: {names}.")
        await self.engine.history.set_persona(conversation.id, chosen.name)
        return CommandResult(f"{chosen.display_name} is here now. {chosen.greeting}")

    async def _personas_here(self, context: CommandContext, current: Persona) -> str:
        """Who talks here (the cast, when it is more than one) and every persona (* here)."""
        cast = await self.engine.cast_for(context.platform, context.conversation)
        here = {p.name for p in cast} if len(cast) > 1 else {current.name}
        if len(cast) > 1:
            names = ", ".join(f"{p.display_name} ({p.name})" for p in cast)
            lines = [f"The cast here: {names}. Personas:"]
        else:
            lines = [f"Talking with {current.display_name} ({current.name}). Personas:"]
        for persona in self.engine.personas.all():
            mark = "*" if persona.name in here else "-"
            lines.append(f"{mark} {persona.name}: {persona.display_name}")
        return "\n".join(lines)

    async def _cast(self, context: CommandContext, args: list[str]) -> CommandResult:
        """persona cast: list; persona cast add NAME / remove NAME (admins)."""
        engine = self.engine
        conversation = await engine.conversation(context.platform, context.conversation)
        cast = await engine.cast_for(context.platform, context.conversation)
        if not args:
            lines = [f"The cast here ({len(cast)}):"]
            lines += [f"- {p.name}: {p.display_name}" for p in cast]
            return CommandResult("\n".join(lines), private=True)
        action = args[0].lower()
        if action not in ("add", "remove") or len(args) != 2:
            raise CommandError(
                "Usage: persona cast, persona cast add NAME, persona cast remove NAME"
            )
        if not context.is_admin:
            raise CommandError("Only an admin can change the cast here.")
        chosen = engine.personas.find(args[1])
        if chosen is None:
            names = ", ".join(engine.personas.names())
            raise CommandError(f"There is no persona called {args[1]!r}. Choose one of: {names}.")
        names_now = [p.name for p in cast]
        if action == "add":
            if chosen.name in names_now:
                return CommandResult(f"{chosen.display_name} is already in the cast here.")
            await engine.history.add_to_cast(conversation.id, [*names_now, chosen.name])
            return CommandResult(f"{chosen.display_name} joins the cast. {chosen.greeting}")
        if chosen.name not in names_now:
            raise CommandError(f"{chosen.display_name} is not in the cast here.")
        if len(names_now) == 1:
            raise CommandError(
                f"{chosen.display_name} is the whole cast; add another persona first, "
                "or switch with: persona NAME"
            )
        await engine.history.add_to_cast(conversation.id, names_now)  # a cast of one stored
        await engine.history.remove_from_cast(conversation.id, chosen.name)
        return CommandResult(f"{chosen.display_name} leaves the cast.")

    async def _reset(self, context: CommandContext, args: list[str]) -> CommandResult:
        conversation = await self.engine.conversation(context.platform, context.conversation)
        deleted = await self.engine.history.reset(conversation.id)
        persona = self.engine.persona_named(conversation.persona)
        return CommandResult(
            f"Forgot this conversation ({deleted} messages). {persona.display_name} starts afresh."
        )
