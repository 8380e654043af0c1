"""Llama Guard in the pipeline, built: the guard as configured, and its check of memories.

The pipeline half of moderation (the input gate, the output screen, the refusal and the notices)
lives in bot/core/moderation.py and knows the guard only as a `GuardPort`; this module makes the
real guard (bot/safety/guard.py) and hands it over, from bot/app.py.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from bot.config import Settings
from bot.core.calls import CallLog
from bot.core.moderation import Moderation
from bot.core.personas import Persona
from bot.core.verdicts import Where
from bot.errors import ModelUnavailable
from bot.ops.notify import AdminNotifier
from bot.safety.guard import Guard


class Said(Protocol):
    """Where a fact was learned (memory's Exchange has these)."""

    platform: str
    conversation_id: int | None
    user_key: str
    persona: str


def fact_vetter(
    guard: Guard, persona_named: Callable[[str | None], Persona]
) -> Callable[[str, Any], Awaitable[bool]]:
    """Judges a fact extracted for memory as the user's input would be, for the persona that
    heard it: True keeps it. No verdict raises ModelUnavailable, so the job waits for later."""

    async def vet(text: str, exchange: Said) -> bool:
        where = Where(exchange.platform, None, exchange.conversation_id, exchange.user_key)
        persona = persona_named(exchange.persona)
        verdict = await guard.judge("memory", text, persona=persona, where=where)
        if verdict.unknown:
            raise ModelUnavailable(f"the guard gave no verdict on a fact ({verdict.reason})")
        return verdict.safe

    return vet


def build_moderation(
    settings: Settings, pool: Any, calls: CallLog, notifier: AdminNotifier | None
) -> tuple[Moderation, Guard]:
    """The guard as configured (GUARD_*), on GUARD_HOST or else OLLAMA_HOST, and the pipeline's
    moderation around it."""
    guard = Guard(
        pool=pool,
        calls=calls,
        host=settings.guard_host or settings.ollama_host,
        model=settings.guard_model,
        timeout=settings.guard_timeout,
        connect_timeout=settings.ollama_connect_timeout,
        keep_alive=settings.ollama_keep_alive,
        fail_policy=settings.guard_fail_policy.for_platform,
        notifier=notifier,
        alerts=settings.guard_alerts,
        keep_text=settings.guard_keep_text,
        enabled=settings.guard_enabled,
        context=settings.guard_context,
    )
    moderation = Moderation(
        guard, prompts_dir=settings.prompts_dir, stream_mode=settings.guard_stream_mode
    )
    return moderation, guard
