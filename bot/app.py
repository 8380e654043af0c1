"""Wiring: every connection and service is built here and handed down; nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from bot import db
from bot.brains import Brain, BrainRouter
from bot.brains.build import build_pool
from bot.brains.local import LocalBrain
from bot.brains.ollama_brain import OllamaBrain
from bot.brains.pool import BackendPool
from bot.brains.sessions import SessionBook
from bot.brains.supervisor import OnFailure
from bot.config import Settings
from bot.core.calls import CallLog
from bot.core.commands import Commands
from bot.core.engine import Engine
from bot.core.history import History
from bot.core.metrics import Metrics
from bot.core.persona_files import PersonaRegistry
from bot.core.prompts import PromptBuilder
from bot.errors import PersonaError
from bot.images.audit import build_fal_audit
from bot.images.commands import register_imagine_command
from bot.images.draw_tool import DrawTool
from bot.images.service import ImageService, build_images
from bot.memory.commands import register as register_memory_commands
from bot.memory.service import Memory, build_memory
from bot.ops.notify import AdminNotifier
from bot.ops.scheduler import Scheduler
from bot.safety.guard import Guard
from bot.safety.moderation import build_moderation, fact_vetter
from bot.spend.ledger import Budgets, Ledger
from bot.spend.prices import Prices
from bot.spend.ratelimit import Buckets
from bot.spend.report import register_spend_command, schedule_month_summary

log = logging.getLogger(__name__)

_RATE_BUCKET_IDLE = 86400.0  # a persona's bucket untouched for a day is full: forgotten


@dataclass
class App:
    settings: Settings
    pool: Any
    engine: Engine
    commands: Commands
    scheduler: Scheduler
    notifier: AdminNotifier
    memory: Memory | None = None  # long-term memory (issue 5)
    ledger: Ledger | None = None  # spend ledger (issue 7); always set by running_app
    backends: BackendPool | None = None  # backend pool (issue 6); `prewake(model)` on typing
    images: ImageService | None = None  # /imagine with Fal Flux (issue 8)

    guard: Guard | None = None  # Llama Guard (issue 4): `judge(...)`, `check_image_prompt(...)`

    @property
    def metrics(self) -> Metrics:
        """Counters and histograms for /metrics (bot/ops/web.py), for the engine and scheduler."""
        return self.engine.metrics


def worker_failures(metrics: Metrics) -> OnFailure:
    """Counts a lost local model worker on /metrics."""

    def count(worker: str, cause: str) -> None:
        metrics.local_worker_crashes.inc(worker=worker, cause=cause)

    return count


def build_brains(
    settings: Settings, *, with_ollama: bool = True, metrics: Metrics | None = None
) -> list[Brain]:
    """Plain brains tried in order: Ollama at OLLAMA_HOST (unless the pool has it), then local."""
    brains: list[Brain] = []
    if with_ollama:
        brains.append(
            OllamaBrain(
                settings.ollama_host,
                connect_timeout=settings.ollama_connect_timeout,
                read_timeout=settings.ollama_read_timeout,
                keep_alive=settings.ollama_keep_alive,
            )
        )
    if settings.local_model_enabled:
        brains.append(
            LocalBrain(
                settings.local_model_path,
                threads=settings.local_model_threads,
                context=settings.local_model_context,
                repeat_penalty=settings.local_model_repeat_penalty,
                worker_command=settings.local_model_worker_command,
                worker_timeout=settings.local_model_worker_timeout,
                on_failure=worker_failures(metrics) if metrics is not None else None,
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


def _schedule_image_jobs(
    scheduler: Scheduler, settings: Settings, pool: Any, ledger: Ledger, images: ImageService
) -> None:
    scheduler.every(600, images.sweep, name="spend-sweep")  # what a crash left reserved
    audit = build_fal_audit(settings, pool, ledger)
    if audit is not None:  # what Fal ran that the bot never saw (a retried submit)
        scheduler.every(settings.fal_audit_interval, audit.run, name="fal-audit")


def own_budgets(personas: PersonaRegistry) -> Callable[[str], Decimal | None]:
    """Each persona's own monthly cap (`budget_usd_month`), read at each use (hot reload)."""

    def cap(name: str) -> Decimal | None:
        persona = personas.find(name)
        return persona.budget_usd_month if persona is not None else None

    return cap


def display_names(personas: PersonaRegistry) -> Callable[[str], str]:
    """What members call each persona (its display name; its name once it is gone)."""

    def shown(name: str) -> str:
        persona = personas.find(name)
        return persona.display_name if persona is not None else name

    return shown


