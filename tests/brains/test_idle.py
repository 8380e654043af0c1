"""`idle_stop: auto`: the learned idle time (idle.py) and what the pool measures for it.

Real parts: the official `ollama` client against a fake Ollama on loopback, httpx against the
fake Fly Machines API on loopback (tests/fakes/fly.py), the embedded PostgreSQL for settings.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.brains.build import build_pool
from bot.brains.idle import (
    AUTO_IDLE_MAX,
    MIN_GLOBAL,
    MIN_HISTORY,
    TYPING_WINDOW,
    AutoIdle,
    best_idle,
)
from tests.conftest import make_settings
from tests.fakes.fly import FakeFly, MachineOllama
from tests.fakes.loopback import dead_url

MODEL = "llama3.2:3b"


def test_restart_cost_is_wake_plus_stop_or_the_billing_minimum() -> None:
    idle = AutoIdle(wake=12.0, stop=3.0)
    assert idle.restart == 15.0
    idle.billing_minimum = 60.0
    assert idle.restart == 60.0
    assert AutoIdle().restart is None


def test_best_idle_on_gaps_worked_by_hand() -> None:
    # R = 10, no penalty. T = 0: 3 restarts, 30. T = 2: 2 + 2*(2+10) = 26. T = 4: 2+4+(4+10) = 20.
    # T = 50: 56. So 4: stay through the short gaps, stop before the long one.
    assert best_idle([2.0, 4.0, 50.0], restart=10.0, penalty=0.0) == 4.0
    # Every gap long: stop at once (each costs R instead of R + the gap).
    assert best_idle([100.0, 200.0, 300.0], restart=10.0, penalty=0.0) == 0.0
    # Gaps longer than the cap are never stayed through.
    assert best_idle([AUTO_IDLE_MAX + 1] * 3, restart=1e6, penalty=0.0) == 0.0


def test_best_idle_is_the_cheapest_idle_time_by_brute_force() -> None:
    rng = random.Random(7)
    for _ in range(50):
        gaps = sorted(rng.choice([rng.uniform(0, 40), rng.uniform(0, 2000)]) for _ in range(30))
        restart, penalty = rng.uniform(5, 60), rng.uniform(0, 30)

        def cost(t: float, gaps: list[float] = gaps, r: float = restart + penalty) -> float:
            return sum(g if g <= t else t + r for g in gaps)

        candidates = [0.0, *(g for g in gaps if g <= AUTO_IDLE_MAX)]
        cheapest = min(cost(t) for t in candidates)
        assert cost(best_idle(gaps, restart, penalty)) == pytest.approx(cheapest)


def test_ski_rental_until_there_is_history_then_learned() -> None:
    idle = AutoIdle()
    assert idle.limit(0.0) == AUTO_IDLE_MAX, "before the first wake nothing is known"
    idle.wake, idle.stop = 12.0, 3.0
    assert idle.limit(0.0) == 15.0, "no history: the ski-rental rule, stay up for R"
    now = 0.0
    for _ in range(MIN_HISTORY + 1):  # a lone message an hour: every gap is long
        idle.demand(now + 3600, now)
        now += 3600
    assert idle.limit(now) == 0.0, "quiet: stop as soon as the reply is done"


def test_a_busy_context_stays_up_through_short_gaps() -> None:
    idle = AutoIdle(wake=12.0, stop=3.0)
    now = 0.0
    for _ in range(3 * MIN_HISTORY):  # a lively channel: a demand every 8 s
        idle.demand(now + 8.0, now)
        now += 8.0
    # Each 8 s gap stayed through costs 8; a stop and restart would cost R = 15 plus the
    # penalty, so T = 8 beats T = 0.
    assert idle.limit(now) == pytest.approx(8.0), "stay up through the 8 s gaps"


def _questions(idle: AutoIdle, count: int, typed: float | None, now: float = 0.0) -> float:
    """`count` lone questions an hour apart, each typed for `typed` seconds (None: typing that
    never becomes a message); the machine wakes for each, so only the hour-long gaps are idle."""
    for _ in range(count):
        idle.demand(now, now - 3600.0 if now else None, typing=True)
        if typed is not None:
            idle.demand(now + typed, None)  # the message, while the machine wakes
        now += 3600.0
    return now


def test_a_machine_stays_up_while_someone_types() -> None:
    idle = AutoIdle(wake=12.0, stop=3.0)
    now = _questions(idle, MIN_HISTORY + 1, typed=20.0)
    assert idle.limit(now - 3600.0 + 21.0) == 0.0, "after the reply: stop at once"
    # Someone starts typing; the machine (woken by it) is ready 12 s later. A fixed timeout
    # would count from then; ours holds until the learned 20 s of typing are over.
    idle.demand(now, now - 3600.0 + 21.0, typing=True)
    assert idle.limit(now + 12.0) == pytest.approx(8.0)
    assert idle.limit(now) == pytest.approx(20.0)
    idle.demand(now + 20.0, None)  # the message came: nothing is on its way any more
    assert idle.limit(now + 21.0) == 0.0


def test_typing_repeated_while_someone_types_is_one_wait() -> None:
    """Discord sends its typing event again every few seconds while someone types."""
    idle = AutoIdle(wake=12.0, stop=3.0)
    now = _questions(idle, MIN_HISTORY + 1, typed=20.0)
    for repeat in (0.0, 8.0, 16.0):
        idle.demand(now + repeat, None if repeat else now - 3600.0 + 21.0, typing=True)
    assert idle.limit(now + 18.0) == pytest.approx(18.0), "held 20 s from the last typing"
    idle.demand(now + 30.0, now + 18.0)  # the message
    assert idle.limit(now + 31.0) == 0.0, "the message ends all three"
    assert idle._typed.gaps[-1] == 30.0, "typed for 30 s, from the first typing event"


def test_typing_that_never_becomes_a_message_teaches_no_hold() -> None:
    idle = AutoIdle(wake=12.0, stop=3.0)
    now = _questions(idle, MIN_HISTORY, typed=None)
    idle.demand(now, now - 3600.0, typing=True)
    assert idle.limit(now) == 0.0, f"typing gave up within {TYPING_WINDOW} s every time"


def test_a_new_context_uses_what_all_contexts_learned() -> None:
    idle = AutoIdle(wake=12.0, stop=3.0)
    for k in range(MIN_GLOBAL):  # ten gaps of 18 s, each in a busy stretch
        for j in range(10):
            idle.demand(k * 10_000.0 + j * 5.0, None)
        idle.demand(k * 10_000.0 + 63.0, k * 10_000.0 + 45.0)
    # A lone demand is a context never seen: it takes the 18 s all contexts learned, not the
    # ski-rental guess of R = 15 s.
    idle.demand(500_000.0, None)
    assert idle.limit(500_001.0) == pytest.approx(18.0)


@pytest.fixture
async def machine() -> AsyncIterator[tuple[FakeFly, MachineOllama]]:
    async with MachineOllama() as ollama, FakeFly(ollama=ollama, boot_seconds=0.05) as fly:
        yield fly, ollama


async def test_the_pool_measures_a_restart_without_its_polling_sleep(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    backend = {
        "name": "fly-l40s",
        "url": ollama.url,
        "models": [MODEL],
        "cost": {"usd_per_gpu_hour": "0.72"},
        "wake": {"driver": "fly", "app": fly.app, "machine": fly.machine, "api_url": fly.url},
        "idle_stop": "auto",
        "billing_minimum": 0.5,
    }
    settings = make_settings(
        tmp_path,
        database_url,
        dead_url(),
        backends=[backend],
        fly_api_token="fly-test-token-123",
        backend_wake_poll=0.3,
        backend_wake_timeout=10.0,
        memory_enabled=False,
    )
    pool = build_pool(settings, clock=time.monotonic)
    [gpu] = pool.backends
    try:
        # Asked once before the start (a machine left running?), then polled: two misses,
        # each followed by a polling sleep.
        ollama.fail_next(503, "loading", count=3)
        assert await pool.prewake(MODEL)
        lease = await pool.acquire(gpu, MODEL)  # waits on the same wake
        await pool.release(lease)
        assert gpu.wake_seconds is not None and gpu.auto.wake is not None
        assert gpu.wake_seconds >= 0.6, "two polling sleeps of 0.3 s"
        # auto.wake is rounded to the millisecond (up to 0.5 ms off), and uvloop's timers keep
        # libuv's millisecond loop clock, so a sleep of 0.3 s can end up to 1 ms early as the
        # monotonic clock sees it (seen: 0.29927 s)
        unbilled = gpu.wake_seconds - gpu.auto.wake
        assert 0.3 - 0.0015 <= unbilled < 0.45, "the last sleep is not billed"
        assert gpu.auto.stop == 0.0
    finally:
        await pool.aclose()  # stops the machine it woke: the stop is measured
    assert fly.state == "stopped" and gpu.auto.stop > 0.0
    assert gpu.auto.billing_minimum == 0.5, "from the backend's `billing_minimum`"
    assert gpu.auto.restart == pytest.approx(max(0.5, gpu.auto.wake + gpu.auto.stop))


async def test_the_pool_holds_a_machine_while_someone_types(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    """The production path: `prewake` (someone typing) and `idle_check` on the pool's clock."""
    fly, ollama = machine
    backend = {
        "name": "fly-l40s",
        "url": ollama.url,
        "models": [MODEL],
        "wake": {"driver": "fly", "app": fly.app, "machine": fly.machine, "api_url": fly.url},
        "idle_stop": "auto",
    }
    settings = make_settings(
        tmp_path,
        database_url,
        dead_url(),
        backends=[backend],
        fly_api_token="fly-test-token-123",
        backend_wake_poll=0.05,
        memory_enabled=False,
    )
    clock = [0.0]
    pool = build_pool(settings, clock=lambda: clock[0])
    [gpu] = pool.backends
    # Lone questions an hour apart, each typed for 20 s: stop right after a reply, but hold
    # 20 s after someone starts typing.
    _questions(gpu.auto, MIN_HISTORY + 1, typed=20.0, now=-200_000.0)
    try:
        assert await pool.prewake(MODEL)
        assert gpu._wake is not None
        await asyncio.wait_for(asyncio.shield(gpu._wake), 10)  # the wake typing started
        assert gpu.state == "up"
        gpu.auto.wake, gpu.auto.stop = 12.0, 3.0  # the fake boots at once; say a cold start is 12 s
        clock[0] = 19.0
        assert await pool.idle_check() == [], "still typing: held"
        clock[0] = 19.5  # the message comes and is answered
        lease = await pool.acquire(gpu, MODEL)
        await pool.release(lease)
        clock[0] = 20.5
        assert await pool.idle_check() == ["fly-l40s"], "answered, nothing on its way: stopped"
        assert fly.state == "stopped"
    finally:
        await pool.aclose()
