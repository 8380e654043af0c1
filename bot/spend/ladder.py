"""The degrade ladder and the month's alerts, mixed into the Ledger (bot/spend/ledger.py).

    level 0   normal
          1   free backends only         (also at the GPU-seconds cap, BUDGET_KIND_CAPS)
          2   the local model only
          3   paid actions refused

The steps come from the fractions in `BUDGET_DEGRADE_AT` of the bot's monthly budget, and for a
persona with its own cap (`budget_usd_month`) of that cap over the persona's rows; a persona's
replies go by the higher of the two. Each alert and degrade notice is sent once per month.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bot.core.together import Together
from bot.spend.budgets import (
    FREE_ONLY,
    LADDER,
    NORMAL,
    Budgets,
    PersonaCap,
    month_of,
    num,
    persona_scope,
    usd,
)

if TYPE_CHECKING:
    from bot.ops.notify import AdminNotifier

log = logging.getLogger(__name__)

# What the ladder weighs, from the running totals (migration 0020) of the months asked, by
# persona: all that counts (reserved and settled), and the GPU seconds of paid backends.
_SPENT = (
    "SELECT month, persona, sum(cost) AS cost,"
    " COALESCE(sum(units) FILTER (WHERE kind = 'gpu_seconds' AND paid), 0) AS gpu_units"
    " FROM ledger_totals WHERE month = ANY($1::date[]) GROUP BY month, persona"
)


@dataclass(frozen=True)
class Spent:
    """A month's spend as the ladder weighs it."""

    cost: Decimal
    gpu_units: Decimal  # of paid backends
    personas: dict[str, Decimal]  # cost by persona ('' for rows of none)


def _spent(rows: list[Any]) -> Spent:
    return Spent(
        sum((r["cost"] for r in rows), Decimal(0)),
        sum((r["gpu_units"] for r in rows), Decimal(0)),
        {r["persona"]: r["cost"] for r in rows},
    )


@dataclass(frozen=True)
class BudgetStatus:
    month: date
    spent: Decimal
    cap: Decimal | None
    level: int


class Ladder:
    """Needs the Ledger's pool, budgets, clock, notifier and `persona_cap`."""

    pool: Any
    budgets: Budgets
    _clock: Callable[[], datetime]
    _notifier: AdminNotifier | None
    persona_cap: Callable[[str | None], PersonaCap | None]  # the Ledger's
    _spending: Together[date, Spent]  # the Ledger's: `_spent_in`, asked together

    async def degrade_level(self, persona: str | None = None) -> int:
        """0 normal, 1 free backends only, 2 local model only, 3 paid actions refused.
        At the GPU-seconds cap (BUDGET_KIND_CAPS), free backends only, whatever the money;
        for a persona with its own cap, at least its own step on the ladder. Asked before
        every reply: a read of the month's running totals (migration 0020), shared by the
        checks made while one is under way; none when no cap is set."""
        own = self.persona_cap(persona)
        gpu_cap = self.budgets.kind_caps.get("gpu_seconds")
        if not self.budgets.monthly_usd and gpu_cap is None and own is None:
            return NORMAL
        month = month_of(self._clock())
        spent = await self._spending(month)
        level = await self._bot_level(month, spent.cost, spent.gpu_units, gpu_cap)
        if own is None:
            return level
        mine = spent.personas.get(own.name, Decimal(0))
        return max(level, await self._persona_level(month, own.name, own.usd, mine))

    async def _spent_in(self, months: list[date]) -> list[Spent]:
        """Each month's spend, the one read of the running totals (the ladder's checks,
        `status`, `persona_spent`), asked together (`bot/core/together.py`): under a burst of
        replies one statement serves the ladder checks of all those waiting."""
        rows = await self.pool.fetch(_SPENT, sorted(set(months)))
        return [_spent([r for r in rows if r["month"] == month]) for month in months]

    async def _persona_level(self, month: date, name: str, cap: Decimal, spent: Decimal) -> int:
        level = self.budgets.level_of(spent, cap)
        if level > NORMAL:
            text = (
                f"Spend: {name} has used {usd(spent)} of its {usd(cap)} monthly budget;"
                f" for {name}, {LADDER[level]}."
            )
            await self._alert_once(month, f"degrade:{persona_scope(name)}:{level}", text)
        return level

    async def persona_spent(self, name: str, month: date) -> Decimal:
        """What the persona's rows cost this month (reserved and settled)."""
        return (await self._spending(month)).personas.get(name, Decimal(0))

    async def _bot_level(
        self, month: date, spent: Decimal, gpu_used: Decimal, gpu_cap: Decimal | None
    ) -> int:
        gpu = await self._gpu_cap_level(month, gpu_used, gpu_cap)
        cap = self.budgets.monthly_usd
        if not cap:
            return gpu
        status = self._budget_status(month, spent)
        if gpu > status.level:
            return gpu
        if status.level > NORMAL:
            text = (
                f"Spend: {usd(status.spent)} of the {usd(status.cap)} monthly budget"
                f" is used; {LADDER[status.level]}."
            )
            await self._alert_once(status.month, f"degrade:{status.level}", text)
        return status.level

    async def _gpu_cap_level(self, month: date, used: Decimal, cap: Decimal | None) -> int:
        if cap is None or used < cap:
            return NORMAL
        text = f"GPU time: {num(used)} of the {num(cap)} GPU seconds for the month are used;"
        await self._alert_once(month, "gpu-cap", f"{text} {LADDER[FREE_ONLY]}.")
        return FREE_ONLY

    async def status(self, month: date | None = None) -> BudgetStatus:
        month = month or month_of(self._clock())
        return self._budget_status(month, (await self._spending(month)).cost)

    def _budget_status(self, month: date, spent: Decimal) -> BudgetStatus:
        return BudgetStatus(month, spent, self.budgets.monthly_usd, self.budgets.level(spent))

    async def _global_alerts(self, month: date) -> None:
        cap = self.budgets.monthly_usd
        if not cap:
            return
        status = await self.status(month)
        if status.spent >= cap * self.budgets.alert_fraction:
            text = f"Spend alert: {usd(status.spent)} of the {usd(cap)} monthly budget is used."
            await self._alert_once(month, "global", text)

    async def _alert_once(self, month: date, scope: str, text: str) -> None:
        first = await self.pool.fetchval(
            "INSERT INTO budget_alerts (month, scope, text) VALUES ($1, $2, $3)"
            " ON CONFLICT DO NOTHING RETURNING true",
            month,
            scope,
            text,
        )
        if first:
            if self._notifier is not None:
                await self._notifier.send(text)
            else:
                log.warning("%s", text)
