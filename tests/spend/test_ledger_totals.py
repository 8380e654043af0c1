"""The ledger's running totals (migration 0020) are always the sums of the rows that count.

The degrade ladder and the caps read `ledger_totals`, kept by the ledger's own statement
triggers, instead of summing the month's rows before each reply. Each test writes through the
real Ledger and CallLog on the embedded PostgreSQL, and compares the totals with the sums
computed from `ledger` itself after every step: inserts of one row and of many in one statement,
reservations settled with other units, released, swept, several months, personas and kinds, paid
and free, and concurrent writers.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bot import db
from bot.brains.base import CallStats, ChatRequest
from bot.config import REPO_ROOT
from bot.core.calls import CallContext, CallLog
from bot.core.together import Together
from bot.spend.budgets import FREE_ONLY, LOCAL_ONLY, NORMAL
from bot.spend.ledger import Budgets, Ledger
from bot.spend.prices import Prices
from tests.spend.test_ledger import SCHNELL, Clock

NOV = datetime(2026, 11, 5, 12, tzinfo=UTC)
DEC = datetime(2026, 12, 2, 9, tzinfo=UTC)
REQUEST = ChatRequest(
    model="m",
    messages=[{"role": "user", "content": "hi"}],
    temperature=0.5,
    seed=1,
    max_tokens=50,
    context_window=2048,
)
# The totals as the rows say they should be, grouped as ledger_totals keys them.
_FROM_ROWS = (
    "SELECT month, kind, coalesce(persona, '') AS persona, unit_price > 0 AS paid,"
    " sum(cost) AS cost, sum(units) AS units FROM ledger WHERE status <> 'released'"
    " GROUP BY 1, 2, 3, 4"
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=8)
    yield pool
    await pool.close()


async def totals(pool: Any) -> dict[tuple[Any, ...], tuple[Decimal, Decimal]]:
    """The running totals, without the groups that came back to nothing."""
    rows = await pool.fetch("SELECT * FROM ledger_totals")
    return {
        (r["month"], r["kind"], r["persona"], r["paid"]): (r["cost"], r["units"])
        for r in rows
        if r["cost"] or r["units"]
    }


async def from_rows(pool: Any) -> dict[tuple[Any, ...], tuple[Decimal, Decimal]]:
    rows = await pool.fetch(_FROM_ROWS)
    return {
        (r["month"], r["kind"], r["persona"], r["paid"]): (r["cost"], r["units"])
        for r in rows
        if r["cost"] or r["units"]
    }


async def assert_kept(pool: Any) -> dict[tuple[Any, ...], tuple[Decimal, Decimal]]:
    kept = await totals(pool)
    assert kept == await from_rows(pool)
    return kept


async def reserve_pictures(
    ledger: Ledger, request_id: str, units: int, persona: str | None, user: str | None = None
) -> None:
    await ledger.reserve(
        kind="image",
        provider="fal",
        model=SCHNELL,
        units=Decimal(units),
        request_id=request_id,
        user_key=user,
        persona=persona,
    )


async def price_paid_tokens(pool: Any) -> None:
    """Tokens of backends named `paid:...` cost a dollar a million (the prices table's way,
    which the call log's batches use; a backend's own per-token price is charged apart)."""
    await pool.execute(
        "INSERT INTO prices (kind, provider, model, unit_price, unit, effective_from, source)"
        " VALUES ('chat_tokens', 'paid:%', NULL, 0.000001, 'token', '2025-01-01', 'a test')"
    )


def ledger_at(pool: Any, clock: Clock, **caps: Any) -> Ledger:
    return Ledger(pool, Prices(pool), clock=clock, budgets=Budgets(**caps))


async def test_every_kind_of_write_keeps_the_totals_equal_to_the_rows(pool: Any) -> None:
    clock = Clock(NOV)
    ledger = ledger_at(pool, clock)
    assert await assert_kept(pool) == {}

    # one row, priced in its statement; one at the caller's price; a free one of no persona
    await ledger.record(
        kind="image",
        provider="fal",
        model=SCHNELL,
        units=Decimal(2),
        request_id="img",
        persona="mimi",
    )
    await ledger.record(
        kind="chat_tokens",
        provider="openai:api",
        model="m",
        units=Decimal(1000),
        unit_price=Decimal("0.000002"),
        request_id="tok",
        persona="mimi",
    )
    await ledger.record(
        kind="gpu_seconds", provider="ollama:home", model=None, units=Decimal(30), request_id="home"
    )
    kept = await assert_kept(pool)
    november = NOV.date().replace(day=1)
    assert kept[(november, "image", "mimi", True)] == (Decimal("0.006"), Decimal(2))
    assert kept[(november, "gpu_seconds", "", False)] == (Decimal(0), Decimal(30))

    # a retry of a request id writes nothing, and counts nothing
    await ledger.record(
        kind="image",
        provider="fal",
        model=SCHNELL,
        units=Decimal(9),
        request_id="img",
        persona="mimi",
    )
    assert await assert_kept(pool) == kept

    # many calls in one statement (the call log's batch), two personas, priced from the table;
    # and calls a backend bills per token itself, each charged in statements of its own
    await price_paid_tokens(pool)
    calls = CallLog(pool, ledger=ledger, linger=0.05)
    own_price = Decimal("0.000004")
    await asyncio.gather(
        *(
            calls.record(
                CallContext("test", None, f"test:u{n}", ("mimi", "rex")[n % 2]),
                REQUEST,
                backend="paid:api",
                stats=CallStats(
                    "paid:api",
                    "m",
                    prompt_tokens=100 + n,
                    completion_tokens=n,
                    usd_per_input_token=own_price if n > 9 else None,
                    usd_per_output_token=own_price if n > 9 else None,
                ),
            )
            for n in range(12)
        )
    )
    kept = await assert_kept(pool)
    assert kept[(november, "chat_tokens", "rex", True)][1] == sum(
        Decimal(100 + 2 * n) for n in range(1, 12, 2)
    )

    # reserved counts; settled with other units counts those; released counts nothing
    await reserve_pictures(ledger, "r-settle", 4, "rex", "test:a")
    await reserve_pictures(ledger, "r-release", 4, "rex", "test:a")
    reserved = await assert_kept(pool)
    assert reserved[(november, "image", "rex", True)] == (Decimal("0.024"), Decimal(8))
    await ledger.settle("r-settle", Decimal(1))
    await ledger.release("r-release")
    settled = await assert_kept(pool)
    assert settled[(november, "image", "rex", True)] == (Decimal("0.003"), Decimal(1))

    # December: a month of its own; an abandoned November reservation swept (booked, released)
    await reserve_pictures(ledger, "r-lost", 3, "mimi")
    clock.at = DEC
    await ledger.record(
        kind="image",
        provider="fal",
        model=SCHNELL,
        units=Decimal(1),
        request_id="dec",
        persona="mimi",
    )

    async def billed(ids: list[str]) -> set[str]:
        return set(ids)

    assert await ledger.expire_reservations(DEC, billed) == (1, 1)
    kept = await assert_kept(pool)
    december = DEC.date().replace(day=1)
    assert kept[(december, "image", "mimi", True)] == (Decimal("0.012"), Decimal(4))
    assert (await ledger.status(november)).spent == sum(
        (cost for (month, *_), (cost, _) in kept.items() if month == november), Decimal(0)
    )


async def test_a_statement_that_changes_rows_of_many_groups_keeps_them_all(pool: Any) -> None:
    """One UPDATE over reservations of several months, kinds and personas: every group's
    total moves by what its own rows lost."""
    ledger = ledger_at(pool, Clock(NOV))
    for n in range(9):
        ledger._clock = Clock(NOV + timedelta(days=30 * (n % 2)))  # November and December
        await ledger.reserve(
            kind=("image", "gpu_seconds")[n % 2 if n < 6 else 0],
            provider=("fal", "fly:gpu")[n % 2 if n < 6 else 0],
            model=(SCHNELL, "l40s")[n % 2 if n < 6 else 0],
            units=Decimal(n + 1),
            request_id=f"r{n}",
            persona=("mimi", "rex", None)[n % 3],
        )
    await assert_kept(pool)
    await pool.execute(
        "UPDATE ledger SET status = 'settled', units = units / 2,"
        " cost = units / 2 * unit_price WHERE id % 2 = 0"
    )
    await assert_kept(pool)
    await pool.execute("UPDATE ledger SET status = 'released', cost = 0 WHERE status = 'reserved'")
    kept = await assert_kept(pool)
    assert kept != {}
    # a row written already released (as a sweep of another tool might) counts nothing
    await pool.execute(
        "INSERT INTO ledger (at, month, kind, provider, model, units, unit_price, cost,"
        " request_id, status) SELECT at, month, kind, provider, model, units, unit_price,"
        " cost, request_id || ':copy', 'released' FROM ledger"
    )
    assert await assert_kept(pool) == kept


async def test_concurrent_writers_keep_exact_totals_and_never_deadlock(pool: Any) -> None:
    """Reservations settled and released, call-log batches and single records, at once over
    two personas and both paid and free prices: the totals are the rows' sums at the end."""
    await price_paid_tokens(pool)
    ledger = ledger_at(pool, Clock(NOV), monthly_usd=Decimal(1000))
    calls = CallLog(pool, ledger=ledger, linger=0.001)

    async def picture(n: int) -> None:
        persona = ("mimi", "rex")[n % 2]
        await reserve_pictures(ledger, f"p{n}", 2, persona, f"test:{n % 5}")
        if n % 3:
            await ledger.settle(f"p{n}", Decimal(1))
        else:
            await ledger.release(f"p{n}")

    async def call(n: int) -> None:
        price = Decimal("0.000001") if n % 3 == 0 else None  # else the table's price
        await calls.record(
            CallContext("test", None, f"test:{n}", ("rex", "mimi")[n % 2]),
            REQUEST,
            backend="paid:api" if n % 4 else "ollama:gpu",
            stats=CallStats(
                "paid:api" if n % 4 else "ollama:gpu",
                "m",
                prompt_tokens=10 * n,
                completion_tokens=n,
                usd_per_input_token=price,
                usd_per_output_token=price,
            ),
        )

    async def gpu(n: int) -> None:
        await ledger.record(
            kind="gpu_seconds",
            provider="fly:gpu",
            model="l40s",
            units=Decimal(n),
            request_id=f"g{n}",
            persona=("mimi", None)[n % 2],
        )

    work = [picture(n) for n in range(40)] + [call(n) for n in range(80)]
    work += [gpu(n) for n in range(1, 30)]
    await asyncio.wait_for(asyncio.gather(*work), 60)
    kept = await assert_kept(pool)
    november = NOV.date().replace(day=1)
    assert kept[(november, "image", "mimi", True)][1] + kept[(november, "image", "rex", True)][
        1
    ] == Decimal(26)  # 40 pictures, 26 settled at 1 unit, 14 released


