"""What the reply pipeline needs from the capabilities, as interfaces bot/app.py fills.

The core never imports a capability package: the engine holds a `MemoryPort` (bot/memory/),
a `DrawingPort` (bot/images/draw_tool.py), a `RatePort` (bot/spend/ratelimit.py) and a
moderation step around a guard port
(bot/core/moderation.py, the guard from bot/safety/). The small values they exchange with the
engine (an `Exchange` for memory, a `Speaker` for the draw tool) are defined here, and the
capabilities import them from the core.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bot.brains.base import ToolCall
from bot.core.calls import CallContext
from bot.core.personas import Persona

Spawn = Callable[[Awaitable[None]], None]


def scope_of(platform: str, conversation: str, guild: str | None) -> str:
    """Where a fact learned here may be recalled: the terminal, a Matrix room (a DM is a room),
    a Discord server, or else the conversation itself (a Discord DM)."""
    if platform == "console":
        return "console"
    if platform == "matrix":  # a thread's conversation is "room|thread root": its room
        return f"matrix:room:{conversation.split('|', 1)[0]}"
    if guild:
        return f"{platform}:guild:{guild}"
    return f"{platform}:conv:{conversation}"


@dataclass(frozen=True)
class Exchange:
    """One answered message, as the engine hands it to memory."""

    user_key: str
    author_name: str
    persona: str
    model: str
    platform: str
    conversation_id: int | None
    message: str
    reply: str
    scope: str | None = None  # scope_of() the place it was said; None: before scopes
    message_id: int | None = None  # messages.id of the user's message in history
    # The persona that alone recalls what is learned here (a cast, issue 21); None: shared by
    # every persona (a persona with `share_memories: true`).
    private_to: str | None = None


class RecalledFact(Protocol):
    @property
    def text(self) -> str: ...


class EarlyEmbedding(Protocol):
    """A message's embedding started before its reply knew the persona (`embed_early`)."""

    @property
    def user_key(self) -> str: ...

    @property
    def text(self) -> str: ...


class MemoryPort(Protocol):
    """Long-term memory as the engine uses it (bot/memory/service.py's `Memory`)."""

    def active(self, persona: Persona) -> bool: ...

    def embed_early(self, user_key: str, text: str, scope: str | None) -> EarlyEmbedding | None: ...

    def settle_early(self, early: EarlyEmbedding, context: CallContext, spawn: Spawn) -> None: ...

    async def recall(
        self,
        user_key: str,
        text: str,
        *,
        context: CallContext,
        spawn: Spawn | None = None,
        scope: str | None = None,
        persona: str | None = None,
        early: EarlyEmbedding | None = None,
    ) -> Sequence[RecalledFact]: ...

    async def remember(self, exchange: Exchange) -> None: ...

    async def message_deleted(self, message_rows: list[int]) -> int: ...

    async def message_edited(
        self,
        message_rows: list[int],
        text: str,
        model_of: Callable[[str], str | None] | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Speaker:
    """Who asked, and where: the picture is theirs (limits, caps, ledger) as with /imagine."""

    platform: str
    conversation: str
    author_id: str
    guild: str | None
    nsfw: bool


class DrawnPicture(Protocol):
    @property
    def path(self) -> Path: ...

    @property
    def spoiler(self) -> bool: ...


class Drawn(Protocol):
    """What a tool call did: the tool message for the model, and the picture if one was drawn."""

    @property
    def reply(self) -> str: ...

    @property
    def prompt(self) -> str: ...

    @property
    def result(self) -> DrawnPicture | None: ...


class DrawingPort(Protocol):
    """The chat model's draw_image tool (bot/images/draw_tool.py's `DrawTool`)."""

    def tools(self, persona: Persona) -> tuple[dict[str, Any], ...]: ...

    def run(self, call: ToolCall, speaker: Speaker, persona: Persona) -> AsyncIterator[str | Drawn]:
        """Progress lines while the picture is drawn, then what was drawn last."""
        ...


class RatePort(Protocol):
    """Token buckets per key with the rate given per call (bot/spend/ratelimit.py's `Buckets`):
    a persona's own limit per member."""

    async def allow(self, key: str, rate_per_minute: float, burst: int) -> bool: ...


def rate_limited(display_name: str) -> str:
    """What a member hears when they talk faster than a persona (or the bot) keeps up with."""
    return (
        f"*{display_name} takes a breath.* You're talking faster than I can keep up — "
        "give me a moment and try again."
    )


DRAW_IMAGE = "draw_image"  # the tool's name, as the model calls it
ONE_PER_REPLY = "Not drawn: only one picture per reply."


def tool_messages(content: str, calls: list[ToolCall], results: list[str]) -> list[dict[str, Any]]:
    """The model's turn with its tool calls, then one tool message per call (Ollama's shape)."""
    turn: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "tool_calls": [{"function": {"name": c.name, "arguments": c.arguments}} for c in calls],
    }
    answers = [
        {"role": "tool", "content": result, "tool_name": call.name}
        for call, result in zip(calls, results, strict=True)
    ]
    return [turn, *answers]
