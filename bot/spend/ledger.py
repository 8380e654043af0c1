"""The spend ledger: every cost event in one append-only table, and monthly budgets that hold.

    record()   a settled cost row (tokens of every model call, GPU seconds): written afterwards
    reserve()  before a paid action: checks the caps and writes a 'reserved' row, atomically
    settle()   the action happened: the row becomes 'settled' (with its final units)
    release()  the action failed: the row becomes 'released' and costs nothing

Budgets are computed per UTC month from the rows themselves (status reserved or settled), so
nothing is ever reset: the month rolls over at 00:00 UTC on the 1st by itself. A reservation
locks one `budget_scopes` row per cap it is subject to (global money, the kind, the user and
kind, the guild and kind) in a fixed order, inside one transaction, so concurrent reservations
from any number of processes take turns and a cap is never passed. The request id is unique:
a retry returns the first reservation and never charges twice.

The degrade ladder follows the global monthly budget: level 1 (free backends only), 2 (the
local model only), 3 (paid actions refused) from the fractions in `BUDGET_DEGRADE_AT`. A persona
with its own monthly cap (`budget_usd_month` in its YAML, looked up through `persona_cap`) has
the same ladder over its own rows, and its reservations lock and check its cap as well; the
higher of the two steps holds for its replies.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bot.core.calls import Charge
from bot.core.together import Together
from bot.errors import BotError
from bot.spend.budgets import (
    BudgetExceeded,
    Budgets,
    Cap,
    PersonaCap,
    caps_for,
    month_of,
    refusal,
    scopes_for,
    utcnow,
)
from bot.spend.ladder import BudgetStatus, Ladder
from bot.spend.prices import KINDS, LOOKUP, Prices

if TYPE_CHECKING:
    from bot.ops.notify import AdminNotifier

__all__ = [
    "BudgetExceeded",
    "BudgetStatus",
    "Budgets",
    "Ledger",
    "LedgerError",
    "Reservation",
    "month_of",
]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_SPENT_TOGETHER = 512  # ladder checks one statement answers at most (all read the same rows)
# A persona's own monthly cap in dollars by its name (None: it has none); the app reads it from
# the persona registry on every use, so an edited YAML counts at once.
PersonaCaps = Callable[[str], Decimal | None]


class LedgerError(BotError):
    """The ledger was used wrongly (an unknown request id, no price for a paid action)."""

    user_message = "That isn't available right now; an admin needs to look at the bot's logs."


@dataclass(frozen=True)
class Reservation:
    request_id: str
    kind: str
    units: Decimal
    unit_price: Decimal
    cost: Decimal
    month: date
    status: str


class Ledger(Ladder):
    def __init__(
        self,
        pool: Any,
        prices: Prices,
        *,
        clock: Clock = utcnow,
        budgets: Budgets | None = None,
        notifier: AdminNotifier | None = None,
        persona_caps: PersonaCaps | None = None,
        persona_names: Callable[[str], str] | None = None,
    ) -> None:
        self.pool = pool
        self.prices = prices
        self.budgets = budgets or Budgets()
        self._clock = clock
        self._notifier = notifier
        self.persona_caps = persona_caps
        self.persona_names = persona_names  # a persona's display name, for members' messages
        self._spending = Together(self._spent_in, most=_SPENT_TOGETHER)

    def persona_cap(self, persona: str | None) -> PersonaCap | None:
        """The persona's own monthly cap, when it has one."""
        if persona is None or self.persona_caps is None:
            return None
        cap = self.persona_caps(persona)
        if cap is None:
            return None
        shown = self.persona_names(persona) if self.persona_names is not None else persona
        return PersonaCap(persona, cap, shown)

    def now(self) -> datetime:
        return self._clock()

    async def record(
        self,
        *,
        kind: str,
        provider: str,
        model: str | None,
        units: Decimal,
        request_id: str,
        unit_price: Decimal | None = None,
        user_key: str | None = None,
        platform: str | None = None,
        guild: str | None = None,
        persona: str | None = None,
        at: datetime | None = None,
    ) -> bool:
        """A settled cost row; a second call with the same request id changes nothing.
        True when the row was written (False: the request id was booked before)."""
        units = _units(kind, units)
        at = at or self._clock()
        if isinstance(unit_price, float):
            unit_price = Decimal(str(unit_price))
        if unit_price is None:  # priced and inserted in one round trip
            row = await self.pool.fetchrow(
                _INSERT_PRICED,
                *(kind, provider, model, at, month_of(at), units),
                *(user_key, platform, guild, persona, request_id),
            )
            if row is not None and row["price_id"] is None:
                log.error("no price for %s from %s (%s): recorded at 0", kind, provider, model)
            cost = row["cost"] if row is not None else None
        else:
            cost = await self.pool.fetchval(
                _INSERT + " RETURNING cost",
                *(at, month_of(at), kind, provider, model, units, unit_price),
                *(units * unit_price, None, user_key, platform, guild, persona, request_id),
                "settled",
            )
        if cost is not None and cost > 0:
            await self._global_alerts(month_of(at))
        return cost is not None

    async def record_with(
        self,
        source: str,
        source_args: Sequence[Any],
        *,
        kind: str,
        provider: str,
        model: str | None,
        units: Decimal,
        request_prefix: str,
        user_key: str | None = None,
        platform: str | None = None,
        persona: str | None = None,
    ) -> int:
        """`source` (an INSERT of one row, `RETURNING id`, over `source_args`) and a settled
        cost row for it at the price in force, whose request id is `request_prefix` and that
        id, in one statement (one round trip); returns the source row's id."""
        units = _units(kind, units)
        at = self._clock()
        shift = len(source_args)
        row = await self.pool.fetchrow(
            _with_source(source, shift),
            *source_args,
            *(kind, provider, model, at, month_of(at), units),
            *(user_key, platform, None, persona, request_prefix),
        )
        if row["priced"] is not None and row["price_id"] is None:
            log.error("no price for %s from %s (%s): recorded at 0", kind, provider, model)
        if row["cost"] is not None and row["cost"] > 0:
            await self._global_alerts(month_of(at))
        return int(row["id"])

    async def record_many_with(
        self,
        rows: str,
        source: str,
        source_args: Sequence[Any],
        charges: Sequence[Charge],
        *,
        request_prefix: str,
    ) -> None:
        """`record_with` for many rows in one statement: `rows` (a SELECT over `source_args`
        giving each row an `id` and its number `n` from 1), `source` (an INSERT of those rows,
        reading them from `input`) and, for the n-th charge, a settled cost row at the price in
        force whose request id is `request_prefix` and the n-th row's id."""
        shift = len(source_args)
        row = await self.pool.fetchrow(
            _many_with_source(rows, source, shift),
            *source_args,
            [c.kind for c in charges],
            [c.provider for c in charges],
            [c.model for c in charges],
            [c.at for c in charges],
            [month_of(c.at) for c in charges],
            [_units(c.kind, c.units) for c in charges],
            [c.user_key for c in charges],
            [c.platform for c in charges],
            [c.persona for c in charges],
            request_prefix,
        )
        for what in row["unpriced"] or ():
            log.error("no price for %s: recorded at 0", what)
        for month in row["months"] or ():
            await self._global_alerts(month)

    async def reserve(
        self,
        *,
        kind: str,
        provider: str,
        model: str | None,
        units: Decimal,
        request_id: str,
        user_key: str | None = None,
        platform: str | None = None,
        guild: str | None = None,
        persona: str | None = None,
    ) -> Reservation:
        """Reserve before spending; raises BudgetExceeded when a cap would be passed."""
        units = _units(kind, units)
        at = self._clock()
        month = month_of(at)
        price = await self.prices.lookup(kind, provider, model, at)
        if price is None:
            log.error(
                "refused %s from %s (%s): no price in the prices table", kind, provider, model
            )
            raise LedgerError(f"no price for {kind} from {provider} ({model})")
        cost = units * price.unit_price
        own = self.persona_cap(persona)
        scopes = scopes_for(self.budgets, kind, cost, user_key, guild, persona=own)
        if scopes:  # committed before the transaction, so the locks below find them
            await self.pool.executemany(
                "INSERT INTO budget_scopes (month, scope) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                [(month, s) for s in scopes],
            )
        values: tuple[Any, ...] = (at, month, kind, provider, model, units, price.unit_price)
        values += (cost, price.id)
        values += (user_key, platform, guild, persona, request_id, "reserved")
        async with self.pool.acquire() as conn, conn.transaction():
            row, caps = await self._reserve_locked(conn, scopes, values, own)
        for cap in caps:
            if cap.used + cap.adding >= cap.limit * self.budgets.alert_fraction:
                await self._alert_once(month, cap.scope, cap.alert)
        return _reservation(row)

    async def _reserve_locked(
        self, conn: Any, scopes: list[str], values: tuple[Any, ...], own: PersonaCap | None
    ) -> tuple[Any, list[Cap]]:
        """Inside the transaction: lock the scopes, check the caps, write the reserved row."""
        _, month, kind, _, _, units, _, cost, _, user_key, _, guild, persona, request_id, _ = values
        if scopes:
            await conn.execute(
                "SELECT 1 FROM budget_scopes WHERE month = $1 AND scope = ANY($2::text[])"
                " ORDER BY scope FOR UPDATE",
                month,
                scopes,
            )
        # Each statement below sees every reservation committed before the locks were granted.
        row = await conn.fetchrow("SELECT * FROM ledger WHERE request_id = $1", request_id)
        if row is not None:
            return row, []  # a retry: the first reservation stands, nothing is charged twice
        caps: list[Cap] = []
        if scopes:
            used = await conn.fetchrow(_USAGE, month, kind, user_key, guild, persona)
            caps = caps_for(
                self.budgets,
                used,
                kind=kind,
                units=units,
                cost=cost,
                user=user_key,
                guild=guild,
                persona=own,
            )
            refused = refusal(self.budgets, caps)
            if refused is not None:
                log.info("refused %s for %s: %s", kind, user_key, refused.user_message)
                raise refused
        row = await conn.fetchrow(_INSERT + " RETURNING *", *values)
        if row is None:  # a concurrent first attempt (not under any cap) won the insert
            row = await conn.fetchrow("SELECT * FROM ledger WHERE request_id = $1", request_id)
        return row, caps

    async def settle(self, request_id: str, units: Decimal | None = None) -> None:
        """The reserved action happened; `units` when it used more or less than reserved."""
        row = await self.pool.fetchrow(
            "UPDATE ledger SET status = 'settled', units = COALESCE($2, units),"
            " cost = COALESCE($2, units) * unit_price, settled_at = $3"
            " WHERE request_id = $1 AND status = 'reserved' RETURNING month, cost",
            request_id,
            units,
            self._clock(),
        )
        if row is None:
            status = await self._status(request_id)
            if status == "released":
                raise LedgerError(f"request {request_id} was released and cannot be settled")
            return  # already settled: a retry
        if row["cost"] > 0:
            await self._global_alerts(row["month"])

    async def release(self, request_id: str) -> None:
        """The reserved action failed or was refused: it costs nothing."""
        done = await self.pool.fetchval(
            "UPDATE ledger SET status = 'released', cost = 0, settled_at = $2"
            " WHERE request_id = $1 AND status = 'reserved' RETURNING id",
            request_id,
            self._clock(),
        )
        if done is None and await self._status(request_id) == "settled":
            log.warning("release of %s ignored: it was already settled", request_id)

    async def expire_reservations(
        self, before: datetime, billed: Callable[[list[str]], Awaitable[set[str]]] | None = None
    ) -> tuple[int, int]:
        """Reservations never settled nor released (a crash between `reserve` and `settle`)
        and made before `before`: the ones `billed` says the provider has a request id for are
        booked as the provider's bill without the member (`<request id>:swept`, settled), and
        every one is released. Returns (booked, released). A scheduled job runs it."""
        rows = await self.pool.fetch(
            "SELECT * FROM ledger WHERE status = 'reserved' AND at < $1 ORDER BY id", before
        )
        if not rows:
            return 0, 0
        charged = await billed([r["request_id"] for r in rows]) if billed else set()
        booked = 0
        for row in rows:
            if row["request_id"] in charged:
                await self.record(
                    kind=row["kind"],
                    provider=row["provider"],
                    model=row["model"],
                    units=row["units"],
                    request_id=f"{row['request_id']}:swept",
                    unit_price=row["unit_price"],
                    platform=row["platform"],
                    guild=row["guild"],
                    persona=row["persona"],
                )
                booked += 1
            await self.release(row["request_id"])
        log.warning(
            "swept %d abandoned reservations (%d booked as the provider's bill)", len(rows), booked
        )
        return booked, len(rows)

    async def _status(self, request_id: str) -> str:
        status = await self.pool.fetchval(
            "SELECT status FROM ledger WHERE request_id = $1", request_id
        )
        if status is None:
            raise LedgerError(f"no ledger row for request {request_id}")
        return str(status)


