"""Spend and rate limits per persona (issue 21, point 4): a persona's own monthly cap
(`budget_usd_month`) refuses its paid actions and walks its own degrade ladder with the bot's
words, its own rate per member (`rate_limit_per_minute`) holds back only its replies, and
/spend shows the month per persona.

The ledger on the embedded PostgreSQL; replies through the real engine, the chat model the
fake Ollama on loopback, and a per-token API the fake OpenAI-compatible server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot import db
from bot.app import display_names, running_app
from bot.config import REPO_ROOT
from bot.core.commands import CommandContext
from bot.core.engine import Done, Failed, Incoming
from bot.core.persona_files import PersonaRegistry
from bot.spend.budgets import FREE_ONLY, LOCAL_ONLY, NORMAL, PAID_REFUSED
from bot.spend.ledger import BudgetExceeded, Budgets, Ledger
from bot.spend.prices import Prices
from tests.brains.test_openai_backend import KEY, KEY_ENV, MODEL, api_backend, collect
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI
from tests.spend.test_ledger import SCHNELL, Clock, Inbox

CAPS = {"luna": Decimal("1.00")}
CENT_3 = Decimal("0.03")


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=4)
    yield pool
    await pool.close()


def ledger_for(pool: Any, inbox: Inbox | None = None) -> Ledger:
    return Ledger(
        pool,
        Prices(pool),
        clock=Clock(datetime(2026, 11, 10, 12, tzinfo=UTC)),
        budgets=Budgets(),
        notifier=inbox.notifier if inbox else None,
        persona_caps=CAPS.get,
    )


async def spend(ledger: Ledger, persona: str | None, dollars: str, request_id: str) -> None:
    await ledger.record(
        kind="gpu_seconds",
        provider="fly:gpu",
        model="a10",
        units=Decimal(1),
        unit_price=Decimal(dollars),
        request_id=request_id,
        persona=persona,
    )


def image(persona: str, request_id: str, units: int = 1) -> dict[str, Any]:
    return {
        "kind": "image",
        "provider": "fal",
        "model": SCHNELL,
        "units": Decimal(units),
        "request_id": request_id,
        "user_key": "discord:1",
        "persona": persona,
    }


async def test_a_persona_walks_its_own_ladder(pool: Any) -> None:
    inbox = Inbox()
    ledger = ledger_for(pool, inbox)
    levels = []
    for i, dollars in enumerate(["0.80", "0.12", "0.06"]):  # 80%, 92%, 98% of luna's $1
        await spend(ledger, "luna", dollars, f"luna-{i}")
        levels.append(await ledger.degrade_level("luna"))
        await ledger.degrade_level("luna")  # asking again sends no second notice
    assert levels == [FREE_ONLY, LOCAL_ONLY, PAID_REFUSED]
    await spend(ledger, "sol", "50", "sol-0")  # sol has no cap of its own, nor the bot
    assert await ledger.degrade_level("sol") == NORMAL
    assert await ledger.degrade_level() == NORMAL
    notices = [t for t in inbox.texts if t.startswith("Spend: luna has used")]
    assert len(notices) == 3, "one notice per step of luna's ladder"
    assert "only free backends" in notices[0] and "paid actions" in notices[-1]


async def test_a_persona_cap_refuses_its_paid_actions_and_charges_nothing(pool: Any) -> None:
    inbox = Inbox()
    ledger = ledger_for(pool, inbox)
    await spend(ledger, "luna", "0.975", "luna-0")  # under 98% of luna's $1: paid actions go
    await ledger.reserve(**image("luna", "img-0", units=3))  # $0.009 more: $0.984, over 98%
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(**image("luna", "img-1", units=1))  # the ladder's last step
    assert refused.value.user_message == (
        "luna's budget for this month is spent, so luna's paid features are paused until the 1st."
    )
    rows = await pool.fetch("SELECT request_id FROM ledger WHERE request_id = 'img-1'")
    assert rows == [], "a refused reservation writes no row"
    await ledger.reserve(**image("sol", "img-2", units=10))  # another persona is not held back
    assert any("luna has used" in t and "of its $1.00" in t for t in inbox.texts)


async def test_a_reservation_over_the_persona_cap_is_refused(pool: Any) -> None:
    ledger = ledger_for(pool)
    await spend(ledger, "luna", "0.50", "luna-0")
    too_much = image("luna", "big", units=200)  # $0.60 more: over $1 at once
    with pytest.raises(BudgetExceeded, match="luna's budget"):
        await ledger.reserve(**too_much)
    await ledger.reserve(**image("luna", "small", units=10))


async def test_concurrent_reservations_never_pass_a_persona_cap(pool: Any) -> None:
    ledger = Ledger(pool, Prices(pool), budgets=Budgets(), persona_caps={"luna": CENT_3}.get)

    async def attempt(i: int) -> bool:
        try:
            await ledger.reserve(**image("luna", f"c{i}"))  # $0.003 each: ten fit in $0.03
        except BudgetExceeded:
            return False
        return True

    granted = await asyncio.gather(*(attempt(i) for i in range(40)))
    assert sum(granted) == 10
    spent = await pool.fetchval("SELECT sum(cost) FROM ledger WHERE persona = 'luna'")
    assert spent == CENT_3


# ---------------------------------------------------------------- through the app


def _persona(folder: Path, name: str, extra: str = "") -> None:
    (folder / f"{name}.yaml").write_text(
        f"name: {name}\ndisplay_name: {name.title()}\ndescription: d\ngreeting: g\n"
        f"model: {MODEL}\n{extra}"
    )


@pytest.fixture
def personas(tmp_path: Path) -> Path:
    folder = tmp_path / "personas"
    folder.mkdir()
    _persona(folder, "luna", "budget_usd_month: 1\nrate_limit_per_minute: 1\nrate_limit_burst: 2\n")
    _persona(folder, "sol")
    return folder


def to(persona: str, text: str, user: str = "alice") -> Incoming:
    return Incoming("test", "stage", user, user.title(), text, persona=persona)


async def test_a_persona_rate_holds_back_only_its_own_replies(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, personas: Path
) -> None:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, personas_dir=personas)
    async with running_app(settings) as app:
        for _ in range(2):
            fake_ollama.queue_reply("Hello!")
            assert isinstance((await collect(app, to("luna", "hi")))[-1], Done)
        asked = len(fake_ollama.chat_requests())
        held = await collect(app, to("luna", "hi again"))
        assert len(held) == 1 and isinstance(held[0], Failed)
        assert "Luna takes a breath" in held[0].text
        assert len(fake_ollama.chat_requests()) == asked, "the model is not asked"
        fake_ollama.queue_reply("Hi Bob!")
        assert isinstance((await collect(app, to("luna", "hi", user="bob")))[-1], Done)
        fake_ollama.queue_reply("Sol here.")
        assert isinstance((await collect(app, to("sol", "hi")))[-1], Done), "sol has none"
        said = Incoming("test", "stage", "sol", "Sol", "luna?", persona="luna", from_persona="sol")
        fake_ollama.queue_reply("Yes, Sol?")
        assert isinstance((await collect(app, said))[-1], Done), "a persona is no member"
        await app.engine.drain()
        stored = await app.pool.fetchval("SELECT count(*) FROM messages WHERE content = 'hi again'")
        assert stored == 0, "nothing of the held message is kept"


@pytest.fixture
async def fake_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    monkeypatch.setenv(KEY_ENV, KEY)
    async with FakeOpenAI(key=KEY) as fake:
        yield fake


async def test_a_persona_over_its_rung_answers_from_free_backends(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI, personas: Path
) -> None:
    async with FakeOllama() as home:
        backends = [api_backend(fake_api), {"name": "home", "url": home.url}]
        settings = make_settings(
            tmp_path, database_url, dead_url(), backends=backends, personas_dir=personas
        )
        async with running_app(settings) as app:
            assert app.ledger is not None
            await spend(app.ledger, "luna", "0.80", "luna-spent")  # 80% of luna's own $1
            home.queue_reply("free words")
            luna = await collect(app, to("luna", "one"))
            assert isinstance(luna[-1], Done) and luna[-1].text == "free words"
            assert fake_api.requests == [], "the per-token API is not used for luna"
            fake_api.queue_reply("paid words")
            sol = await collect(app, to("sol", "two"))
            assert isinstance(sol[-1], Done) and sol[-1].text == "paid words"


async def test_spend_command_shows_each_persona(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama, personas: Path
) -> None:
    settings = make_settings(tmp_path, database_url, fake_ollama.url, personas_dir=personas)
    async with running_app(settings) as app:
        assert app.ledger is not None
        await spend(app.ledger, "luna", "0.25", "luna-0")
        await spend(app.ledger, "sol", "0.5", "sol-0")
        await spend(app.ledger, None, "0.125", "machine-0")
        admin = CommandContext("test", "stage", "alice", "Alice", is_admin=True)
        text = (await app.commands.run(admin, "spend", [])).text
    part = text.split("By persona (settled)\n", 1)[1].splitlines()
    assert part[1].split()[:3] == ["sol", "1", "$0.5000"], "most first"
    assert part[2].split()[:3] == ["luna", "1", "$0.2500"]
    assert "$0.2500 of $1.00 (25%), degrade level 0" in part[2]
    assert part[3].startswith("(none: shared GPU time)") and "$0.1250" in part[3]


async def test_members_are_told_the_persona_by_its_display_name(pool: Any) -> None:
    """The refusal a member reads names the persona as they know it (its display name, from
    the persona files as the app wires it); the admins' alert keeps its file name."""
    inbox = Inbox()
    registry = PersonaRegistry(REPO_ROOT / "personas")
    registry.load_all()
    shown = display_names(registry)
    assert shown("mimi") == registry.find("mimi").display_name  # type: ignore[union-attr]
    assert shown("gone") == "gone", "a persona no longer there keeps its name"
    ledger = Ledger(
        pool,
        Prices(pool),
        clock=Clock(datetime(2026, 11, 10, 12, tzinfo=UTC)),
        budgets=Budgets(),
        notifier=inbox.notifier,
        persona_caps=CAPS.get,
        persona_names={"luna": "Luna of the Night"}.get,  # type: ignore[arg-type]
    )
    await spend(ledger, "luna", "0.975", "luna-0")
    await ledger.reserve(**image("luna", "img-0", units=3))  # over 98%: the admins are told
    with pytest.raises(BudgetExceeded) as refused:
        await ledger.reserve(**image("luna", "img-1"))
    assert refused.value.user_message == (
        "Luna of the Night's budget for this month is spent,"
        " so Luna of the Night's paid features are paused until the 1st."
    )
    assert any("alert: luna has used" in t for t in inbox.texts), inbox.texts
