"""The backend pool: routing, the circuit breaker, waking (fly, wol, command), sleeping, GPU time.

Real parts: the embedded PostgreSQL, the official `ollama` client against fake Ollama servers
on loopback, httpx against a fake Fly Machines API on loopback, real UDP and real subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.app import App, running_app
from bot.brains.base import ChatRequest
from bot.brains.build import build_pool
from bot.brains.pool import WAKING_NOTICE
from bot.brains.router import QUEUED_NOTICE, BrainRouter, NoBackend
from bot.brains.sessions import Session, SessionBook
from bot.brains.wake import WolWake, magic_packet
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Done, Event, Failed, Incoming, Notice
from bot.errors import ConfigError
from tests.conftest import make_settings
from tests.fakes.fly import FakeFly, MachineOllama
from tests.fakes.loopback import dead_url
from tests.fakes.ollama import FakeOllama

MODEL = "llama3.2:3b"
TOUCH, RM = shutil.which("touch") or "touch", shutil.which("rm") or "rm"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def say(text: str, *, conversation: str = "c1", user: str = "alice") -> Incoming:
    return Incoming("test", conversation, user, user.title(), text)


async def collect(app: App, incoming: Incoming) -> list[Event]:
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        return [event async for event in events]


def request(model: str = MODEL, text: str = "hello") -> ChatRequest:
    return ChatRequest(
        model=model,
        messages=[{"role": "user", "content": text}],
        temperature=0.5,
        seed=1,
        max_tokens=50,
        context_window=2048,
    )


def fly_backend(fly: FakeFly, ollama: FakeOllama, **extra: Any) -> dict[str, Any]:
    return {
        "name": "fly-l40s",
        "url": ollama.url,
        "models": [MODEL],
        "cost": {"usd_per_gpu_hour": "0.72"},
        "wake": {"driver": "fly", "app": fly.app, "machine": fly.machine, "api_url": fly.url},
        **extra,
    }


def pool_settings(
    tmp_path: Path, database_url: str, backends: list[dict[str, Any]], **overrides: Any
) -> Settings:
    values: dict[str, Any] = {
        "backends": backends,
        "fly_api_token": "fly-test-token-123",
        "backend_wake_poll": 0.02,
        "backend_wake_timeout": 5.0,
        "memory_enabled": False,
    }
    values.update(overrides)
    return make_settings(tmp_path, database_url, dead_url(), **values)


@pytest.fixture
async def machine() -> AsyncIterator[tuple[FakeFly, MachineOllama]]:
    async with MachineOllama() as ollama, FakeFly(ollama=ollama, boot_seconds=0.05) as fly:
        yield fly, ollama


async def open_text(router: BrainRouter, req: ChatRequest | None = None) -> tuple[str, Any]:
    answer = await router.open(req or request())
    text = "".join([piece async for piece in answer.chunks()])
    return text, answer


# ---------------------------------------------------------------- configuration


def test_unset_backends_is_one_always_on_backend_at_ollama_host(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "postgresql://x/y", "http://10.1.2.3:11434")
    pool = build_pool(settings)
    [backend] = pool.backends
    assert backend.name == "ollama:10.1.2.3:11434"
    assert backend.driver.always_on and backend.state == "up" and backend.serves("anything")


def test_backends_file_and_errors_name_the_entry(tmp_path: Path) -> None:
    path = tmp_path / "backends.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "backends": [
                    {"name": "home", "url": "http://127.0.0.1:1", "cost": {"watts": 300}},
                ]
            }
        )
    )
    settings = make_settings(tmp_path, "postgresql://x/y", "http://h", backends_file=path)
    with pytest.raises(ConfigError, match=r"backends.yaml: backend 1: cost: .*usd_per_kwh"):
        build_pool(settings)
    path.write_text(
        "- name: home\n  url: http://127.0.0.1:1\n  models: [llama3.2]\n"
        "  cost: {watts: 300, usd_per_kwh: 0.36}\n"
        "  wake: {driver: wol, mac: 'aa:bb:cc:dd:ee:ff'}\n"
    )
    [home] = build_pool(settings).backends
    assert home.usd_per_second == Decimal("0.00003")  # 0.3 kW x $0.36 / 3600 s
    assert home.serves("llama3.2:latest") and not home.serves(MODEL)
    env = make_settings(
        tmp_path, "postgresql://x/y", "http://h", backends=[{"url": "x", "wake": 3}]
    )
    with pytest.raises(ConfigError, match="BACKENDS: backend 1: wake"):
        build_pool(env)


# ---------------------------------------------------------------- routing and the breaker


async def test_routing_order_and_model_filter(tmp_path: Path, database_url: str) -> None:
    async with FakeOllama() as first, FakeOllama(models=[MODEL, "qwen3:8b"]) as second:
        backends = [
            {"name": "first", "url": first.url, "models": [MODEL]},
            {"name": "second", "url": second.url},
        ]
        settings = pool_settings(tmp_path, database_url, backends)
        async with running_app(settings) as app:
            first.queue_reply("from the first")
            events = await collect(app, say("hi"))
            assert isinstance(events[-1], Done) and events[-1].text == "from the first"
            assert not any(isinstance(e, Notice) for e in events)
            assert second.chat_requests() == []
            qwen = await app.engine.router.open(request(model="qwen3:8b"))
            assert qwen.brain.name == "second" and not qwen.failures
            _ = [piece async for piece in qwen.chunks()]
            assert first.chat_requests()[-1]["model"] == MODEL  # qwen never went to `first`


async def test_failover_and_breaker_backoff(tmp_path: Path, database_url: str) -> None:
    clock = Clock()
    async with FakeOllama() as flaky, FakeOllama() as steady:
        backends = [
            {"name": "flaky", "url": flaky.url},
            {"name": "steady", "url": steady.url},
        ]
        settings = pool_settings(tmp_path, database_url, backends, backend_breaker_base=5.0)
        router = BrainRouter([], build_pool(settings, clock=clock))
        [flaky_b, _] = router.pool.backends  # type: ignore[union-attr]
        try:
            flaky.fail_next(status=503, error="overloaded", count=10)
            text, answer = await open_text(router)
            assert answer.brain.name == "steady" and text
            assert [f.backend for f in answer.failures] == ["flaky"]
            assert "HTTP 503" in answer.failures[0].reason
            assert flaky_b.breaker.remaining() == 5.0
            calls = len(flaky.requests)
            _, answer = await open_text(router)  # resting: not even tried
            assert len(flaky.requests) == calls and answer.brain.name == "steady"
            assert "resting" in answer.failures[0].reason
            clock.now += 5.0  # the rest is over: tried again, fails, rests twice as long
            _, answer = await open_text(router)
            assert len(flaky.requests) == calls + 1
            assert flaky_b.breaker.remaining() == 10.0
            clock.now += 10.0
            flaky.reset()
            flaky.queue_reply("back again")
            text, answer = await open_text(router)
            assert text == "back again" and not answer.failures
            assert flaky_b.breaker.state == "closed"
        finally:
            await router.aclose()


async def test_all_down_apologises_when_the_persona_says_so(
    tmp_path: Path, database_url: str
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    shutil.copy(REPO_ROOT / "personas" / "sage.yaml", personas / "sage.yaml")
    with (personas / "sage.yaml").open("a") as f:
        f.write("fallback: apologise\n")
    backends = [{"name": "gone", "url": dead_url()}]
    settings = pool_settings(
        tmp_path, database_url, backends, personas_dir=personas, local_model_enabled=True
    )
    async with running_app(settings) as app:
        events = await collect(app, say("hello?"))
        assert isinstance(events[-1], Failed)
        assert "model isn't answering" in events[-1].text and "127.0.0.1" not in events[-1].text
        with pytest.raises(NoBackend):
            await app.engine.router.open(request(), fallback="apologise")


async def test_all_down_answers_with_the_local_model_and_a_notice(
    tmp_path: Path, database_url: str
) -> None:
    personas = tmp_path / "personas"
    personas.mkdir()
    tiny = {"name": "tiny", "display_name": "Tiny", "description": "Brief.", "greeting": "Hi."}
    (personas / "tiny.yaml").write_text(yaml.safe_dump({**tiny, "max_reply_tokens": 16}))
    backends = [{"name": "gone", "url": dead_url()}]
    settings = pool_settings(
        tmp_path, database_url, backends, personas_dir=personas, local_model_enabled=True
    )
    async with running_app(settings) as app:
        events = await collect(app, say("hello?"))
        notices = [e.text for e in events if isinstance(e, Notice)]
        assert len(notices) == 1 and "local CPU model" in notices[0] and "gone" in notices[0]
        assert isinstance(events[-1], Done) and "local" in events[-1].answered_by


# ---------------------------------------------------------------- waking with Fly


async def test_wake_on_demand_notice_once_and_before_the_first_token(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    async with running_app(settings) as app:
        ollama.queue_reply("I was asleep, but here I am")
        events = await collect(app, say("wake up"))
        kinds = [type(e).__name__ for e in events]
        assert kinds[0] == "Notice" and kinds.count("Notice") == 1, kinds
        waking = WAKING_NOTICE.format(name="fly-l40s")
        assert events[0] == Notice(waking, user_text=waking), "chat users see it too"
        assert kinds.index("Notice") < kinds.index("Delta")
        assert isinstance(events[-1], Done) and events[-1].text == "I was asleep, but here I am"
        assert ollama.refused >= 1, "the first probe found it down"
        assert fly.count("POST", "start") == 1 and fly.count("GET", "wait") == 1
        loads = [b for p, b in ollama.requests if p == "/api/chat" and not b.get("messages")]
        assert loads and loads[-1]["model"] == MODEL, "ready = the model was loaded"
        assert ollama.chat_requests()[-1]["keep_alive"] == -1, "loaded while the machine is up"
        events = await collect(app, say("again"))
        assert not any(isinstance(e, Notice) for e in events)
        assert fly.count("POST", "start") == 1
        assert "backends-idle-stop" in app.scheduler.jobs()


async def test_concurrent_requests_share_one_wake(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    fly.boot_seconds = 0.3
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    async with running_app(settings) as app:
        results = await asyncio.gather(
            *(collect(app, say(f"hi {i}", conversation=f"c{i}")) for i in range(4))
        )
        assert fly.count("POST", "start") == 1
        for events in results:
            assert [type(e) for e in events].count(Notice) == 1
            assert isinstance(events[-1], Done)
        assert app.backends is not None and app.backends.backends[0].cold_starts == 1


async def test_prewake_on_typing(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    async with running_app(settings) as app:
        assert app.backends is not None
        assert await app.backends.prewake(MODEL) is True
        assert await app.backends.prewake("unknown:1b") is False
        async with asyncio.timeout(5):
            while True:
                if app.backends.backends[0].state == "up":
                    break
                await asyncio.sleep(0.01)
        assert await app.backends.prewake(MODEL) is False, "already up"
        events = await collect(app, say("typing done"))
        assert not any(isinstance(e, Notice) for e in events)
        assert fly.count("POST", "start") == 1


async def test_failed_wake_falls_through_and_stops_the_machine(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    fly.boot_seconds = 60  # never comes up in time
    marker = tmp_path / "spare-is-up"
    touch = [TOUCH]
    async with MachineOllama(is_up=marker.exists) as spare:
        wake = {"driver": "command", "start": [*touch, str(marker)]}
        backends = [fly_backend(fly, ollama), {"name": "spare", "url": spare.url, "wake": wake}]
        settings = pool_settings(tmp_path, database_url, backends, backend_wake_timeout=1.5)
        async with running_app(settings) as app:
            spare.queue_reply("the spare answers")
            events = await collect(app, say("anyone?"))
            notices = [e.text for e in events if isinstance(e, Notice)]
            assert notices[0].startswith("Waking up fly-l40s")
            assert notices[1].startswith("Waking up spare")
            assert "fly-l40s (it did not wake in time)" in notices[2]
            assert isinstance(events[-1], Done) and events[-1].text == "the spare answers"
            assert fly.count("POST", "stop") == 1 and fly.state == "stopped"
            row = await app.pool.fetchrow("SELECT * FROM backend_sessions")
            assert row["reason"] == "wake failed" and row["backend"] == "fly-l40s"
            assert app.backends is not None and app.backends.backends[0].breaker.state == "open"


async def test_bad_fly_token_fails_plainly_and_stays_out_of_logs(
    tmp_path: Path,
    database_url: str,
    machine: tuple[FakeFly, MachineOllama],
    caplog: pytest.LogCaptureFixture,
) -> None:
    fly, ollama = machine
    settings = pool_settings(
        tmp_path, database_url, [fly_backend(fly, ollama)], fly_api_token="wrong-secret-xyz"
    )
    caplog.set_level(logging.DEBUG)
    async with running_app(settings) as app:
        events = await collect(app, say("hi"))
        assert isinstance(events[-1], Failed)
        assert "HTTP 401" in caplog.text
        assert "wrong-secret-xyz" not in caplog.text
        assert all("wrong-secret" not in str(e) for e in events)
        assert fly.calls[0][1].endswith(fly.machine)


# ---------------------------------------------------------------- sleeping and accounting


async def test_idle_stop_never_in_flight_and_gpu_seconds_in_the_ledger(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    clock = Clock()
    settings = pool_settings(
        tmp_path, database_url, [fly_backend(fly, ollama, idle_stop=60)], memory_enabled=False
    )
    # The app gives the database and the ledger only: its own pool must not also run idle
    # checks on this machine on the real clock (it would stop it under the test's fake one).
    base = make_settings(tmp_path, database_url, dead_url(), memory_enabled=False)
    async with running_app(base) as app:
        pool = build_pool(settings, sessions=SessionBook(app.pool, app.ledger), clock=clock)
        router = BrainRouter([], pool)
        try:
            ollama.token_delay = 0.02
            ollama.queue_reply("a long and slow reply " * 5)
            answer = await router.open(request())
            clock.now += 30  # the wake took 30 s
            pieces = answer.chunks()
            await anext(pieces)
            clock.now += 600  # a very slow reply: idle time passes while it streams
            assert await pool.idle_check() == []
            assert fly.count("POST", "stop") == 0
            _ = [p async for p in pieces]
            clock.now += 59
            assert await pool.idle_check() == []
            clock.now += 1
            assert await pool.idle_check() == ["fly-l40s"]
            assert fly.count("POST", "stop") == 1 and fly.state == "stopped"
            # An answer closed unread (the guard refused its input) frees the backend too.
            ollama.token_delay = 0
            unread = await router.open(request())
            assert pool.backends[0].in_flight == 1
            await unread.aclose()
            assert pool.backends[0].in_flight == 0
        finally:
            await router.aclose()
        row = await app.pool.fetchrow("SELECT * FROM backend_sessions ORDER BY id LIMIT 1")
        assert row["gpu_seconds"] == Decimal("690.000") and row["reason"] == "idle"
        assert row["ledgered"] is True
        ledger = await app.pool.fetchrow(
            "SELECT * FROM ledger WHERE request_id LIKE $1", f"backend-session:{row['id']}:%"
        )
        assert ledger["provider"] == "fly-l40s" and ledger["units"] == Decimal(690)
        assert ledger["cost"] == Decimal("0.138")  # 690 s at $0.72 an hour
        assert ledger["kind"] == "gpu_seconds"


async def test_shutdown_stops_what_it_woke(
    tmp_path: Path, database_url: str, machine: tuple[FakeFly, MachineOllama]
) -> None:
    fly, ollama = machine
    settings = pool_settings(tmp_path, database_url, [fly_backend(fly, ollama)])
    async with running_app(settings) as app:
        await collect(app, say("hi"))
        assert fly.state == "started"
    assert fly.state == "stopped" and fly.count("POST", "stop") == 1


# ---------------------------------------------------------------- wol and command drivers


async def test_wol_packet_reaches_a_udp_socket() -> None:
    loop = asyncio.get_running_loop()
    received: asyncio.Queue[bytes] = asyncio.Queue()

    class Listener(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            received.put_nowait(data)

    transport, _ = await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        await WolWake(mac="0A-1b-2C-3d-4E-5f", broadcast="127.0.0.1", port=port).start()
        packet = await asyncio.wait_for(received.get(), 2)
        assert packet == b"\xff" * 6 + bytes([0x0A, 0x1B, 0x2C, 0x3D, 0x4E, 0x5F]) * 16
        assert len(packet) == 102 and packet == magic_packet("0a:1b:2c:3d:4e:5f")
    finally:
        transport.close()
    with pytest.raises(ValueError):
        magic_packet("not-a-mac")


async def test_wol_backend_wakes_when_the_packet_arrives(tmp_path: Path, database_url: str) -> None:
    loop = asyncio.get_running_loop()
    async with MachineOllama() as home:

        class Nic(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                home.up = data == magic_packet("aa:bb:cc:dd:ee:ff")

        transport, _ = await loop.create_datagram_endpoint(Nic, local_addr=("127.0.0.1", 0))
        try:
            port = transport.get_extra_info("sockname")[1]
            wake = {"driver": "wol", "mac": "aa:bb:cc:dd:ee:ff", "broadcast": "127.0.0.1"}
            backends = [{"name": "home", "url": home.url, "wake": {**wake, "port": port}}]
            settings = pool_settings(tmp_path, database_url, backends)
            async with running_app(settings) as app:
                home.queue_reply("good morning")
                events = await collect(app, say("hello home"))
                assert isinstance(events[0], Notice) and "home" in events[0].text
                assert isinstance(events[-1], Done) and events[-1].text == "good morning"
        finally:
            transport.close()


async def test_command_driver_starts_and_stops(tmp_path: Path, database_url: str) -> None:
    marker = tmp_path / "machine-is-up"
    async with MachineOllama(is_up=marker.exists) as box:
        wake = {
            "driver": "command",
            "start": [TOUCH, str(marker)],
            "stop": [RM, str(marker)],
        }
        backends = [{"name": "box", "url": box.url, "wake": wake, "idle_stop": 0.01}]
        settings = pool_settings(tmp_path, database_url, backends)
        async with running_app(settings) as app:
            box.queue_reply("started by a command")
            events = await collect(app, say("hi box"))
            assert isinstance(events[-1], Done) and events[-1].text == "started by a command"
            assert marker.exists()
            # the app's own idle check (scheduled every second) stops it: calling idle_check
            # here as well would race that job, so wait for the job to stop it and book it
            query = "SELECT reason FROM backend_sessions WHERE backend = 'box'"
            for _ in range(100):
                if await app.pool.fetchval(query + " AND stopped_at IS NOT NULL"):
                    break
                await asyncio.sleep(0.05)
            assert not marker.exists()
            row = await app.pool.fetchrow(query)
            assert row["reason"] == "idle"


async def test_failing_command_fails_plainly_and_rests_the_backend(
    tmp_path: Path, database_url: str
) -> None:
    async with MachineOllama() as box:
        wake = {"driver": "command", "start": [sys.executable, "-c", "raise SystemExit(3)"]}
        settings = pool_settings(
            tmp_path, database_url, [{"name": "box", "url": box.url, "wake": wake}]
        )
        async with running_app(settings) as app:
            events = await collect(app, say("hi"))
            assert isinstance(events[0], Notice) and isinstance(events[-1], Failed)
            assert "exited" not in events[-1].text
            await app.engine.drain()
            row = await app.pool.fetchrow("SELECT backend, ok, error FROM model_calls")
            assert row["backend"] == "box" and not row["ok"]
            assert "the start command exited with 3" in row["error"]
            assert app.backends is not None and app.backends.backends[0].breaker.state == "open"


async def test_sessions_recorded_before_the_ledger_are_pushed_later(app: App) -> None:
    from datetime import UTC, datetime, timedelta

    stopped = datetime.now(UTC)
    session = Session(
        "fly-l40s", stopped - timedelta(minutes=5), stopped, Decimal("300.000"), Decimal("0.0002")
    )
    await SessionBook(app.pool, None).record(session)
    assert await app.pool.fetchval("SELECT count(*) FROM ledger WHERE kind = 'gpu_seconds'") == 0
    book = SessionBook(app.pool, app.ledger)
    await book.push_pending()
    await book.push_pending()  # idempotent: nothing is booked twice
    rows = await app.pool.fetch("SELECT units, cost FROM ledger WHERE kind = 'gpu_seconds'")
    assert [(r["units"], r["cost"]) for r in rows] == [(Decimal(300), Decimal("0.06"))]
    assert await app.pool.fetchval("SELECT bool_and(ledgered) FROM backend_sessions")


def _persona_dir(tmp_path: Path, **fields: Any) -> Path:
    personas = tmp_path / "personas"
    personas.mkdir(exist_ok=True)
    tiny = {"name": "tiny", "display_name": "Tiny", "description": "Brief.", "greeting": "Hi."}
    (personas / "tiny.yaml").write_text(yaml.safe_dump({**tiny, **fields}))
    return personas


async def test_queue_fallback_answers_when_the_backend_is_back(
    tmp_path: Path, database_url: str
) -> None:
    async with FakeOllama() as flaky:
        settings = pool_settings(
            tmp_path,
            database_url,
            [{"name": "flaky", "url": flaky.url}],
            personas_dir=_persona_dir(tmp_path, fallback="queue"),
            local_model_enabled=True,
            backend_breaker_base=0.3,
        )
        async with running_app(settings) as app:
            flaky.fail_next(status=503, count=2)  # the first try and the retry after 0.3 s
            flaky.queue_reply("sorry, I was away")
            events = await collect(app, say("are you there?"))
            notices = [e.text for e in events if isinstance(e, Notice)]
            assert notices == [QUEUED_NOTICE.format(minutes=10)]
            assert isinstance(events[-1], Done) and events[-1].text == "sorry, I was away"
            assert "Ollama" in events[-1].answered_by, "the pool answered, not the local model"
            await app.engine.drain()
            rows = await app.pool.fetch("SELECT backend, ok FROM model_calls")
            assert sorted((r["backend"], r["ok"]) for r in rows) == [
                ("flaky", False),
                ("flaky", False),
                ("flaky", True),
            ]


async def test_queue_fallback_gives_up_after_the_wait(tmp_path: Path, database_url: str) -> None:
    settings = pool_settings(
        tmp_path,
        database_url,
        [{"name": "gone", "url": dead_url()}],
        personas_dir=_persona_dir(tmp_path, fallback="queue"),
        local_model_enabled=True,
        backend_breaker_base=0.2,
        backend_queue_wait=0.5,
    )
    async with running_app(settings) as app:
        events = await collect(app, say("hello?"))
        assert isinstance(events[0], Notice) and "as soon as it is back" in events[0].text
        assert isinstance(events[-1], Failed) and "model isn't answering" in events[-1].text
