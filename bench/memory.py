"""Memory benchmarks: recall latency as the table grows, and extraction throughput.

Recall: memories spread over 10,000 users (768-dimension halfvec, random vectors) are written
straight into the embedded PostgreSQL in steps (10k, 100k, 1M rows); at each step the database
part of one recall on the reply's path (which models the user has, then the exact cosine scan
of that user's rows, floor, recency weight, top k) is timed for random users; the
last_recalled_at update runs after it, as the bot runs it in the background. The query's
embedding is not included: it is one /api/embed call whose cost depends on the model and the
GPU, not on the table.

`--load N` runs a concurrent load while recall is timed: a process of its own with N
connections, each recalling for random users, touching what it found and adding a memory every
fifth turn, without pause (a busy bot on the same database, on the same two cores).
`--runs 3` times recall that many times and prints each run and min/median/max of p50/p95/p99.
`--explain` prints `EXPLAIN (ANALYZE, BUFFERS)` of one recall. `--compare` then times recall
through the table (the query before migration 0018) against the store's query for the same
users, alternating, and counts the pages each touches. `--pg-dir` keeps the database,
so the million rows are written once (the largest size is what is kept).

Extraction: jobs run through the real pipeline (job row, structured-output call to the fake
Ollama on loopback with zero latency, embedding, dedupe and insert), so what is measured is our
overhead per extraction, not a model (`--jobs 0` skips it).

    .venv/bin/python bench/memory.py [--sizes 10000,100000,1000000] [--recalls 500]
        [--pg-dir DIR] [--load 4] [--runs 3] [--explain] [--compare] [--jobs 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgserver
from pgvector import HalfVector

from bot import db
from bot.app import running_app
from bot.config import REPO_ROOT, Settings
from bot.loop import run as run_on_loop
from bot.memory.store import Exchange, MemoryStore, NewFact, recall_query
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


# Recall as it was before migration 0018: the same scan, reading each of the user's rows (and
# its text) from the table. `--compare` times it against the store's query, alternating, so
# that both see the same load.
_TABLE_RECALL = """
WITH scored AS (
    SELECT id, text, created_at, 1 - (embedding <=> $2::halfvec) AS similarity
    FROM memories
    WHERE user_key = $1 AND embed_model = $3 AND superseded_by IS NULL
      AND ($8::text IS NULL OR scope = $8)
      AND ($9::text IS NULL OR private_to IS NULL OR private_to = $9)
)
SELECT id, text, similarity,
       similarity - $5 * (1 - power(0.5,
           extract(epoch FROM now() - created_at) / 86400.0 / $6)) AS score
FROM scored
WHERE similarity >= $4
ORDER BY score DESC, id DESC
LIMIT $7
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def fill(pool: Any, size: int) -> float:
    """Random memories up to `size` rows (kept with --pg-dir), then vacuumed and analysed (as
    autovacuum would after so many changes), so that every run starts alike; returns the seconds
    it took."""
    started = time.perf_counter()
    have = int(await pool.fetchval("SELECT count(*) FROM memories WHERE text LIKE 'fact %'"))
    step = 50_000
    for a in range(have, size, step):
        await pool.execute(_FILL, a, min(size, a + step) - 1)
    await pool.execute("VACUUM ANALYZE memories")
    return time.perf_counter() - started


def random_vector(rng: random.Random) -> list[float]:
    return [rng.random() - 0.5 for _ in range(DIM)]


async def recall_once(store: MemoryStore, user: str, vector: list[float]) -> list[int]:
    """The database part of a recall on the reply's path; the ids it found."""
    models = await store.models_of(user)
    if not models:  # small tables leave some users with nothing: no recall, as in the bot
        return []
    found = await store.recall(
        user, vector, models[0], top_k=5, floor=-1.0, recency_weight=0.05, half_life_days=30
    )
    return [m.id for m in found]


async def stamp(store: MemoryStore, user: str, ids: list[int]) -> None:
    """Recall's stamps, written at once (the bot gathers them and writes them when quiet)."""
    now = datetime.now(UTC)
    await store.touch({i: (user, now) for i in ids})


