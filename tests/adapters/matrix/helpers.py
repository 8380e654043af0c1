"""Helpers for the Matrix tests: the bot's settings, running it, rooms, waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

from bot.adapters.matrix.adapter import MatrixAdapter, create
from bot.app import App, running_app
from bot.config import REPO_ROOT, Settings
from tests.conftest import make_settings
from tests.fakes.ollama import FakeOllama
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse


def quiet_personas(directory: Path) -> Path:
    """The shipped personas without attention-following, so tests do not depend on chance."""
    directory.mkdir(parents=True, exist_ok=True)
    for source in (REPO_ROOT / "personas").glob("*.yaml"):
        fields = yaml.safe_load(source.read_text())
        fields["attention_start"] = 0.0
        (directory / source.name).write_text(yaml.safe_dump(fields, allow_unicode=True))
    return directory


def bot_settings(
    tmp_path: Path,
    database_url: str,
    fake_ollama: FakeOllama,
    synapse: Synapse,
    bot_user: MatrixUser,
    **overrides: object,
) -> Settings:
    values: dict[str, object] = {
        "personas_dir": quiet_personas(tmp_path / "personas"),
        "matrix_homeserver": synapse.url,
        "matrix_user_id": bot_user.user_id,
        "matrix_password": bot_user.password,
        "matrix_stream": False,
        "matrix_sync_timeout": 1.0,
        "matrix_rate_burst": 100,
        "guard_enabled": False,
        "memory_enabled": False,
        "web_enabled": False,
    }
    values.update(overrides)
    return make_settings(tmp_path, database_url, fake_ollama.url, **values)


@contextlib.asynccontextmanager
async def running_bot(settings: Settings) -> AsyncIterator[tuple[App, MatrixAdapter]]:
    async with running_app(settings) as app:
        adapter = create(app)
        assert adapter is not None
        await adapter.start()
        try:
            yield app, adapter
        finally:
            await adapter.stop()


async def group_room(human: Human, synapse: Synapse, bot: MatrixUser) -> str:
    """A room with the human, the bot and a third (invited) member: not a DM."""
    third = await synapse.register("carol")
    room = await human.create_room([bot.user_id, third.user_id])
    await human.wait_membership(room, bot.user_id, "join")
    return room


async def direct_room(human: Human, bot: MatrixUser) -> str:
    """A direct room the human opened with the bot, once the bot has joined it."""
    room = await human.create_room([bot.user_id], direct=True)
    await human.wait_membership(room, bot.user_id, "join")
    return room


InGroupRoom = tuple[App, MatrixAdapter, str]
# The bot's settings with some changed: `settings_with(matrix_stream=True)` (a fixture).
SettingsWith = Callable[..., Settings]
# The bot running, settings changed as given, in a new group room: (app, adapter, room).
GroupBot = Callable[..., contextlib.AbstractAsyncContextManager[InGroupRoom]]
# `await ask(room, question, answer, nth=1, **send)`, a fixture: the model will say `answer`,
# the human sends `question` (`send`: mention=, reply_to=, thread_root=); the id of what was
# sent and the bot's `nth` message in the room, once it is there.
Ask = Callable[..., Awaitable[tuple[str, dict[str, Any]]]]


@contextlib.asynccontextmanager
async def in_group_room(
    settings: Settings, human: Human, synapse: Synapse, bot: MatrixUser
) -> AsyncIterator[InGroupRoom]:
    """The bot running, and a new group room (`group_room`) it has joined."""
    async with running_bot(settings) as (app, adapter):
        yield app, adapter, await group_room(human, synapse, bot)


def persona_requests(fake: FakeOllama, model: str = "llama3.2:3b") -> list[dict[str, Any]]:
    return [body for body in fake.chat_requests() if body["model"] == model]


async def settle(adapter: MatrixAdapter, human: Human) -> None:
    """Let the bot finish what it is doing, then collect what it sent."""
    await asyncio.sleep(0.3)
    await adapter.messages.drain()
    await human.sync(0)


async def handled(app: App, event_id: str, wait: float = 20.0) -> None:
    """Wait until the bot has taken up the event (claimed it), whatever it decided."""
    deadline = asyncio.get_running_loop().time() + wait
    query = "SELECT 1 FROM matrix_events WHERE event_id = $1 AND NOT from_bot"
    while await app.pool.fetchval(query, event_id) is None:
        assert asyncio.get_running_loop().time() < deadline, f"{event_id} was never handled"
        await asyncio.sleep(0.05)


def replied_to(event: dict[str, Any]) -> str | None:
    relates = event["content"].get("m.relates_to", {})
    return relates.get("m.in_reply_to", {}).get("event_id")


def e2e_available() -> bool:
    """matrix-nio's end-to-end extra is installed."""
    try:
        from nio.crypto import ENCRYPTION_ENABLED
    except ImportError:
        return False
    return bool(ENCRYPTION_ENABLED)
