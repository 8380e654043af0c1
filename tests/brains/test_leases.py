"""Money never leaks (issue 16): leases that always end, one owner per machine across processes,
GPU time booked while a machine runs, reconciliation, and a Fly driver that knows the state.

Real parts: the embedded PostgreSQL (two pools, as two processes would, over one database),
the official `ollama` client against fake Ollama servers, httpx against the fake Machines API.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from bot import db
from bot.brains.build import build_pool
from bot.brains.pool import BackendPool
from bot.brains.router import BrainRouter, NoBackend
from bot.brains.sessions import SessionBook
from bot.brains.wake import CommandWake
from bot.config import REPO_ROOT, Settings
from bot.spend.ledger import Ledger
from bot.spend.prices import Prices
from tests.brains.test_backends import MODEL, Clock, fly_backend, pool_settings, request
from tests.fakes.fly import FakeFly, MachineOllama
from tests.fakes.ollama import FakeOllama


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=6)
    yield pool
    await pool.close()


@pytest.fixture
async def machine() -> AsyncIterator[tuple[FakeFly, MachineOllama]]:
    async with MachineOllama() as ollama, FakeFly(ollama=ollama, boot_seconds=0.05) as fly:
        yield fly, ollama


def two_pools(
    settings: Settings, database: Any, clock: Clock
) -> tuple[BackendPool, BackendPool, Ledger]:
    """Two processes' pools over one database (as `bot run` beside `bot chat`)."""
    ledger = Ledger(database, Prices(database))
    a = build_pool(settings, sessions=SessionBook(database, ledger), clock=clock)
    b = build_pool(settings, sessions=SessionBook(database, ledger), clock=clock)
    return a, b, ledger


async def session_rows(database: Any) -> list[Any]:
    return list(await database.fetch("SELECT * FROM backend_sessions ORDER BY id"))


async def booked(database: Any, session_id: int) -> Decimal:
    total = await database.fetchval(
        "SELECT COALESCE(sum(units), 0) FROM ledger WHERE request_id LIKE $1",
        f"backend-session:{session_id}:%",
    )
    return Decimal(total)


# ---------------------------------------------------------------- 1: every path releases


async def test_every_way_out_before_the_first_token_releases_the_lease(
    tmp_path: Path, database_url: str
) -> None:
    async with FakeOllama() as ollama:
        settings = pool_settings(tmp_path, database_url, [{"name": "box", "url": ollama.url}])
        pool = build_pool(settings)
        router = BrainRouter([], pool)
        backend = pool.backends[0]
        try:
            # Cancelled while waiting for the first token (a user left, a guard refusal
            # cancelled the opening, shutdown).
            ollama.hang = True
            task = asyncio.create_task(router.open(request()))
            await asyncio.sleep(0.3)
            assert backend.in_flight == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert backend.in_flight == 0
            # A time-out around the opening.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await router.open(request())
            assert backend.in_flight == 0
            ollama.hang = False
            # The opening stream abandoned after the Answer was ready but before it was taken.
            ollama.queue_reply("never read")
            opening = router.opening(request())
            while True:
                item = await anext(opening)
                if not isinstance(item, str):
                    break
            assert backend.in_flight == 1
            await opening.aclose()  # the Answer was handed over: its holder closes it
            await item.aclose()  # type: ignore[union-attr]
            assert backend.in_flight == 0
            # An error that is not a ModelUnavailable (a model that is not there answers 404):
            # the next backend is tried and this one is released.
            with pytest.raises(NoBackend):
                await router.open(request(model="not-pulled:1b"))
            assert backend.in_flight == 0
            # A tool call, read to the end.
            ollama.queue_tool_call("draw_image", {"prompt": "a cat"}, text="Sure.")
            answer = await router.open(request())
            _ = [piece async for piece in answer.chunks()]
            assert answer.tool_calls and backend.in_flight == 0
        finally:
            await router.aclose()
        rows = await _leases(database_url)
        assert all(row["in_flight"] == 0 for row in rows)


async def _leases(database_url: str) -> list[Any]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations", max_size=1)
    try:
        return list(await pool.fetch("SELECT * FROM backend_leases"))
    finally:
        await pool.close()


async def test_a_lease_left_behind_stops_counting(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    clock = Clock()
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)])
    pool = build_pool(settings, clock=clock)
    backend = pool.backends[0]
    try:
        lease = await pool.acquire(backend, MODEL)  # a bug forgets to release it
        assert lease.backend is backend and backend.state == "up"
        clock.now += 600
        assert await pool.idle_check() == []  # a request may take this long
        clock.now += pool.lease_ttl
        assert await pool.idle_check() == ["fly-l40s"]
        assert fly.state == "stopped"
    finally:
        await pool.aclose()


# ---------------------------------------------------------------- 2, 9: one owner, booked once


