"""The spend ledger on the embedded PostgreSQL: prices, reservations, caps, rollover, alerts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from bot import db
from bot.config import REPO_ROOT
from bot.errors import ConfigError
from bot.ops.notify import AdminNotifier
from bot.spend.budgets import FREE_ONLY, LOCAL_ONLY, NORMAL, PAID_REFUSED
from bot.spend.ledger import BudgetExceeded, Budgets, Ledger, LedgerError
from bot.spend.prices import Prices

SCHNELL = "fal-ai/flux/schnell"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Inbox:
    """An admin channel: an AdminNotifier sink that keeps what it was sent."""

    def __init__(self) -> None:
        self.notifier = AdminNotifier()
        self.texts: list[str] = []
        self.notifier.register("inbox", self._sink)

    async def _sink(self, text: str) -> None:
        self.texts.append(text)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=4)
    yield pool
    await pool.close()


def nov(day: int, hour: int = 12, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, second, tzinfo=UTC)


def make_ledger(pool: Any, clock: Clock, inbox: Inbox | None = None, **caps: Any) -> Ledger:
    budgets = Budgets(**caps)
    notifier = inbox.notifier if inbox else None
    return Ledger(pool, Prices(pool), clock=clock, budgets=budgets, notifier=notifier)


async def test_prices_have_sources_and_record_uses_them(pool: Any) -> None:
    prices = await Prices(pool).all()
    assert prices and all(p.source.strip() for p in prices)
    ledger = make_ledger(pool, Clock(nov(5)))
    await ledger.record(
        kind="image", provider="fal", model=SCHNELL, units=Decimal(2), request_id="img-1"
    )
    await ledger.record(
        kind="gpu_seconds", provider="fly:gpu", model="l40s", units=Decimal(3600), request_id="g-1"
    )
    rows = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM ledger")}
    assert rows["img-1"]["unit_price"] == Decimal("0.003")
    assert rows["img-1"]["cost"] == Decimal("0.006")
    assert rows["img-1"]["status"] == "settled" and rows["img-1"]["month"] == date(2026, 11, 1)
    assert rows["g-1"]["cost"].quantize(Decimal("0.01")) == Decimal("1.25"), "L40S: $1.25/hour"
    assert rows["g-1"]["price_id"] is not None


async def test_record_is_idempotent_on_request_id(pool: Any) -> None:
    ledger = make_ledger(pool, Clock(nov(5)))
    for units in (Decimal(1), Decimal(5)):  # a retry, even a confused one, never charges twice
        await ledger.record(
            kind="image", provider="fal", model=SCHNELL, units=units, request_id="same"
        )
    rows = await pool.fetch("SELECT units, cost FROM ledger")
    assert [(r["units"], r["cost"]) for r in rows] == [(Decimal(1), Decimal("0.003"))]


async def test_record_without_a_price_or_with_the_callers_price(
    pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Priced in the same statement as the insert: no price in force is a row at 0 (and an
    error in the log, once); a price the caller gives is used as it is, with no price row."""
    ledger = make_ledger(pool, Clock(nov(5)))
    for _ in range(2):
        await ledger.record(
            kind="image", provider="nobody", model="x", units=Decimal(2), request_id="free"
        )
    await ledger.record(
        kind="chat_tokens",
        provider="openai:api",
        model="m",
        units=Decimal(1000),
        unit_price=Decimal("0.000002"),
        request_id="given",
    )
    rows = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM ledger")}
    assert (rows["free"]["cost"], rows["free"]["price_id"]) == (Decimal(0), None)
    assert rows["free"]["status"] == "settled" and rows["free"]["settled_at"] == nov(5)
    assert rows["given"]["cost"] == Decimal("0.002") and rows["given"]["price_id"] is None
    assert [r.message for r in caplog.records].count(
        "no price for image from nobody (x): recorded at 0"
    ) == 1


_CALL = (
    "INSERT INTO model_calls (purpose, backend, model, platform, user_key, persona, ok)"
    " VALUES ($1, $2, $3, 'console', 'console:1', 'x', true) RETURNING id"
)


