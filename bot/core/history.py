"""Conversations and their messages, in Postgres. Adapters never refetch history from a platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.prompts import Turn

_HISTORY_ROWS = 200


@dataclass(frozen=True)
class Conversation:
    id: int
    platform: str
    external_id: str
    persona: str | None


class History:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def conversation(self, platform: str, external_id: str) -> Conversation:
        """The conversation row, created on first sight."""
        row = await self._pool.fetchrow(
            "INSERT INTO conversations (platform, external_id) VALUES ($1, $2)"
            " ON CONFLICT (platform, external_id) DO UPDATE SET platform = EXCLUDED.platform"
            " RETURNING id, platform, external_id, persona",
            platform,
            external_id,
        )
        return Conversation(row["id"], row["platform"], row["external_id"], row["persona"])

    async def set_persona(self, conversation_id: int, persona: str | None) -> None:
        """Switch the conversation to one persona: a cast of one (any larger cast is cleared)."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE conversations SET persona = $2 WHERE id = $1", conversation_id, persona
            )
            await conn.execute(
                "DELETE FROM conversation_cast WHERE conversation_id = $1", conversation_id
            )

    async def cast(self, conversation_id: int) -> list[str]:
        """The cast's persona names in the order they joined; empty: the single persona."""
        rows = await self._pool.fetch(
            "SELECT persona FROM conversation_cast WHERE conversation_id = $1"
            " ORDER BY added_at, persona",
            conversation_id,
        )
        return [r["persona"] for r in rows]

    async def add_to_cast(self, conversation_id: int, names: list[str]) -> None:
        """Add personas to the cast (already there: no change)."""
        await self._pool.executemany(
            "INSERT INTO conversation_cast (conversation_id, persona) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING",
            [(conversation_id, name) for name in names],
        )

    async def remove_from_cast(self, conversation_id: int, name: str) -> bool:
        """Take a persona out of the cast; False when it was not in it."""
        result = await self._pool.execute(
            "DELETE FROM conversation_cast WHERE conversation_id = $1 AND persona = $2",
            conversation_id,
            name,
        )
        return bool(int(result.split()[-1]))

    async def recent(self, conversation_id: int, limit: int = _HISTORY_ROWS) -> list[Turn]:
        """The latest messages, oldest first."""
        rows = await self._pool.fetch(
            "SELECT role, author_name, content FROM messages WHERE conversation_id = $1"
            " ORDER BY id DESC LIMIT $2",
            conversation_id,
            limit,
        )
        return [Turn(r["role"], r["author_name"], r["content"]) for r in reversed(rows)]

    async def append_exchange(
        self,
        conversation_id: int,
        *,
        author_id: str,
        author_name: str,
        text: str,
        persona: str,
        reply: str,
        heard: bool = True,
    ) -> None:
        """The user's message and the persona's reply, together or not at all. `heard=False`:
        the message is another persona's reply, already stored; only the reply is added."""
        rows = [(conversation_id, "assistant", persona, persona, persona, reply)]
        if heard:
            rows.insert(0, (conversation_id, "user", author_id, author_name, persona, text))
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO messages (conversation_id, role, author_id, author_name, persona,"
                " content) VALUES ($1, $2, $3, $4, $5, $6)",
                rows,
            )

    async def reset(self, conversation_id: int) -> int:
        """Forget this conversation's messages; returns how many were deleted."""
        result = await self._pool.execute(
            "DELETE FROM messages WHERE conversation_id = $1", conversation_id
        )
        return int(result.split()[-1])
