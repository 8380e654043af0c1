"""Every model call, recorded in `model_calls`, so the ledger and benchmarks can build on it."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from bot.brains.base import CallStats, ChatRequest

if TYPE_CHECKING:
    from bot.spend.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallContext:
    platform: str
    conversation_id: int | None
    user_key: str
    persona: str


class CallLog:
    def __init__(
        self, pool: Any, *, keep_prompts: bool = False, ledger: Ledger | None = None
    ) -> None:
        self._pool = pool
        self._keep_prompts = keep_prompts
        self._ledger = ledger  # every call's tokens become a ledger row (issue 7)

    async def record(
        self,
        context: CallContext,
        request: ChatRequest,
        *,
        backend: str,
        stats: CallStats | None,
        error: str | None = None,
        purpose: str = "chat",
    ) -> None:
        prompt = json.dumps(request.messages) if self._keep_prompts else None
        if self._keep_prompts:
            log.debug("prompt for %s/%s: %s", context.persona, context.user_key, prompt)
        values = (
            purpose,
            backend,
            stats.model if stats else request.model,
            context.platform,
            context.conversation_id,
            context.user_key,
            context.persona,
            json.dumps(request.options()),
            stats.prompt_tokens if stats else None,
            stats.completion_tokens if stats else None,
            stats.total_ms if stats else None,
            stats.load_ms if stats else None,
            stats.prompt_eval_ms if stats else None,
            stats.eval_ms if stats else None,
            error is None,
            error,
            prompt,
        )
        if self._ledger is None or stats is None:
            await self._pool.execute(_INSERT, *values)
        elif stats.priced:
            call_id = await self._pool.fetchval(_INSERT + " RETURNING id", *values)
            await self._charge_priced(self._ledger, context, stats, purpose, call_id)
        else:  # the call and its ledger row in one statement
            await self._ledger.record_with(
                _INSERT + " RETURNING id",
                values,
                kind=_kind(purpose),
                provider=stats.backend,
                model=stats.model,
                units=Decimal((stats.prompt_tokens or 0) + (stats.completion_tokens or 0)),
                request_prefix="model_call:",
                user_key=context.user_key,
                platform=context.platform,
                persona=context.persona,
            )

    @staticmethod
    async def _charge_priced(
        ledger: Ledger, context: CallContext, stats: CallStats, purpose: str, call_id: int
    ) -> None:
        """A call a backend billed per token: input and output at their own prices."""
        for part, units, price in (
            ("input", stats.prompt_tokens, stats.usd_per_input_token),
            ("output", stats.completion_tokens, stats.usd_per_output_token),
        ):
            await ledger.record(
                kind=_kind(purpose),
                provider=stats.backend,
                model=stats.model,
                units=Decimal(units or 0),
                unit_price=price or Decimal(0),
                request_id=f"model_call:{call_id}:{part}",
                user_key=context.user_key,
                platform=context.platform,
                persona=context.persona,
            )


_INSERT = (
    "INSERT INTO model_calls (purpose, backend, model, platform, conversation_id,"
    " user_key, persona, options, prompt_tokens, completion_tokens, total_ms, load_ms,"
    " prompt_eval_ms, eval_ms, ok, error, prompt)"
    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)"
)


def _kind(purpose: str) -> str:
    """The ledger kind of a call's tokens: unit price from the price table, 0 for our own."""
    if "embed" in purpose:
        return "embed_tokens"
    if "guard" in purpose or "moderat" in purpose:
        return "moderation_tokens"
    return "chat_tokens"
