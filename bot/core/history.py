"""Conversations and their messages, in Postgres. Adapters never refetch history from a platform."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bot.core.prompts import HISTORY_ROWS, Turn
from bot.core.together import Together

_CONVERSATION = "id, platform, external_id, persona, history_from"
# a conversation another writer made meanwhile: its row is returned all the same
_TOUCH = "DO UPDATE SET platform = EXCLUDED.platform"


@dataclass(frozen=True)
class Conversation:
    id: int
    platform: str
    external_id: str
    persona: str | None
    history_from: int | None = None  # first message id of the prompt's history window


def _conversation(row: Any) -> Conversation:
    return Conversation(
        row["id"], row["platform"], row["external_id"], row["persona"], row["history_from"]
    )


_OPENED_COLUMNS = (  # a conversation's row, and a message of it (none: NULLs)
    "c.id, c.platform, c.external_id, c.persona, c.history_from,"
    " m.id AS turn_id, m.role, m.author_name, m.content"
)
_LATEST_MESSAGES = (  # of conversation c, from its history window on, at most $3
    " LEFT JOIN LATERAL (SELECT id, role, author_name, content FROM messages"
    "  WHERE conversation_id = c.id AND id >= coalesce(c.history_from, 0)"
    "  ORDER BY id DESC LIMIT $3) m ON true"
)
_OPENING = (  # one conversation, newest message first
    f"SELECT {_OPENED_COLUMNS} FROM conversations c{_LATEST_MESSAGES}"
    " WHERE c.platform = $1 AND c.external_id = $2 ORDER BY m.id DESC"
)
_OPENINGS = (  # several, by their place in the arrays of keys ($1, $2), newest first
    f"SELECT q.i, {_OPENED_COLUMNS}"
    " FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(platform, external_id, i)"
    " JOIN conversations c ON c.platform = q.platform AND c.external_id = q.external_id"
    f"{_LATEST_MESSAGES} ORDER BY q.i, m.id DESC"
)
_OPENINGS_TOGETHER = 256  # the most conversations one opening statement reads

_Opening = tuple[Conversation, list[Turn]]


def _opened(rows: list[Any]) -> _Opening:
    """A conversation and its messages, oldest first, from its rows of `_OPENING(S)`."""
    turns = [
        Turn(r["role"], r["author_name"], r["content"], r["turn_id"])
        for r in reversed(rows)
        if r["turn_id"] is not None
    ]
    return _conversation(rows[0]), turns


_MESSAGE_COLUMNS = (
    "conversation_id, role, author_id, author_name, persona, content, platform_message_id"
)
_APPEND = f"INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES "
# several exchanges' rows ($2 on), each with its exchange's place in the list ($1); their ids are
# taken in the arrays' order (the message before its reply) before the INSERT, so each exchange
# finds its message's id
_APPEND_MANY = (
    "WITH input AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('messages', 'id')) AS id,"
    " t.* FROM unnest($1::int[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[],"
    f" $7::text[], $8::text[]) WITH ORDINALITY AS t(n, {_MESSAGE_COLUMNS}, i) ORDER BY i),"
    f" written AS (INSERT INTO messages (id, {_MESSAGE_COLUMNS})"
    f" SELECT id, {_MESSAGE_COLUMNS} FROM input ORDER BY id)"
    " SELECT n, id FROM input WHERE role = 'user'"
)
_APPENDS_TOGETHER = 256  # the most exchanges one statement writes


@dataclass(frozen=True)
class _Exchange:
    """A message and the persona's reply to it, as `History.append_exchange` takes them."""

    conversation_id: int
    author_id: str
    author_name: str
    text: str
    persona: str
    reply: str
    message_id: str | None
    heard: bool  # False: only the reply is written (the message is already stored)


def _rows_of(e: _Exchange) -> list[tuple[Any, ...]]:
    """The exchange's rows for `_APPEND_MANY` (role, author_id, author_name, persona, content,
    platform_message_id), the message first."""
    reply = ("assistant", e.persona, e.persona, e.persona, e.reply, e.message_id)
    if not e.heard:
        return [reply]
    return [("user", e.author_id, e.author_name, e.persona, e.text, e.message_id), reply]


