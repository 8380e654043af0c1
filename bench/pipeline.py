"""Pipeline benchmarks: the bot's CPU per reply, overhead per reply, throughput in flight.

Runs the real engine on an embedded PostgreSQL against the fake Ollama on loopback (through
the official client). The fake runs in processes of its own (one answering at once, one taking
a second a reply), so the bot's process time is the bot's alone: what is measured is our
pipeline, the database and HTTP, not a model.

- CPU per reply: this process's CPU time (time.process_time) over sequential replies,
  background work included (call records, ledger, memory extraction with its embedding),
  with memory on and with it off. PostgreSQL's own CPU is not in it (another process).
- Overhead per reply: a reply's wall time minus the fake model's own round trip, memory on, with
  recall against a table of `--memories` memories (random 768-d halfvecs over 10,000 users,
  learned in the community server the benchmark speaks in; each reply speaks there as one of
  them, so every recall embeds the message and scans that user's ~100 rows at a million).
- Throughput: N conversations at once, the fake taking 1 s a reply; wall time until all are
  answered, and replies per second.

The bot runs as a community's would: with a monthly budget (`BUDGET_MONTHLY_USD`, `--budget`,
the talk's five dollars by default; 0 for none), so each reply asks the degrade ladder how
much is spent, over a month whose ledger already holds `--ledger` rows (about a thousand
replies a day of four calls each, by the month's end).

    .venv/bin/python bench/pipeline.py [--replies 300] [--levels 1,100,500,1000]
        [--memories 1000000] [--ledger 120000] [--budget 5]
        [--pg-dir DIR] [--json] [--hops]

`--hops` times, instead, what a sequential reply with memory on waits for, hop by hop (the
database calls and the embedding; background work's calls of the same kind are counted too).

`--pg-dir` keeps the database between runs, so the million memories are written once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.connection
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgserver

from bot import db
from bot.app import running_app
from bot.brains.http import ollama_client
from bot.config import REPO_ROOT, Settings
from bot.core.engine import Done, Engine, Incoming
from bot.loop import run as run_on_loop
from tests.fakes.ollama import FakeOllama

REPLY = "A short reply of about a dozen words, streamed in pieces."
FACT = json.dumps({"facts": [{"fact": "Likes benchmarks.", "replaces": []}]})
USERS = 10_000
GUILD = "bench"  # every message comes from this community server, where the memories were learned
SCOPE = f"bench:guild:{GUILD}"  # bot/core/ports.py scope_of
DIM = 768
EMBED_MODEL = "ollama:nomic-embed-text"
RUN = str(time.time_ns())  # conversation names of this run: a kept database has earlier ones
_FILL = f"""
INSERT INTO memories (user_key, text, text_hash, embed_model, embedding, created_at, scope)
SELECT 'bench:' || (i % {USERS}), 'fact ' || i, md5(i::text), '{EMBED_MODEL}', g.v::halfvec,
       now() - (i % 365) * interval '1 day', '{SCOPE}'
FROM generate_series($1::bigint, $2::bigint) AS i,
     LATERAL (SELECT array_agg(random() - 0.5) AS v FROM generate_series(1, {DIM})
              WHERE i IS NOT NULL) AS g
"""


def respond(body: dict[str, Any]) -> str:
    """The fake's answer: a fact for memory extraction (structured output), else REPLY."""
    return FACT if body.get("format") else REPLY


def _serve_fake(delay: float, conn: multiprocessing.connection.Connection) -> None:
    """The fake Ollama in a process of its own, until the parent says stop."""

    async def serve() -> None:
        async with FakeOllama(responder=respond, first_token_delay=delay) as fake:
            conn.send(fake.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    asyncio.run(serve())


@contextlib.contextmanager
def fake_process(delay: float) -> Iterator[str]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve_fake, args=(delay, child), daemon=True)
    process.start()
    try:
        yield parent.recv()
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.terminate()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def reply_once(engine: Engine, conversation: str, author: str) -> float:
    started = time.perf_counter()
    incoming = Incoming("bench", conversation, author, "User", "hello there", guild=GUILD)
    async with contextlib.aclosing(engine.handle(incoming)) as events:
        last = None
        async for event in events:
            last = event
    assert isinstance(last, Done), last
    return time.perf_counter() - started