async def recall_times(pool: Any, recalls: int, seed: int) -> list[float]:
    store = MemoryStore(pool)
    rng = random.Random(seed)
    times = []
    for _ in range(recalls):
        user = f"bench:{rng.randrange(USERS)}"
        vector = random_vector(rng)
        started = time.perf_counter()
        ids = await recall_once(store, user, vector)
        times.append(time.perf_counter() - started)
        await stamp(store, user, ids)  # in the bot: later, with others (one statement)
    return times


async def _load_worker(store: MemoryStore, seed: int, stop: Any) -> int:
    rng = random.Random(seed)
    turns = 0
    while not stop.is_set():
        user = f"bench:{rng.randrange(USERS)}"
        vector = random_vector(rng)
        await stamp(store, user, await recall_once(store, user, vector))
        turns += 1
        if turns % 5 == 0:
            fact = NewFact(f"load fact {seed}.{turns}", vector, ())
            await store.add(user, [fact], model=MODEL, persona=None)
    return turns


def _load(url: str, connections: int, stop: Any) -> None:
    """The concurrent load, in a process of its own until `stop` is set."""

    async def run() -> None:
        pool = await db.connect(url, REPO_ROOT / "migrations", max_size=connections)
        started = time.perf_counter()
        try:
            store = MemoryStore(pool)
            turns = await asyncio.gather(
                *(_load_worker(store, 1000 + i, stop) for i in range(connections))
            )
        finally:
            await pool.close()
        rate = sum(turns) / (time.perf_counter() - started)
        print(f"(load: {connections} connections, {rate:.0f} recalls/s)", file=sys.stderr)

    asyncio.run(run())


@contextlib.contextmanager
def load_running(url: str, connections: int) -> Iterator[None]:
    if not connections:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    process = ctx.Process(target=_load, args=(url, connections, stop))
    process.start()
    try:
        time.sleep(3)  # started, connected and recalling
        yield
    finally:
        stop.set()
        process.join()


