"""/healthz and /metrics over loopback: the real aiohttp server, real Postgres, the fake Ollama."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import App
from bot.core.engine import Incoming
from bot.core.metrics import Histogram, Metrics
from bot.errors import ConfigError
from bot.ops.web import WebServer
from bot.runner import run
from tests.conftest import make_settings
from tests.fakes.loopback import free_port
from tests.fakes.ollama import FakeOllama
from tests.test_cli import run_bot


class Adapter:
    """A platform adapter as the runner sees it, with the optional `connected` flag."""

    def __init__(self, name: str = "fakechat", connected: bool | None = True) -> None:
        self.name = name
        self.connected = connected
        self.started = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.connected = False


async def reply(app: App, text: str = "hi", platform: str = "test") -> None:
    incoming = Incoming(platform, "c1", "alice", "Alice", text)
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        async for _ in events:
            pass
    await app.engine.drain()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus page, parsed by the reference parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, frozenset(s.labels.items()))] = s.value
    return found


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


@contextlib.asynccontextmanager
async def serving(app: App, adapters: list[Adapter]):
    server = WebServer(app, host="127.0.0.1", port=0, adapters=adapters)
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            yield http
    finally:
        await server.stop()


async def test_healthz_is_ok_with_database_and_adapters_up(app: App) -> None:
    async with serving(app, [Adapter("discord"), Adapter("legacy", connected=None)]) as http:
        response = await http.get("/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["database"] == "ok"
    assert body["adapters"] == {"discord": "connected", "legacy": "unknown"}
    assert body["problems"] == []


async def test_healthz_503_names_a_disconnected_adapter(app: App) -> None:
    adapter = Adapter("matrix")
    async with serving(app, [adapter]) as http:
        assert (await http.get("/healthz")).status_code == 200
        adapter.connected = False
        response = await http.get("/healthz")
    assert response.status_code == 503
    assert response.json()["problems"] == ["matrix is not connected"]


async def test_healthz_503_when_the_database_is_gone(
    app: App, pg_server: object, database_url: str
) -> None:
    name = urlsplit(database_url).path.lstrip("/")
    admin = await asyncpg.connect(pg_server.get_uri())  # type: ignore[attr-defined]
    try:
        async with serving(app, [Adapter()]) as http:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
            )
            response = await http.get("/healthz")
            metrics = await http.get("/metrics")
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            recovered = await http.get("/healthz")
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    assert response.status_code == 503
    assert response.json()["database"] == "unreachable"
    assert "the database does not answer" in response.json()["problems"]
    assert metrics.status_code == 200, "metrics still answer, saying the database is down"
    assert value(samples(metrics.text), "personabot_database_up") == 0
    assert recovered.status_code == 200


async def test_metrics_count_replies_latency_calls_and_spend(
    app: App, fake_ollama: FakeOllama
) -> None:
    fake_ollama.queue_reply("Hello there!")
    await reply(app)
    fake_ollama.fail_next(status=500)
    await reply(app, "again")
    assert app.ledger is not None
    for n, (kind, units) in enumerate([("image", "2"), ("image", "1"), ("gpu_seconds", "10")]):
        await app.ledger.record(
            kind=kind,
            provider="fal" if kind == "image" else "fly:gpu",
            model="fal-ai/flux/schnell" if kind == "image" else None,
            units=Decimal(units),
            unit_price=Decimal("0.5"),
            request_id=f"r{n}-{uuid.uuid4()}",
        )
    async with serving(app, [Adapter("discord")]) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(response.text)
    assert value(found, "personabot_replies_total", platform="test", outcome="done") == 1
    assert value(found, "personabot_replies_total", platform="test", outcome="failed") == 1
    assert value(found, "personabot_reply_seconds_count", platform="test") == 1
    assert value(found, "personabot_first_token_seconds_count", platform="test") == 1
    inf = value(found, "personabot_reply_seconds_bucket", platform="test", le="+Inf")
    assert inf == 1
    backend = f"ollama:127.0.0.1:{fake_ollama.url.rsplit(':', 1)[-1]}"
    assert value(found, "personabot_model_calls_total", backend=backend, result="ok") == 1
    assert value(found, "personabot_model_calls_total", backend=backend, result="error") == 1
    assert value(found, "personabot_spend_dollars_total", kind="image") == 1.5
    assert value(found, "personabot_spend_dollars_total", kind="gpu_seconds") == 5.0
    assert value(found, "personabot_spend_month_dollars", kind="image") == 1.5
    assert value(found, "personabot_adapter_connected", adapter="discord") == 1
    assert value(found, "personabot_database_up") == 1
    states = [k for k in found if k[0] == "personabot_backend_state"]
    assert states, "every backend reports a state"


async def test_metrics_read_guard_verdicts_and_backend_sessions(app: App) -> None:
    await app.pool.execute(
        "INSERT INTO moderation_verdicts (kind, verdict, categories, blocked, model, backend,"
        " platform, persona) VALUES ('input', 'unsafe', '{S1}', true, 'g', 'b', 'test', 'mimi'),"
        " ('input', 'safe', '{}', false, 'g', 'b', 'test', 'mimi'),"
        " ('output', 'safe', '{}', false, 'g', 'b', 'test', 'mimi')"
    )
    await app.pool.execute(
        "INSERT INTO backend_sessions (backend, started_at, stopped_at, gpu_seconds,"
        " usd_per_second, cost_usd, reason) VALUES"
        " ('fly-gpu', now() - interval '90 seconds', now(), 90, 0.0004, 0.036, 'idle'),"
        " ('fly-gpu', now() - interval '30 seconds', now(), 30, 0.0004, 0.012, 'shutdown')"
    )
    async with serving(app, []) as http:
        found = samples((await http.get("/metrics")).text)
    verdicts = "personabot_guard_verdicts_total"
    assert value(found, verdicts, kind="input", verdict="unsafe", blocked="true") == 1
    assert value(found, verdicts, kind="input", verdict="safe", blocked="false") == 1
    assert value(found, verdicts, kind="output", verdict="safe", blocked="false") == 1
    sessions = "personabot_backend_sessions_total"
    assert value(found, sessions, backend="fly-gpu", reason="idle") == 1
    assert value(found, "personabot_backend_gpu_seconds_total", backend="fly-gpu") == 120


def test_histogram_buckets_are_cumulative() -> None:
    metrics = Metrics()
    for seconds in (0.05, 0.3, 0.3, 7.0, 500.0):
        metrics.reply_seconds.observe(seconds, platform="discord")
    found = samples(metrics.render().decode())
    bucket = "personabot_reply_seconds_bucket"
    assert value(found, bucket, platform="discord", le="0.1") == 1
    assert value(found, bucket, platform="discord", le="0.5") == 3
    assert value(found, bucket, platform="discord", le="10.0") == 4
    assert value(found, bucket, platform="discord", le="+Inf") == 5
    assert value(found, "personabot_reply_seconds_sum", platform="discord") == 507.65
    assert isinstance(metrics.reply_seconds, Histogram)


def test_label_values_are_escaped() -> None:
    metrics = Metrics()
    metrics.model_calls.inc(backend='od"d\\name\nx', result="ok")
    found = samples(metrics.render().decode())
    assert value(found, "personabot_model_calls_total", backend='od"d\\name\nx', result="ok") == 1


async def test_run_serves_health_for_its_adapters(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    port = free_port()
    settings = make_settings(tmp_path, database_url, fake_ollama.url, web_port=port)
    adapter = Adapter("fakechat")
    stop = asyncio.Event()
    task = asyncio.create_task(run(settings, stop, factories=[lambda app: adapter]))
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    response = await http.get("/healthz")
                    if response.status_code == 200:
                        break
                await asyncio.sleep(0.05)
            assert response.json()["adapters"] == {"fakechat": "connected"}
            assert adapter.started
            assert "personabot_database_up 1" in (await http.get("/metrics")).text
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 30) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server stops with the bot"


async def test_a_busy_port_is_a_plain_configuration_error(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        settings = make_settings(tmp_path, database_url, fake_ollama.url, web_port=port)
        adapter = Adapter()
        with pytest.raises(ConfigError, match="set WEB_PORT to a free port"):
            await run(settings, asyncio.Event(), factories=[lambda app: adapter])
    assert not adapter.started


async def test_healthcheck_command_follows_healthz(app: App, tmp_path: Path) -> None:
    """`python -m bot healthcheck`, the image's HEALTHCHECK, as Docker runs it."""
    adapter = Adapter("discord")
    server = WebServer(app, host="127.0.0.1", port=0, adapters=[adapter])
    await server.start()
    env = {"DATA_DIR": str(tmp_path), "LOG_FILE": "false", "WEB_HOST": "0.0.0.0"}
    try:
        code, out, _ = await run_bot("healthcheck", env={**env, "WEB_PORT": str(server.port)})
        assert code == 0 and '"status": "ok"' in out
        adapter.connected = False
        code, out, _ = await run_bot("healthcheck", env={**env, "WEB_PORT": str(server.port)})
        assert code == 1 and "discord is not connected" in out
    finally:
        await server.stop()
    code, out, _ = await run_bot("healthcheck", env={**env, "WEB_PORT": str(free_port())})
    assert code == 1 and out.startswith("unhealthy:")