async def fake_only(url: str, n: int) -> list[float]:
    client = ollama_client(url, read_timeout=60.0, connect_timeout=3.0)  # the bot's own
    times = []
    for _ in range(n):
        started = time.perf_counter()
        async for _part in client.chat_stream(
            model="llama3.2:3b", messages=[{"role": "user", "content": "hi"}]
        ):
            pass
        times.append(time.perf_counter() - started)
    await client.close()
    return times


def speaker(tag: str, i: int) -> tuple[str, str]:
    """The conversation and author of the i-th sequential reply: 20 conversations in turn (so
    history grows as in real use), each with its own user among the memories' 10,000."""
    return f"{RUN}{tag}{i % 20}", str((i % 20) * 397 % USERS)


async def warm_up(app: Any, tag: str) -> None:
    """One reply in each conversation (connections, templates, the conversations), drained."""
    for i in range(20):
        await reply_once(app.engine, *speaker(tag, i))
    await app.engine.drain()


async def sequential(settings: Settings, replies: int, tag: str) -> tuple[list[float], float]:
    """Wall time of each of `replies` sequential replies spread over 20 conversations (so
    history grows as in real use), and CPU ms per reply (background work drained and counted)."""

    async with running_app(settings) as app:
        await warm_up(app, tag)
        cpu = time.process_time()
        times = [await reply_once(app.engine, *speaker(tag, i)) for i in range(replies)]
        await app.engine.drain()
        cpu_ms = (time.process_time() - cpu) * 1e3 / replies
    return times, cpu_ms


# What a sequential reply waits for, by the object the app holds it in and the method's name.
HOPS = (
    ("history", "opening"),
    ("store", "models_of"),
    ("store", "models_of_many"),
    ("embeddings", "embed"),
    ("store", "recall"),
    ("history", "append_exchange"),
)


def _time_calls(owner: Any, name: str, label: str, into: dict[str, list[float]]) -> None:
    """Wrap `owner.name` (this instance only) so each call's wall time goes into `into`."""
    method = getattr(owner, name)

    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await method(*args, **kwargs)
        finally:
            into.setdefault(label, []).append((time.perf_counter() - started) * 1e3)

    setattr(owner, name, timed)


async def hops(settings: Settings, replies: int) -> dict[str, list[float]]:
    """Milliseconds of each call of each hop in `replies` sequential replies, and the replies'."""
    times: dict[str, list[float]] = {}

    async with running_app(settings) as app:
        assert app.memory is not None
        owners = {
            "history": app.engine.history,
            "store": app.memory.store,
            "embeddings": app.memory.embeddings,
        }
        for where, name in HOPS:
            _time_calls(owners[where], name, f"{where}.{name}", times)
        await warm_up(app, "h")
        times.clear()
        times["whole reply"] = [
            await reply_once(app.engine, *speaker("h", i)) * 1e3 for i in range(replies)
        ]
        await app.engine.drain()
    return times


async def throughput(settings: Settings, levels: list[int]) -> dict[str, dict[str, float]]:
    result: dict[str, dict[str, float]] = {}
    async with running_app(settings) as app:
        await reply_once(app.engine, f"{RUN}tp-warm", "1")
        for level in levels:
            started = time.perf_counter()
            times = await asyncio.gather(
                *(reply_once(app.engine, f"{RUN}t-{i}", str(i % USERS)) for i in range(level))
            )
            wall = time.perf_counter() - started
            await app.engine.drain()
            result[str(level)] = {
                "wall_s": round(wall, 3),
                "replies_per_s": round(level / wall, 1),
                "p50_s": round(statistics.median(times), 3),
                "p99_s": round(percentile(times, 0.99), 3),
            }
    return result


