"""Per-user token buckets in the real Postgres, shared by every limiter on the database."""

from __future__ import annotations

import asyncio

from bot.app import App
from bot.spend.ratelimit import RateLimiter


async def test_burst_then_refused_then_refilled(app: App) -> None:
    limiter = RateLimiter(app.pool, rate_per_minute=6, burst=3)  # a token every 10 s
    assert [await limiter.allow("discord:1") for _ in range(3)] == [True, True, True]
    assert await limiter.allow("discord:1") is False
    assert await limiter.allow("discord:2") is True, "buckets are per key"
    await app.pool.execute(  # 11 s pass for this bucket: one token comes back
        "UPDATE rate_buckets SET updated_at = updated_at - interval '11 seconds'"
        " WHERE key = 'discord:1'"
    )
    assert await limiter.allow("discord:1") is True
    assert await limiter.allow("discord:1") is False
    row = await app.pool.fetchrow("SELECT tokens FROM rate_buckets WHERE key = 'discord:1'")
    assert 0 <= row["tokens"] < 1


async def test_two_limiters_share_one_bucket(app: App) -> None:
    """Two shards (or processes) asking at once never spend more than the burst."""
    first = RateLimiter(app.pool, rate_per_minute=1, burst=5)
    second = RateLimiter(app.pool, rate_per_minute=1, burst=5)
    results = await asyncio.gather(
        *(limiter.allow("discord:7") for limiter in [first, second] * 10)
    )
    assert results.count(True) == 5


async def test_refill_never_exceeds_the_burst(app: App) -> None:
    limiter = RateLimiter(app.pool, rate_per_minute=60, burst=2)
    assert await limiter.allow("k")
    await app.pool.execute(
        "UPDATE rate_buckets SET updated_at = now() - interval '1 hour' WHERE key = 'k'"
    )
    assert [await limiter.allow("k") for _ in range(3)] == [True, True, False]


async def test_zero_turns_the_limit_off_and_prune_drops_full_buckets(app: App) -> None:
    off = RateLimiter(app.pool, rate_per_minute=0, burst=0)
    assert all([await off.allow("k") for _ in range(20)])
    assert await app.pool.fetchval("SELECT count(*) FROM rate_buckets") == 0
    limiter = RateLimiter(app.pool, rate_per_minute=60, burst=2)
    await limiter.allow("a:old")
    await limiter.allow("a:new")
    await limiter.allow("b:old")
    await app.pool.execute(
        "UPDATE rate_buckets SET updated_at = now() - interval '1 minute' WHERE key LIKE '%old'"
    )
    assert await limiter.prune("a:") == 1, "only this limiter's full buckets go"
    keys = {r["key"] for r in await app.pool.fetch("SELECT key FROM rate_buckets")}
    assert keys == {"a:new", "b:old"}