async def test_two_processes_share_one_machine_and_book_it_once(
    tmp_path: Path, database: Any, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    clock = Clock()
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)])
    a, b, ledger = two_pools(settings, database, clock)
    try:
        lease_a = await a.acquire(a.backends[0], MODEL)  # `bot run` wakes the machine
        assert fly.count("POST", "start") == 1
        clock.now += 30
        lease_b = await b.acquire(b.backends[0], MODEL)  # `bot chat` finds it up: joins
        assert fly.count("POST", "start") == 1 and b.backends[0].state == "up"
        assert len(await session_rows(database)) == 1
        await lease_b.release()
        clock.now += 120
        # B is idle past the limit, but A's request is in flight (A's scheduler renews its
        # lease every few seconds): B must not stop it.
        assert await a.idle_check() == []
        assert await b.idle_check() == []
        # B shuts down under A's request: it does not stop the machine either.
        await b.aclose()
        assert fly.state == "started" and fly.count("POST", "stop") == 0
        # Meanwhile the machine's time is booked as it runs, and counts in the month.
        assert await a.book() == 1
        [row] = await session_rows(database)
        assert row["stopped_at"] is None and await booked(database, row["id"]) == 150
        status = await ledger.status(row["started_at"].date().replace(day=1))
        assert status.spent == Decimal("0.03")  # 150 s at $0.72 an hour
        await lease_a.release()
        clock.now += 59
        assert await a.idle_check() == []
        clock.now += 1
        assert await a.idle_check() == ["fly-l40s"]
        assert fly.count("POST", "stop") == 1 and fly.state == "stopped"
    finally:
        await a.aclose()
        await b.aclose()
    [row] = await session_rows(database)
    assert row["gpu_seconds"] == Decimal("210.000") and row["reason"] == "idle"
    assert await booked(database, row["id"]) == Decimal(210)  # the whole interval, once
    assert row["ledgered"] is True


async def test_a_process_stopped_by_another_wakes_the_machine_again(
    tmp_path: Path, database: Any, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    clock = Clock()
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)])
    a, b, _ = two_pools(settings, database, clock)
    try:
        await (await b.acquire(b.backends[0], MODEL)).release()
        await (await a.acquire(a.backends[0], MODEL)).release()
        clock.now += 61
        assert await a.idle_check() == ["fly-l40s"]
        # B still believes the machine is up; its next request wakes it instead of failing.
        assert b.backends[0].state == "up"
        ollama.queue_reply("back again")
        router = BrainRouter([], b)
        answer = await router.open(request())
        assert "".join([p async for p in answer.chunks()]) == "back again"
        assert fly.count("POST", "start") == 2
    finally:
        await a.aclose()
        await b.aclose()
    rows = await session_rows(database)
    assert [r["reason"] for r in rows] == ["idle", "shutdown"]


# ---------------------------------------------------------------- 3: reconciliation


async def test_reconcile_adopts_a_running_machine_and_closes_a_gone_one(
    tmp_path: Path, database: Any, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    clock = Clock()
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)])
    pool, _, _ = two_pools(settings, database, clock)
    try:
        fly.state, ollama.up = "started", True  # left running by a process that crashed
        assert await pool.reconcile() == ["fly-l40s: adopted"]
        assert await pool.reconcile() == []
        clock.now += 61
        assert await pool.idle_check() == ["fly-l40s"] and fly.state == "stopped"
        # A session whose machine went away behind our back (stopped from Fly's dashboard).
        await (await pool.acquire(pool.backends[0], MODEL)).release()
        fly.state, ollama.up = "stopped", False
        clock.now += settings.backend_wake_timeout + 1
        assert await pool.reconcile() == ["fly-l40s: closed"]
        assert pool.backends[0].state == "asleep"
    finally:
        await pool.aclose()
    rows = await session_rows(database)
    assert [r["reason"] for r in rows] == ["idle", "gone"]
    assert all(r["stopped_at"] is not None and r["ledgered"] for r in rows)


# ---------------------------------------------------------------- 4, 5: the Fly driver


async def test_fly_stop_waits_and_start_handles_a_stopping_machine(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    fly.stop_seconds = 0.3
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)])
    pool = build_pool(settings)
    driver = pool.backends[0].driver
    try:
        await driver.start()
        assert fly.state == "started"
        await driver.stop()
        assert fly.state == "stopped" and fly.wait_calls[-1] == "stopped"
        # Started while it is still stopping: wait for `stopped`, then start (no 412 error).
        await driver.start()
        fly.stop_seconds = 0.3
        await fly_stop_behind_our_back(fly)
        assert fly.state == "stopping"
        await driver.start()
        assert fly.state == "started"
        assert fly.wait_calls[-2:] == ["stopped", "started"]
    finally:
        await pool.aclose()


async def fly_stop_behind_our_back(fly: FakeFly) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=fly.url) as http:
        path = f"/v1/apps/{fly.app}/machines/{fly.machine}/stop"
        response = await http.post(path, headers={"Authorization": f"Bearer {fly.token}"})
        assert response.status_code == 200


