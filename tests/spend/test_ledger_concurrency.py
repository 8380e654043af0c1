"""A cap is a cap: 200 concurrent image reservations from two real processes, cap 10 → 10.

Run as a module (`python -m tests.spend.test_ledger_concurrency URL COUNT NAME`), this file is also
the
worker: it connects, says "ready", waits for "go" on stdin, fires COUNT reservations at once and
prints what happened as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from bot import db
from bot.config import REPO_ROOT
from bot.spend.ledger import BudgetExceeded, Budgets, Ledger
from bot.spend.prices import Prices

CAP = 10
PER_PROCESS = 100


def _budgets() -> Budgets:
    # The global money cap is generous; it is here so each reservation locks two scopes.
    return Budgets(monthly_usd=Decimal(100), user_caps={"image": Decimal(CAP)})


async def _worker(url: str, count: int, name: str) -> dict[str, int]:
    pool = await asyncpg.create_pool(url, min_size=8, max_size=8)
    try:
        ledger = Ledger(pool, Prices(pool), budgets=_budgets())
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

        async def one(i: int) -> str:
            try:
                await ledger.reserve(
                    kind="image",
                    provider="fal",
                    model="fal-ai/flux/schnell",
                    units=Decimal(1),
                    request_id=f"{name}-{i}",
                    user_key="discord:42",
                    guild="g",
                )
            except BudgetExceeded:
                return "refused"
            except Exception as exc:
                sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
                return "errors"
            return "ok"

        outcomes = await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await pool.close()
    return {key: outcomes.count(key) for key in ("ok", "refused", "errors")}


@pytest.fixture
async def migrated(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=2)
    yield pool
    await pool.close()


async def _spawn(url: str, name: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.spend.test_ledger_concurrency",
        url,
        str(PER_PROCESS),
        name,
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def test_two_processes_never_pass_the_cap(database_url: str, migrated: Any) -> None:
    workers = [await _spawn(database_url, name) for name in ("p1", "p2")]
    for worker in workers:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        if line != b"ready\n":
            _, err = await worker.communicate()
            pytest.fail(f"worker did not start: {line!r} {err.decode()[-2000:]}")
    for worker in workers:  # both start firing at the same moment
        assert worker.stdin is not None
        worker.stdin.write(b"go\n")
        await worker.stdin.drain()
    results = []
    for worker in workers:
        out, err = await asyncio.wait_for(worker.communicate(), 120)
        assert worker.returncode == 0, err.decode()[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    assert sum(r["errors"] for r in results) == 0, results
    assert sum(r["ok"] for r in results) == CAP, results
    assert sum(r["refused"] for r in results) == 2 * PER_PROCESS - CAP
    row = await migrated.fetchrow(
        "SELECT count(*) AS n, sum(units) AS units, sum(cost) AS cost FROM ledger"
        " WHERE status = 'reserved'"
    )
    assert row["n"] == CAP and row["units"] == CAP
    assert row["cost"] == Decimal("0.003") * CAP, "nothing overspent"
    assert await migrated.fetchval("SELECT count(*) FROM ledger") == CAP, "refusals write nothing"


if __name__ == "__main__":
    outcome = asyncio.run(_worker(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
    sys.stdout.write(json.dumps(outcome) + "\n")
