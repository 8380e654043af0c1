"""Shared fixtures: one real embedded PostgreSQL per session, a fresh database per test,
the fake Ollama on loopback, and the app wired exactly as production wires it."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from bot.app import App, running_app
from bot.config import REPO_ROOT, Settings
from bot.loop import loop_factory
from tests.fakes.ollama import FakeOllama
from tests.fal_fixtures import fake_fal, fal_server  # noqa: F401 (the fake Fal's fixtures)
from tests.synapse import Synapse
from tests.synapse import available as synapse_available


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """The tests run on the event loop production runs on (bot/loop.py): uvloop's."""
    factory = loop_factory()
    return {"uvloop" if factory is not asyncio.new_event_loop else "asyncio": factory}


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="delete")
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def synapse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Synapse]:
    """One real Synapse homeserver for the whole session (Matrix adapter and doctor tests)."""
    if not synapse_available():
        if os.environ.get("CI"):
            pytest.fail("matrix-synapse is missing; CI installs it with the test extra")
        pytest.skip("matrix-synapse is not installed")
    server = Synapse(tmp_path_factory.mktemp("synapse"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def database_url(pg_server: object) -> AsyncIterator[str]:
    """A database of its own for each test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server.get_uri())  # type: ignore[attr-defined]
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield pg_server.get_uri(database=name)  # type: ignore[attr-defined]
    admin = await asyncpg.connect(pg_server.get_uri())  # type: ignore[attr-defined]
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def fake_ollama() -> AsyncIterator[FakeOllama]:
    async with FakeOllama() as fake:
        yield fake


def make_settings(
    tmp_path: Path, database_url: str, ollama_url: str, **overrides: object
) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "data_dir": tmp_path / "data",
        "ollama_host": ollama_url,
        "local_model_enabled": False,
        "log_file": False,
        "personas_dir": REPO_ROOT / "personas",
        "personas_reload_interval": 0.05,
        # Memory extraction adds model calls after every reply; tests of it turn it on.
        "memory_enabled": False,
        # The guard adds model calls around every reply and holds the reply back until it is
        # checked; tests/safety/test_guard.py turns it on, against a fake guard of its own.
        "guard_enabled": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture
def settings(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> Settings:
    return make_settings(tmp_path, database_url, fake_ollama.url)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[App]:
    async with running_app(settings) as running:
        yield running
