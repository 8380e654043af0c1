"""What the Matrix adapter keeps in Postgres: device id and access token, sync token, catch-up
marker, events, and the pictures it uploaded (persona avatars, by their bytes' SHA-256).

A replayed event is never handled twice: `claim()` inserts the event id before the bot acts on
it, and only the first insert wins (across restarts and processes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SavedState:
    device_id: str | None = None
    access_token: str | None = None
    next_batch: str | None = None
    caught_up_ts: int | None = None


class MatrixState:
    def __init__(self, pool: Any, account: str) -> None:
        self._pool = pool
        self.account = account

    async def load(self) -> SavedState:
        row = await self._pool.fetchrow(
            "SELECT device_id, access_token, next_batch, caught_up_ts FROM matrix_state"
            " WHERE account = $1",
            self.account,
        )
        if row is None:
            return SavedState()
        return SavedState(
            row["device_id"], row["access_token"], row["next_batch"], row["caught_up_ts"]
        )

    async def save_login(self, device_id: str, access_token: str | None) -> None:
        """The device and its access token, always saved together."""
        await self._pool.execute(
            "INSERT INTO matrix_state (account, device_id, access_token) VALUES ($1, $2, $3)"
            " ON CONFLICT (account) DO UPDATE SET device_id = $2, access_token = $3,"
            " updated_at = now()",
            self.account,
            device_id,
            access_token,
        )

    async def save_position(self, next_batch: str, caught_up_ts: int | None) -> None:
        """The sync token after a processed sync, and the newest event time seen (ms)."""
        await self._pool.execute(
            "INSERT INTO matrix_state (account, next_batch, caught_up_ts) VALUES ($1, $2, $3)"
            " ON CONFLICT (account) DO UPDATE SET next_batch = $2,"
            " caught_up_ts = greatest(matrix_state.caught_up_ts, $3), updated_at = now()",
            self.account,
            next_batch,
            caught_up_ts,
        )

    async def claim(self, event_id: str, room_id: str, conversation: str) -> bool:
        """True the first time an event is claimed; False when it was handled before."""
        row = await self._pool.fetchrow(
            "INSERT INTO matrix_events (account, event_id, room_id, conversation)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING 1",
            self.account,
            event_id,
            room_id,
            conversation,
        )
        return row is not None

    async def sent(self, event_id: str, room_id: str, conversation: str) -> None:
        """Remember an event the bot sent, so replies to it continue its conversation."""
        await self._pool.execute(
            "INSERT INTO matrix_events (account, event_id, room_id, conversation, from_bot)"
            " VALUES ($1, $2, $3, $4, true) ON CONFLICT DO NOTHING",
            self.account,
            event_id,
            room_id,
            conversation,
        )

    async def lookup(self, event_id: str) -> tuple[str, bool] | None:
        """(conversation, sent by the bot) for an event the bot handled or sent."""
        row = await self._pool.fetchrow(
            "SELECT conversation, from_bot FROM matrix_events WHERE account = $1 AND event_id = $2",
            self.account,
            event_id,
        )
        return None if row is None else (row["conversation"], row["from_bot"])

    async def prune(self, days: int = 90) -> int:
        result = await self._pool.execute(
            "DELETE FROM matrix_events WHERE account = $1"
            " AND created_at < now() - make_interval(days => $2)",
            self.account,
            days,
        )
        return int(result.split()[-1])

    async def media(self, sha256: str) -> str | None:
        """The mxc URI of a picture this account uploaded before (by its bytes' SHA-256)."""
        found = await self._pool.fetchval(
            "SELECT mxc FROM matrix_media WHERE account = $1 AND sha256 = $2",
            self.account,
            sha256,
        )
        return None if found is None else str(found)

    async def save_media(self, sha256: str, mxc: str) -> None:
        await self._pool.execute(
            "INSERT INTO matrix_media (account, sha256, mxc) VALUES ($1, $2, $3)"
            " ON CONFLICT (account, sha256) DO UPDATE SET mxc = $3, uploaded_at = now()",
            self.account,
            sha256,
            mxc,
        )
