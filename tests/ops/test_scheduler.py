"""Scheduled jobs run once across replicas: two schedulers, each with its own pool, one database."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from bot import db
from bot.config import REPO_ROOT
from bot.core.metrics import Metrics
from bot.ops.scheduler import Scheduler

MIGRATIONS = REPO_ROOT / "migrations"


@pytest.fixture
async def pools(database_url: str) -> AsyncIterator[list[asyncpg.Pool]]:
    """Two replicas' pools on one migrated database."""
    first = await db.connect(database_url, MIGRATIONS, max_size=3)
    second = await db.connect(database_url, MIGRATIONS, max_size=3)
    yield [first, second]
    await first.close()
    await second.close()


async def run_for(schedulers: list[Scheduler], seconds: float) -> None:
    for scheduler in schedulers:
        scheduler.start()
    await asyncio.sleep(seconds)
    for scheduler in schedulers:
        scheduler.shutdown()


async def test_two_replicas_run_each_interval_once(pools: list[asyncpg.Pool]) -> None:
    runs: list[tuple[str, float]] = []
    metrics = [Metrics(), Metrics()]
    schedulers = [
        Scheduler(pool, metrics=m, holder=f"replica{i}")
        for i, (pool, m) in enumerate(zip(pools, metrics, strict=True))
    ]
    for i, scheduler in enumerate(schedulers):

        async def job(who: str = f"replica{i}") -> None:
            runs.append((who, time.monotonic()))

        scheduler.every(0.4, job, name="tick")
    # stopped halfway between two slots (the sixth comes about 2.1 s in on a loaded machine):
    # a run cut off by the shutdown would be counted in `runs` but not in the metrics
    await run_for(schedulers, 2.3)
    assert 3 <= len(runs) <= 6, runs
    times = sorted(t for _, t in runs)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert min(gaps) > 0.2, f"a slot ran twice: {runs}"
    ran = sum(m.scheduled_runs.value(job="tick", result="ok") for m in metrics)
    skipped = sum(m.scheduled_runs.value(job="tick", result="skipped") for m in metrics)
    assert ran == len(runs)
    assert skipped >= len(runs) - 1, "the other replica saw each slot and stood down"
    holder = await pools[0].fetchval("SELECT holder FROM scheduler_runs WHERE name = 'tick'")
    assert holder in {"replica0", "replica1"}


async def test_a_long_job_never_overlaps_itself_across_replicas(
    pools: list[asyncpg.Pool],
) -> None:
    active = 0
    most = 0
    runs = 0

    async def slow() -> None:
        nonlocal active, most, runs
        active += 1
        runs += 1
        most = max(most, active)
        try:
            await asyncio.sleep(0.7)
        finally:
            active -= 1

    schedulers = [Scheduler(pool, holder=f"r{i}") for i, pool in enumerate(pools)]
    for scheduler in schedulers:
        scheduler.every(0.25, slow, name="slow")
    await run_for(schedulers, 1.6)
    for _ in range(100):  # shutdown cancels a run in progress; let it unlock and let go
        if active == 0:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)
    assert most == 1, "the advisory lock keeps one run at a time across replicas"
    assert 1 <= runs <= 3


async def test_cron_jobs_run_once_and_failures_are_counted(pools: list[asyncpg.Pool]) -> None:
    runs: list[float] = []
    metrics = [Metrics(), Metrics()]

    async def job() -> None:
        runs.append(time.monotonic())
        raise RuntimeError("boom")

    schedulers = [
        Scheduler(pool, metrics=m, holder=f"c{i}")
        for i, (pool, m) in enumerate(zip(pools, metrics, strict=True))
    ]
    for scheduler in schedulers:
        scheduler.cron(job, name="every-second", second="*")
    assert schedulers[0].jobs() == ["every-second"]
    await run_for(schedulers, 2.2)
    assert 1 <= len(runs) <= 3
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert not gaps or min(gaps) > 0.5, "each second ran once across both replicas"
    errors = sum(m.scheduled_runs.value(job="every-second", result="error") for m in metrics)
    assert errors == len(runs), "a failing job is logged and counted, and runs again next time"


async def test_without_a_pool_jobs_just_run(tmp_path: Path) -> None:
    runs = 0

    async def job() -> None:
        nonlocal runs
        runs += 1

    scheduler = Scheduler()
    scheduler.every(0.2, job, name="local")
    await run_for([scheduler], 0.7)
    assert 2 <= runs <= 4


async def test_local_jobs_run_in_every_replica(pools: list[asyncpg.Pool]) -> None:
    runs = {"a": 0, "b": 0}
    schedulers = []
    for who, pool in zip(runs, pools, strict=True):

        async def job(who: str = who) -> None:
            runs[who] += 1

        scheduler = Scheduler(pool, holder=who)
        scheduler.every(0.3, job, name="idle-check", local=True)
        schedulers.append(scheduler)
    await run_for(schedulers, 1.0)
    assert runs["a"] >= 2 and runs["b"] >= 2, runs
