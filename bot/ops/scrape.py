"""Samples gathered when /metrics is scraped: process state, backends, and what other services
keep in Postgres (the spend ledger, backend sessions, guard verdicts).

Each source is optional: a table that does not exist (its feature is not installed) or an object
without the attribute simply adds nothing. Reading the tables at scrape time means one replica
reports the totals of all, and nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from bot.ops.metrics import header, sample

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 5.0

TableReader = Callable[[Any], Awaitable[list[str]]]


async def scrape(app: App, adapters: Sequence[Any]) -> list[str]:
    lines = _process(app, adapters) + _backends(app)
    lines += await _database(app.pool)
    return lines


def _process(app: App, adapters: Sequence[Any]) -> list[str]:
    lines = header("personabot_live_conversations", "gauge", "Conversations with a reply underway.")
    lines.append(sample("personabot_live_conversations", {}, app.engine.live_conversations))
    lines += header(
        "personabot_adapter_connected", "gauge", "1 when the platform adapter is connected."
    )
    for adapter in adapters:
        connected = getattr(adapter, "connected", None)
        if connected is not None:
            lines.append(
                sample("personabot_adapter_connected", {"adapter": adapter.name}, int(connected))
            )
    return lines


def _state_of(obj: Any) -> str | None:
    state = getattr(obj, "state", None)
    if callable(state):
        return None  # an async query (a Fly machine's state) is not run from a scrape
    return state if isinstance(state, str) else None


def _backend_objects(app: App) -> list[Any]:
    """The backend pool's backends (issue 6), then the router's plain brains (the local model)."""
    router = app.engine.router
    found: list[Any] = []
    for holder in (getattr(router, "pool", None), getattr(app, "backends", None)):
        backends = getattr(holder, "backends", None)
        if isinstance(backends, list | tuple):
            found = list(backends)
            break
    return found + list(getattr(router, "brains", []))


def _backends(app: App) -> list[str]:
    state_name, breaker_name = "personabot_backend_state", "personabot_backend_breaker"
    wakes = "personabot_backend_wakes_total"
    states = header(state_name, "gauge", "1 for the state each model backend is in.")
    breakers = header(breaker_name, "gauge", "1 for each backend's circuit breaker state.")
    woken = header(wakes, "counter", "Cold starts (wakes) of each backend by this process.")
    for backend in _backend_objects(app):
        name = str(getattr(backend, "name", type(backend).__name__))
        state = _state_of(backend)
        available = getattr(backend, "available", None)
        if state is None and isinstance(available, bool):
            state = "available" if available else "unavailable"
        states.append(sample(state_name, {"backend": name, "state": state or "ready"}, 1))
        breaker = _state_of(getattr(backend, "breaker", None))
        if breaker is not None:
            breakers.append(sample(breaker_name, {"backend": name, "state": breaker}, 1))
        cold_starts = getattr(backend, "cold_starts", None)
        if isinstance(cold_starts, int):
            woken.append(sample(wakes, {"backend": name}, cold_starts))
    return states + breakers + woken


async def _database(pool: Any) -> list[str]:
    lines = header("personabot_database_up", "gauge", "1 when the database answered this scrape.")
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT), pool.acquire() as conn:
            tables = await conn.fetch(
                "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                list(_TABLES),
            )
            body: list[str] = []
            for row in tables:
                body += await _TABLES[row["t"]](conn)
    except Exception as exc:
        log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
        return [*lines, sample("personabot_database_up", {}, 0)]
    return [*lines, sample("personabot_database_up", {}, 1), *body]


async def _ledger(conn: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT kind,"
        " coalesce(sum(cost) FILTER (WHERE status = 'settled'), 0) AS settled,"
        " coalesce(sum(cost) FILTER (WHERE status <> 'released'"
        "   AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0) AS month"
        " FROM ledger GROUP BY kind ORDER BY kind"
    )
    total = "personabot_spend_dollars_total"
    month = "personabot_spend_month_dollars"
    lines = header(total, "counter", "Settled spend in US dollars since the start, by kind.")
    lines += [sample(total, {"kind": r["kind"]}, float(r["settled"])) for r in rows]
    lines += header(month, "gauge", "Spend this UTC month (settled and reserved), by kind.")
    lines += [sample(month, {"kind": r["kind"]}, float(r["month"])) for r in rows]
    return lines


async def _backend_sessions(conn: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT backend, reason, count(*) AS n, coalesce(sum(gpu_seconds), 0) AS seconds"
        " FROM backend_sessions WHERE stopped_at IS NOT NULL"  # open ones are still counting
        " GROUP BY backend, reason ORDER BY backend, reason"
    )
    wakes = "personabot_backend_sessions_total"
    seconds = "personabot_backend_gpu_seconds_total"
    lines = header(wakes, "counter", "Wake-to-stop sessions of woken backends, by end reason.")
    lines += [sample(wakes, {"backend": r["backend"], "reason": r["reason"]}, r["n"]) for r in rows]
    lines += header(seconds, "counter", "Seconds woken backends ran, by backend.")
    per_backend: dict[str, float] = {}
    for r in rows:
        per_backend[r["backend"]] = per_backend.get(r["backend"], 0.0) + float(r["seconds"])
    lines += [sample(seconds, {"backend": b}, s) for b, s in sorted(per_backend.items())]
    return lines


async def _guard_verdicts(conn: Any) -> list[str]:
    rows = await conn.fetch(
        "SELECT kind, verdict, blocked, count(*) AS n FROM moderation_verdicts"
        " GROUP BY kind, verdict, blocked ORDER BY kind, verdict, blocked"
    )
    name = "personabot_guard_verdicts_total"
    lines = header(name, "counter", "Llama Guard verdicts by check, verdict and whether blocked.")
    for r in rows:
        labels = {"kind": r["kind"], "verdict": r["verdict"], "blocked": str(r["blocked"]).lower()}
        lines.append(sample(name, labels, r["n"]))
    return lines


_TABLES: dict[str, TableReader] = {
    "ledger": _ledger,
    "backend_sessions": _backend_sessions,
    "moderation_verdicts": _guard_verdicts,
}