async def test_record_with_writes_its_source_row_and_the_charge_in_one_statement(
    pool: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The source row (a model call) and its cost row: the request id is the prefix and the
    source's id, priced at the price in force, or at 0 with an error logged when none is."""
    ledger = make_ledger(pool, Clock(nov(5)))
    paid = await ledger.record_with(
        _CALL, ("image", "fal", SCHNELL), kind="image", provider="fal", model=SCHNELL,
        units=Decimal(2), request_prefix="call:", user_key="console:1", persona="x",
    )  # fmt: skip
    free = await ledger.record_with(
        _CALL, ("image", "nobody", "m"), kind="image", provider="nobody", model="m",
        units=Decimal(1), request_prefix="call:",
    )  # fmt: skip
    calls = {r["id"]: r["backend"] for r in await pool.fetch("SELECT * FROM model_calls")}
    assert calls == {paid: "fal", free: "nobody"}
    rows = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM ledger")}
    assert set(rows) == {f"call:{paid}", f"call:{free}"}
    charged = rows[f"call:{paid}"]
    assert (charged["cost"], charged["units"], charged["status"]) == (
        Decimal("0.006"),
        Decimal(2),
        "settled",
    )
    assert (charged["user_key"], charged["persona"], charged["month"]) == (
        "console:1",
        "x",
        date(2026, 11, 1),
    )
    assert (rows[f"call:{free}"]["cost"], rows[f"call:{free}"]["price_id"]) == (Decimal(0), None)
    assert [r.message for r in caplog.records] == [
        "no price for image from nobody (m): recorded at 0"
    ]


async def test_price_change_applies_from_its_date_and_never_rewrites_the_past(pool: Any) -> None:
    clock = Clock(nov(30, 23, 59, 59))
    ledger = make_ledger(pool, clock)
    await ledger.record(
        kind="image", provider="fal", model=SCHNELL, units=Decimal(1), request_id="before"
    )
    await Prices(pool).add(
        kind="image",
        provider="fal",
        model=SCHNELL,
        unit_price=Decimal("0.004"),
        unit="image",
        effective_from=datetime(2026, 12, 1, tzinfo=UTC),
        source="test: a price rise announced for December",
    )
    await ledger.record(  # an event dated before the change, written after it
        kind="image", provider="fal", model=SCHNELL, units=Decimal(1), request_id="late"
    )
    clock.at = datetime(2026, 12, 1, tzinfo=UTC)
    await ledger.record(
        kind="image", provider="fal", model=SCHNELL, units=Decimal(1), request_id="after"
    )
    price = {r["request_id"]: r["unit_price"] for r in await pool.fetch("SELECT * FROM ledger")}
    assert price == {
        "before": Decimal("0.003"),
        "late": Decimal("0.003"),
        "after": Decimal("0.004"),
    }


async def test_reserve_settle_release_and_the_rows_stay_put(pool: Any) -> None:
    ledger = make_ledger(pool, Clock(nov(5)), user_caps={"image": Decimal(2)})
    kw = {"kind": "image", "provider": "fal", "model": SCHNELL, "user_key": "discord:1"}
    first = await ledger.reserve(units=Decimal(1), request_id="a", **kw)
    assert first.status == "reserved" and first.cost == Decimal("0.003")
    await ledger.reserve(units=Decimal(1), request_id="b", **kw)
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(units=Decimal(1), request_id="c", **kw)
    assert (
        refused.value.user_message == "You've used your 2 images for this month. More on the 1st!"
    )
    await ledger.release("b")  # the image failed: it costs nothing and frees the cap
    await ledger.release("b")
    await ledger.reserve(units=Decimal(1), request_id="c", **kw)
    await ledger.settle("a", Decimal(1))
    await ledger.settle("a")  # a retry changes nothing
    with pytest.raises(LedgerError):
        await ledger.settle("b")
    with pytest.raises(LedgerError):
        await ledger.settle("never-reserved")
    rows = {r["request_id"]: r for r in await pool.fetch("SELECT * FROM ledger")}
    assert {k: r["status"] for k, r in rows.items()} == {
        "a": "settled",
        "b": "released",
        "c": "reserved",
    }
    assert rows["b"]["cost"] == 0 and rows["a"]["cost"] == Decimal("0.003")
    with pytest.raises(asyncpg.RaiseError, match="never deleted"):
        await pool.execute("DELETE FROM ledger WHERE request_id = 'a'")
    with pytest.raises(asyncpg.RaiseError, match="final"):
        await pool.execute("UPDATE ledger SET cost = 0 WHERE request_id = 'a'")


async def test_reserve_is_idempotent_on_request_id(pool: Any) -> None:
    ledger = make_ledger(pool, Clock(nov(5)), user_caps={"image": Decimal(1)})
    kw = {"kind": "image", "provider": "fal", "model": SCHNELL, "user_key": "u"}
    first = await ledger.reserve(units=Decimal(1), request_id="r", **kw)
    again = await ledger.reserve(units=Decimal(1), request_id="r", **kw)  # cap is full: a retry
    assert again == first
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 1


async def test_month_rolls_over_at_midnight_utc_and_alerts_once_per_month(pool: Any) -> None:
    clock = Clock(datetime(2026, 11, 30, 23, 59, 59, 999_000, tzinfo=UTC))
    inbox = Inbox()
    caps = {"user_caps": {"image": Decimal(2)}, "alert_fraction": Decimal("0.5")}
    ledger = make_ledger(pool, clock, inbox, **caps)
    kw = {"kind": "image", "provider": "fal", "model": SCHNELL, "user_key": "matrix:@a:x"}
    await ledger.reserve(units=Decimal(1), request_id="n1", **kw)
    await ledger.reserve(units=Decimal(1), request_id="n2", **kw)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(units=Decimal(1), request_id="n3", **kw)
    assert inbox.texts == ["Spend alert: matrix:@a:x has used 1 of 2 images this month."]
    clock.at = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)
    await ledger.reserve(units=Decimal(1), request_id="d1", **kw)
    await ledger.reserve(units=Decimal(1), request_id="d2", **kw)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(units=Decimal(1), request_id="d3", **kw)
    assert len(inbox.texts) == 2, "one alert per scope per month"
    months = {r["request_id"]: r["month"] for r in await pool.fetch("SELECT * FROM ledger")}
    assert months == {
        "n1": date(2026, 11, 1),
        "n2": date(2026, 11, 1),
        "d1": date(2026, 12, 1),
        "d2": date(2026, 12, 1),
    }


