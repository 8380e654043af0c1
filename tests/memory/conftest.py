"""Fixtures the memory tests share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.app import App, running_app
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama


@pytest.fixture
async def held_app(
    tmp_path: Path, database_url: str, fake_ollama: FakeOllama
) -> AsyncIterator[App]:
    """Memory on, and no moment without replies comes before the test's drain: what waits for
    one (extraction, recall stamps) waits until the test drains the engine."""
    settings = make_settings(tmp_path, database_url, fake_ollama.url, memory_enabled=True)
    async with running_app(settings) as app:
        app.engine.quiet.settle = 30.0
        yield app
