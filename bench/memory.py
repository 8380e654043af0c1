"""Memory benchmarks: recall latency as the table grows, and extraction throughput.

Recall: memories spread over 10,000 users (768-dimension halfvec, random vectors) are written
straight into the embedded PostgreSQL in steps (10k, 100k, 1M rows); at each step the database
part of one recall on the reply's path (which models the user has, then the exact cosine scan
of that user's rows through the B-tree on user_key, floor, recency weight, top k) is timed for
random users; the last_recalled_at update runs after it, as the bot runs it in the background.
The query's embedding is not included: it is one /api/embed call whose cost depends on the
model and the GPU, not on the table.

Extraction: jobs run through the real pipeline (job row, structured-output call to the fake
Ollama on loopback with zero latency, embedding, dedupe and insert), so what is measured is our
overhead per extraction, not a model.

    .venv/bin/python bench/memory.py [--sizes 10000,100000,1000000] [--recalls 500]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgserver

from bot import db
from bot.app import running_app
from bot.config import REPO_ROOT, Settings
from bot.memory.store import Exchange, MemoryStore
from tests.fakes.ollama import FakeOllama

USERS = 10_000
DIM = 768
MODEL = "ollama:nomic-embed-text"

_FILL = f"""
INSERT INTO memories (user_key, text, text_hash, embed_model, embedding, created_at)
SELECT 'bench:' || (i % {USERS}), 'fact ' || i, md5(i::text), '{MODEL}', g.v::halfvec,
       now() - (i % 365) * interval '1 day'
FROM generate_series($1::bigint, $2::bigint) AS i,
     LATERAL (SELECT array_agg(random() - 0.5) AS v FROM generate_series(1, {DIM})
              WHERE i IS NOT NULL) AS g
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def fill(pool: object, start: int, stop: int) -> float:
    started = time.perf_counter()
    step = 50_000
    for a in range(start, stop, step):
        await pool.execute(_FILL, a, min(stop, a + step) - 1)  # type: ignore[attr-defined]
    await pool.execute("ANALYZE memories")  # type: ignore[attr-defined]
    return time.perf_counter() - started


async def recall_times(pool: object, recalls: int) -> list[float]:
    store = MemoryStore(pool)
    rng = random.Random(1)
    times = []
    for _ in range(recalls):
        user = f"bench:{rng.randrange(USERS)}"
        vector = [rng.random() - 0.5 for _ in range(DIM)]
        started = time.perf_counter()
        models = await store.models_of(user)
        found = await store.recall(
            user, vector, models[0], top_k=5, floor=-1.0, recency_weight=0.05, half_life_days=30
        )
        times.append(time.perf_counter() - started)
        await store.touch(user, [m.id for m in found])  # in the bot: after the reply
    return times


async def recall_bench(url: str, sizes: list[int], recalls: int) -> None:
    pool = await db.connect(url, REPO_ROOT / "migrations")
    print("\n## Recall latency (database part, 10,000 users, 768-d halfvec)\n")
    print("| memories | rows per user | fill s | p50 ms | p95 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    have = 0
    try:
        for size in sizes:
            filled = await fill(pool, have, size)
            have = size
            await recall_times(pool, 50)  # warm the cache
            times = await recall_times(pool, recalls)
            p50, p95, p99 = (percentile(times, q) * 1e3 for q in (0.5, 0.95, 0.99))
            print(
                f"| {size:,} | {size // USERS} | {filled:.0f} | {p50:.2f} | {p95:.2f} | {p99:.2f} |"
            )
        plan = await pool.fetch(  # type: ignore[attr-defined]
            "EXPLAIN SELECT id FROM memories WHERE user_key = 'bench:7' AND superseded_by IS NULL"
        )
        print("\nplan: " + " / ".join(r[0].strip() for r in plan))
    finally:
        await pool.close()  # type: ignore[attr-defined]


async def extraction_bench(url: str, data: Path, jobs: int) -> None:
    async with FakeOllama() as fake:
        counter = iter(range(10**9))
        fake.responder = lambda body: json.dumps(
            {"facts": [{"fact": f"Likes thing {next(counter)}.", "replaces": []}]}
        )
        settings = Settings(  # type: ignore[call-arg]
            _env_file=None,
            database_url=url,
            data_dir=data,
            ollama_host=fake.url,
            local_model_enabled=False,
            log_file=False,
            memory_enabled=True,
        )
        async with running_app(settings) as app:
            memory = app.memory
            assert memory is not None
            exchanges = [
                Exchange(f"x:{i % 50}", "User", "mimi", "llama3.2:3b", "x", None, "I like it", "ok")
                for i in range(jobs)
            ]
            started = time.perf_counter()
            await asyncio.gather(*(memory.remember(e) for e in exchanges))
            elapsed = time.perf_counter() - started
            stored = await app.pool.fetchval(
                "SELECT count(*) FROM memories WHERE user_key LIKE 'x:%'"
            )
    print(f"\n## Extraction throughput ({jobs} exchanges, zero-latency fake model)\n")
    print(f"{jobs / elapsed:.1f} extractions/s ({elapsed:.2f} s, {stored} facts stored)")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--recalls", type=int, default=500)
    parser.add_argument("--jobs", type=int, default=200)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        server = pgserver.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            server.psql("CREATE DATABASE extraction;")
            await extraction_bench(server.get_uri(database="extraction"), Path(tmp), args.jobs)
            await recall_bench(server.get_uri(), sizes, args.recalls)
        finally:
            server.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