class History:
    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._openings: Together[tuple[str, str], _Opening | None] = Together(
            self._opening_many, most=_OPENINGS_TOGETHER, alone=self._opening_one
        )
        # first messages of new conversations (a burst of DMs) are written together as well
        self._creations: Together[tuple[str, str], Conversation] = Together(
            self._create_many, most=_OPENINGS_TOGETHER, alone=self._create_one
        )
        # and the exchanges of replies that end at once (when that fails, say because one
        # conversation was deleted meanwhile, each alone: only the bad one fails)
        self._appends: Together[_Exchange, int | None] = Together(
            self._append_many,
            most=_APPENDS_TOGETHER,
            alone=self._append_one,
            retry_alone="exchanges",
        )

    async def conversation(self, platform: str, external_id: str) -> Conversation:
        """The conversation row, created on first sight. A read when it exists (every message
        but the first): no row lock, no dead tuple and no commit to wait for on the reply's path."""
        row = await self._pool.fetchrow(
            f"SELECT {_CONVERSATION} FROM conversations WHERE platform = $1 AND external_id = $2",
            platform,
            external_id,
        )
        if row is None:
            return await self._create(platform, external_id)
        return _conversation(row)

    async def _create(self, platform: str, external_id: str) -> Conversation:
        """The conversation's row, written now (or the one another writer just wrote); the
        rows of conversations first seen while one is being written go in together."""
        return await self._creations((platform, external_id))

    async def _create_one(self, key: tuple[str, str]) -> Conversation:
        row = await self._pool.fetchrow(
            "INSERT INTO conversations (platform, external_id) VALUES ($1, $2)"
            f" ON CONFLICT (platform, external_id) {_TOUCH} RETURNING {_CONVERSATION}",
            *key,
        )
        return _conversation(row)

    async def _create_many(self, keys: list[tuple[str, str]]) -> list[Conversation]:
        # in key order, so that writers of the same new conversations wait, never deadlock
        rows = await self._pool.fetch(
            "INSERT INTO conversations (platform, external_id)"
            " SELECT DISTINCT platform, external_id FROM unnest($1::text[], $2::text[])"
            " AS k(platform, external_id) ORDER BY platform, external_id"
            f" ON CONFLICT (platform, external_id) {_TOUCH} RETURNING {_CONVERSATION}",
            [platform for platform, _ in keys],
            [external_id for _, external_id in keys],
        )
        made = {(row["platform"], row["external_id"]): _conversation(row) for row in rows}
        return [made[key] for key in keys]

    async def opening(self, platform: str, external_id: str) -> tuple[Conversation, list[Turn]]:
        """The conversation row (created on first sight) and its latest messages from the
        history window on, as `conversation` and `recent` give them, in one round trip; the
        openings of replies that come while one is being read are read together, in one
        statement (`bot/core/together.py`)."""
        found = await self._openings((platform, external_id))
        if found is None:  # first sight: no messages either
            return await self._create(platform, external_id), []
        return found

    async def _opening_one(self, key: tuple[str, str]) -> _Opening | None:
        rows = await self._pool.fetch(_OPENING, *key, HISTORY_ROWS)
        return _opened(rows) if rows else None

    async def _opening_many(self, asked: list[tuple[str, str]]) -> list[_Opening | None]:
        rows = await self._pool.fetch(
            _OPENINGS, [platform for platform, _ in asked], [ext for _, ext in asked], HISTORY_ROWS
        )
        found: list[list[Any]] = [[] for _ in asked]
        for row in rows:
            found[row["i"] - 1].append(row)
        return [_opened(rows) if rows else None for rows in found]

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
        message_id: str | None = None,
        heard: bool = True,
    ) -> int | None:
        """The user's message (with the platform's id of it) and the persona's reply, together
        or not at all; returns the user message's row id. `heard=False`: the message is another
        persona's reply (or one another cast member answered), already stored; only the reply
        is added, and None is returned. The exchanges of replies that end while one is being
        written go in together, in one statement (`bot/core/together.py`)."""
        exchange = _Exchange(
            conversation_id, author_id, author_name, text, persona, reply, message_id, heard
        )
        return await self._appends(exchange)

    async def _append_one(self, exchange: _Exchange) -> int | None:
        """One exchange in one statement: one round trip, atomic without a transaction of its
        own; the rows are numbered in the order written, the message before its reply."""
        e = exchange
        if not e.heard:
            await self._pool.execute(
                _APPEND + "($1, 'assistant', $2, $2, $2, $3, $4)",
                e.conversation_id,
                e.persona,
                e.reply,
                e.message_id,
            )
            return None
        rows = await self._pool.fetch(
            _APPEND + "($1, 'user', $2, $3, $4, $5, $7), ($1, 'assistant', $4, $4, $4, $6, $7)"
            " RETURNING id, role",
            e.conversation_id,
            e.author_id,
            e.author_name,
            e.persona,
            e.text,
            e.reply,
            e.message_id,
        )
        return next(int(r["id"]) for r in rows if r["role"] == "user")

    async def _append_many(self, exchanges: list[_Exchange]) -> list[int | None]:
        """Several conversations' exchanges in one statement, each one's rows numbered in order,
        the message before its reply."""
        rows = [
            (n, e.conversation_id, *row) for n, e in enumerate(exchanges) for row in _rows_of(e)
        ]
        columns = [list(column) for column in zip(*rows, strict=True)]
        found = await self._pool.fetch(_APPEND_MANY, *columns)
        users: dict[int, int] = {int(r["n"]): int(r["id"]) for r in found}
        return [users.get(n) for n in range(len(exchanges))]

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
