"""The SQL of pending extractions (`memory_jobs`): one row per answered exchange, written before
extraction and deleted after it, so nothing is lost when a process stops mid-way."""

from __future__ import annotations

from typing import Any

from bot.memory.types import Exchange, Job


class JobQueries:
    """Mixed into MemoryStore: the job queries, on its pool."""

    _pool: Any

    async def enqueue_held(self, exchange: Exchange, lease_seconds: float) -> Job:
        """A new job, already taken by this process for `lease_seconds` (queue and claim in one
        round trip)."""
        return await enqueue_held_on(self._pool, exchange, lease_seconds)

    async def enqueue_held_many(self, exchanges: list[Exchange], lease_seconds: float) -> list[Job]:
        """New jobs for several exchanges, in their order, in one statement, each taken as
        `enqueue_held` takes one."""
        columns = [list(column) for column in zip(*map(_values, exchanges), strict=True)]
        rows = await self._pool.fetch(_ENQUEUE_HELD_MANY, *columns, lease_seconds)
        return [job_of(row) for row in rows]

    async def retake(self, job_ids: list[int], lease_seconds: float) -> list[Job]:
        """This process's jobs as they are now, taken for `lease_seconds` more: a message
        edited meanwhile reads its new text, a deleted one's job is gone."""
        rows = await self._pool.fetch(
            "UPDATE memory_jobs SET locked_until = now() + make_interval(secs => $2)"
            " WHERE id = ANY($1) RETURNING *",
            job_ids,
            lease_seconds,
        )
        return sorted((job_of(row) for row in rows), key=_said)

    async def claim(self, job_id: int, lease_seconds: float) -> Job | None:
        """Take a job for `lease_seconds` unless another worker holds it."""
        row = await self._pool.fetchrow(
            "UPDATE memory_jobs SET locked_until = now() + make_interval(secs => $2)"
            " WHERE id = $1 AND (locked_until IS NULL OR locked_until < now()) RETURNING *",
            job_id,
            lease_seconds,
        )
        return None if row is None else job_of(row)

    async def expire(self, days: float) -> int:
        """Drop jobs that could not be extracted for `days` (a model that never came back)."""
        result = await self._pool.execute(
            "DELETE FROM memory_jobs WHERE created_at < now() - make_interval(days => $1)",
            int(days),
        )
        return int(result.split()[-1])

    async def pending(self, limit: int = 100) -> list[int]:
        rows = await self._pool.fetch(
            "SELECT id FROM memory_jobs WHERE locked_until IS NULL OR locked_until < now()"
            " ORDER BY id LIMIT $1",
            limit,
        )
        return [r["id"] for r in rows]

    async def finish(self, job_ids: list[int]) -> None:
        await self._pool.execute("DELETE FROM memory_jobs WHERE id = ANY($1)", job_ids)

    async def release(self, job_ids: list[int]) -> None:
        """Give jobs back for later (their model did not answer)."""
        await self._pool.execute(
            "UPDATE memory_jobs SET locked_until = NULL WHERE id = ANY($1)", job_ids
        )

    async def count_attempt(self, job_ids: list[int]) -> None:
        """One more invalid answer for these jobs (the lease is kept)."""
        await self._pool.execute(
            "UPDATE memory_jobs SET attempts = attempts + 1 WHERE id = ANY($1)", job_ids
        )


_ENQUEUE_HELD = (
    "INSERT INTO memory_jobs (user_key, author_name, persona, model, platform,"
    " conversation_id, message, reply, scope, message_id, private_to, locked_until)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11, now() + make_interval(secs => $12))"
    " RETURNING *"
)

_JOB_COLUMNS = (
    "user_key, author_name, persona, model, platform, conversation_id, message, reply, scope,"
    " message_id, private_to"
)
# several ($1 to $11: a column each); their ids are taken in the arrays' order before the INSERT,
# so the rows come back in that order
_ENQUEUE_HELD_MANY = (
    "WITH input AS MATERIALIZED (SELECT nextval(pg_get_serial_sequence('memory_jobs', 'id'))"
    " AS id, t.* FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],"
    " $6::bigint[], $7::text[], $8::text[], $9::text[], $10::bigint[], $11::text[])"
    f" WITH ORDINALITY AS t({_JOB_COLUMNS}, n) ORDER BY n),"
    f" written AS (INSERT INTO memory_jobs (id, {_JOB_COLUMNS}, locked_until)"
    f" SELECT id, {_JOB_COLUMNS}, now() + make_interval(secs => $12) FROM input ORDER BY id"
    " RETURNING *)"
    " SELECT written.* FROM written JOIN input USING (id) ORDER BY input.n"
)


def _values(exchange: Exchange) -> tuple[Any, ...]:
    return (
        exchange.user_key,
        exchange.author_name,
        exchange.persona,
        exchange.model,
        exchange.platform,
        exchange.conversation_id,
        exchange.message,
        exchange.reply,
        exchange.scope,
        exchange.message_id,
        exchange.private_to,
    )


def _said(job: Job) -> tuple[int, int]:
    """The order the messages were said in: their history rows (the jobs of replies answered at
    the same time may be queued in another order), else the queue's."""
    return (job.exchange.message_id or 0, job.id)


async def enqueue_held_on(conn: Any, exchange: Exchange, lease_seconds: float) -> Job:
    """`enqueue_held` on a connection (or pool) given, as in a transaction of the caller's."""
    return job_of(await conn.fetchrow(_ENQUEUE_HELD, *_values(exchange), lease_seconds))


def job_of(row: Any) -> Job:
    """A `memory_jobs` row as a Job."""
    exchange = Exchange(
        row["user_key"],
        row["author_name"],
        row["persona"],
        row["model"],
        row["platform"],
        row["conversation_id"],
        row["message"],
        row["reply"],
        row["scope"],
        row["message_id"],
        row["private_to"],
    )
    return Job(row["id"], exchange, row["attempts"])
