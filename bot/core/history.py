"""Conversations and their messages, in Postgres. Adapters never refetch history from a platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.prompts import HISTORY_ROWS, Turn

_CONVERSATION = "id, platform, external_id, persona, history_from"


@dataclass(frozen=True)
class Conversation:
    id: int
    platform: str
    external_id: str
    persona: str | None
    history_from: int | None = None  # first message id of the prompt's history window


class History:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def conversation(self, platform: str, external_id: str) -> Conversation:
        """The conversation row, created on first sight. A read when it exists (every message
        but the first): no row lock, no dead tuple and no commit to wait for on the reply's path."""
        row = await self._pool.fetchrow(
            f"SELECT {_CONVERSATION} FROM conversations WHERE platform = $1 AND external_id = $2",
            platform,
            external_id,
        )
        if row is None:
            row = await self._pool.fetchrow(
                "INSERT INTO conversations (platform, external_id) VALUES ($1, $2)"
                " ON CONFLICT (platform, external_id) DO UPDATE SET platform = EXCLUDED.platform"
                f" RETURNING {_CONVERSATION}",
                platform,
                external_id,
            )
        return Conversation(
            row["id"], row["platform"], row["external_id"], row["persona"], row["history_from"]
        )

    async def set_persona(self, conversation_id: int, persona: str | None) -> None:
        await self._pool.execute(
            "UPDATE conversations SET persona = $2 WHERE id = $1", conversation_id, persona
        )

    async def recent(
        self, conversation_id: int, limit: int = HISTORY_ROWS, *, since: int | None = None
    ) -> list[Turn]:
        """The latest messages (from the message id `since` on, when given), oldest first."""
        rows = await self._pool.fetch(
            "SELECT id, role, author_name, content FROM messages WHERE conversation_id = $1"
            " AND id >= $3 ORDER BY id DESC LIMIT $2",
            conversation_id,
            limit,
            since or 0,
        )
        return [Turn(r["role"], r["author_name"], r["content"], r["id"]) for r in reversed(rows)]

    async def set_window(self, conversation_id: int, first_id: int) -> None:
        """Remember where the prompt's history window starts (see prompts.history_window)."""
        await self._pool.execute(
            "UPDATE conversations SET history_from = $2 WHERE id = $1", conversation_id, first_id
        )

    async def append_exchange(
        self,
        conversation_id: int,
        *,
        author_id: str,
        author_name: str,
        text: str,
        persona: str,
        reply: str,
    ) -> None:
        """The user's message and the persona's reply, together or not at all: one statement,
        so one round trip and atomic without a transaction of its own."""
        await self._pool.execute(
            "INSERT INTO messages (conversation_id, role, author_id, author_name, persona,"
            " content) VALUES ($1, 'user', $2, $3, $4, $5), ($1, 'assistant', $4, $4, $4, $6)",
            conversation_id,
            author_id,
            author_name,
            persona,
            text,
            reply,
        )

    async def reset(self, conversation_id: int) -> int:
        """Forget this conversation's messages; returns how many were deleted."""
        result = await self._pool.execute(
            "DELETE FROM messages WHERE conversation_id = $1", conversation_id
        )
        return int(result.split()[-1])
