"""Prompt-prefix benchmark: how much of each turn's prompt a model's prompt cache can reuse.

Ollama (like llama.cpp's server and vLLM) keeps the evaluated prompt of a conversation and
evaluates only what follows the longest byte-identical beginning. This runs a 20-turn
conversation through the real engine (embedded PostgreSQL, memory on, the fake Ollama on
loopback through the official client), renders every chat request the way Ollama's Llama 3
template does (system messages first, as `.System`; then each message between header tokens;
the template text is the one in Ollama's docs/template.md), and compares it with what the
model held after the previous turn: that turn's prompt plus the reply it generated.

What is reported is the size of the prompt and of the part that must be evaluated again, in
estimated tokens (about four characters a token, the engine's own estimate). There is no real
Ollama on this machine, so this does not report `prompt_eval_duration`; evaluation time on a
real model grows with the evaluated tokens (the issue measured 180 ms against 855 ms for a
second turn on Ollama 0.24, CPU).

To make the changing parts visible, recall uses no similarity floor (every turn recalls the
top five of the user's facts, whose order changes with the message) and the persona's context
window is small, so history is trimmed within the 20 turns.

With `--no-memory` nothing is recalled, so no turn has notes: the floor of what is evaluated.

With `--local` the figures are real instead: the same conversation runs with the real local
model (SmolLM2-135M in llama.cpp, which reuses a prompt's prefix as Ollama does) as the only
brain, no Ollama at all, and each turn reports the prompt tokens, those evaluated and llama.cpp's
prompt-eval time, after (the bot's layout) and before (the notes in the system prompt); see
bench/prefix_local.py.

    .venv/bin/python bench/prefix.py [--turns 20] [--window 1536] [--no-memory] [--json]
    .venv/bin/python bench/prefix.py --local [--turns 20] [--runs 3] [--reply-tokens 24]
        [--context 2048] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgserver
import yaml

from bot.app import running_app
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Done, Incoming
from tests.fakes.ollama import FakeOllama

TOPICS = [
    "pixel art",
    "my cat Miso",
    "the rain in Lisbon",
    "a cosy farming game",
    "learning the guitar",
    "my sister's wedding",
    "a sketchbook I bought",
    "night shifts at the bakery",
    "a trip to Porto",
    "watercolour brushes",
]


def render(messages: list[dict[str, Any]]) -> str:
    """The prompt text Ollama's Llama 3 template makes of these messages (system first)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = f"<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>" if system else ""
    for m in messages:
        if m["role"] != "system":
            text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
    return text + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def tokens(chars: int) -> int:
    return chars // 4


def responder(body: dict[str, Any]) -> str:
    last = body["messages"][-1]["content"]
    if body.get("format"):  # memory extraction: one fact per message
        topic = next((t for t in TOPICS if t in last), "chatting")
        return json.dumps({"facts": [{"fact": f"Talked about {topic}.", "replaces": []}]})
    topic = next((t for t in TOPICS if t in last), "that")
    return (
        f"Oh, {topic}! That sounds lovely, nya~ Tell me more about it: what got you "
        "started, and what would you like to try next? I'd love to see how it turns out."
    )


def persona_dir(tmp: Path, window: int) -> Path:
    data = yaml.safe_load((REPO_ROOT / "personas" / "mimi.yaml").read_text())
    data.update(context_window=window, max_reply_tokens=min(300, window // 2 - 1))
    folder = tmp / "personas"
    folder.mkdir()
    (folder / "mimi.yaml").write_text(yaml.safe_dump(data))
    return folder


async def conversation(settings: Settings, fake: FakeOllama, turns: int) -> list[dict[str, int]]:
    rows: list[dict[str, int]] = []
    cached = ""
    async with running_app(settings) as app:
        for n in range(turns):
            topic = TOPICS[n % len(TOPICS)]
            text = f"Hey Mimi, today I want to tell you about {topic}, it has been on my mind."
            incoming = Incoming("bench", "prefix", "u1", "Alice", text)
            async with contextlib.aclosing(app.engine.handle(incoming)) as events:
                last = [e async for e in events][-1]
            assert isinstance(last, Done), last
            await app.engine.drain()  # extraction done: its facts can be recalled next turn
            body = next(b for b in reversed(fake.chat_requests()) if not b.get("format"))
            prompt = render(body["messages"])
            reused = common_prefix(cached, prompt)
            rows.append(
                {
                    "turn": n + 1,
                    "prompt_tokens": tokens(len(prompt)),
                    "reused_tokens": tokens(reused),
                    "evaluated_tokens": tokens(len(prompt) - reused),
                }
            )
            cached = prompt + last.text + "<|eot_id|>"
    return rows


def report(rows: list[dict[str, int]]) -> dict[str, Any]:
    later = rows[1:]  # the first turn has nothing cached, before or after
    return {
        "turns": len(rows),
        "prompt_tokens_total": sum(r["prompt_tokens"] for r in later),
        "evaluated_tokens_total": sum(r["evaluated_tokens"] for r in later),
        "evaluated_tokens_median": statistics.median(r["evaluated_tokens"] for r in later),
        "reused_share": round(
            sum(r["reused_tokens"] for r in later) / max(1, sum(r["prompt_tokens"] for r in later)),
            3,
        ),
        "per_turn": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print("| turn | prompt tokens | reused from cache | evaluated |")
    print("|---:|---:|---:|---:|")
    for r in result["per_turn"]:
        print(
            f"| {r['turn']} | {r['prompt_tokens']} | {r['reused_tokens']} "
            f"| {r['evaluated_tokens']} |"
        )
    print(
        f"\nturns 2..{result['turns']}: {result['evaluated_tokens_total']} of "
        f"{result['prompt_tokens_total']} prompt tokens evaluated "
        f"(median {result['evaluated_tokens_median']} a turn; "
        f"{result['reused_share']:.0%} reused)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--window", type=int, default=1536)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--local", action="store_true", help="real figures, the local model")
    parser.add_argument("--runs", type=int, default=1, help="--local: runs of both passes")
    parser.add_argument("--reply-tokens", type=int, default=24, help="--local: reply length")
    parser.add_argument("--context", type=int, default=2048, help="--local: its context")
    parser.add_argument("--threads", type=int, default=1, help="--local: llama.cpp threads")
    args = parser.parse_args()
    if args.local:
        from bench.prefix_local import main_local

        results = await main_local(args)
        if args.json:
            print(json.dumps(results))
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = pgserver.get_server(tmp / "pg", cleanup_mode="delete")
        try:
            async with FakeOllama(responder=responder) as fake:
                settings = Settings(
                    _env_file=None,  # type: ignore[call-arg]
                    database_url=server.get_uri(),  # type: ignore[arg-type]
                    data_dir=tmp / "data",
                    ollama_host=fake.url,
                    local_model_enabled=False,
                    log_file=False,
                    personas_dir=persona_dir(tmp, args.window),
                    guard_enabled=False,
                    memory_enabled=not args.no_memory,
                    memory_min_similarity=-1.0,
                )
                result = report(await conversation(settings, fake, args.turns))
        finally:
            server.cleanup()
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    asyncio.run(main())
