"""The price table: what one unit of each kind of spend costs, with where the figure comes from.

Prices live in the `prices` table (seeded by migrations/0004_ledger.sql). A price change is a new
row with a later `effective_from`; the ledger copies the unit price into each row it writes, so
a change never rewrites the past. Lookup picks, among rows whose `provider` pattern (SQL LIKE)
matches, the most specific (a named model over "any model", a longer provider pattern over a
shorter one), then the latest `effective_from` not after the event.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

log = logging.getLogger(__name__)

KINDS = ("gpu_seconds", "image", "chat_tokens", "embed_tokens", "moderation_tokens")


@dataclass(frozen=True)
class Price:
    id: int
    kind: str
    provider: str
    model: str | None
    unit_price: Decimal
    unit: str
    effective_from: datetime
    source: str


# The price in force: $1 kind, $2 provider, $3 model, $4 the event's time.
LOOKUP = (
    "SELECT * FROM prices"
    " WHERE kind = $1 AND $2 LIKE provider AND (model IS NULL OR model = $3)"
    " AND effective_from <= $4"
    " ORDER BY (model IS NOT NULL) DESC, length(replace(provider, '%', '')) DESC,"
    " effective_from DESC LIMIT 1"
)


class Prices:
    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def lookup(
        self, kind: str, provider: str, model: str | None, at: datetime, *, conn: Any = None
    ) -> Price | None:
        """The price in force for this event, or None when nothing matches."""
        row = await (conn or self._pool).fetchrow(LOOKUP, kind, provider, model, at)
        return _price(row) if row is not None else None

    async def add(
        self,
        *,
        kind: str,
        provider: str,
        model: str | None,
        unit_price: Decimal,
        unit: str,
        effective_from: datetime,
        source: str,
    ) -> Price:
        """A new price from `effective_from` on; earlier events keep the price they had."""
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
        row = await self._pool.fetchrow(
            "INSERT INTO prices (kind, provider, model, unit_price, unit, effective_from, source)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING *",
            kind,
            provider,
            model,
            unit_price,
            unit,
            effective_from,
            source,
        )
        log.info(
            "price for %s/%s/%s from %s: %s", kind, provider, model, effective_from, unit_price
        )
        return _price(row)

    async def all(self) -> list[Price]:
        rows = await self._pool.fetch(
            "SELECT * FROM prices ORDER BY kind, provider, effective_from"
        )
        return [_price(r) for r in rows]


def _price(row: Any) -> Price:
    return Price(
        id=row["id"],
        kind=row["kind"],
        provider=row["provider"],
        model=row["model"],
        unit_price=row["unit_price"],
        unit=row["unit"],
        effective_from=row["effective_from"],
        source=row["source"],
    )
