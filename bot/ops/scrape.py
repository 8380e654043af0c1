"""Figures gathered when /metrics is scraped: process state, backends, and what other services
keep in Postgres (the spend ledger, backend sessions, guard verdicts).

`ScrapeCollector` is a prometheus-client custom collector registered in the app's registry.
`refresh()` reads everything (the database asynchronously, under a time-out) just before the web
server renders the registry; `collect()` then yields what was read. Each source is optional: a
table that does not exist (its feature is not installed) or an object without the attribute simply
adds nothing. Reading the tables at scrape time means one replica reports the totals of all, and
nothing is counted twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT = 5.0

TableReader = Callable[[Any], Awaitable[list[Metric]]]


class ScrapeCollector(Collector):
    """The figures read at scrape time, for one app and the runner's adapters."""

    def __init__(self, app: App, adapters: Sequence[Any]) -> None:
        self._app = app
        self._adapters = adapters
        self._families: list[Metric] = []

    async def refresh(self) -> None:
        families = _process(self._app, self._adapters) + _backends(self._app)
        families += await _database(self._app.pool)
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _process(app: App, adapters: Sequence[Any]) -> list[Metric]:
    live = GaugeMetricFamily(
        "personabot_live_conversations", "Conversations with a reply underway."
    )
    live.add_metric([], app.engine.live_conversations)
    connected = GaugeMetricFamily(
        "personabot_adapter_connected",
        "1 when the platform adapter is connected.",
        labels=["adapter"],
    )
    for adapter in adapters:
        flag = getattr(adapter, "connected", None)
        if flag is not None:
            connected.add_metric([adapter.name], int(flag))
    return [live, connected]


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


def _backends(app: App) -> list[Metric]:
    states = GaugeMetricFamily(
        "personabot_backend_state",
        "1 for the state each model backend is in.",
        labels=["backend", "state"],
    )
    breakers = GaugeMetricFamily(
        "personabot_backend_breaker",
        "1 for each backend's circuit breaker state.",
        labels=["backend", "state"],
    )
    woken = CounterMetricFamily(
        "personabot_backend_wakes",
        "Cold starts (wakes) of each backend by this process.",
        labels=["backend"],
    )
    for backend in _backend_objects(app):
        name = str(getattr(backend, "name", type(backend).__name__))
        state = _state_of(backend)
        available = getattr(backend, "available", None)
        if state is None and isinstance(available, bool):
            state = "available" if available else "unavailable"
        states.add_metric([name, state or "ready"], 1)
        breaker = _state_of(getattr(backend, "breaker", None))
        if breaker is not None:
            breakers.add_metric([name, breaker], 1)
        cold_starts = getattr(backend, "cold_starts", None)
        if isinstance(cold_starts, int):
            woken.add_metric([name], cold_starts)
    return [states, breakers, woken]


async def _database(pool: Any) -> list[Metric]:
    up = GaugeMetricFamily("personabot_database_up", "1 when the database answered this scrape.")
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT), pool.acquire() as conn:
            tables = await conn.fetch(
                "SELECT t FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NOT NULL",
                list(_TABLES),
            )
            body: list[Metric] = []
            for row in tables:
                body += await _TABLES[row["t"]](conn)
    except Exception as exc:
        log.warning("metrics: the database did not answer (%s)", type(exc).__name__)
        up.add_metric([], 0)
        return [up]
    up.add_metric([], 1)
    return [up, *body]


async def _ledger(conn: Any) -> list[Metric]:
    rows = await conn.fetch(
        "SELECT kind,"
        " coalesce(sum(cost) FILTER (WHERE status = 'settled'), 0) AS settled,"
        " coalesce(sum(cost) FILTER (WHERE status <> 'released'"
        "   AND month = date_trunc('month', now() AT TIME ZONE 'UTC')::date), 0) AS month"
        " FROM ledger GROUP BY kind ORDER BY kind"
    )
    total = CounterMetricFamily(
        "personabot_spend_dollars",
        "Settled spend in US dollars since the start, by kind.",
        labels=["kind"],
    )
    month = GaugeMetricFamily(
        "personabot_spend_month_dollars",
        "Spend this UTC month (settled and reserved), by kind.",
        labels=["kind"],
    )
    for r in rows:
        total.add_metric([r["kind"]], float(r["settled"]))
        month.add_metric([r["kind"]], float(r["month"]))
    return [total, month]


async def _backend_sessions(conn: Any) -> list[Metric]:
    rows = await conn.fetch(
        "SELECT backend, reason, count(*) AS n, coalesce(sum(gpu_seconds), 0) AS seconds"
        " FROM backend_sessions WHERE stopped_at IS NOT NULL"  # open ones are still counting
        " GROUP BY backend, reason ORDER BY backend, reason"
    )
    wakes = CounterMetricFamily(
        "personabot_backend_sessions",
        "Wake-to-stop sessions of woken backends, by end reason.",
        labels=["backend", "reason"],
    )
    seconds = CounterMetricFamily(
        "personabot_backend_gpu_seconds",
        "Seconds woken backends ran, by backend.",
        labels=["backend"],
    )
    per_backend: dict[str, float] = {}
    for r in rows:
        wakes.add_metric([r["backend"], r["reason"]], r["n"])
        per_backend[r["backend"]] = per_backend.get(r["backend"], 0.0) + float(r["seconds"])
    for backend, total in sorted(per_backend.items()):
        seconds.add_metric([backend], total)
    return [wakes, seconds]


async def _guard_verdicts(conn: Any) -> list[Metric]:
    rows = await conn.fetch(
        "SELECT kind, verdict, blocked, count(*) AS n FROM moderation_verdicts"
        " GROUP BY kind, verdict, blocked ORDER BY kind, verdict, blocked"
    )
    verdicts = CounterMetricFamily(
        "personabot_guard_verdicts",
        "Llama Guard verdicts by check, verdict and whether blocked.",
        labels=["kind", "verdict", "blocked"],
    )
    for r in rows:
        verdicts.add_metric([r["kind"], r["verdict"], str(r["blocked"]).lower()], r["n"])
    return [verdicts]


_TABLES: dict[str, TableReader] = {
    "ledger": _ledger,
    "backend_sessions": _backend_sessions,
    "moderation_verdicts": _guard_verdicts,
}
