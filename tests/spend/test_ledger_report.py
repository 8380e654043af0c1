"""Reports: totals equal the rows to the cent; the CLI; /spend with its chart; the month summary;
and every model call's tokens reaching the ledger through the real engine."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import random
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot import db
from bot.app import App
from bot.config import REPO_ROOT
from bot.core.commands import CommandContext
from bot.core.engine import Incoming
from bot.errors import CommandError
from bot.ops.notify import AdminNotifier
from bot.spend.ledger import Ledger
from bot.spend.prices import Prices
from bot.spend.report import (
    GROUPS,
    SUMMARY_JOB,
    money,
    month_report,
    persona_lines,
    post_month_summary,
    render_month_chart,
    report_csv,
)
from tests.fakes.ollama import FakeOllama

CENT = Decimal("0.01")
NOV = date(2026, 11, 1)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=4)
    yield pool
    await pool.close()


async def fill_month(ledger: Ledger, *, seed: int = 7, events: int = 120) -> None:
    """A month of varied events with awkward prices; plus rows that must not count."""
    rng = random.Random(seed)
    kinds = [
        ("image", "fal", "fal-ai/flux/schnell"),
        ("image", "fal", "fal-ai/flux/dev"),
        ("gpu_seconds", "fly:gpu", "l40s"),
        ("chat_tokens", "ollama:home", "llama3.2:3b"),
        ("chat_tokens", "local", "smollm2:135m"),
    ]
    for i in range(events):
        kind, provider, model = rng.choice(kinds)
        units = (
            Decimal(rng.randint(1, 900)) if kind == "gpu_seconds" else Decimal(rng.randint(1, 3))
        )
        price = Decimal(rng.randint(1, 99_999)) / Decimal(10_000_000) if kind == "image" else None
        await ledger.record(
            kind=kind,
            provider=provider,
            model=model,
            units=units,
            unit_price=price,
            request_id=f"e{i}",
            user_key=rng.choice(["discord:1", "discord:2", "matrix:@c:x"]),
            persona=rng.choice(["mimi", "sage", None]),
            at=datetime(2026, 11, rng.randint(1, 30), rng.randint(0, 23), tzinfo=UTC),
        )
    kw = {"kind": "image", "provider": "fal", "model": "fal-ai/flux/dev", "units": Decimal(1)}
    await ledger.reserve(request_id="in-flight", **kw)
    await ledger.reserve(request_id="failed", **kw)
    await ledger.release("failed")
    await ledger.record(request_id="december", at=datetime(2026, 12, 1, tzinfo=UTC), **kw)


async def test_report_totals_equal_the_sum_of_rows(pool: Any) -> None:
    ledger = Ledger(pool, Prices(pool), clock=Clock(datetime(2026, 11, 15, tzinfo=UTC)))
    await fill_month(ledger)
    rows = await pool.fetch("SELECT cost, status, month FROM ledger")
    expected = sum(
        (r["cost"] for r in rows if r["status"] == "settled" and r["month"] == NOV), Decimal(0)
    )
    assert expected.quantize(CENT) > 0
    for by in GROUPS:
        report = await month_report(pool, NOV, by)
        assert report.total == expected, by
        assert sum((line.cost for line in report.lines), Decimal(0)) == expected, by
        assert sum(line.events for line in report.lines) == 120
        parsed = list(csv.DictReader(io.StringIO(report_csv(report))))
        csv_total = sum((Decimal(r["cost_usd"]) for r in parsed), Decimal(0))
        assert csv_total.quantize(CENT) == expected.quantize(CENT), by
    assert (await month_report(pool, NOV)).reserved == Decimal("0.025")


async def test_cli_spend_prints_the_month(pool: Any, database_url: str, tmp_path: Path) -> None:
    ledger = Ledger(pool, Prices(pool), clock=Clock(datetime(2026, 11, 15, tzinfo=UTC)))
    await fill_month(ledger, events=30)
    expected = await pool.fetchval(
        "SELECT sum(cost) FROM ledger WHERE month = $1 AND status = 'settled'", NOV
    )
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "DATA_DIR": str(tmp_path),
        "LOG_FILE": "false",
        "BUDGET_MONTHLY_USD": "5",
    }
    args = ["-m", "bot", "spend", "--month", "2026-11", "--by", "user"]
    text = await run_cli(args, env)
    assert "Spend for 2026-11 by user" in text and "discord:1" in text
    assert f"total: ${expected.quantize(Decimal('0.0001'))}" in text
    assert "budget:" in text and "of $5.00 (" in text
    rows = list(csv.DictReader(io.StringIO(await run_cli([*args, "--csv"], env))))
    assert {r["user"] for r in rows} == {"discord:1", "discord:2", "matrix:@c:x"}
    assert sum((Decimal(r["cost_usd"]) for r in rows), Decimal(0)) == expected
    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "spend", "--month", "November",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await bad.communicate()
    assert bad.returncode == 2 and b"not a month like 2026-11" in err


async def run_cli(args: list[str], env: dict[str, str]) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        env=env,
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()[-2000:]
    return out.decode()


async def test_month_summary_job_posts_last_month(pool: Any) -> None:
    clock = Clock(datetime(2026, 11, 15, tzinfo=UTC))
    ledger = Ledger(pool, Prices(pool), clock=clock, persona_caps={"mimi": Decimal(5)}.get)
    await fill_month(ledger, events=20)
    notifier, sent = AdminNotifier(), []

    async def sink(text: str) -> None:
        sent.append(text)

    notifier.register("admins", sink)
    clock.at = datetime(2026, 12, 1, 0, 0, tzinfo=UTC)  # the job's time: 00:00 UTC on the 1st
    text = await post_month_summary(ledger, notifier)
    total = (await month_report(pool, NOV)).total
    assert sent == [text]
    assert text.startswith(f"Spend for 2026-11: ${total.quantize(Decimal('0.0001'))}.")
    assert "image $" in text
    # each persona that spent, as `spend --by persona` counts it, mimi with its own cap
    personas = {line.persona: line.cost for line in await persona_lines(ledger, NOV)}
    assert personas["mimi"] > 0 and personas["sage"] > 0
    mimi, sage = money(personas["mimi"]), money(personas["sage"])
    _, _, by_persona = text.partition(" By persona: ")
    assert sorted(by_persona.rstrip(".").split(", ")) == [
        f"mimi {mimi} of its $5.00",
        f"sage {sage}",
    ]


async def test_app_wires_the_ledger(app: App) -> None:
    assert app.ledger is not None
    assert SUMMARY_JOB in app.scheduler.jobs()
    assert app.engine.router.degrade == app.ledger.degrade_level
    assert "spend" in [c.name for c in app.commands.all()]


async def test_every_model_call_is_charged_in_the_ledger(app: App, fake_ollama: FakeOllama) -> None:
    fake_ollama.queue_reply("a free reply")
    incoming = Incoming("test", "c1", "alice", "Alice", "hello")
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        [_ async for _ in events]
    await app.engine.drain()
    call = await app.pool.fetchrow("SELECT * FROM model_calls")
    row = await app.pool.fetchrow("SELECT * FROM ledger")
    assert row["request_id"] == f"model_call:{call['id']}"
    assert row["kind"] == "chat_tokens" and row["provider"].startswith("ollama:")
    assert row["units"] == call["prompt_tokens"] + call["completion_tokens"] > 0
    assert row["unit_price"] == 0 and row["cost"] == 0 and row["status"] == "settled"
    assert (row["user_key"], row["persona"], row["platform"]) == (
        "test:alice",
        call["persona"],
        "test",
    )


async def test_spend_command_attaches_a_chart(app: App) -> None:
    assert app.ledger is not None
    now = app.ledger.now()
    await app.ledger.record(
        kind="image", provider="fal", model="fal-ai/flux/dev", units=Decimal(3), request_id="i"
    )
    user = CommandContext("test", "c1", "bob", "Bob", is_admin=False)
    with pytest.raises(CommandError, match="Only an admin"):
        await app.commands.run(user, "spend", [])
    admin = CommandContext("test", "c1", "alice", "Alice", is_admin=True)
    with pytest.raises(CommandError, match="Usage: spend"):
        await app.commands.run(admin, "spend", ["last-month"])
    result = await app.commands.run(admin, "spend", [])
    assert f"Spend for {now:%Y-%m}" in result.text and "image" in result.text
    assert "$0.0750" in result.text and result.private
    assert (
        result.attachment is not None and result.attachment.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    )


async def test_chart_renders_a_month_by_kind(pool: Any, tmp_path: Path) -> None:
    ledger = Ledger(pool, Prices(pool), clock=Clock(datetime(2026, 11, 15, tzinfo=UTC)))
    await fill_month(ledger, events=150)
    for day in range(1, 31, 3):  # some GPU evenings on top
        await ledger.record(
            kind="gpu_seconds",
            provider="fly:gpu",
            model="a10",
            units=Decimal(1800 + 60 * day),
            request_id=f"gpu-{day}",
            at=datetime(2026, 11, day, 21, tzinfo=UTC) + timedelta(minutes=day),
        )
    path = await render_month_chart(pool, NOV, tmp_path)
    assert path.name == "spend-2026-11.png" and path.stat().st_size > 10_000
    keep = os.environ.get("LEDGER_CHART_COPY")  # set it to look at the chart yourself
    if keep:
        await asyncio.to_thread(Path(keep).write_bytes, path.read_bytes())
    empty = await render_month_chart(pool, date(2026, 10, 1), tmp_path)
    assert empty.stat().st_size > 5_000
