"""Scheduled jobs (apscheduler's AsyncIOScheduler), started and stopped with the app.

Services add their jobs through `Scheduler.every()` / `Scheduler.cron()`; job functions are
coroutines. A failing job is logged and runs again at its next time.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

log = logging.getLogger(__name__)

Job = Callable[[], Awaitable[Any]]


class Scheduler:
    def __init__(self) -> None:
        self._scheduler = AsyncIOScheduler(timezone="UTC")

    def every(self, seconds: float, job: Job, *, name: str) -> None:
        self._scheduler.add_job(
            self._guarded(job, name),
            IntervalTrigger(seconds=seconds),
            id=name,
            replace_existing=True,
            max_instances=1,
            coalesce=True,
        )

    def cron(self, job: Job, *, name: str, **fields: Any) -> None:
        """For example `cron(job, name="month", day=1, hour=0, minute=0)` (UTC)."""
        self._scheduler.add_job(
            self._guarded(job, name),
            CronTrigger(timezone="UTC", **fields),
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

    @staticmethod
    def _guarded(job: Job, name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            try:
                await job()
            except Exception:
                log.exception("scheduled job %s failed", name)

        return run