async def test_the_ladder_reads_the_totals_in_one_statement(pool: Any) -> None:
    """The degrade ladder's steps from the totals: the bot's budget, the GPU-seconds cap and a
    persona's own cap, as they were from the rows; nothing set, no statement at all."""
    clock = Clock(NOV)
    ledger = Ledger(
        pool,
        Prices(pool),
        clock=clock,
        budgets=Budgets(monthly_usd=Decimal(10), kind_caps={"gpu_seconds": Decimal(3600)}),
        persona_caps=lambda name: Decimal(1) if name == "rex" else None,
    )
    assert await ledger.degrade_level("rex") == NORMAL
    await ledger.record(
        kind="image",
        provider="fal",
        model=SCHNELL,
        units=Decimal(320),
        request_id="rex-pictures",
        persona="rex",
    )
    assert await ledger.degrade_level("rex") == LOCAL_ONLY  # 0.96 of rex's own dollar
    assert await ledger.degrade_level("mimi") == NORMAL  # 0.96 of the bot's ten dollars
    await ledger.record(
        kind="gpu_seconds",
        provider="ollama:home",
        model=None,
        units=Decimal(7200),
        request_id="free-gpu",
    )
    assert await ledger.degrade_level("mimi") == NORMAL, "free GPU seconds are not capped"
    await ledger.record(
        kind="gpu_seconds",
        provider="fly:gpu",
        model="l40s",
        units=Decimal(3600),
        request_id="paid-gpu",
    )
    assert await ledger.degrade_level("mimi") == FREE_ONLY
    clock.at = DEC
    assert await ledger.degrade_level("rex") == NORMAL, "a new month starts from nothing"

    class Counting:
        """The pool, counting the statements the ladder sends."""

        def __init__(self) -> None:
            self.sent = 0

        async def fetch(self, *args: Any) -> Any:
            self.sent += 1
            return await pool.fetch(*args)

    counting = Counting()
    checked = Ledger(
        counting,
        Prices(pool),
        clock=clock,
        budgets=Budgets(monthly_usd=Decimal(10)),
        persona_caps=lambda name: Decimal(1),
    )
    assert await checked.degrade_level("rex") == NORMAL and counting.sent == 1
    unchecked = Ledger(counting, Prices(pool), clock=clock, budgets=Budgets())
    assert await unchecked.degrade_level("rex") == NORMAL and counting.sent == 1


