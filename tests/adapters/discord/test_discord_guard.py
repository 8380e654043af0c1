"""Discord with Llama Guard in paragraph mode: a reply withheld after it began is edited away."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import discord.ext.test as dpytest
import pytest

from tests.adapters.discord.test_discord import Env, make_env
from tests.fakes.ollama import FakeOllama
from tests.safety.llama_guard import GuardScript


@pytest.fixture
async def env(tmp_path: Path, database_url: str, fake_ollama: FakeOllama) -> AsyncIterator[Env]:
    script = GuardScript()
    script.rules["HATEFUL"] = "unsafe\nS10"
    async with FakeOllama(models=["llama-guard3:1b"], responder=script) as guard:
        overrides = {
            "guard_enabled": True,
            "guard_host": guard.url,
            "guard_timeout": 2.0,
            "guard_stream_mode": "paragraph",
            "discord_edit_interval": 1.0,
        }
        async for made in make_env(tmp_path, database_url, fake_ollama, **overrides):
            yield made


async def test_withheld_paragraph_is_edited_away(env: Env) -> None:
    env.ollama.responder = lambda body: "Fine start.\n\nThen HATEFUL words.\n\nMore."
    await dpytest.message(f"{env.mention} tell me a story", member=env.alice)
    shown = [p["content"] for p in env.sent.payloads]
    assert shown and shown[0].startswith("Fine start."), "the checked paragraph was shown"
    [reply] = env.bot_messages()
    assert "Fine start." not in reply.content
    assert "HATEFUL" not in reply.content
    assert "S10" in reply.content or "Hate" in reply.content
