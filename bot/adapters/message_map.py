"""Which conversation a platform message belongs to, kept in Postgres (table platform_messages).

Adapters remember the messages they answered and the replies they sent; a later reply to one of
them (or, on Discord, a thread started from one) continues that conversation. Kept in the
database, so every shard and process sees the same map and a restart forgets nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Mapped:
    conversation: str
    from_bot: bool


class MessageMap:
    def __init__(self, pool: Any, platform: str) -> None:
        self._pool = pool
        self.platform = platform

    async def remember(
        self, conversation: str, message_ids: Iterable[str], *, from_bot: bool
    ) -> None:
        rows = [(self.platform, mid, conversation, from_bot) for mid in message_ids]
        if not rows:
            return
        await self._pool.executemany(
            "INSERT INTO platform_messages (platform, message_id, conversation, from_bot)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (platform, message_id) DO NOTHING",
            rows,
        )

    async def lookup(self, message_id: str) -> Mapped | None:
        row = await self._pool.fetchrow(
            "SELECT conversation, from_bot FROM platform_messages"
            " WHERE platform = $1 AND message_id = $2",
            self.platform,
            message_id,
        )
        return None if row is None else Mapped(row["conversation"], row["from_bot"])