async def test_guild_and_kind_caps(pool: Any) -> None:
    caps = {"guild_caps": {"image": Decimal(3)}, "kind_caps": {"image": Decimal(4)}}
    ledger = make_ledger(pool, Clock(nov(5)), **caps)
    kw = {"kind": "image", "provider": "fal", "model": SCHNELL}
    for i in range(3):
        await ledger.reserve(units=Decimal(1), request_id=f"g{i}", guild="guild-1", **kw)
    with pytest.raises(BudgetExceeded, match="This server has used its 3 images"):
        await ledger.reserve(units=Decimal(1), request_id="g3", guild="guild-1", **kw)
    await ledger.reserve(units=Decimal(1), request_id="h0", guild="guild-2", **kw)
    with pytest.raises(BudgetExceeded, match="The bot has used all 4 images"):
        await ledger.reserve(units=Decimal(1), request_id="h1", guild="guild-2", **kw)


async def test_global_budget_degrade_ladder_and_refusal(pool: Any) -> None:
    inbox = Inbox()
    ledger = make_ledger(
        pool,
        Clock(nov(10)),
        inbox,
        monthly_usd=Decimal("1.00"),
        degrade_at=(Decimal("0.5"), Decimal("0.8"), Decimal("0.95")),
    )
    assert await ledger.degrade_level() == NORMAL
    levels = []
    for i, dollars in enumerate(["0.50", "0.30", "0.15"]):
        await ledger.record(
            kind="gpu_seconds",
            provider="fly:gpu",
            model="a10",
            units=Decimal(1),
            unit_price=Decimal(dollars),
            request_id=f"gpu-{i}",
        )
        levels.append(await ledger.degrade_level())
        await ledger.degrade_level()  # asking again sends no second notice
    assert levels == [FREE_ONLY, LOCAL_ONLY, PAID_REFUSED]
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(
            kind="image", provider="fal", model=SCHNELL, units=Decimal(1), request_id="img"
        )
    assert "budget for this month is spent" in refused.value.user_message
    free = await ledger.reserve(  # free actions still go through
        kind="chat_tokens", provider="local", model=None, units=Decimal(100), request_id="chat"
    )
    assert free.cost == 0
    assert inbox.texts.count("Spend alert: $0.80 of the $1.00 monthly budget is used.") == 1
    notices = [t for t in inbox.texts if t.startswith("Spend: ")]
    assert len(notices) == 3, "one notice per step of the ladder"
    assert "only free backends" in notices[0] and "paid actions" in notices[-1]


async def test_global_cap_is_never_passed_by_reservations(pool: Any) -> None:
    ledger = make_ledger(pool, Clock(nov(3)), monthly_usd=Decimal("0.10"))
    kw = {"kind": "image", "provider": "fal", "model": "fal-ai/flux/dev"}  # $0.025 each
    for i in range(3):
        await ledger.reserve(units=Decimal(1), request_id=f"i{i}", **kw)
    with pytest.raises(BudgetExceeded):  # 0.075 + 2 x 0.025 would pass the $0.10 cap
        await ledger.reserve(units=Decimal(2), request_id="big", **kw)
    spent = await pool.fetchval("SELECT sum(cost) FROM ledger WHERE status <> 'released'")
    assert spent == Decimal("0.075")


