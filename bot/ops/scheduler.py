"""Scheduled jobs (apscheduler's AsyncIOScheduler), started and stopped with the app.

Services add their jobs through `Scheduler.every()` / `Scheduler.cron()`; job functions are
coroutines. A failing job is logged and runs again at its next time.

With a pool, each job runs once across every replica sharing the database:

- interval jobs are aligned to a common epoch, so every replica fires them at the same moments;
- a run first takes a Postgres advisory lock for the job (`pg_try_advisory_lock`, held on one
  pooled connection until the job ends), so a job never overlaps itself across replicas;
- it then claims the run in `scheduler_runs` (migration 0009): the claim succeeds only if no
  replica started the job within half its period, so the replica that comes second for the same
  slot, even a moment later once the first has finished and unlocked, skips it.

A job about this process's own state (its backends' idle timers) passes `local=True` and runs in
every replica.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from bot.core.metrics import Metrics

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[Any]]

_LOCK_CLASS = 7_311_010  # advisory lock namespace for scheduled jobs (db.py uses 7_311_001)
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # interval jobs fire at _EPOCH + k * interval


def _lock_key(name: str) -> int:
    value = zlib.crc32(name.encode("utf-8"))
    return value - 2**32 if value >= 2**31 else value


def _cron_min_gap(trigger: CronTrigger, samples: int = 12) -> timedelta:
    """The shortest time between consecutive fires of a cron trigger, from the next few."""
    now = datetime.now(UTC)
    fires: list[datetime] = []
    previous: datetime | None = None
    for _ in range(samples):
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None:
            break
        fires.append(fire)
        previous, now = fire, fire + timedelta(microseconds=1)
    gaps = [b - a for a, b in itertools.pairwise(fires)]
    return min(gaps) if gaps else timedelta(days=1)


class Scheduler:
    def __init__(
        self, pool: Any = None, *, metrics: Metrics | None = None, holder: str | None = None
    ) -> None:
        self._scheduler = AsyncIOScheduler(timezone="UTC")
        self._pool = pool
        self._metrics = metrics or Metrics()
        self._holder = holder or f"{socket.gethostname()}:{os.getpid()}"

    def every(self, seconds: float, job: Job, *, name: str, local: bool = False) -> None:
        """Run `job` every `seconds`; `local=True` runs it in every replica (per-process state)."""
        gap = timedelta(seconds=seconds)
        self._scheduler.add_job(
            self._guarded(job, name, gap, local=local),
            IntervalTrigger(seconds=seconds, start_date=_EPOCH, timezone=UTC),
            id=name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

    def cron(self, job: Job, *, name: str, local: bool = False, **fields: Any) -> None:
        """For example `cron(job, name="month", day=1, hour=0, minute=0)` (UTC)."""
        trigger = CronTrigger(timezone="UTC", **fields)
        self._scheduler.add_job(
            self._guarded(job, name, _cron_min_gap(trigger), local=local),
            trigger,
            id=name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

    def jobs(self) -> list[str]:
        return [job.id for job in self._scheduler.get_jobs()]

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)

    def _guarded(
        self, job: Job, name: str, period: timedelta, *, local: bool
    ) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                ran = await (_run_here(job) if local else self._run_once(job, name, period))
            except Exception:
                log.exception("scheduled job %s failed", name)
                self._metrics.scheduled_runs.inc(job=name, result="error")
                return
            self._metrics.scheduled_runs.inc(job=name, result="ok" if ran else "skipped")

        return run

    async def _run_once(self, job: Job, name: str, period: timedelta) -> bool:
        """Run the job unless another replica runs or ran it for this slot; True if it ran."""
        if self._pool is None:
            await job()
            return True
        key = _lock_key(name)
        async with self._pool.acquire() as conn:
            if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _LOCK_CLASS, key):
                log.info("scheduled job %s is running on another replica; skipped", name)
                return False
            try:
                if not await self._claim(conn, name, period / 2):
                    log.info("scheduled job %s already ran for this slot; skipped", name)
                    return False
                await job()
                await conn.execute(
                    "UPDATE scheduler_runs SET finished_at = clock_timestamp() WHERE name = $1",
                    name,
                )
                return True
            finally:
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_CLASS, key)

    async def _claim(self, conn: Any, name: str, min_gap: timedelta) -> bool:
        claimed = await conn.fetchval(
            "INSERT INTO scheduler_runs AS r (name, started_at, holder)"
            " VALUES ($1, clock_timestamp(), $2)"
            " ON CONFLICT (name) DO UPDATE"
            " SET started_at = EXCLUDED.started_at, holder = EXCLUDED.holder, finished_at = NULL"
            " WHERE r.started_at < EXCLUDED.started_at - $3::interval"
            " RETURNING name",
            name,
            self._holder,
            min_gap,
        )
        return claimed is not None


async def _run_here(job: Job) -> bool:
    await job()
    return True
