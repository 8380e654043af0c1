"""`/memories` and `/forget`: each user sees and deletes only their own memories.

The list shows every fact kept about the user in this place, whichever persona of a cast keeps
it (a persona's own facts are marked with its name), and `forget` deletes any of them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bot.errors import CommandError
from bot.memory.store import scope_of

if TYPE_CHECKING:
    from bot.core.commands import CommandContext, CommandResult, Commands
    from bot.memory.service import Memory

_FORGET_USAGE = "Usage: forget all, or forget ID (the ids are in memories)."


def _kept_by(persona: str | None) -> str:
    """Which persona alone recalls a fact (a cast, issue 21); shared facts say nothing."""
    return f" (only {persona} remembers this)" if persona else ""


def register(commands: Commands, memory: Memory) -> None:
    from bot.core.commands import CommandResult

    async def memories(context: CommandContext, args: list[str]) -> CommandResult:
        scope = scope_of(context.platform, context.conversation, context.guild)
        rows = await memory.current(context.user_key, scope)
        elsewhere = await memory.count(context.user_key) - len(rows)
        more = (
            f"I keep {elsewhere} more {'fact' if elsewhere == 1 else 'facts'} about you from"
            " other places; ask there to see them."
            if elsewhere
            else ""
        )
        if not rows:
            text = "I don't remember anything about you here."
            return CommandResult(f"{text} {more}".strip(), private=True)
        lines = [f"What I remember about you here ({len(rows)}):"]
        lines += [f"#{row.id} {row.text}{_kept_by(row.private_to)}" for row in rows]
        if more:
            lines.append(more)
        lines.append("Use forget ID to delete one, or forget all (everywhere).")
        return CommandResult("\n".join(lines), private=True)

    async def forget(context: CommandContext, args: list[str]) -> CommandResult:
        if len(args) != 1:
            raise CommandError(_FORGET_USAGE)
        word = args[0].strip().lower()
        if word == "all":
            count = await memory.forget(context.user_key)
            return CommandResult(
                f"Done: I deleted all {count} things I remembered, and your messages in my"
                " history and logs.",
                private=True,
            )
        try:
            memory_id = int(word.removeprefix("#"))
        except ValueError:
            raise CommandError(_FORGET_USAGE) from None
        if await memory.forget(context.user_key, memory_id) == 0:
            raise CommandError(f"You have no memory #{memory_id}. See memories for the list.")
        return CommandResult(f"Done: I deleted memory #{memory_id}.", private=True)

    commands.register("memories", "memories", "list what I remember about you, with ids", memories)
    commands.register(
        "forget", "forget all|ID", "delete all your memories, or the one with that id", forget
    )
