"""The `images` table (migrations/0006_images.sql) and the per-user monthly cap counted from it.

The cap is checked and the new row inserted in one transaction under a per-user advisory lock,
so two requests at once (from two shards or processes) cannot both slip under it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bot.images.fal import ImageError

_LOCK_SPACE = 8006  # advisory lock namespace: per-user image cap


class ImageLimited(ImageError):
    user_message = "You've asked for pictures a lot just now. Please wait a minute."


class ImageStore:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    async def open(self, row: dict[str, Any], monthly_cap: int) -> None:
        """Insert a 'pending' row for `row["user_key"]`, or raise ImageLimited.

        `monthly_cap` counts pictures made or being made this UTC month (0: no cap)."""
        user_key = row["user_key"]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", _LOCK_SPACE, user_key
            )
            month = await conn.fetchval(
                """SELECT count(*) FROM images
                   WHERE user_key = $1 AND status IN ('ok', 'pending') AND created_at >=
                         date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'""",
                user_key,
            )
            if monthly_cap and month >= monthly_cap:
                raise ImageLimited(
                    f"{user_key} hit the monthly image cap",
                    f"You've had your {monthly_cap} pictures for this month. More on the 1st!",
                )
            names = list(row)
            placeholders = ", ".join(f"${i}" for i in range(1, len(names) + 1))
            await conn.execute(
                f"INSERT INTO images ({', '.join(names)}) VALUES ({placeholders})",
                *row.values(),
            )

    async def finish(self, request_id: str, status: str, **values: Any) -> None:
        """Close a row: its outcome, and any of width, height, cost, nsfw, file_path, error…"""
        sets = ["status = $2", "finished_at = now()"]
        sets += [f"{name} = ${i}" for i, name in enumerate(values, start=3)]
        await self.pool.execute(
            f"UPDATE images SET {', '.join(sets)} WHERE request_id = $1",
            request_id,
            status,
            *values.values(),
        )

    async def get(self, request_id: str) -> dict[str, Any] | None:
        row = await self.pool.fetchrow("SELECT * FROM images WHERE request_id = $1", request_id)
        return dict(row) if row is not None else None

    async def abandon(self, before: datetime) -> int:
        """Pending rows created before `before` (their process died): marked failed."""
        result = await self.pool.execute(
            "UPDATE images SET status = 'failed', finished_at = now(), error = 'abandoned'"
            " WHERE status = 'pending' AND created_at < $1",
            before,
        )
        return int(result.split()[-1])

    async def submitted(self, request_ids: list[str]) -> set[str]:
        """Which of these requests Fal accepted (it gave a request id): Fal may bill them."""
        rows = await self.pool.fetch(
            "SELECT request_id FROM images WHERE request_id = ANY($1::text[])"
            " AND fal_request_id IS NOT NULL",
            request_ids,
        )
        return {r["request_id"] for r in rows}

    async def submitted_as(self, request_id: str, fal_request_id: str) -> None:
        await self.pool.execute(
            "UPDATE images SET fal_request_id = $2 WHERE request_id = $1",
            request_id,
            fal_request_id,
        )