_INSERT = (
    "INSERT INTO ledger (at, month, kind, provider, model, units, unit_price, cost, price_id,"
    " user_key, platform, guild, persona, request_id, status, settled_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15,"
    " CASE WHEN $15::text = 'settled' THEN $1::timestamptz END)"
    " ON CONFLICT (request_id) DO NOTHING"
)


# A settled row's values as `_INSERT_PRICED` and `record_with` pass them: $1 kind, $2 provider,
# $3 model, $4 at, $5 month, $6 units, $7 user key, $8 platform, $9 guild, $10 persona ($11, the
# request id, is the caller's `request_id`).
_PARAMS = {
    "at": "$4::timestamptz", "month": "$5::date", "kind": "$1::text", "provider": "$2::text",
    "model": "$3::text", "units": "$6::numeric", "user_key": "$7::text", "platform": "$8::text",
    "guild": "$9::text", "persona": "$10::text",
}  # fmt: skip


def _priced_insert(
    request_id: str, rows: str, *, price: str = "price p", values: dict[str, str] = _PARAMS
) -> str:
    """A settled ledger row for each of `rows`, at the price in force that `price` gives as `p`
    (the `price` CTE by default; 0 when there is none), its values from `values`."""
    v = values
    return (
        "INSERT INTO ledger (at, month, kind, provider, model, units, unit_price, cost, price_id,"
        " user_key, platform, guild, persona, request_id, status, settled_at)"
        f" SELECT {v['at']}, {v['month']}, {v['kind']}, {v['provider']}, {v['model']},"
        f" {v['units']}, coalesce(p.unit_price, 0), {v['units']} * coalesce(p.unit_price, 0),"
        f" p.id, {v['user_key']}, {v['platform']}, {v['guild']}, {v['persona']}, {request_id},"
        f" 'settled', {v['at']}"
        f" FROM {rows} LEFT JOIN {price} ON true"
        " ON CONFLICT (request_id) DO NOTHING"
    )