async def fill_memories(url: str, target: int) -> int:
    """Random memories up to `target` rows (kept between runs with --pg-dir)."""
    pool = await db.connect(url, REPO_ROOT / "migrations")
    try:
        have = int(await pool.fetchval("SELECT count(*) FROM memories WHERE text LIKE 'fact %'"))
        elsewhere = await pool.fetchval(
            "SELECT count(*) FROM memories WHERE text LIKE 'fact %' AND scope IS DISTINCT FROM $1",
            SCOPE,
        )
        if elsewhere:  # filled by an earlier version, whose memories no reply could recall
            raise SystemExit("--pg-dir holds memories learned nowhere: use a new directory")
        step = 50_000
        for start in range(have, target, step):
            await pool.execute(_FILL, start, min(target, start + step) - 1)
        if have < target:  # as autovacuum soon would: statistics, and the visibility map
            await pool.execute("VACUUM ANALYZE memories")
        return max(have, target)
    finally:
        await pool.close()


_FILL_LEDGER = """
INSERT INTO ledger (at, month, kind, provider, model, units, unit_price, cost, user_key,
                    platform, persona, request_id, status)
SELECT now(), date_trunc('month', now() AT TIME ZONE 'UTC')::date,
       (ARRAY['chat_tokens', 'embed_tokens'])[1 + i % 2], 'ollama:bench', 'llama3.2:3b',
       100, 0, 0, 'bench:' || (i % $3), 'bench', 'mimi',
       'bench-fill:' || $4::text || ':' || i, 'settled'
FROM generate_series($1::bigint, $2::bigint) AS i
"""


async def fill_ledger(url: str, target: int) -> int:
    """This month's ledger up to `target` rows (calls of earlier runs count)."""
    pool = await db.connect(url, REPO_ROOT / "migrations")
    try:
        have = int(
            await pool.fetchval(
                "SELECT count(*) FROM ledger"
                " WHERE month = date_trunc('month', now() AT TIME ZONE 'UTC')::date"
            )
        )
        if have < target:
            await pool.execute(_FILL_LEDGER, 1, target - have, USERS, RUN)
            await pool.execute("VACUUM ANALYZE ledger")
        return max(have, target)
    finally:
        await pool.close()


BUDGET = Decimal(5)  # BUDGET_MONTHLY_USD of the bench's bot (--budget)


def settings_for(
    url: str, data: Path, ollama_url: str, *, memory: bool, budget: Decimal = BUDGET
) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=url,  # type: ignore[arg-type]
        data_dir=data,
        ollama_host=ollama_url,
        local_model_enabled=False,
        log_file=False,
        personas_dir=REPO_ROOT / "personas",
        guard_enabled=False,  # bench/guard.py measures what the guard adds
        memory_enabled=memory,
        budget_monthly_usd=budget or None,
    )


