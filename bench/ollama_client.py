"""The bot's CPU per call to Ollama: the official `ollama` client (over httpx) against the bot's
own (`bot/brains/http.py`, on its HTTP/1.1 client `bot/brains/wire.py`), for the three calls a
reply makes: a streamed chat, an embedding, a structured (non-streamed) chat. The fake Ollama
runs in a process of its own, so this process's CPU time is the client's alone.

    .venv/bin/python bench/ollama_client.py [--calls 400] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import ollama

from bench.pipeline import fake_process
from bot.brains.http import ollama_client
from bot.loop import run as run_on_loop

MODEL = "llama3.2:3b"
# a system prompt of about 200 words and a short message: the size of a persona's request
MESSAGES = [
    {"role": "system", "content": "You are Mimi, a cheerful persona. " * 35},
    {"role": "user", "content": "hello there"},
]
SCHEMA = {"type": "object", "properties": {"facts": {"type": "array"}}}

Call = Callable[[], Awaitable[Any]]


def official_calls(url: str) -> tuple[ollama.AsyncClient, dict[str, Call]]:
    client = ollama.AsyncClient(host=url, timeout=httpx.Timeout(60.0, connect=3.0))

    async def chat() -> None:
        async for _ in await client.chat(model=MODEL, messages=MESSAGES, stream=True):
            pass

    async def embed() -> None:
        await client.embed(model="nomic-embed-text", input=["hello there"])

    async def structured() -> None:
        await client.chat(model=MODEL, messages=MESSAGES, format=SCHEMA, stream=False)

    return client, {"streamed chat": chat, "embedding": embed, "structured chat": structured}


def own_calls(url: str) -> tuple[Any, dict[str, Call]]:
    client = ollama_client(url, read_timeout=60.0, connect_timeout=3.0)

    async def chat() -> None:
        async for _ in client.chat_stream(model=MODEL, messages=MESSAGES):
            pass

    async def embed() -> None:
        await client.embed(model="nomic-embed-text", input=["hello there"])

    async def structured() -> None:
        await client.chat(model=MODEL, messages=MESSAGES, format=SCHEMA)

    return client, {"streamed chat": chat, "embedding": embed, "structured chat": structured}


async def cpu_per_call(call: Call, n: int) -> float:
    for _ in range(20):  # connections, caches
        await call()
    started = time.process_time()
    for _ in range(n):
        await call()
    return (time.process_time() - started) * 1e3 / n


async def measure(calls: int) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = {}
    with fake_process(0.0) as url:
        for name, make in (("official", official_calls), ("bot", own_calls)):
            client, kinds = make(url)
            result[name] = {k: round(await cpu_per_call(c, calls), 3) for k, c in kinds.items()}
            await client.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run_on_loop(measure(args.calls))
    if args.json:
        print(json.dumps(result))
        return
    print(f"\n## CPU per call to Ollama (ms, {args.calls} calls each, one at a time)\n")
    print("| call | official client (httpx) | bot/brains/http.py (wire.py) |")
    print("|---|---:|---:|")
    for kind in result["official"]:
        print(f"| {kind} | {result['official'][kind]:.2f} | {result['bot'][kind]:.2f} |")


if __name__ == "__main__":
    main()