_INSERT_PRICED = (
    f"WITH price AS ({LOOKUP}) "
    + _priced_insert("$11::text", "(VALUES (1)) AS one")
    + " RETURNING price_id, cost"
)


def _shifted(sql: str, shift: int) -> str:
    """`sql` with its parameters renumbered to follow `shift` others ($1 becomes $shift+1)."""
    return re.sub(r"\$(\d+)", lambda m: f"${int(m.group(1)) + shift}", sql)


@functools.cache
def _with_source(source: str, shift: int) -> str:
    """`source` (its parameters $1 to $`shift`) and `_INSERT_PRICED`'s row after it, whose
    request id is the prefix ($11, shifted) followed by the id the source row was given."""
    price = _shifted(LOOKUP, shift)
    charged = _shifted(_priced_insert("$11::text || source.id", "source"), shift)
    return (
        f"WITH source AS ({source}), price AS ({price}),"
        f" charged AS ({charged} RETURNING true AS priced, price_id, cost)"
        " SELECT source.id, charged.priced, charged.price_id, charged.cost"
        " FROM source LEFT JOIN charged ON true"
    )


@functools.cache
def _many_with_source(rows: str, source: str, shift: int) -> str:
    """`record_many_with`'s statement: the rows, their INSERT, and a ledger row for each,
    priced by `LOOKUP` per row (its $1 to $4 read from the row); one row back, with what had
    no price and the months whose spend went up (for the alerts)."""
    by_row = ("c.kind", "c.provider", "c.model", "c.at")  # LOOKUP's $1 to $4
    lookup = re.sub(r"\$(\d+)", lambda m: by_row[int(m.group(1)) - 1], LOOKUP)
    s = [f"${shift + i}" for i in range(1, 11)]
    charged = _priced_insert(
        f"{s[9]}::text || input.id",
        "c JOIN input ON input.n = c.n",
        price=f"LATERAL ({lookup}) p",
        values={column: f"c.{column}" for column in _PARAMS} | {"guild": "NULL"},
    )
    return (
        f"WITH input AS ({rows}), source AS ({source}),"
        f" c AS (SELECT * FROM unnest({s[0]}::text[], {s[1]}::text[], {s[2]}::text[],"
        f" {s[3]}::timestamptz[], {s[4]}::date[], {s[5]}::numeric[], {s[6]}::text[],"
        f" {s[7]}::text[], {s[8]}::text[]) WITH ORDINALITY"
        " AS c(kind, provider, model, at, month, units, user_key, platform, persona, n)),"
        f" charged AS ({charged} RETURNING month, price_id, cost, kind, provider, model)"
        " SELECT array_agg(DISTINCT kind || ' from ' || provider || ' (' || coalesce(model, '')"
        " || ')') FILTER (WHERE price_id IS NULL) AS unpriced,"
        " array_agg(DISTINCT month) FILTER (WHERE cost > 0) AS months FROM charged"
    )


