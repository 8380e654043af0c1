"""OpenAI-compatible backends (`kind: openai`): streaming, per-token booking, tool calls, refusals,
failover with a home Ollama, and `max_context`.

Real parts: the official `openai` client against the fake OpenAI-compatible server on loopback
(tests/fakes/openai.py), the official `ollama` client against the fake Ollama, the real engine,
the embedded PostgreSQL with the real ledger, and the real fal-client against the fake Fal.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot.app import App, running_app
from bot.brains.base import ChatRequest
from bot.brains.build import build_pool
from bot.brains.router import BrainRouter
from bot.config import Settings
from bot.core.engine import Done, Event, Failed, Incoming, Notice, Picture
from bot.core.prompts import user_seed
from bot.errors import ConfigError, ModelError, ModelInterrupted
from bot.images.draw_tool import DRAW_IMAGE
from bot.spend.report import format_report, month_report
from tests.conftest import make_settings
from tests.fakes.fal import FakeFal
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama
from tests.fakes.openai import FakeOpenAI, count_tokens, prompt_tokens
from tests.fal_fixtures import start_app

MODEL = "llama3.2:3b"
SERVED = "meta-llama/llama-3.2-3b-instruct"
KEY = "sk-test-7f3a9c2e1b"
KEY_ENV = "PERSONABOT_TEST_API_KEY"
PER_IN, PER_OUT = Decimal("0.05"), Decimal("0.08")  # dollars per million tokens


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def api_backend(fake: FakeOpenAI, **extra: Any) -> dict[str, Any]:
    return {
        "name": "api",
        "kind": "openai",
        "url": fake.url,
        "api_key_env": KEY_ENV,
        "models": {MODEL: SERVED},
        "cost": {
            "usd_per_million_input_tokens": str(PER_IN),
            "usd_per_million_output_tokens": str(PER_OUT),
        },
        **extra,
    }


def settings_for(
    tmp_path: Path, database_url: str, backends: list[dict[str, Any]], **overrides: Any
) -> Settings:
    values: dict[str, Any] = {"backends": backends, "memory_enabled": False}
    values.update(overrides)
    return make_settings(tmp_path, database_url, dead_url(), **values)


def say(text: str, *, user: str = "alice") -> Incoming:
    return Incoming("test", "c1", user, user.title(), text)


async def collect(app: App, incoming: Incoming) -> list[Event]:
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        return [event async for event in events]


def request(text: str = "hello", *, max_tokens: int = 50) -> ChatRequest:
    return ChatRequest(
        model=MODEL,
        messages=[{"role": "user", "content": text}],
        temperature=0.5,
        seed=7,
        max_tokens=max_tokens,
        context_window=4096,
    )


async def answer_text(router: BrainRouter, req: ChatRequest | None = None) -> tuple[str, Any]:
    answer = await router.open(req or request())
    return "".join([piece async for piece in answer.chunks()]), answer


@pytest.fixture
async def fake_api(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeOpenAI]:
    monkeypatch.setenv(KEY_ENV, KEY)
    async with FakeOpenAI(key=KEY) as fake:
        yield fake


# ---------------------------------------------------------------- configuration


def test_spec_kind_openai_and_its_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)
    api = {
        "name": "api",
        "kind": "openai",
        "url": "http://127.0.0.1:9/v1",
        "api_key_env": KEY_ENV,
        "models": {"llama3.2": SERVED},
        "cost": {"usd_per_million_input_tokens": 0.05, "usd_per_million_output_tokens": 0.08},
        "max_context": 8192,
    }
    settings = make_settings(tmp_path, "postgresql://x/y", "http://h", backends=[api])
    [backend] = build_pool(settings).backends
    assert backend.serves("llama3.2:latest") and not backend.serves("qwen3:8b")
    assert backend.usd_per_input_token == Decimal("0.00000005")
    assert backend.usd_per_output_token == Decimal("0.00000008")
    assert not backend.free and backend.max_context == 8192 and backend.driver.always_on
    assert backend.brain.label("llama3.2") == f"{SERVED} on api (OpenAI-compatible API)"

    assert KEY in settings.secret_values(), "the log filter redacts the backend's key"

    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"api_key_env names {KEY_ENV}, which is not set"):
        build_pool(settings)
    monkeypatch.chdir(tmp_path)  # the key may also come from .env, like every setting
    (tmp_path / ".env").write_text(f"{KEY_ENV}=sk-from-dotenv\n")
    from_file = make_settings(tmp_path, "postgresql://x/y", "http://h", backends_file=None)
    assert from_file.api_key(KEY_ENV) is not None
    assert from_file.api_key(KEY_ENV).get_secret_value() == "sk-from-dotenv"  # type: ignore[union-attr]
    path = tmp_path / "backends.yaml"
    path.write_text(f"- {{name: api, kind: openai, url: x, api_key_env: {KEY_ENV}}}\n")
    in_file = make_settings(tmp_path, "postgresql://x/y", "http://h", backends_file=path)
    assert "sk-from-dotenv" in in_file.secret_values()
    wrong: list[tuple[dict[str, Any], str]] = [
        ({"url": "x", "models": {"a": "b"}}, "a mapping of model ids is for kind: openai"),
        ({"url": "x", "api_key_env": "K"}, "api_key_env: is for kind: openai"),
        (
            {
                "url": "x",
                "cost": {"usd_per_million_input_tokens": 1, "usd_per_million_output_tokens": 1},
            },
            "per-token prices are for kind: openai",
        ),
        ({"url": "x", "kind": "openai", "keep_alive": "5m"}, "keep_alive: is for kind: ollama"),
        (
            {"url": "x", "kind": "openai", "cost": {"usd_per_million_input_tokens": 1}},
            "go together",
        ),
        ({"url": "x", "kind": "openai", "api_key_env": "sk-abc 123"}, "api_key_env"),
    ]
    for entry, message in wrong:
        bad = make_settings(tmp_path, "postgresql://x/y", "http://h", backends=[entry])
        with pytest.raises(ConfigError, match=message):
            build_pool(bad)


# ---------------------------------------------------------------- streaming and the ledger


async def test_streams_persona_settings_and_books_tokens_at_its_prices(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = settings_for(tmp_path, database_url, [api_backend(fake_api)])
    async with running_app(settings) as app:
        fake_api.queue_reply("Hello from the API, friend.")
        events = await collect(app, say("hi there"))
        await app.engine.drain()
        done = events[-1]
        assert isinstance(done, Done) and done.text == "Hello from the API, friend."
        assert not [e for e in events if isinstance(e, Notice)]
        assert "OpenAI-compatible" in done.answered_by

        persona = await app.engine.persona_for("test", "c1")
        [sent] = fake_api.requests
        assert sent["model"] == SERVED and sent["stream"] is True
        assert sent["stream_options"] == {"include_usage": True}
        assert sent["temperature"] == persona.temperature
        assert sent["max_tokens"] == persona.max_reply_tokens
        assert sent["seed"] == user_seed("test", "alice")
        assert sent["presence_penalty"] == pytest.approx(persona.repeat_penalty - 1.0)
        assert "tools" not in sent

        rows = await app.pool.fetch(
            "SELECT request_id, kind, provider, model, units, unit_price, cost, user_key"
            " FROM ledger ORDER BY request_id"
        )
        used_in = prompt_tokens(sent["messages"])
        used_out = count_tokens(done.text)
        assert [(r["kind"], r["provider"], r["model"]) for r in rows] == [
            ("chat_tokens", "api", SERVED)
        ] * 2
        booked = {r["request_id"].rsplit(":", 1)[-1]: r for r in rows}
        assert booked["input"]["units"] == used_in and booked["output"]["units"] == used_out
        assert booked["input"]["unit_price"] == PER_IN / 1_000_000
        cost = (used_in * PER_IN + used_out * PER_OUT) / 1_000_000
        assert sum(r["cost"] for r in rows) == cost > 0
        assert {r["user_key"] for r in rows} == {"test:alice"}
        assert app.ledger is not None
        status = await app.ledger.status()
        assert status.spent == cost
        report = format_report(await month_report(app.pool, status.month, "provider"))
        assert "api" in report and str(used_in + used_out) in report

    assert KEY not in caplog.text
    assert all(KEY not in str(r.args) for r in caplog.records)


async def test_a_per_token_backend_is_paid_for_the_degrade_ladder(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    async with FakeOllama() as home:
        backends = [api_backend(fake_api), {"name": "home", "url": home.url}]
        # The first rung (free backends only) at a millionth of $1: one reply's tokens pass it.
        rungs = [Decimal("0.000001"), Decimal("0.5"), Decimal("0.9")]
        settings = settings_for(
            tmp_path, database_url, backends, budget_monthly_usd=1, budget_degrade_at=rungs
        )
        async with running_app(settings) as app:
            fake_api.queue_reply("paid words")
            first = await collect(app, say("one"))
            await app.engine.drain()
            assert isinstance(first[-1], Done) and first[-1].text == "paid words"
            assert app.ledger is not None and await app.ledger.degrade_level() == 1
            home.queue_reply("free words")
            second = await collect(app, say("two"))
            assert isinstance(second[-1], Done) and second[-1].text == "free words"
            assert len(fake_api.requests) == 1, "the per-token API is not used on rung 1"


async def test_the_model_draws_through_the_apis_tool_calls(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI, fake_fal: FakeFal
) -> None:
    async with FakeOllama() as unused:
        app_context = await start_app(
            tmp_path, database_url, unused, backends=[api_backend(fake_api)]
        )
        async with app_context as app:
            fox = {"prompt": "a red fox in the snow", "size": "landscape"}
            fake_api.queue_tool_call(DRAW_IMAGE, fox)
            fake_api.queue_reply("Here is your fox!")
            events = await collect(app, say("draw me a fox"))

    first, second = fake_api.requests
    assert [t["function"]["name"] for t in first["tools"]] == [DRAW_IMAGE]
    [submission] = fake_fal.submissions
    assert fox["prompt"] in submission["arguments"]["prompt"]
    call, result = second["messages"][-2:]
    assert call["role"] == "assistant"
    [tool_call] = call["tool_calls"]
    assert tool_call["type"] == "function" and tool_call["function"]["name"] == DRAW_IMAGE
    assert (
        tool_call["function"]["arguments"]
        == '{"prompt": "a red fox in the snow", "size": "landscape"}'
    )
    assert result["role"] == "tool" and result["tool_call_id"] == tool_call["id"]
    assert result["content"].startswith("Drawn")
    done, picture = events[-2:]
    assert isinstance(done, Done) and done.text == "Here is your fox!"
    assert isinstance(picture, Picture)


# ---------------------------------------------------------------- failures


async def test_a_bad_key_rests_long_alerts_once_and_never_shows_the_key(
    tmp_path: Path,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-4c1d8e"
    monkeypatch.setenv(KEY_ENV, wrong)
    alerts: list[str] = []

    async def alert(text: str) -> None:
        alerts.append(text)

    clock = Clock()
    async with FakeOpenAI(key=KEY) as api, FakeOllama() as home:
        backends = [api_backend(api), {"name": "home", "url": home.url}]
        settings = settings_for(tmp_path, database_url, backends, backend_bad_key_rest=1800.0)
        router = BrainRouter([], build_pool(settings, clock=clock, alert=alert))
        [api_b, _] = router.pool.backends  # type: ignore[union-attr]
        try:
            text, answer = await answer_text(router)
            assert answer.brain.name == "home" and text
            assert answer.failures[0].reason == "it refused the API key (HTTP 401)"
            assert api_b.breaker.remaining() == 1800.0
            assert answer.notice is not None and wrong not in answer.notice
            clock.now += 1800.0  # the rest is over: tried again, still refused, no new alert
            _, answer = await answer_text(router)
            assert answer.brain.name == "home" and api_b.breaker.remaining() == 1800.0
        finally:
            await router.aclose()
    assert len(alerts) == 1
    assert KEY_ENV in alerts[0] and "401" in alerts[0] and wrong not in alerts[0]
    assert wrong not in caplog.text
    assert all(wrong not in str(r.args) for r in caplog.records)


async def test_rate_limited_rests_for_retry_after_then_answers(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    clock = Clock()
    async with FakeOllama() as home:
        backends = [api_backend(fake_api), {"name": "home", "url": home.url}]
        settings = settings_for(tmp_path, database_url, backends)
        router = BrainRouter([], build_pool(settings, clock=clock))
        [api_b, _] = router.pool.backends  # type: ignore[union-attr]
        try:
            fake_api.fail_next(429, retry_after=42)
            _, answer = await answer_text(router)
            assert answer.brain.name == "home"
            assert answer.failures[0].reason == "it is rate limiting us (HTTP 429)"
            assert api_b.breaker.remaining() == 42.0
            clock.now += 41.0
            _, answer = await answer_text(router)
            assert answer.brain.name == "home" and len(fake_api.requests) == 0
            clock.now += 1.0
            fake_api.queue_reply("back from the limit")
            text, answer = await answer_text(router)
            assert text == "back from the limit" and answer.brain.name == "api"
            assert api_b.breaker.state == "closed"
        finally:
            await router.aclose()


async def test_server_errors_and_timeouts_rest_it_and_the_user_gets_a_plain_sentence(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    settings = settings_for(
        tmp_path, database_url, [api_backend(fake_api)], backend_breaker_base=5.0
    )
    async with running_app(settings) as app:
        fake_api.fail_next(503)
        events = await collect(app, say("hello?"))
        failed = events[-1]
        assert isinstance(failed, Failed) and failed.text == ModelError.user_message
        [api_b] = app.backends.backends  # type: ignore[union-attr]
        assert 0 < api_b.breaker.remaining() <= 5.0
        await app.engine.drain()  # the call's record is written in the background
        failure = (await app.pool.fetch("SELECT error FROM model_calls WHERE NOT ok"))[0]
        assert failure["error"] == "it answered HTTP 503"

    slow = settings_for(tmp_path, database_url, [api_backend(fake_api)], ollama_read_timeout=0.3)
    router = BrainRouter([], build_pool(slow))
    try:
        fake_api.hang_next(seconds=5.0)
        with pytest.raises(ModelError) as caught:
            await router.open(request())
        assert "did not answer in time" in str(caught.value)
    finally:
        await router.aclose()


async def test_a_stream_cut_midway_is_an_interrupted_reply(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    router = BrainRouter(
        [], build_pool(settings_for(tmp_path, database_url, [api_backend(fake_api)]))
    )
    try:
        fake_api.queue_reply("one two three four five six")
        fake_api.break_stream_after(2)
        answer = await router.open(request())
        with pytest.raises(ModelInterrupted):
            _ = [piece async for piece in answer.chunks()]
        assert answer.text == "one two"
    finally:
        await router.aclose()


async def test_failover_from_a_down_home_ollama_to_the_api_and_back(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    clock = Clock()
    async with FakeOllama() as home:
        backends = [{"name": "home", "url": home.url}, api_backend(fake_api)]
        settings = settings_for(tmp_path, database_url, backends, backend_breaker_base=5.0)
        router = BrainRouter([], build_pool(settings, clock=clock))
        try:
            home.fail_next(status=503, error="gpu asleep", count=1)
            fake_api.queue_reply("the API answers")
            text, answer = await answer_text(router)
            assert text == "the API answers" and answer.brain.name == "api"
            assert [f.backend for f in answer.failures] == ["home"]
            assert answer.notice is not None and "OpenAI-compatible" in answer.notice
            clock.now += 5.0
            home.queue_reply("home again")
            text, answer = await answer_text(router)
            assert text == "home again" and answer.brain.name == "home" and not answer.failures
            assert len(fake_api.requests) == 1
        finally:
            await router.aclose()


async def test_max_context_skips_a_backend_the_prompt_does_not_fit(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    async with FakeOllama() as small:
        backends = [{"name": "small", "url": small.url, "max_context": 600}, api_backend(fake_api)]
        router = BrainRouter([], build_pool(settings_for(tmp_path, database_url, backends)))
        try:
            small.queue_reply("short and small")
            text, answer = await answer_text(router, request("a short question"))
            assert answer.brain.name == "small" and text == "short and small"
            assert small.chat_requests()[-1]["options"]["num_ctx"] == 600
            fake_api.queue_reply("long and large")
            long = request("word " * 2400)  # about 3,000 tokens: more than 600
            text, answer = await answer_text(router, long)
            assert answer.brain.name == "api" and text == "long and large"
            assert not answer.failures and len(small.chat_requests()) == 1
        finally:
            await router.aclose()


async def test_the_app_tells_its_admins_once_about_a_refused_key(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-revoked-0a9b")
    async with FakeOpenAI(key=KEY) as api:
        settings = settings_for(tmp_path, database_url, [api_backend(api)])
        async with running_app(settings) as app:
            notices: list[str] = []

            async def admin_room(text: str) -> None:
                notices.append(text)

            app.notifier.register("test", admin_room)
            events = await collect(app, say("hello?"))
            assert isinstance(events[-1], Failed) and events[-1].text == ModelError.user_message
            assert "sk-revoked" not in events[-1].text
    assert len(notices) == 1 and KEY_ENV in notices[0] and "sk-revoked" not in notices[0]


async def test_a_reply_cut_off_midway_still_books_its_estimated_tokens(
    tmp_path: Path, database_url: str, fake_api: FakeOpenAI
) -> None:
    """The provider bills what it generated though a broken stream sends no usage chunk: the
    call is booked at estimated counts (4 characters a token), at the backend's prices."""
    settings = settings_for(tmp_path, database_url, [api_backend(fake_api)])
    async with running_app(settings) as app:
        fake_api.queue_reply("one two three four five six")
        fake_api.break_stream_after(2)
        events = await collect(app, say("tell me a story"))
        await app.engine.drain()
        assert isinstance(events[-1], Failed)
        rows = await app.pool.fetch(
            "SELECT request_id, units, unit_price, cost FROM ledger ORDER BY request_id"
        )
        booked = {r["request_id"].rsplit(":", 1)[-1]: r for r in rows}
        assert set(booked) == {"input", "output"}
        [sent] = fake_api.requests
        chars = sum(len(str(m.get("content") or "")) for m in sent["messages"])
        assert booked["input"]["units"] == chars // 4 + 4 * len(sent["messages"])
        assert booked["output"]["units"] == (len("one two") + 3) // 4
        assert booked["output"]["unit_price"] == PER_OUT / 1_000_000
        assert sum(r["cost"] for r in rows) > 0
        call = await app.pool.fetchrow("SELECT ok, completion_tokens FROM model_calls")
        assert call["ok"] is False and call["completion_tokens"] == booked["output"]["units"]