async def test_fly_start_outlasts_fly_s_own_wait_and_a_412(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    from pydantic import SecretStr

    from bot.brains.wake import FlyWake

    fly, _ = machine
    fly.boot_seconds = 1.5
    driver = FlyWake(
        app=fly.app,
        machine=fly.machine,
        token=SecretStr(fly.token),
        api_url=fly.url,
        wait_timeout=1,
    )
    try:
        await driver.start()  # Fly's wait answers 408 after 1 s; the driver asks again
        assert fly.state == "started" and fly.wait_calls.count("started") >= 2
        assert await driver.state() == "up"
        fly.stop_seconds = 0.5
        await fly_stop_behind_our_back(fly)
        assert await driver.state() == "changing"
        fly.stop_seconds = 0.0
    finally:
        await driver.aclose()


async def test_a_driver_error_of_any_kind_ends_the_wake_cleanly(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    fly.garbage = True  # the Machines API answers 200 with a body that is not JSON
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    pool = build_pool(settings)
    router = BrainRouter([], pool)
    try:
        with pytest.raises(NoBackend) as failed:
            await router.open(request())
        assert [f.backend for f in failed.value.failures] == ["fly-l40s"]
        assert "JSONDecodeError" in failed.value.failures[0].reason
        backend = pool.backends[0]
        assert backend.state == "asleep" and backend.breaker.state == "open"
        assert backend.in_flight == 0 and backend._wake is not None and backend._wake.done()
    finally:
        await router.aclose()


# ---------------------------------------------------------------- 6: the request's fault


async def test_a_request_error_neither_rests_nor_stops_a_warm_machine(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    pool = build_pool(settings)
    router = BrainRouter([], pool)
    try:
        ollama.queue_reply("warm")
        answer = await router.open(request())
        _ = [p async for p in answer.chunks()]
        ollama.fail_next(400, "invalid options")
        with pytest.raises(NoBackend):
            await router.open(request())
        backend = pool.backends[0]
        assert backend.breaker.state == "closed" and backend.state == "up"
        assert fly.count("POST", "stop") == 0
    finally:
        await router.aclose()


def test_breaker_counts_concurrent_failures_once_and_admits_one_probe() -> None:
    from bot.brains.breaker import CircuitBreaker

    clock = Clock()
    breaker = CircuitBreaker(base=5, clock=clock)
    assert breaker.failure() == 5
    assert breaker.failure() == 5  # a request that failed together with the first
    assert breaker.failures == 1
    clock.now += 5
    assert breaker.state == "half-open" and breaker.allows()
    assert breaker.begin() is True  # the probe
    assert not breaker.allows() and breaker.begin() is False  # everyone else waits
    assert breaker.failure() == 10  # the probe failed: a longer rest
    clock.now += 10
    assert breaker.begin() is True
    breaker.success()
    assert breaker.state == "closed" and breaker.allows()


# ---------------------------------------------------------------- 7: wol, command


async def test_command_driver_keeps_its_output_for_the_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import sys

    script = "import sys; print('booting gpu-box'); print('warn: slow disk', file=sys.stderr)"
    driver = CommandWake(start=[sys.executable, "-c", script])
    with caplog.at_level(logging.INFO, logger="bot.brains.wake"):
        await driver.start()
    assert "booting gpu-box" in driver.output and "warn: slow disk" in driver.output
    assert "booting gpu-box" in caplog.text
    assert await driver.state() == "unknown"


async def test_wol_sends_its_packet_three_times() -> None:
    from bot.brains.wake import WOL_REPEATS, WolWake, magic_packet

    loop = asyncio.get_running_loop()
    received: list[bytes] = []

    class Catch(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.append(data)

    transport, _ = await loop.create_datagram_endpoint(Catch, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        mac = "aa:bb:cc:dd:ee:ff"
        await WolWake(mac=mac, broadcast="127.0.0.1", port=port).start()
        await asyncio.sleep(0.1)
        assert WOL_REPEATS == 3 and received == [magic_packet(mac)] * 3
    finally:
        transport.close()


def test_wall_clock_follows_an_injected_clock() -> None:
    clock = Clock()
    pool = BackendPool([], clock=clock)
    assert pool._wall() == datetime.fromtimestamp(1000.0, UTC)


async def test_fly_suspend_instead_of_stop(machine: tuple[FakeFly, MachineOllama]) -> None:
    from pydantic import SecretStr

    from bot.brains.wake import FlyWake

    fly, _ = machine
    fly.stop_seconds = 0.2
    driver = FlyWake(
        app=fly.app, machine=fly.machine, token=SecretStr(fly.token), api_url=fly.url,
        suspend=True,
    )  # fmt: skip
    try:
        await driver.start()
        await driver.stop()  # returns once Fly reports it suspended: billing has stopped
        assert fly.state == "suspended" and fly.count("POST", "suspend") == 1
        assert fly.count("POST", "stop") == 0 and fly.wait_calls[-1] == "suspended"
        assert await driver.state() == "down"
        await driver.start()  # resumes
        assert fly.state == "started"
    finally:
        await driver.aclose()
