"""Fixtures for the Matrix tests: a bot account, a human, and the bot's settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.config import Settings
from tests.adapters.matrix.helpers import bot_settings
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse


@pytest.fixture
async def bot_user(synapse: Synapse) -> MatrixUser:
    return await synapse.register("bot")


@pytest.fixture
async def human(synapse: Synapse) -> AsyncIterator[Human]:
    person = Human(synapse.url, await synapse.register("alice"))
    await person.sync(0)
    yield person
    await person.close()


@pytest.fixture
def matrix_settings(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    synapse: Synapse,
    bot_user: MatrixUser,
) -> Settings:
    return bot_settings(tmp_path, database_url, fake_ollama, synapse, bot_user)