async def test_paid_action_without_a_price_is_refused(pool: Any) -> None:
    ledger = make_ledger(pool, Clock(nov(3)))
    with pytest.raises(LedgerError) as refused:
        await ledger.reserve(
            kind="image", provider="elsewhere", model="x", units=Decimal(1), request_id="x"
        )
    assert "admin" in refused.value.user_message and "elsewhere" not in refused.value.user_message
    assert await pool.fetchval("SELECT count(*) FROM ledger") == 0


def test_budgets_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from bot.config import Settings

    monkeypatch.setenv("BUDGET_MONTHLY_USD", "5")
    monkeypatch.setenv("BUDGET_USER_CAPS", '{"image": 20}')
    monkeypatch.setenv("BUDGET_DEGRADE_AT", "[0.9, 0.5, 0.99]")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    budgets = Budgets.from_settings(settings)
    assert budgets.monthly_usd == Decimal(5) and budgets.user_caps == {"image": Decimal(20)}
    assert budgets.degrade_at == (Decimal("0.5"), Decimal("0.9"), Decimal("0.99"))
    assert budgets.level(Decimal("4.6")) == 2
    monkeypatch.setenv("BUDGET_GUILD_CAPS", '{"images": 5}')
    with pytest.raises(ConfigError, match="BUDGET_GUILD_CAPS: no such kind images"):
        Budgets.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


def test_month_boundary_helpers() -> None:
    from bot.spend.ledger import month_of

    assert month_of(datetime(2026, 12, 1, tzinfo=UTC) - timedelta(microseconds=1)) == date(
        2026, 11, 1
    )
    tokyo = datetime(2026, 12, 1, 8, 0, tzinfo=ZoneInfo("Asia/Tokyo"))  # 23:00 UTC on the 30th
    assert month_of(tokyo) == date(2026, 11, 1)
    assert month_of(datetime(2026, 12, 1, 0, 0, tzinfo=UTC)) == date(2026, 12, 1)


@pytest.mark.parametrize(
    ("variable", "value", "why"),
    [
        ("BUDGET_KIND_CAPS", '{"chat_tokens": 1000000}', "counted after each model call"),
        ("BUDGET_USER_CAPS", '{"moderation_tokens": 5000}', "counted after each model call"),
        ("BUDGET_USER_CAPS", '{"gpu_seconds": 3600}', "not counted per user"),
        ("BUDGET_GUILD_CAPS", '{"gpu_seconds": 3600}', "not counted per guild"),
    ],
)
def test_a_cap_that_cannot_be_enforced_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, why: str
) -> None:
    from bot.config import Settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"{variable}: a cap on .*{why}"):
        Budgets.from_settings(Settings(_env_file=None))  # type: ignore[call-arg]


async def test_the_gpu_seconds_cap_leaves_only_free_backends(pool: Any) -> None:
    from bot.config import Settings

    settings = Settings(_env_file=None, budget_kind_caps={"gpu_seconds": 600})  # type: ignore[call-arg]
    clock, inbox = Clock(nov(10)), Inbox()
    ledger = Ledger(
        pool, Prices(pool), clock=clock, budgets=Budgets.from_settings(settings),
        notifier=inbox.notifier,
    )  # fmt: skip
    price = Decimal("0.0002")
    await ledger.record(
        kind="gpu_seconds", provider="fly-a", model=None, units=Decimal(500),
        unit_price=price, request_id="backend-session:1:0",
    )  # fmt: skip
    await ledger.record(  # a home GPU's seconds are free: they do not count
        kind="gpu_seconds", provider="ollama:home", model=None, units=Decimal(5000),
        unit_price=Decimal(0), request_id="backend-session:2:0",
    )  # fmt: skip
    assert await ledger.degrade_level() == NORMAL
    await ledger.record(
        kind="gpu_seconds", provider="fly-a", model=None, units=Decimal(100),
        unit_price=price, request_id="backend-session:1:500",
    )  # fmt: skip
    assert await ledger.degrade_level() == FREE_ONLY
    assert await ledger.degrade_level() == FREE_ONLY
    assert len(inbox.texts) == 1 and "600 of the 600 GPU seconds" in inbox.texts[0]
