"""Per-user rate limits: a token bucket per key, kept in Postgres so shards and processes share it.

A bucket holds up to `burst` tokens and refills at `rate_per_minute`; each allowed action takes
one. The check and the take are one atomic statement on the database clock, so two processes
(or two shards) asking at once can never both spend the last token. A rate or burst of 0 turns
the limit off.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Insert a full bucket less one token, or refill an existing one and take a token when at least
# one is there. When there is not, the WHERE leaves the row untouched and nothing is returned.
_TAKE = """
INSERT INTO rate_buckets AS b (key, tokens, updated_at) VALUES ($1, $3::float8 - 1, now())
ON CONFLICT (key) DO UPDATE SET
    tokens = least($3::float8,
                   b.tokens + extract(epoch FROM now() - b.updated_at)::float8 * $2::float8) - 1,
    updated_at = now()
WHERE least($3::float8,
            b.tokens + extract(epoch FROM now() - b.updated_at)::float8 * $2::float8) >= 1
RETURNING tokens
"""


class Buckets:
    """Buckets whose rate and burst come with each call: a persona's own limit per member
    (`rate_limit_per_minute`, `rate_limit_burst`), which an edited YAML changes at once."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def allow(self, key: str, rate_per_minute: float, burst: int) -> bool:
        """Take a token from `key`'s bucket; False when it is empty (the action should wait)."""
        if rate_per_minute <= 0 or burst <= 0:
            return True
        row = await self._pool.fetchrow(_TAKE, key, rate_per_minute / 60.0, burst)
        if row is None:
            log.info("rate limit reached for %s", key)
            return False
        return True

    async def prune(self, prefix: str, older_than_seconds: float) -> int:
        """Drop buckets (keys starting with `prefix`) untouched for `older_than_seconds`:
        full by then, as a missing row is. Returns how many were dropped."""
        result = await self._pool.execute(
            "DELETE FROM rate_buckets WHERE updated_at < now() - make_interval(secs => $1)"
            " AND starts_with(key, $2)",
            older_than_seconds,
            prefix,
        )
        return int(result.split()[-1])


class RateLimiter:
    def __init__(self, pool: Any, rate_per_minute: float, burst: int) -> None:
        self._buckets = Buckets(pool)
        self.rate_per_minute = rate_per_minute
        self.burst = burst

    @property
    def enabled(self) -> bool:
        return self.rate_per_minute > 0 and self.burst > 0

    async def allow(self, key: str) -> bool:
        """Take a token from `key`'s bucket; False when it is empty (the action should wait)."""
        return await self._buckets.allow(key, self.rate_per_minute, self.burst)

    async def prune(self, prefix: str = "") -> int:
        """Drop this limiter's buckets (keys starting with `prefix`) that have refilled; a full
        bucket equals a missing row. Returns how many were dropped."""
        if not self.enabled:
            return 0
        seconds_to_full = self.burst * 60.0 / self.rate_per_minute
        return await self._buckets.prune(prefix, seconds_to_full)