def _persona_rates(pool: Any, scheduler: Scheduler) -> Buckets:
    """Personas' own rate limits per member (issue 21), their idle buckets pruned hourly."""
    rates = Buckets(pool)

    async def prune() -> None:
        await rates.prune("persona:", _RATE_BUCKET_IDLE)

    scheduler.every(3600, prune, name="persona-rate-prune")
    return rates


def _wire_memory(memory: Memory, engine: Engine, guard: Guard | None) -> None:
    """New facts pass the input guard when it is on; extraction waits for a moment without
    replies (bot/core/background.py, `Quiet`), and writes its calls' records in the engine's
    background, which the drain waits for (not holding one of its slots meanwhile)."""
    if guard is not None:
        memory.vet = fact_vetter(guard, engine.persona_named)
    memory.quiet = engine.quiet.wait
    memory.spawn = memory.extractor.spawn = engine.spawn


async def _resume_memory(memory: Memory) -> None:
    await memory.resume()


@contextlib.asynccontextmanager
async def running_app(
    settings: Settings, *, brains: list[Brain] | None = None
) -> AsyncIterator[App]:
    """The whole object graph, started; on exit background work is drained and all is closed."""
    personas = load_personas(settings)
    url = await asyncio.to_thread(db.database_url, settings)
    pool = await db.connect(url, settings.migrations_dir)
    notifier = AdminNotifier()
    metrics = Metrics()
    ledger = Ledger(
        pool,
        Prices(pool),
        budgets=Budgets.from_settings(settings),
        notifier=notifier,
        persona_caps=own_budgets(personas),
        persona_names=display_names(personas),
    )
    # Tests may pass their own brains; otherwise the backend pool (issue 6), then the local model.
    sessions = SessionBook(pool, ledger)
    backends = (
        build_pool(settings, sessions=sessions, alert=notifier.send) if brains is None else None
    )
    router = BrainRouter(
        brains
        if brains is not None
        else build_brains(settings, with_ollama=False, metrics=metrics),
        backends,
        degrade=ledger.degrade_level,
        queue_wait=settings.backend_queue_wait,
    )
    calls = CallLog(pool, keep_prompts=settings.log_prompts, ledger=ledger)
    memory = build_memory(settings, pool, calls, on_worker_failure=worker_failures(metrics))
    moderation, guard = build_moderation(settings, pool, calls, notifier)  # Llama Guard
    engine = Engine(
        personas=personas,
        prompts=PromptBuilder(settings.prompts_dir),
        history=History(pool),
        router=router,
        calls=calls,
        default_persona=settings.default_persona,
        metrics=metrics,
        memory=memory,
        moderation=moderation,
    )
    _wire_memory(memory, engine, guard if moderation.active else None)
    scheduler = Scheduler(pool, metrics=engine.metrics)  # pool: jobs run once across replicas
    schedule_month_summary(scheduler, ledger, notifier)
    commands = Commands(engine)
    register_memory_commands(commands, memory)
    register_spend_command(commands, ledger, settings.data_dir / "reports")
    images = build_images(settings, pool, ledger, guard=guard)
    register_imagine_command(commands, images)
    _schedule_image_jobs(scheduler, settings, pool, ledger, images)
    engine.drawing = DrawTool(images)  # the chat model's draw_image tool, when FAL_KEY is set
    engine.rates = _persona_rates(pool, scheduler)
    watcher = asyncio.create_task(personas.watch(settings.personas_reload_interval))
    if memory.enabled:  # exchanges a stopped process left unprocessed, then every 10 min
        engine.spawn(_resume_memory(memory))
        scheduler.every(600, memory.resume, name="memory-jobs")
    if backends is not None and not all(b.driver.always_on for b in backends.backends):
        engine.spawn(sessions.push_pending())  # GPU time a failed ledger write left unbooked
        scheduler.every(  # local: each process renews its own leases; stops need a claim
            settings.backend_idle_check_interval,
            backends.idle_check,
            name="backends-idle-stop",
            local=True,
        )
        scheduler.every(60, backends.book, name="backends-book")  # GPU time while it runs
        scheduler.every(300, backends.reconcile, name="backends-reconcile")
    scheduler.start()
    try:
        yield App(
            settings,
            pool,
            engine,
            commands,
            scheduler,
            notifier,
            memory=memory,
            ledger=ledger,
            backends=backends,
            images=images,
            guard=guard,
        )
    finally:
        scheduler.shutdown()
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await engine.drain()
        await moderation.aclose()
        await memory.aclose()
        await images.close()
        await router.aclose()
        await pool.close()
