"""Pipeline benchmarks: overhead per reply, and throughput under concurrency.

Runs the real engine on an embedded PostgreSQL against the fake Ollama on loopback (through
the official client), so what is measured is our pipeline, the database and HTTP, not a model.

    .venv/bin/python bench/pipeline.py [--replies 300] [--levels 1,10,50,100]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ollama
import pgserver

from bot.app import running_app
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Done, Incoming
from tests.fakes.ollama import FakeOllama

REPLY = "A short reply of about a dozen words, streamed in pieces."


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def reply_once(engine, conversation: str) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    async with contextlib.aclosing(
        engine.handle(Incoming("bench", conversation, "u1", "User", "hello there"))
    ) as events:
        last = None
        async for event in events:
            last = event
    assert isinstance(last, Done), last
    return time.perf_counter() - started


async def fake_only(url: str, n: int) -> list[float]:
    client = ollama.AsyncClient(host=url)
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async for _part in await client.chat(
            model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}], stream=True
        ):
            pass
        times.append(time.perf_counter() - started)
    await client.close()
    return times


async def overhead(settings: Settings, fake: FakeOllama, replies: int) -> None:
    async with running_app(settings) as app:
        for i in range(20):  # warm-up: connections, templates
            await reply_once(app.engine, f"warm{i}")
        times = [await reply_once(app.engine, f"o{i}") for i in range(replies)]
        base = await fake_only(fake.url, replies)
    print(f"\n## Overhead per reply ({replies} sequential replies, zero-latency fake model)\n")
    print("| measure | p50 ms | p99 ms |")
    print("|---|---:|---:|")

    row("whole pipeline", times)
    row("fake model alone", base)
    row("pipeline overhead", [t - b for t, b in zip(sorted(times), sorted(base), strict=True)])


def row(name: str, values: list[float]) -> None:
    p50, p99 = percentile(values, 0.5) * 1e3, percentile(values, 0.99) * 1e3
    print(f"| {name} | {p50:.2f} | {p99:.2f} |")


async def throughput(settings: Settings, fake: FakeOllama, levels: list[int]) -> None:
    fake.first_token_delay = 1.0
    print("\n## Throughput (fake model takes 1 s per reply)\n")
    print("| concurrent conversations | replies | wall s | replies/s | p50 s | p99 s |")
    print("|---:|---:|---:|---:|---:|---:|")
    async with running_app(settings) as app:
        for level in levels:
            started = time.perf_counter()
            times = await asyncio.gather(
                *(reply_once(app.engine, f"t{level}-{i}") for i in range(level))
            )
            wall = time.perf_counter() - started
            print(
                f"| {level} | {level} | {wall:.2f} | {level / wall:.1f} "
                f"| {statistics.median(times):.2f} | {percentile(times, 0.99):.2f} |"
            )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=300)
    parser.add_argument("--levels", default="1,10,50,100")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        async with FakeOllama() as fake:
            fake.responder = lambda body: REPLY
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                database_url=server.get_uri(),  # type: ignore[arg-type]
                data_dir=Path(tmp) / "data",
                ollama_host=fake.url,
                local_model_enabled=False,
                log_file=False,
                personas_dir=REPO_ROOT / "personas",
                guard_enabled=False,  # bench/guard.py measures what the guard adds
            )
            await overhead(settings, fake, args.replies)
            await throughput(settings, fake, [int(x) for x in args.levels.split(",")])
        server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
