"""The SQL of long-term memory: rows in `memories`, pending extractions in `memory_jobs`.

Every query that reads or changes memories names the user key: one user's rows are never
reachable through another user's key.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pgvector import HalfVector

from bot.memory.jobs import JobQueries, enqueue_held_on
from bot.memory.types import (
    Exchange,
    Job,
    MemoryRow,
    NewFact,
    Recalled,
    normalise,
    scope_of,
    text_hash,
)

__all__ = [
    "INDEXED_DIMS",
    "Exchange",
    "Job",
    "MemoryRow",
    "MemoryStore",
    "NewFact",
    "RecallAsk",
    "Recalled",
    "normalise",
    "recall_query",
    "scope_of",
    "text_hash",
]

# A persona sees the shared facts (private_to NULL) and its own, never another persona's.
_KEEPER = "private_to IS NULL OR private_to = {p}"

# The scan reads only what memories_recall_idx holds (migration 0018), so for vectors of up to
# INDEXED_DIMS dimensions it is an index-only scan of the user's few leaf pages; the text is then
# read for the top k alone. {indexed} is that index's predicate, spelled as in the migration so
# the planner can use it (rows of one model all have the query's dimensions).
# The score is reckoned in double precision: `extract` answers numeric, and numeric `power` for
# every fact that passes the floor cost three quarters of the query's time (0.75 of 1.1 ms at
# a million memories, 50 facts over the floor), against 0.3 ms for the whole query so.
_RECALL = """
WITH top AS (
    SELECT id, similarity,
           similarity - $5::float8 * (1 - power(0.5::float8,
               extract(epoch FROM now() - created_at)::float8 / 86400.0 / $6::float8)) AS score
    FROM (
        SELECT id, created_at, 1 - (embedding <=> $2::halfvec) AS similarity
        FROM memories
        WHERE user_key = $1 AND embed_model = $3 AND superseded_by IS NULL{indexed}
          AND ($8::text IS NULL OR scope = $8)
          AND ($9::text IS NULL OR {keeper})
    ) AS scored
    WHERE similarity >= $4
    ORDER BY score DESC, id DESC
    LIMIT $7
)
SELECT top.id, m.text, top.similarity, top.score
FROM top JOIN memories m ON m.id = top.id
ORDER BY top.score DESC, top.id DESC
"""
INDEXED_DIMS = 1024
_RECALL_INDEXED = _RECALL.format(
    indexed=f" AND vector_dims(embedding) <= {INDEXED_DIMS}", keeper=_KEEPER.format(p="$9")
)
_RECALL_WIDE = _RECALL.format(indexed="", keeper=_KEEPER.format(p="$9"))


# The same recall for several users at once (their questions made while one was out, see
# bot/core/together.py): one row of `q` per question, its user's rows read as above through a
# lateral subquery; the floor, the recency weight, the half-life and k are the bot's own, the
# same for all. Rows come back numbered by question (`n`).
_RECALL_MANY = """
SELECT q.n, top.id, m.text, top.similarity, top.score
FROM unnest($1::text[], $2::halfvec[], $3::text[], $8::text[], $9::text[]) WITH ORDINALITY
     AS q(user_key, vector, model, scope, persona, n)