# What a reservation checks its caps against: the bot's, the kind's and the persona's from
# the running totals (migration 0020), the user's and the server's from their own rows.
_USAGE = (
    "SELECT (SELECT COALESCE(sum(cost), 0) FROM ledger_totals WHERE month = $1) AS cost,"
    " (SELECT COALESCE(sum(units), 0) FROM ledger_totals WHERE month = $1 AND kind = $2)"
    " AS kind_units,"
    " (SELECT COALESCE(sum(units), 0) FROM ledger WHERE month = $1 AND user_key = $3"
    " AND kind = $2 AND status <> 'released') AS user_units,"
    " (SELECT COALESCE(sum(units), 0) FROM ledger WHERE month = $1 AND guild = $4"
    " AND kind = $2 AND status <> 'released') AS guild_units,"
    " (SELECT COALESCE(sum(cost), 0) FROM ledger_totals WHERE month = $1 AND persona = $5)"
    " AS persona_cost"
)


def _units(kind: str, units: Decimal | float) -> Decimal:
    """Units as an exact Decimal (a float is taken at its shortest decimal form)."""
    if kind not in KINDS:
        raise ValueError(f"unknown spend kind {kind!r}; one of {', '.join(KINDS)}")
    value = Decimal(str(units)) if isinstance(units, float) else Decimal(units)
    if value < 0:
        raise ValueError("units cannot be negative")
    return value


def _reservation(row: Any) -> Reservation:
    return Reservation(
        request_id=row["request_id"],
        kind=row["kind"],
        units=row["units"],
        unit_price=row["unit_price"],
        cost=row["cost"],
        month=row["month"],
        status=row["status"],
    )
