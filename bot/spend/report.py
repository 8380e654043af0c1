"""Reports on the ledger: `python -m bot spend`, `/spend` (admins) and the month's summary.

Reports count settled rows only (money actually spent); in-flight reservations are shown
apart. Totals are summed by PostgreSQL over NUMERIC, so they equal the sum of the rows exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import logging
from dataclasses import dataclass, replace
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from bot.spend.budgets import usd
from bot.spend.ledger import Budgets, BudgetStatus, Ledger, PersonaCaps, month_of
from bot.spend.prices import Prices

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.core.commands import CommandContext, CommandResult, Commands
    from bot.ops.notify import AdminNotifier
    from bot.ops.scheduler import Scheduler

log = logging.getLogger(__name__)

GROUPS = {
    "kind": "kind",
    "provider": "provider",  # the backend's name: its tokens and dollars
    "user": "COALESCE(user_key, '-')",
    "persona": "COALESCE(persona, '-')",
    "day": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
}
SUMMARY_JOB = "ledger-month-summary"


@dataclass(frozen=True)
class Line:
    key: str
    kind: str
    events: int
    units: Decimal
    cost: Decimal


@dataclass(frozen=True)
class Report:
    month: date
    by: str
    lines: list[Line]
    total: Decimal
    reserved: Decimal


def parse_month(text: str) -> date:
    """'2026-11' → date(2026, 11, 1); ValueError otherwise."""
    try:
        return datetime.strptime(text, "%Y-%m").date()
    except ValueError:
        raise ValueError(f"{text!r} is not a month like 2026-11") from None


def previous_month(month: date) -> date:
    return (month - timedelta(days=1)).replace(day=1)


async def month_report(pool: Any, month: date, by: str = "kind") -> Report:
    if by not in GROUPS:
        raise ValueError(f"cannot group by {by!r}; one of {', '.join(GROUPS)}")
    group = GROUPS[by]
    rows = await pool.fetch(
        f"SELECT {group} AS key, kind, count(*) AS events, sum(units) AS units,"
        " sum(cost) AS cost FROM ledger WHERE month = $1 AND status = 'settled'"
        " GROUP BY 1, 2 ORDER BY 1, 2",
        month,
    )
    totals = await pool.fetchrow(
        "SELECT COALESCE(sum(cost) FILTER (WHERE status = 'settled'), 0) AS total,"
        " COALESCE(sum(cost) FILTER (WHERE status = 'reserved'), 0) AS reserved"
        " FROM ledger WHERE month = $1",
        month,
    )
    lines = [Line(r["key"], r["kind"], r["events"], r["units"], r["cost"]) for r in rows]
    return Report(month, by, lines, totals["total"], totals["reserved"])


async def daily_by_kind(pool: Any, month: date) -> dict[str, dict[int, Decimal]]:
    """{kind: {day of month: cost}} of the month's settled rows, for the chart."""
    rows = await pool.fetch(
        "SELECT kind, extract(day FROM at AT TIME ZONE 'UTC')::int AS day, sum(cost) AS cost"
        " FROM ledger WHERE month = $1 AND status = 'settled' GROUP BY 1, 2 ORDER BY 1, 2",
        month,
    )
    days: dict[str, dict[int, Decimal]] = {}
    for row in rows:
        days.setdefault(row["kind"], {})[row["day"]] = row["cost"]
    return days


def money(value: Decimal) -> str:
    """Dollars to a hundredth of a cent: token prices are tiny, images a fraction of a cent."""
    return f"${value.quantize(Decimal('0.0001'))}"


def format_report(report: Report, status: BudgetStatus | None = None) -> str:
    label = report.by
    out = [f"Spend for {report.month:%Y-%m} by {label} (settled, UTC)"]
    if label != "kind":
        out.append(f"{label:<28} {'kind':<18} {'events':>7} {'units':>14} {'cost':>12}")
    else:
        out.append(f"{'kind':<18} {'events':>7} {'units':>14} {'cost':>12}")
    for line in report.lines:
        units = format(line.units.normalize(), "f")
        tail = f"{line.kind:<18} {line.events:>7} {units:>14} {money(line.cost):>12}"
        out.append(f"{line.key:<28} {tail}" if label != "kind" else tail)
    if not report.lines:
        out.append("(nothing spent)")
    out.append(f"total: {money(report.total)}")
    if report.reserved:
        out.append(f"in flight (reserved, not yet spent): {money(report.reserved)}")
    if status is not None and status.cap:
        share = (status.spent / status.cap * 100).quantize(Decimal("1"))
        out.append(
            f"budget: {money(status.spent)} of {usd(status.cap)} ({share}%),"
            f" degrade level {status.level}"
        )
    return "\n".join(out)


@dataclass(frozen=True)
class PersonaLine:
    """One persona's month: its settled rows, and its own cap when it has one."""

    persona: str | None  # None: rows of no persona (a cloud machine's GPU time, shared)
    events: int
    cost: Decimal
    cap: Decimal | None = None
    spent: Decimal | None = None  # reserved and settled, as its cap counts them
    level: int = 0


