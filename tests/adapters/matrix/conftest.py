"""Fixtures for the Matrix tests: a bot account, a human, the bot's settings, the bot running
in a group room, and the human asking the bot something."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from bot.config import Settings
from tests.adapters.matrix.helpers import (
    Ask,
    GroupBot,
    InGroupRoom,
    SettingsWith,
    bot_settings,
    in_group_room,
)
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
def settings_with(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    synapse: Synapse,
    bot_user: MatrixUser,
) -> SettingsWith:
    def make(**overrides: object) -> Settings:
        return bot_settings(tmp_path, database_url, fake_ollama, synapse, bot_user, **overrides)

    return make


@pytest.fixture
def matrix_settings(settings_with: SettingsWith) -> Settings:
    return settings_with()


@pytest.fixture
def group_bot(
    settings_with: SettingsWith, human: Human, synapse: Synapse, bot_user: MatrixUser
) -> GroupBot:
    def start(**overrides: object) -> AbstractAsyncContextManager[InGroupRoom]:
        return in_group_room(settings_with(**overrides), human, synapse, bot_user)

    return start


@pytest.fixture
def ask(human: Human, bot_user: MatrixUser, fake_ollama: FakeOllama) -> Ask:
    async def asking(
        room: str, question: str, answer: str, *, nth: int = 1, **send: Any
    ) -> tuple[str, dict[str, Any]]:
        fake_ollama.queue_reply(answer)
        asked = await human.send(room, question, **send)
        return asked, (await human.wait_for(room, bot_user.user_id, nth))[nth - 1]

    return asking