CROSS JOIN LATERAL (
    SELECT id, similarity,
           similarity - $5::float8 * (1 - power(0.5::float8,
               extract(epoch FROM now() - created_at)::float8 / 86400.0 / $6::float8)) AS score
    FROM (
        SELECT id, created_at, 1 - (embedding <=> q.vector) AS similarity
        FROM memories
        WHERE user_key = q.user_key AND embed_model = q.model AND superseded_by IS NULL{indexed}
          AND (q.scope IS NULL OR scope = q.scope)
          AND (q.persona IS NULL OR {keeper})
    ) AS scored
    WHERE similarity >= $4
    ORDER BY score DESC, id DESC
    LIMIT $7
) AS top
JOIN memories m ON m.id = top.id
ORDER BY q.n, top.score DESC, top.id DESC
"""
_RECALL_MANY_INDEXED = _RECALL_MANY.format(
    indexed=f" AND vector_dims(embedding) <= {INDEXED_DIMS}", keeper=_KEEPER.format(p="q.persona")
)
_RECALL_MANY_WIDE = _RECALL_MANY.format(indexed="", keeper=_KEEPER.format(p="q.persona"))


@dataclass(frozen=True)
class RecallAsk:
    """One recall's question: the user's facts nearest `vector` of `model`, in `scope` (None:
    any), those `persona` may see (None: all)."""

    user_key: str
    vector: list[float]
    model: str
    scope: str | None = None
    persona: str | None = None


def recall_query(dims: int) -> str:
    """The recall query for vectors of `dims` dimensions ($1 user key, $2 vector, $3 model,
    $4 floor, $5 recency weight, $6 half-life in days, $7 top k, $8 scope or NULL, $9 the
    persona asking or NULL)."""
    return _RECALL_INDEXED if dims <= INDEXED_DIMS else _RECALL_WIDE


_FIELDS = (
    "id", "text", "embed_model", "persona", "created_at", "last_recalled_at", "superseded_by",
    "private_to",
)  # fmt: skip
# a fact's recall stamp is kept beside it (migration 0019), so recall never writes `memories`
_STAMP = (
    "(SELECT r.last_recalled_at FROM memory_recalls r WHERE r.memory_id = memories.id)"
    " AS last_recalled_at"
)
_COLUMNS = ", ".join(_STAMP if f == "last_recalled_at" else f for f in _FIELDS)


async def _scrub(conn: Any, user_key: str) -> None:
    """The user's words out of everything else kept: the logged prompts of model calls made
    for them or in a conversation they spoke in (LOG_PROMPTS), the texts of their guard
    verdicts (GUARD_KEEP_TEXT), and their messages in the conversation history."""
    platform, _, author_id = user_key.partition(":")
    spoke = (
        "SELECT m.conversation_id FROM messages m JOIN conversations c"
        " ON c.id = m.conversation_id WHERE c.platform = $2 AND m.author_id = $3"
        " AND m.role = 'user'"
    )
    await conn.execute(
        "UPDATE model_calls SET prompt = NULL WHERE prompt IS NOT NULL"
        f" AND (user_key = $1 OR conversation_id IN ({spoke}))",
        user_key,
        platform,
        author_id,
    )
    await conn.execute(
        "UPDATE moderation_verdicts SET text = NULL WHERE user_key = $1 AND text IS NOT NULL",
        user_key,
    )
    await conn.execute(
        "DELETE FROM messages m USING conversations c WHERE c.id = m.conversation_id"
        " AND c.platform = $1 AND m.author_id = $2 AND m.role = 'user'",
        platform,
        author_id,
    )


async def _insert(
    conn: Any,
    user_key: str,
    fact: NewFact,
    *,
    model: str,
    persona: str | None,
    scope: str | None,
    source_message_id: int | None,
    private_to: str | None,
) -> int | None:
    """One fact in; its id, or None when it is current already for this place and keeper:
    said again, it is then no longer drawn from one message only (a deletion of either
    message leaves it)."""
    row = await conn.fetchrow(
        "INSERT INTO memories (user_key, text, text_hash, embed_model, embedding,"
        " persona, scope, source_message_id, private_to)"
        " VALUES ($1, $2, $3, $4, $5::halfvec, $6, $7, $8, $9)"
        " ON CONFLICT (user_key, (coalesce(scope, '')), (coalesce(private_to, '')), text_hash)"
        " WHERE superseded_by IS NULL DO UPDATE SET source_message_id ="
        " CASE WHEN memories.source_message_id IS NOT DISTINCT FROM"
        " EXCLUDED.source_message_id THEN memories.source_message_id END"
        " RETURNING id, xmax = 0 AS inserted",
        user_key,
        fact.text,
        text_hash(fact.text),
        model,
        HalfVector(fact.vector),
        persona,
        scope,
        source_message_id,
        private_to,
    )
    return int(row["id"]) if row["inserted"] else None


def _row(record: Any) -> MemoryRow:
    return MemoryRow(**{key: record[key] for key in _FIELDS})


class MemoryStore(JobQueries):
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def models_of(self, user_key: str, scope: str | None = None) -> list[str]:
        """Embedding models of the user's current memories, with `scope` only of those learned
        there (empty: nothing to recall, no query to embed)."""
        rows = await self._pool.fetch(
            "SELECT DISTINCT embed_model FROM memories"
            " WHERE user_key = $1 AND superseded_by IS NULL AND ($2::text IS NULL OR scope = $2)",
            user_key,
            scope,
        )
        return [r["embed_model"] for r in rows]

    async def models_of_many(self, asked: list[tuple[str, str | None]]) -> list[list[str]]:
        """`models_of` for several (user, scope) pairs in one query, answers in their order."""
        rows = await self._pool.fetch(
            "SELECT q.i, m.embed_model FROM unnest($1::text[], $2::text[]) WITH ORDINALITY"
            " AS q(user_key, scope, i) CROSS JOIN LATERAL (SELECT DISTINCT embed_model"
            "  FROM memories WHERE user_key = q.user_key AND superseded_by IS NULL"
            "  AND (q.scope IS NULL OR scope = q.scope)) m",
            [user for user, _ in asked],
            [scope for _, scope in asked],
        )
        models: list[list[str]] = [[] for _ in asked]
        for row in rows:
            models[row["i"] - 1].append(row["embed_model"])
        return models

    async def recall(
        self,
        user_key: str,
        vector: list[float],
        model: str,
        *,
        top_k: int,
        floor: float,
        recency_weight: float,
        half_life_days: float,
        scope: str | None = None,
        persona: str | None = None,
    ) -> list[Recalled]:
        """The user's facts nearest `vector`; with `scope`, only those learned there; with
        `persona`, only the shared ones and those private to it."""
        rows = await self._pool.fetch(
            recall_query(len(vector)),
            user_key,
            HalfVector(vector),
            model,
            floor,
            recency_weight,
            half_life_days,
            top_k,
            scope,
            persona,
        )
        return [Recalled(r["id"], r["text"], r["similarity"], r["score"]) for r in rows]

    async def recall_many(
        self,
        asked: list[RecallAsk],
        *,
        top_k: int,
        floor: float,
        recency_weight: float,
        half_life_days: float,
    ) -> list[list[Recalled]]:
        """`recall` for several questions in one statement; each question's facts, in order."""
        wide = any(len(a.vector) > INDEXED_DIMS for a in asked)
        rows = await self._pool.fetch(
            _RECALL_MANY_WIDE if wide else _RECALL_MANY_INDEXED,
            [a.user_key for a in asked],
            [HalfVector(a.vector) for a in asked],
            [a.model for a in asked],
            floor,
            recency_weight,
            half_life_days,
            top_k,
            [a.scope for a in asked],
            [a.persona for a in asked],
        )
        found: list[list[Recalled]] = [[] for _ in asked]
        for r in rows:
            found[r["n"] - 1].append(Recalled(r["id"], r["text"], r["similarity"], r["score"]))
        return found

    async def nearest(
        self,
        user_key: str,
        vector: list[float],
        model: str,
        limit: int,
        scope: str | None,
        *,
        persona: str | None = None,
    ) -> list[MemoryRow]:
        """The user's current facts nearest `vector` by cosine distance (no floor), oldest
        first: what a new fact is compared with (in its scope, those `persona` sees)."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM memories WHERE user_key = $1 AND embed_model = $3"
            " AND superseded_by IS NULL AND ($5::text IS NULL OR scope = $5)"
            f" AND ($6::text IS NULL OR {_KEEPER.format(p='$6')})"
            " ORDER BY embedding <=> $2::halfvec, id DESC LIMIT $4",
            user_key,
            HalfVector(vector),
            model,
            limit,
            scope,
            persona,
        )
        return sorted((_row(r) for r in rows), key=lambda m: m.id)

    async def drop(self, user_key: str, ids: list[int], *, job_id: int | None = None) -> int:
        """Delete the user's current facts `ids` (the message showed they no longer hold);
        nothing when the job is gone (the user said "forget all" meanwhile)."""
        async with self._pool.acquire() as conn, conn.transaction():
            if job_id is not None and not await conn.fetchval(
                "SELECT id FROM memory_jobs WHERE id = $1 FOR UPDATE", job_id
            ):
                return 0
            result = await conn.execute(
                "DELETE FROM memories WHERE user_key = $1 AND id = ANY($2)"
                " AND superseded_by IS NULL",
                user_key,
                ids,
            )
        return int(result.split()[-1])

    async def touch(self, stamps: Mapping[int, tuple[str, datetime]]) -> None:
        """Stamp facts as recalled (memory id -> (its user's key, when)), in one statement,
        into `memory_recalls`: `memories` itself is not written. A fact deleted meanwhile, or
        not the user's, gets no stamp; a later stamp replaces an earlier one."""
        await self._pool.execute(
            "INSERT INTO memory_recalls (memory_id, last_recalled_at)"
            " SELECT m.id, s.at FROM unnest($1::bigint[], $2::text[], $3::timestamptz[])"
            " AS s(id, user_key, at) JOIN memories m ON m.id = s.id AND m.user_key = s.user_key"
            " ON CONFLICT (memory_id) DO UPDATE SET last_recalled_at = EXCLUDED.last_recalled_at"
            " WHERE memory_recalls.last_recalled_at < EXCLUDED.last_recalled_at",
            list(stamps),
            [user_key for user_key, _ in stamps.values()],
            [at for _, at in stamps.values()],
        )

    async def current(
        self,
        user_key: str,
        limit: int = 1000,
        *,
        scope: str | None = None,
        persona: str | None = None,
    ) -> list[MemoryRow]:
        """The user's memories that are recalled (not superseded), oldest first; with `scope`,
        only those learned there; with `persona`, only those it sees."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM memories WHERE user_key = $1 AND superseded_by IS NULL"
            " AND ($3::text IS NULL OR scope = $3)"
            f" AND ($4::text IS NULL OR {_KEEPER.format(p='$4')}) ORDER BY id LIMIT $2",
            user_key,
            limit,
            scope,
            persona,
        )
        return [_row(r) for r in rows]

    async def count(self, user_key: str) -> int:
        """How many current memories the user has, in every scope."""
        return int(
            await self._pool.fetchval(
                "SELECT count(*) FROM memories WHERE user_key = $1 AND superseded_by IS NULL",
                user_key,
            )
        )

    async def recent(
        self, user_key: str, limit: int, persona: str | None = None
    ) -> list[MemoryRow]:
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM memories WHERE user_key = $1 AND superseded_by IS NULL"
            f" AND ($3::text IS NULL OR {_KEEPER.format(p='$3')}) ORDER BY id DESC LIMIT $2",
            user_key,
            limit,
            persona,
        )
        return [_row(r) for r in reversed(rows)]

    async def all_rows(self, user_key: str) -> list[MemoryRow]:
        """Everything kept about the user, superseded rows too (for export)."""
        rows = await self._pool.fetch(
            f"SELECT {_COLUMNS} FROM memories WHERE user_key = $1 ORDER BY id", user_key
        )
        return [_row(r) for r in rows]

    async def add(
        self,
        user_key: str,
        facts: list[NewFact],
        *,
        model: str,
        persona: str | None,
        job_id: int | None = None,
        scope: str | None = None,
        source_message_id: int | None = None,
        private_to: str | None = None,
        finish: bool = False,
    ) -> list[int]:
        """Insert new facts (duplicates of current ones are skipped) and supersede what they
        contradict; returns the ids of the rows inserted. With `private_to`, only that persona
        recalls them (None: shared); a fact already shared in the place is not kept twice.
        With `job_id`, nothing is stored if the job is gone: the user said "forget all" while
        it was being extracted; with `finish` as well, the job is deleted in the same
        transaction (its extraction is done)."""
        inserted: list[int] = []
        job = "DELETE FROM memory_jobs WHERE id = $1" if finish else "SELECT id FROM memory_jobs"
        job += " RETURNING id" if finish else " WHERE id = $1 FOR UPDATE"
        async with self._pool.acquire() as conn, conn.transaction():
            if job_id is not None and not await conn.fetchval(job, job_id):
                return []
            for fact in facts:
                if private_to is not None and await conn.fetchval(
                    "SELECT 1 FROM memories WHERE user_key = $1 AND text_hash = $2"
                    " AND scope IS NOT DISTINCT FROM $3 AND private_to IS NULL"
                    " AND superseded_by IS NULL",
                    user_key,
                    text_hash(fact.text),
                    scope,
                ):
                    continue  # every persona recalls it already
                new_id = await _insert(
                    conn,
                    user_key,
                    fact,
                    model=model,
                    persona=persona,
                    scope=scope,
                    source_message_id=source_message_id,
                    private_to=private_to,
                )
                if new_id is None:
                    continue
                inserted.append(new_id)
                if fact.replaces:
                    await conn.execute(
                        "UPDATE memories SET superseded_by = $2 WHERE user_key = $1"
                        " AND id = ANY($3) AND id <> $2 AND superseded_by IS NULL",
                        user_key,
                        new_id,
                        list(fact.replaces),
                    )
        return inserted

    async def forget(self, user_key: str, memory_id: int | None = None) -> int:
        """Delete one memory, current or superseded (with the older versions it superseded),
        or all of the user's, and then also their words wherever else they are kept (see
        `_scrub`); returns how many current memories (for one id: rows) were deleted."""
        if memory_id is None:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("DELETE FROM memory_jobs WHERE user_key = $1", user_key)
                current = await conn.fetchval(
                    "SELECT count(*) FROM memories WHERE user_key = $1 AND superseded_by IS NULL",
                    user_key,
                )
                await conn.execute("DELETE FROM memories WHERE user_key = $1", user_key)
                await _scrub(conn, user_key)
                return int(current)
        result = await self._pool.execute(
            "DELETE FROM memories WHERE user_key = $1 AND id = $2", user_key, memory_id
        )
        return int(result.split()[-1])

    async def message_deleted(self, message_rows: list[int]) -> int:
        """Pending extractions of these history rows stop, and the facts drawn from them go
        (what they had superseded is current again); returns how many facts were deleted."""
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM memory_jobs WHERE message_id = ANY($1)", message_rows)
            drawn = await conn.fetch(
                "SELECT id FROM memories WHERE source_message_id = ANY($1)", message_rows
            )
            ids = [r["id"] for r in drawn]
            await _drop_facts(conn, ids)
        return len(ids)

    async def message_edited(
        self,
        message_rows: list[int],
        text: str,
        model_of: Callable[[str], str | None] | None = None,
        lease_seconds: float = 300.0,
    ) -> list[Job]:
        """These history rows (a user's message) now say `text`. A pending extraction reads
        it; where the extraction had finished, the facts drawn from the old text go (what they
        had superseded is current again) and the exchange is queued again with the new text,
        taken by this process, once for each persona and place its facts were learned with
        (`model_of`: the chat model a persona extracts with; None for one that no longer
        learns, whose facts are left as they are). Returns those new jobs."""
        async with self._pool.acquire() as conn, conn.transaction():
            pending = await conn.fetch(
                "UPDATE memory_jobs SET message = $2 WHERE message_id = ANY($1)"
                " RETURNING message_id",
                message_rows,
                text,
            )
            done = sorted(set(message_rows) - {r["message_id"] for r in pending})
            if model_of is None or not done:
                return []
            drawn = await conn.fetch(_DRAWN, done)
            jobs: list[Job] = []
            dropped: list[int] = []
            for key, ids in _learned_together(drawn).items():
                row, user_key, persona, scope, private_to = key
                if persona is None or (model := model_of(persona)) is None:
                    continue  # no longer learns: its facts stay
                origin = await conn.fetchrow(_ORIGIN, row, persona)
                if origin is None or origin["reply"] is None:
                    continue  # the reply is gone: nothing to read the message with
                exchange = Exchange(
                    user_key,
                    origin["author_name"],
                    persona,
                    model,
                    origin["platform"],
                    origin["conversation_id"],
                    text,
                    origin["reply"],
                    scope,
                    row,
                    private_to,
                )
                jobs.append(await enqueue_held_on(conn, exchange, lease_seconds))
                dropped += ids
            await _drop_facts(conn, dropped)
        return jobs

    async def stale(self, model: str, limit: int) -> list[tuple[int, str]]:
        """Rows embedded by another model than `model` (for reembed)."""
        rows = await self._pool.fetch(
            "SELECT id, text FROM memories WHERE embed_model <> $1 ORDER BY id LIMIT $2",
            model,
            limit,
        )
        return [(r["id"], r["text"]) for r in rows]

    async def set_embedding(self, rows: list[tuple[int, list[float]]], model: str) -> None:
        async with self._pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "UPDATE memories SET embedding = $2::halfvec, embed_model = $3 WHERE id = $1",
                [(memory_id, HalfVector(vector), model) for memory_id, vector in rows],
            )


# the facts drawn from these history rows, with what they were learned with
_DRAWN = (
    "SELECT id, source_message_id, user_key, persona, scope, private_to FROM memories"
    " WHERE source_message_id = ANY($1) ORDER BY id"
)
# the message's writer and place, and the reply persona $2 gave it (the next of its own)
_ORIGIN = (
    "SELECT m.author_name, m.conversation_id, c.platform,"
    " (SELECT r.content FROM messages r WHERE r.conversation_id = m.conversation_id"
    "  AND r.role = 'assistant' AND r.persona = $2 AND r.id > m.id ORDER BY r.id LIMIT 1)"
    " AS reply FROM messages m JOIN conversations c ON c.id = m.conversation_id WHERE m.id = $1"
)

_Learned = tuple[int, str, str | None, str | None, str | None]  # row, user, persona, scope, private


def _learned_together(drawn: list[Any]) -> dict[_Learned, list[int]]:
    """The facts' ids by the exchange and place they were learned in, and for whom."""
    found: dict[_Learned, list[int]] = {}
    for r in drawn:
        key = (r["source_message_id"], r["user_key"], r["persona"], r["scope"], r["private_to"])
        found.setdefault(key, []).append(r["id"])
    return found


async def _drop_facts(conn: Any, ids: list[int]) -> None:
    """Facts deleted, and what they had superseded current again (in the caller's
    transaction)."""
    await conn.execute(
        "UPDATE memories SET superseded_by = NULL WHERE superseded_by = ANY($1)"
        " AND NOT (id = ANY($1))",
        ids,
    )
    await conn.execute("DELETE FROM memories WHERE id = ANY($1)", ids)
