"""The operations endpoint of `python -m bot run` (aiohttp): `/healthz` and `/metrics`.

    GET /healthz   200 {"status": "ok", ...} when the database answers and every adapter is
                   connected; 503 with the same shape, naming what is wrong, otherwise
    GET /metrics   Prometheus text format: what the process counts (bot/core/metrics.py) plus what
                   other services keep in Postgres, read at scrape time (bot/ops/scrape.py)

Read-only: nothing here changes state. Bound to WEB_HOST:WEB_PORT (127.0.0.1:8080 by default;
the container sets 0.0.0.0 so Fly's health checks and metrics scraper can reach it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from bot.ops.scrape import ScrapeCollector

if TYPE_CHECKING:
    from bot.app import App

log = logging.getLogger(__name__)

DB_TIMEOUT = 3.0


def adapter_state(adapter: Any) -> str:
    """'connected', 'disconnected', or 'unknown' for an adapter without a `connected` flag."""
    connected = getattr(adapter, "connected", None)
    if connected is None:
        return "unknown"
    return "connected" if connected else "disconnected"


async def database_ok(pool: Any) -> bool:
    try:
        async with asyncio.timeout(DB_TIMEOUT):
            return bool(await pool.fetchval("SELECT 1") == 1)
    except Exception as exc:
        log.warning("health check: the database did not answer (%s)", type(exc).__name__)
        return False


class WebServer:
    """Serves /healthz and /metrics for one app; `adapters` is the runner's list."""

    def __init__(
        self, app: App, *, host: str, port: int, adapters: Sequence[Any] | None = None
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.adapters: list[Any] = list(adapters or [])
        self._runner: web.AppRunner | None = None
        # The figures read at scrape time join the app's registry while this server runs.
        self._scrape = ScrapeCollector(app, self.adapters)
        self._scraping = False

    def _web_app(self) -> web.Application:
        web_app = web.Application()
        web_app.router.add_get("/healthz", self.healthz)
        web_app.router.add_get("/metrics", self.metrics)
        return web_app

    async def start(self) -> None:
        self.app.metrics.registry.register(self._scrape)
        self._scraping = True
        self._runner = web.AppRunner(self._web_app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self._runner.addresses:
            self.port = int(self._runner.addresses[0][1])
        log.info("health and metrics on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self._scraping:
            self.app.metrics.registry.unregister(self._scrape)
            self._scraping = False
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def health(self) -> tuple[bool, dict[str, Any]]:
        db = await database_ok(self.app.pool)
        adapters = {a.name: adapter_state(a) for a in self.adapters}
        healthy = db and "disconnected" not in adapters.values()
        problems = [] if db else ["the database does not answer"]
        problems += [
            f"{name} is not connected" for name, s in adapters.items() if s == "disconnected"
        ]
        report = {
            "status": "ok" if healthy else "unhealthy",
            "database": "ok" if db else "unreachable",
            "adapters": adapters,
            "problems": problems,
        }
        return healthy, report

    async def healthz(self, request: web.Request) -> web.Response:
        healthy, report = await self.health()
        return web.json_response(report, status=200 if healthy else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        await self._scrape.refresh()
        return web.Response(
            body=self.app.metrics.render(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )
