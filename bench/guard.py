"""What Llama Guard costs: time to the first shown piece of a reply, guard on and off.

Runs the real engine on an embedded PostgreSQL against two fake Ollama servers on loopback
(the chat model, and the guard on GUARD_HOST) with set latencies, through the official client.

    .venv/bin/python bench/guard.py [--replies 20] [--model 0.5] [--guard 0.15]

`--model` is the chat model's time to its first token, `--guard` the guard's time per check.
The reply is two paragraphs, the first complete in the first streamed piece, so paragraph mode
can show it as soon as it is checked. A second table shows what paragraph mode sends the guard
(the raw Llama Guard prompt on /api/generate) as replies grow: it grows linearly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgserver

from bot.app import running_app
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Delta, Done, Incoming
from tests.fakes.ollama import FakeOllama

PARAGRAPHS = ["First paragraph of the reply.\n\n", "Second paragraph, a little later."]
QUESTION = "hello there"


class SlowGuard:
    """Answers 'safe' after `input_delay` for the user's message, `output_delay` for replies."""

    def __init__(self, input_delay: float, output_delay: float) -> None:
        self.input_delay = input_delay
        self.output_delay = output_delay

    async def __call__(self, body: dict[str, Any]) -> str:
        prompt = str(body["prompt"])  # the raw Llama Guard 3 prompt (bot/safety/prompt.py)
        asks_input = prompt.rstrip().rsplit("ONLY THE LAST ", 1)[-1].startswith("User")
        await asyncio.sleep(self.input_delay if asks_input else self.output_delay)
        return "safe"


async def prompt_growth(settings: Settings, chat: FakeOllama, guard: FakeOllama) -> None:
    """Bytes sent to the guard for one reply of n paragraphs, paragraph mode."""
    print("\n## What paragraph mode sends the guard, by reply length\n")
    print("| paragraphs | reply bytes | guard calls | conversation bytes sent | largest call |")
    print("|---:|---:|---:|---:|---:|")
    async with running_app(settings) as app:
        for n in (5, 20, 80):
            paragraph = "A paragraph of about a hundred words. " * 12 + "\n\n"
            chat.queue_reply(paragraph * n, chunks=[paragraph] * n)
            guard.requests.clear()
            incoming = Incoming("bench", f"long{n}", "u1", "User", "tell me a long story")
            async with contextlib.aclosing(app.engine.handle(incoming)) as events:
                async for _ in events:
                    pass
            sent = [_conversation(b["prompt"]) for b in guard.generate_requests()]
            print(f"| {n} | {len(paragraph * n)} | {len(sent)} | {sum(sent)} | {max(sent)} |")


def _conversation(prompt: str) -> int:
    start = prompt.index("<BEGIN CONVERSATION>")
    return len(prompt[start : prompt.index("<END CONVERSATION>")].encode())


async def first_shown(engine: Any, conversation: str) -> float:  # type: ignore[misc]
    started = time.perf_counter()
    shown = None
    incoming = Incoming("bench", conversation, "u1", "User", f"{QUESTION} {conversation}")
    async with contextlib.aclosing(engine.handle(incoming)) as events:
        async for event in events:
            if isinstance(event, Delta) and shown is None:
                shown = time.perf_counter() - started
            last = event
    assert isinstance(last, Done), last
    assert shown is not None
    return shown


async def measure(settings: Settings, chat: FakeOllama, replies: int) -> list[float]:
    async with running_app(settings) as app:
        for _ in range(replies + 3):
            chat.queue_reply("".join(PARAGRAPHS), chunks=PARAGRAPHS)
        for i in range(3):  # warm-up: connections, templates
            await first_shown(app.engine, f"warm{i}")
        return [await first_shown(app.engine, f"r{i}") for i in range(replies)]


def row(name: str, values: list[float], base: float | None) -> None:
    p50 = statistics.median(values)
    p90 = sorted(values)[int(0.9 * (len(values) - 1))]
    extra = f"{(p50 / base - 1) * 100:+.1f}%" if base else "-"
    print(f"| {name} | {p50 * 1e3:.0f} | {p90 * 1e3:.0f} | {extra} |")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=20)
    parser.add_argument("--model", type=float, default=0.5, help="chat time to first token, s")
    parser.add_argument("--guard", type=float, default=0.15, help="guard time per check, s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        async with FakeOllama() as chat, FakeOllama(models=["llama-guard3:1b"]) as guard:
            chat.first_token_delay = args.model
            chat.token_delay = 0.05

            def settings(**values: object) -> Settings:
                return Settings(
                    _env_file=None,  # type: ignore[call-arg]
                    database_url=server.get_uri(),  # type: ignore[arg-type]
                    data_dir=Path(tmp) / "data",
                    ollama_host=chat.url,
                    guard_host=guard.url,
                    local_model_enabled=False,
                    memory_enabled=False,
                    log_file=False,
                    personas_dir=REPO_ROOT / "personas",
                    **values,  # type: ignore[arg-type]
                )

            print(
                f"\n## Time to the first shown piece (model first token {args.model * 1e3:.0f} ms,"
                f" guard {args.guard * 1e3:.0f} ms a check, {args.replies} replies)\n"
            )
            print("| setup | p50 ms | p90 ms | vs guard off |")
            print("|---|---:|---:|---:|")
            off = await measure(settings(guard_enabled=False), chat, args.replies)
            base = statistics.median(off)
            row("guard off (streamed)", off, None)
            guard.responder = SlowGuard(args.guard, 0.0)
            on = await measure(settings(guard_stream_mode="paragraph"), chat, args.replies)
            row("input check only (output checks answer at once), paragraph mode", on, base)
            guard.responder = SlowGuard(args.guard, args.guard)
            on = await measure(settings(guard_stream_mode="paragraph"), chat, args.replies)
            row("input and output checks, paragraph mode", on, base)
            on = await measure(settings(guard_stream_mode="whole"), chat, args.replies)
            row("input and output checks, whole mode (default)", on, base)
            guard.responder = SlowGuard(0.0, 0.0)
            chat.first_token_delay = chat.token_delay = 0.0
            await prompt_growth(settings(guard_stream_mode="paragraph"), chat, guard)
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