async def explain(pool: Any, user: str) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of the recall query as the store sends it."""
    vector = HalfVector(random_vector(random.Random(7)))
    rows = await pool.fetch(
        "EXPLAIN (ANALYZE, BUFFERS) " + recall_query(DIM),
        user,
        vector,
        MODEL,
        -1.0,
        0.05,
        30.0,
        5,
        None,
        None,
    )
    vectors = re.compile(r"'\[[^\]]*\]'::halfvec")
    return "\n".join(vectors.sub("'[…]'::halfvec", r[0]) for r in rows)


async def compare(pool: Any, recalls: int, seed: int) -> dict[str, list[float]]:
    """Recall through the table and through the covering index, alternating which goes first,
    for the same random users and vectors: seconds each, and shared buffers each touched."""
    rng = random.Random(seed)
    out: dict[str, list[float]] = {"table": [], "index": [], "table_buf": [], "index_buf": []}
    queries = {"table": _TABLE_RECALL, "index": recall_query(DIM)}
    for i in range(recalls):
        user = f"bench:{rng.randrange(USERS)}"
        args = (user, HalfVector(random_vector(rng)), MODEL, -1.0, 0.05, 30.0, 5, None, None)
        for name in ("table", "index") if i % 2 else ("index", "table"):
            started = time.perf_counter()
            await pool.fetch(queries[name], *args)
            out[name].append(time.perf_counter() - started)
        if i % 10 == 0:  # the pages each reads, from the plan of one execution
            for name in ("table", "index"):
                plan = await pool.fetchval(
                    "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + queries[name], *args
                )
                top = json.loads(plan)[0]["Plan"]
                out[f"{name}_buf"].append(top["Shared Hit Blocks"] + top["Shared Read Blocks"])
    return out


async def compare_bench(url: str, args: argparse.Namespace) -> None:
    pool = await db.connect(url, REPO_ROOT / "migrations")
    load = f", {args.load} connections of concurrent load" if args.load else ""
    print(f"\n## Recall through the table and through the covering index{load}\n")
    print("| run | path | p50 ms | p95 ms | p99 ms | pages read (median) |")
    print("|---:|---|---:|---:|---:|---:|")
    try:
        await recall_times(pool, 50, 0)  # warm the cache
        runs: dict[str, list[list[float]]] = {"table": [], "index": []}
        with load_running(url, args.load):
            for run in range(args.runs):
                out = await compare(pool, args.recalls, 100 + run)
                for name in ("table", "index"):
                    figures = [percentile(out[name], q) * 1e3 for q in (0.5, 0.95, 0.99)]
                    figures.append(statistics.median(out[f"{name}_buf"]))
                    runs[name].append(figures)
                    p50, p95, p99, pages = figures
                    print(
                        f"| {run + 1} | {name} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {pages:.0f} |"
                    )
        for name in ("table", "index"):
            cols = [sorted(c) for c in zip(*runs[name], strict=True)]
            for label, pick in (("min", 0), ("median", len(runs[name]) // 2), ("max", -1)):
                p50, p95, p99, pages = (c[pick] for c in cols)
                print(f"| {label} | {name} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {pages:.0f} |")
    finally:
        await pool.close()


async def recall_bench(url: str, args: argparse.Namespace) -> None:
    pool = await db.connect(url, REPO_ROOT / "migrations")
    load = f", {args.load} connections of concurrent load" if args.load else ""
    print(f"\n## Recall latency (database part, 10,000 users, 768-d halfvec{load})\n")
    print("| memories | rows per user | run | fill s | p50 ms | p95 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    try:
        for size in args.sizes:
            filled = await fill(pool, size)
            await recall_times(pool, 50, 0)  # warm the cache
            runs = []
            with load_running(url, args.load):
                for run in range(args.runs):
                    times = await recall_times(pool, args.recalls, run + 1)
                    runs.append([percentile(times, q) * 1e3 for q in (0.5, 0.95, 0.99)])
                    p50, p95, p99 = runs[-1]
                    print(
                        f"| {size:,} | {size // USERS} | {run + 1} | {filled:.0f} "
                        f"| {p50:.2f} | {p95:.2f} | {p99:.2f} |"
                    )
            if args.runs > 1:
                cols = [sorted(c) for c in zip(*runs, strict=True)]
                for name, pick in (("min", 0), ("median", len(runs) // 2), ("max", -1)):
                    figures = " | ".join(f"{c[pick]:.2f}" for c in cols)
                    print(f"| {size:,} | {size // USERS} | {name} | | {figures} |")
        if args.explain:
            print("\n```\n" + await explain(pool, "bench:7") + "\n```")
    finally:
        await pool.close()


async def extraction_bench(url: str, data: Path, jobs: int) -> None:
    async with FakeOllama() as fake:
        counter = iter(range(10**9))

        def respond(body: dict[str, Any]) -> str:
            """A new fact for each extraction (the first message's, when several are read
            together); Llama Guard's own answer, "safe", when the guard vets it."""
            if not body.get("format"):
                return "safe"
            fact = {"fact": f"Likes thing {next(counter)}.", "replaces": [], "message": 1}
            return json.dumps({"facts": [fact]})

        fake.responder = respond
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
            calls = sum(1 for body in fake.chat_requests() if body.get("format"))
    print(f"\n## Extraction throughput ({jobs} exchanges, zero-latency fake model)\n")
    print(
        f"{jobs / elapsed:.1f} exchanges/s ({elapsed:.2f} s, {calls} extraction calls,"
        f" {stored} facts stored)"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--recalls", type=int, default=500)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--load", type=int, default=0, help="connections of concurrent load")
    parser.add_argument("--explain", action="store_true")
    parser.add_argument("--compare", action="store_true", help="table against index, alternating")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--pg-dir", type=Path, help="keep the database here between runs")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.pg_dir is not None
        pg_dir = args.pg_dir or Path(tmp) / "pg"
        server = pgserver.get_server(pg_dir, cleanup_mode="stop" if keep else "delete")
        try:
            if args.jobs:
                server.psql("DROP DATABASE IF EXISTS extraction;")
                server.psql("CREATE DATABASE extraction;")
                await extraction_bench(server.get_uri(database="extraction"), Path(tmp), args.jobs)
            await recall_bench(server.get_uri(), args)
            if args.compare:
                await compare_bench(server.get_uri(), args)
        finally:
            server.cleanup()


if __name__ == "__main__":
    run_on_loop(main())  # the event loop production runs on (bot/loop.py)