async def persona_lines(ledger: Ledger, month: date) -> list[PersonaLine]:
    """The month's spend per persona (most first, rows of no persona last), with each one's
    own monthly cap (`budget_usd_month`) and where it stands on the degrade ladder."""
    rows = await ledger.pool.fetch(
        "SELECT persona, count(*) AS events, sum(cost) AS cost FROM ledger"
        " WHERE month = $1 AND status = 'settled'"
        " GROUP BY 1 ORDER BY persona IS NULL, 3 DESC, 1",
        month,
    )
    lines = []
    for row in rows:
        line = PersonaLine(row["persona"], row["events"], row["cost"])
        own = ledger.persona_cap(row["persona"])
        if own is not None:
            spent = await ledger.persona_spent(own.name, month)
            level = ledger.budgets.level_of(spent, own.usd)
            line = replace(line, cap=own.usd, spent=spent, level=level)
        lines.append(line)
    return lines


def format_personas(lines: list[PersonaLine]) -> str:
    out = ["By persona (settled)", f"{'persona':<28} {'events':>7} {'cost':>12}  own budget"]
    for line in lines:
        name = line.persona or "(none: shared GPU time)"
        row = f"{name:<28} {line.events:>7} {money(line.cost):>12}"
        if line.cap is not None and line.spent is not None:
            share = (line.spent / line.cap * 100).quantize(Decimal("1"))
            row += (
                f"  {money(line.spent)} of {usd(line.cap)} ({share}%), degrade level {line.level}"
            )
        out.append(row.rstrip())
    if not lines:
        out.append("(nothing spent)")
    return "\n".join(out)


def report_csv(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["month", report.by, "kind", "events", "units", "cost_usd"])
    for line in report.lines:
        key = line.kind if report.by == "kind" else line.key
        writer.writerow(
            [f"{report.month:%Y-%m}", key, line.kind, line.events, line.units, line.cost]
        )
    return buffer.getvalue()


async def post_month_summary(ledger: Ledger, notifier: AdminNotifier) -> str:
    """The month that just ended, to the admin channel (run at 00:00 UTC on the 1st): the
    total, by kind, and by persona (each with its own cap, when it has one)."""
    month = previous_month(month_of(ledger.now()))
    report = await month_report(ledger.pool, month, "kind")
    status = await ledger.status(month)
    parts = [f"{line.kind} {money(line.cost)}" for line in report.lines]
    text = f"Spend for {month:%Y-%m}: {money(report.total)}"
    if status.cap:
        text += f" of the {usd(status.cap)} budget"
    text += "." + (f" By kind: {', '.join(parts)}." if parts else " Nothing was spent.")
    personas = [
        f"{line.persona} {money(line.cost)}" + (f" of its {usd(line.cap)}" if line.cap else "")
        for line in await persona_lines(ledger, month)
        if line.persona is not None and line.cost > 0
    ]
    if personas:
        text += f" By persona: {', '.join(personas)}."
    await notifier.send(text)
    return text


def schedule_month_summary(scheduler: Scheduler, ledger: Ledger, notifier: AdminNotifier) -> None:
    async def job() -> None:
        await post_month_summary(ledger, notifier)

    scheduler.cron(job, name=SUMMARY_JOB, day=1, hour=0, minute=0)


def register_spend_command(commands: Commands, ledger: Ledger, chart_dir: Path) -> None:
    from bot.core.commands import CommandResult
    from bot.errors import CommandError

    async def spend(context: CommandContext, args: list[str]) -> CommandResult:
        if not context.is_admin:
            raise CommandError("Only an admin can see the spend.")
        if len(args) > 1:
            raise CommandError("Usage: spend [YYYY-MM]")
        try:
            month = parse_month(args[0]) if args else month_of(ledger.now())
        except ValueError:
            raise CommandError("Usage: spend [YYYY-MM], for example spend 2026-11") from None
        report = await month_report(ledger.pool, month, "kind")
        status = await ledger.status(month)
        personas = format_personas(await persona_lines(ledger, month))
        path = await render_month_chart(ledger.pool, month, chart_dir)
        text = f"{format_report(report, status)}\n\n{personas}"
        return CommandResult(text, private=True, attachment=path)

    commands.register("spend", "spend [YYYY-MM]", "the month's spend, with a chart (admins)", spend)


async def render_month_chart(pool: Any, month: date, chart_dir: Path) -> Path:
    from bot.spend.chart import render_daily_chart

    days = await daily_by_kind(pool, month)
    path = chart_dir / f"spend-{month:%Y-%m}.png"
    await asyncio.to_thread(render_daily_chart, month, days, path)
    return path


def add_spend_parser(sub: Any) -> None:
    spend = sub.add_parser("spend", help="what the month cost, from the spend ledger")
    spend.add_argument("--month", type=_month_arg, help="YYYY-MM (default: this month, UTC)")
    spend.add_argument("--by", choices=list(GROUPS), default="kind", help="group rows by")
    spend.add_argument("--csv", action="store_true", help="CSV with exact amounts")


def _month_arg(text: str) -> date:
    try:
        return parse_month(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def spend_cli(
    settings: Settings,
    args: argparse.Namespace,
    out: TextIO,
    *,
    persona_caps: PersonaCaps | None = None,
) -> int:
    from bot import db

    url = await asyncio.to_thread(db.database_url, settings)
    pool = await db.connect(url, settings.migrations_dir, max_size=2)
    try:
        budgets = Budgets.from_settings(settings)
        ledger = Ledger(pool, Prices(pool), budgets=budgets, persona_caps=persona_caps)
        month = args.month or month_of(ledger.now())
        report = await month_report(pool, month, args.by)
        if args.csv:
            out.write(report_csv(report))
        else:
            out.write(format_report(report, await ledger.status(month)) + "\n")
            if args.by == "kind":
                out.write("\n" + format_personas(await persona_lines(ledger, month)) + "\n")
    finally:
        await pool.close()
    return 0
