"""`python -m bot run`: start every configured adapter, stop them all cleanly on SIGTERM/SIGINT.

Each platform module offers a factory `(App) -> Adapter | None` that returns None when its
platform is not configured; `ADAPTER_FACTORIES` lists them. An adapter may expose a `fatal`
asyncio.Event: once set, everything stops and `run` returns 1, so a container restarts.
Stopping gives each adapter `SHUTDOWN_GRACE` seconds to finish replies in flight (or tell
their users they were cut off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Sequence
from typing import Protocol

from bot.app import App, running_app
from bot.config import Settings
from bot.errors import ConfigError
from bot.ops.web import WebServer

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 20.0


class Adapter(Protocol):
    name: str

    async def start(self) -> None:
        """Connect and begin handling events; return once running."""
        ...

    async def stop(self) -> None:
        """Stop taking new messages; finish or cut off replies in flight; disconnect."""
        ...


AdapterFactory = Callable[[App], "Adapter | None"]


def adapter_factories() -> list[AdapterFactory]:
    """Platform factories, imported lazily so an unused platform's library is never loaded."""
    return [_discord, _matrix]


def _discord(app: App) -> Adapter | None:
    from bot.adapters.discord.adapter import create

    return create(app)


def _matrix(app: App) -> Adapter | None:
    from bot.adapters.matrix.adapter import create

    return create(app)


async def run(
    settings: Settings,
    stop: asyncio.Event | None = None,
    *,
    factories: Sequence[AdapterFactory] | None = None,
) -> int:
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with running_app(settings) as app:
        chosen = adapter_factories() if factories is None else factories
        adapters = [a for f in chosen if (a := f(app)) is not None]
        if not adapters:
            raise ConfigError(
                "no chat platform is configured: set DISCORD_TOKEN, or MATRIX_HOMESERVER with "
                "MATRIX_USER_ID and a password or access token. For the terminal, use "
                "`python -m bot chat`."
            )
        web = await _start_web(app, adapters)
        started: list[Adapter] = []
        try:
            for adapter in adapters:
                await adapter.start()
                started.append(adapter)
                log.warning("%s adapter running", adapter.name)
            failed = await _until_stopped(stop, adapters)
            log.warning("stopping: finishing replies in flight")
        finally:
            await _stop_all(started)
            if web is not None:
                await web.stop()
    return 1 if failed else 0


async def _until_stopped(stop: asyncio.Event, adapters: Sequence[Adapter]) -> bool:
    """Wait for a signal, or for an adapter whose `fatal` event says it cannot go on (the
    Discord gateway closed for good); True in that case, so the process exits non-zero."""
    fatal = [e for a in adapters if isinstance(e := getattr(a, "fatal", None), asyncio.Event)]
    waits = [asyncio.ensure_future(event.wait()) for event in (stop, *fatal)]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return any(event.is_set() for event in fatal)


async def _start_web(app: App, adapters: list[Adapter]) -> WebServer | None:
    """/healthz and /metrics (bot/ops/web.py); it reports the adapters' `connected` flags."""
    if not app.settings.web_enabled:
        return None
    host, port = app.settings.web_host, app.settings.web_port
    web = WebServer(app, host=host, port=port, adapters=adapters)
    try:
        await web.start()
    except OSError as exc:
        await web.stop()
        raise ConfigError(
            f"cannot serve /healthz and /metrics on {host}:{port} ({exc.strerror or exc}): "
            "set WEB_PORT to a free port, or WEB_ENABLED=false"
        ) from exc
    return web


async def _stop_all(adapters: list[Adapter]) -> None:
    async def stop_one(adapter: Adapter) -> None:
        try:
            await asyncio.wait_for(adapter.stop(), SHUTDOWN_GRACE)
        except Exception:
            log.exception("%s adapter did not stop cleanly", adapter.name)

    await asyncio.gather(*(stop_one(a) for a in adapters))
