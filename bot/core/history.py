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

    async def find(self, platform: str, external_id: str) -> Conversation | None:
        """The conversation row if it exists; a read only (adapters decide without writing)."""
        row = await self._pool.fetchrow(
            "SELECT id, platform, external_id, persona FROM conversations"
            " WHERE platform = $1 AND external_id = $2",
            platform,
            external_id,
        )
        if row is None:
            return None
        return Conversation(row["id"], row["platform"], row["external_id"], row["persona"])

    async def fork(self, source_id: int, target_id: int, persona: str) -> None:
        """Start `target` as a copy of `source` so far (its messages, and `persona`); from then
        on each keeps its own history. Used for a thread started from a message."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO messages (conversation_id, role, author_id, author_name, persona,"
                " content, created_at) SELECT $2, role, author_id, author_name, persona, content,"
                " created_at FROM messages WHERE conversation_id = $1 ORDER BY id",
                source_id,
                target_id,
            )
            await conn.execute(
                "UPDATE conversations SET persona = $2 WHERE id = $1", target_id, persona
            )

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
        message_id: str | None = None,
        heard: bool = True,
    ) -> int | None:
        """The user's message (with the platform's id of it) and the persona's reply, together
        or not at all; returns the user message's row id. `heard=False`: the message is another
        persona's reply (or one another cast member answered), already stored; only the reply
        is added, and None is returned."""
        insert = (
            "INSERT INTO messages (conversation_id, role, author_id, author_name, persona,"
            " content, platform_message_id) VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id"
        )
        row_id = None
        async with self._pool.acquire() as conn, conn.transaction():
            if heard:
                row_id = await conn.fetchval(
                    insert,
                    conversation_id,
                    "user",
                    author_id,
                    author_name,
                    persona,
                    text,
                    message_id,
                )
            await conn.execute(
                insert, conversation_id, "assistant", persona, persona, persona, reply, message_id
            )
        return None if row_id is None else int(row_id)

    async def delete_message(self, platform: str, message_id: str) -> list[int]:
        """A message deleted on the platform leaves the history, with the reply to it; returns
        the row ids of the user's messages deleted (memory drops what came from them)."""
        rows = await self._pool.fetch(
            "DELETE FROM messages m USING conversations c WHERE c.id = m.conversation_id"
            " AND c.platform = $1 AND m.platform_message_id = $2 RETURNING m.id, m.role",
            platform,
            message_id,
        )
        return [r["id"] for r in rows if r["role"] == "user"]

    async def edit_message(self, platform: str, message_id: str, text: str) -> list[int]:
        """An edited message replaces the stored text; returns the row ids changed."""
        rows = await self._pool.fetch(
            "UPDATE messages m SET content = $3 FROM conversations c"
            " WHERE c.id = m.conversation_id AND c.platform = $1"
            " AND m.platform_message_id = $2 AND m.role = 'user' RETURNING m.id",
            platform,
            message_id,
            text,
        )
        return [r["id"] for r in rows]

    async def reset(self, conversation_id: int) -> int:
        """Forget this conversation's messages; returns how many were deleted."""
        result = await self._pool.execute(
            "DELETE FROM messages WHERE conversation_id = $1", conversation_id
        )
        return int(result.split()[-1])
