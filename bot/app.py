"""Wiring: every connection and service is built here and handed down; nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from bot import db
from bot.brains import Brain, BrainRouter
from bot.brains.local import LocalBrain
from bot.brains.ollama_brain import OllamaBrain
from bot.calls import CallLog
from bot.commands import Commands
from bot.config import Settings
from bot.engine import Engine
from bot.errors import PersonaError
from bot.history import History
from bot.notify import AdminNotifier
from bot.personas import PersonaRegistry
from bot.prompts import PromptBuilder
from bot.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclass
class App:
    settings: Settings
    pool: Any
    engine: Engine
    commands: Commands
    scheduler: Scheduler
    notifier: AdminNotifier


def build_brains(settings: Settings) -> list[Brain]:
    brains: list[Brain] = [
        OllamaBrain(
            settings.ollama_host,
            connect_timeout=settings.ollama_connect_timeout,
            read_timeout=settings.ollama_read_timeout,
            keep_alive=settings.ollama_keep_alive,
        )
    ]
    if settings.local_model_enabled:
        brains.append(
            LocalBrain(
                settings.local_model_path,
                threads=settings.local_model_threads,
                context=settings.local_model_context,
                repeat_penalty=settings.local_model_repeat_penalty,
            )
        )
    return brains


def load_personas(settings: Settings) -> PersonaRegistry:
    registry = PersonaRegistry(settings.personas_dir)
    for problem in registry.load_all():
        log.error("%s", problem)
    if not registry.names():
        raise PersonaError(f"no valid personas in {settings.personas_dir}")
    return registry


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, brains: list[Brain] | None = None
) -> AsyncIterator[App]:
    """The whole object graph, started; on exit background work is drained and all is closed."""
    personas = load_personas(settings)
    url = await asyncio.to_thread(db.database_url, settings)
    pool = await db.connect(url, settings.migrations_dir)
    router = BrainRouter(brains if brains is not None else build_brains(settings))
    engine = Engine(
        personas=personas,
        prompts=PromptBuilder(settings.prompts_dir),
        history=History(pool),
        router=router,
        calls=CallLog(pool, keep_prompts=settings.log_prompts),
        default_persona=settings.default_persona,
    )
    scheduler = Scheduler()
    notifier = AdminNotifier()
    watcher = asyncio.create_task(personas.watch(settings.personas_reload_interval))
    scheduler.start()
    try:
        yield App(settings, pool, engine, Commands(engine), scheduler, notifier)
    finally:
        scheduler.shutdown()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await engine.drain()
        await router.aclose()
        await pool.close()