async def test_checks_made_together_share_a_statement_and_each_get_their_own_step(
    pool: Any,
) -> None:
    """A burst of replies asks the ladder at once: the first check goes alone, those made
    meanwhile share the next statement, and each persona still gets its own step."""
    caps = {"rex": Decimal(1), "mimi": Decimal(100)}
    ledger = Ledger(
        pool,
        Prices(pool),
        clock=Clock(NOV),
        budgets=Budgets(monthly_usd=Decimal(1000)),
        persona_caps=caps.get,
    )
    await ledger.record(
        kind="image", provider="fal", model=SCHNELL, units=Decimal(300),
        request_id="rex-pictures", persona="rex",
    )  # fmt: skip
    sent: list[list[date]] = []
    asked = ledger._spent_in

    async def counted(months: list[date]) -> Any:
        sent.append(months)
        return await asked(months)

    ledger._spending = Together(counted, most=512)
    personas = ["rex", "mimi", None] * 20
    levels = await asyncio.gather(*(ledger.degrade_level(p) for p in personas))
    assert levels == [{"rex": LOCAL_ONLY}.get(p, NORMAL) for p in personas]  # rex: 0.90 of $1
    assert [len(months) for months in sent] == [1, 59]


async def test_the_migration_counts_the_rows_already_written(
    database_url: str, tmp_path: Path
) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in sorted((REPO_ROOT / "migrations").glob("*.sql")):
        if path.name < "0020":
            shutil.copy(path, before)
    conn = await asyncpg.connect(database_url)
    try:
        await db.migrate(conn, before)
        for n, (status, persona) in enumerate(
            [("settled", "mimi"), ("reserved", "mimi"), ("released", "rex"), ("settled", None)]
        ):
            await conn.execute(
                "INSERT INTO ledger (at, month, kind, provider, model, units, unit_price, cost,"
                " persona, request_id, status) VALUES ($1, $2, 'image', 'fal', $3, $4, 0.003,"
                " $4 * 0.003, $5, $6, $7)",
                NOV,
                NOV.date().replace(day=1),
                SCHNELL,
                Decimal(n + 1),
                persona,
                f"old{n}",
                status,
            )
        applied = await db.migrate(conn, REPO_ROOT / "migrations")
        assert applied[0] == "0020_ledger_totals.sql"  # then any that came after it
        kept = await assert_kept(conn)
        november = NOV.date().replace(day=1)
        assert kept == {
            (november, "image", "mimi", True): (Decimal("0.009"), Decimal(3)),
            (november, "image", "", True): (Decimal("0.012"), Decimal(4)),
        }
        await conn.execute("UPDATE ledger SET status = 'settled' WHERE request_id = 'old1'")
        assert await assert_kept(conn) == kept
    finally:
        await conn.close()
