"""The call log (bot/core/calls.py) writes a call and its ledger row in one statement, and the
calls that finish within its linger or while such a write is under way together, in one
statement: every row as it
would have been alone, the right ledger row for each call, and a bad row fails only its own
caller. Real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from bot import db
from bot.brains.base import CallStats, ChatRequest
from bot.config import REPO_ROOT
from bot.core.calls import CallContext, CallLog, Charge
from bot.spend.ledger import Budgets, Ledger
from bot.spend.prices import Prices

SCHNELL = "fal-ai/flux/schnell"
REQUEST = ChatRequest(
    model="llama3.2:3b",
    messages=[{"role": "user", "content": "hi"}],
    temperature=0.5,
    seed=1,
    max_tokens=50,
    context_window=2048,
)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=4)
    yield pool
    await pool.close()


def ledger_of(pool: Any) -> Ledger:
    at = datetime(2026, 11, 5, 12, tzinfo=UTC)
    return Ledger(pool, Prices(pool), clock=lambda: at, budgets=Budgets())


def stats(n: int) -> CallStats:
    return CallStats("ollama:gpu", "llama3.2:3b", prompt_tokens=100 + n, completion_tokens=n)


async def test_calls_that_come_together_are_written_together_each_with_its_ledger_row(
    pool: Any,
) -> None:
    calls = CallLog(pool, ledger=ledger_of(pool))
    await asyncio.gather(
        *(
            calls.record(CallContext("test", None, f"test:u{n}", "mimi"), REQUEST,
                         backend="ollama:gpu", stats=stats(n))
            for n in range(60)
        )
    )  # fmt: skip
    rows = await pool.fetch(
        "SELECT c.id, c.user_key, c.prompt_tokens, c.completion_tokens, c.options,"
        " l.units, l.user_key AS charged, l.kind, l.month, l.status"
        " FROM model_calls c JOIN ledger l ON l.request_id = 'model_call:' || c.id"
    )
    assert len(rows) == 60
    for row in rows:  # each ledger row is its own call's
        assert row["charged"] == row["user_key"]
        assert row["units"] == row["prompt_tokens"] + row["completion_tokens"]
        assert (row["kind"], row["status"], str(row["month"])) == (
            "chat_tokens",
            "settled",
            "2026-11-01",
        )
        assert '"num_ctx": 2048' in row["options"]
    assert sorted(r["completion_tokens"] for r in rows) == list(range(60))
    # Rows written by one statement share its transaction id: far fewer than one per call.
    statements = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM model_calls")
    assert statements < 10


async def test_calls_a_moment_apart_wait_for_each_other(pool: Any) -> None:
    """A reply's embedding is recorded a few milliseconds before its answer: within the
    linger they are one statement; without one, each is written as it comes."""

    async def two_calls(calls: CallLog) -> int:
        await pool.execute("TRUNCATE model_calls, ledger")
        context = CallContext("test", None, "test:u", "mimi")
        first = asyncio.create_task(
            calls.record(context, REQUEST, backend="ollama:gpu", stats=stats(1), purpose="embed")
        )
        await asyncio.sleep(0.05)
        await calls.record(context, REQUEST, backend="ollama:gpu", stats=stats(2))
        await first
        assert await pool.fetchval("SELECT count(*) FROM ledger") == 2
        return int(await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM model_calls"))

    assert await two_calls(CallLog(pool, ledger=ledger_of(pool), linger=0.5)) == 1
    assert await two_calls(CallLog(pool, ledger=ledger_of(pool), linger=0)) == 2


async def test_calls_during_a_write_wait_for_the_next_and_a_drain_hurries_it(
    pool: Any,
) -> None:
    """With a 50 ms linger, the calls of replies 3 ms apart go in one statement or a few: those
    that come while one is written wait for the next linger instead of going alone. Under
    `flushing` (the engine's drain) a lingering write goes within a few milliseconds, and
    calls still go together."""
    calls = CallLog(pool, ledger=ledger_of(pool), linger=0.05)
    context = CallContext("test", None, "test:u", "mimi")
    tasks = []
    for n in range(12):  # a reply every 3 ms: its embedding, then its answer
        tasks.append(
            asyncio.create_task(
                calls.record(
                    context, REQUEST, backend="ollama:gpu", stats=stats(n), purpose="embed"
                )
            )
        )
        tasks.append(
            asyncio.create_task(
                calls.record(context, REQUEST, backend="ollama:gpu", stats=stats(n))
            )
        )
        await asyncio.sleep(0.003)
    await asyncio.gather(*tasks)
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 24
    statements = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM model_calls")
    assert statements <= 3

    await pool.execute("TRUNCATE model_calls, ledger")
    lingering = asyncio.create_task(
        calls.record(context, REQUEST, backend="ollama:gpu", stats=stats(1))
    )
    await asyncio.sleep(0.005)
    started = asyncio.get_running_loop().time()
    with calls.flushing():
        await lingering
        took = asyncio.get_running_loop().time() - started
        await asyncio.gather(
            *(
                calls.record(context, REQUEST, backend="ollama:gpu", stats=stats(n))
                for n in range(5)
            )
        )
    assert took < 0.03, f"the drain waited out the linger ({took:.3f} s)"
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 6
    statements = await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM model_calls")
    assert statements == 2


async def test_one_bad_call_fails_alone(pool: Any) -> None:
    """A call of a conversation that no longer exists (its foreign key fails) fails its own
    caller; the calls written with it are written one by one."""
    calls = CallLog(pool, ledger=ledger_of(pool))
    contexts = [CallContext("test", None, f"test:u{n}", "mimi") for n in range(10)]
    contexts[4] = CallContext("test", 987654, "test:gone", "mimi")
    results = await asyncio.gather(
        *(calls.record(c, REQUEST, backend="ollama:gpu", stats=stats(1)) for c in contexts),
        return_exceptions=True,
    )
    assert isinstance(results[4], asyncpg.ForeignKeyViolationError)
    assert all(r is None for n, r in enumerate(results) if n != 4)
    users = {r["user_key"] for r in await pool.fetch("SELECT user_key FROM model_calls")}
    assert users == {f"test:u{n}" for n in range(10) if n != 4}
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 9


_ROWS = (
    "SELECT nextval(pg_get_serial_sequence('model_calls', 'id')) AS id, t.*"
    " FROM unnest($1::text[]) WITH ORDINALITY AS t(backend, n)"
)
_SOURCE = (
    "INSERT INTO model_calls (id, purpose, backend, model, ok)"
    " SELECT id, 'image', backend, 'm', true FROM input"
)


async def test_record_many_with_prices_each_row_at_the_price_in_force(
    pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """As `record_with` does one by one: each charge priced by its own kind, provider, model
    and time, at 0 with an error logged when no price is in force."""
    ledger = ledger_of(pool)
    at = datetime(2026, 11, 5, 12, tzinfo=UTC)
    charges = [
        Charge("image", "fal", SCHNELL, Decimal(2), at, user_key="test:a"),
        Charge("image", "nobody", "m", Decimal(1), at, user_key="test:b"),
        Charge("image", "fal", SCHNELL, Decimal(3), datetime(2026, 12, 1, tzinfo=UTC)),
    ]
    await ledger.record_many_with(
        _ROWS, _SOURCE, [["fal", "nobody", "fal"]], charges, request_prefix="call:"
    )
    rows = await pool.fetch(
        "SELECT c.backend, l.provider, l.units, l.cost, l.price_id, l.month, l.user_key"
        " FROM model_calls c JOIN ledger l ON l.request_id = 'call:' || c.id ORDER BY c.id"
    )
    assert [(r["backend"], r["provider"], r["units"]) for r in rows] == [
        ("fal", "fal", Decimal(2)),
        ("nobody", "nobody", Decimal(1)),
        ("fal", "fal", Decimal(3)),
    ]
    assert [r["cost"] for r in rows] == [Decimal("0.006"), Decimal(0), Decimal("0.009")]
    assert rows[1]["price_id"] is None and rows[0]["user_key"] == "test:a"
    assert [str(r["month"]) for r in rows] == ["2026-11-01", "2026-11-01", "2026-12-01"]
    assert [r.message for r in caplog.records] == [
        "no price for image from nobody (m): recorded at 0"
    ]