async def run(url: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    memories = await fill_memories(url, args.memories) if args.memories else 0
    ledger = await fill_ledger(url, args.ledger)
    if args.hops:
        with fake_process(0.0) as fast:
            found = await hops(
                settings_for(url, data, fast, memory=True, budget=args.budget), args.replies
            )
        return {"memories": memories, "ledger": ledger, "replies": args.replies, "hops": found}
    levels = [int(x) for x in args.levels.split(",")]
    with fake_process(0.0) as fast, fake_process(1.0) as slow:
        _, cpu_off = await sequential(
            settings_for(url, data, fast, memory=False, budget=args.budget), args.replies, "n"
        )
        on = settings_for(url, data, fast, memory=True, budget=args.budget)
        times, cpu_on = await sequential(on, args.replies, "m")
        base = await fake_only(fast, args.replies)
        overhead = [t - b for t, b in zip(sorted(times), sorted(base), strict=True)]
        flight = await throughput(
            settings_for(url, data, slow, memory=True, budget=args.budget), levels
        )
    return {
        "memories": memories,
        "ledger": ledger,
        "budget_usd": str(args.budget),
        "replies": args.replies,
        "pipeline_p50_ms": round(percentile(times, 0.5) * 1e3, 2),
        "pipeline_p99_ms": round(percentile(times, 0.99) * 1e3, 2),
        "fake_model_p50_ms": round(percentile(base, 0.5) * 1e3, 2),
        "overhead_p50_ms": round(percentile(overhead, 0.5) * 1e3, 2),
        "overhead_p99_ms": round(percentile(overhead, 0.99) * 1e3, 2),
        "cpu_ms_per_reply": round(cpu_on, 2),
        "cpu_ms_per_reply_no_memory": round(cpu_off, 2),
        "throughput": flight,
    }


def print_hops(r: dict[str, Any]) -> None:
    print(f"\n## What a sequential reply waits for ({r['replies']} replies, memory on)\n")
    print(f"recall against {r['memories']:,} memories, {r['ledger']:,} ledger rows this month\n")
    print("| hop | calls | p50 ms | mean ms |")
    print("|---|---:|---:|---:|")
    for label, times in r["hops"].items():
        print(
            f"| {label} | {len(times)} | {statistics.median(times):.2f} "
            f"| {statistics.fmean(times):.2f} |"
        )


def print_tables(r: dict[str, Any]) -> None:
    print(f"\n## Per reply ({r['replies']} sequential, zero-latency fake in its own process)\n")
    print(f"recall against {r['memories']:,} memories, {r['ledger']:,} ledger rows this month\n")
    print("| measure | value |")
    print("|---|---:|")
    print(f"| bot CPU per reply, memory on (ms) | {r['cpu_ms_per_reply']:.2f} |")
    print(f"| bot CPU per reply, memory off (ms) | {r['cpu_ms_per_reply_no_memory']:.2f} |")
    print(f"| whole pipeline p50 / p99 (ms) | {r['pipeline_p50_ms']} / {r['pipeline_p99_ms']} |")
    print(f"| fake model alone p50 (ms) | {r['fake_model_p50_ms']} |")
    print(f"| pipeline overhead p50 / p99 (ms) | {r['overhead_p50_ms']} / {r['overhead_p99_ms']} |")
    print("\n## Throughput (fake model takes 1 s a reply)\n")
    print("| in flight | wall s | replies/s | p50 s | p99 s |")
    print("|---:|---:|---:|---:|---:|")
    for level, t in r["throughput"].items():
        print(
            f"| {level} | {t['wall_s']:.2f} | {t['replies_per_s']:.1f} "
            f"| {t['p50_s']:.2f} | {t['p99_s']:.2f} |"
        )


async def measure(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.pg_dir is not None
        pg_dir = args.pg_dir or Path(tmp) / "pg"
        server = pgserver.get_server(pg_dir, cleanup_mode="stop" if keep else "delete")
        try:
            result = await run(server.get_uri(), Path(tmp) / "data", args)
        finally:
            server.cleanup()
    if args.hops:
        print_hops(result)
    elif args.json:
        print(json.dumps(result))
    else:
        print_tables(result)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replies", type=int, default=300)
    parser.add_argument("--levels", default="1,100,500,1000")
    parser.add_argument("--memories", type=int, default=1_000_000)
    parser.add_argument(
        "--ledger", type=int, default=120_000, help="ledger rows this month, at the least"
    )
    parser.add_argument("--pg-dir", type=Path, help="keep the database here between runs")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--hops", action="store_true", help="time a reply's hops instead")
    parser.add_argument(
        "--loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="the event loop: production's (bot/loop.py) or the standard one, to compare",
    )
    parser.add_argument(
        "--budget", type=Decimal, default=BUDGET, help="BUDGET_MONTHLY_USD; 0: none"
    )
    args = parser.parse_args()
    if args.loop == "asyncio":
        asyncio.run(measure(args))
    else:
        run_on_loop(measure(args))


if __name__ == "__main__":
    main()
