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
        call_id = await self._pool.fetchval(
            "INSERT INTO model_calls (purpose, backend, model, platform, conversation_id,"
            " user_key, persona, options, prompt_tokens, completion_tokens, total_ms, load_ms,"
            " prompt_eval_ms, eval_ms, ok, error, prompt)"
            " VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9,$10,$11,$12,$13,$14,$15,$16,$17::jsonb)"
            " RETURNING id",
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
        if self._ledger is not None and stats is not None:
            await self._charge(self._ledger, context, stats, purpose, call_id)

    @staticmethod
    async def _charge(
        ledger: Ledger, context: CallContext, stats: CallStats, purpose: str, call_id: int
    ) -> None:
        """The call's tokens in the ledger (unit price from the price table; 0 for our own)."""
        tokens = (stats.prompt_tokens or 0) + (stats.completion_tokens or 0)
        kind = "chat_tokens"
        if "embed" in purpose:
            kind = "embed_tokens"
        elif "guard" in purpose or "moderat" in purpose:
            kind = "moderation_tokens"
        who: dict[str, Any] = {
            "user_key": context.user_key,
            "platform": context.platform,
            "persona": context.persona,
        }
        if stats.priced:  # a backend billed per token: input and output at their own prices
            for part, units, price in (
                ("input", stats.prompt_tokens, stats.usd_per_input_token),
                ("output", stats.completion_tokens, stats.usd_per_output_token),
            ):
                await ledger.record(
                    kind=kind,
                    provider=stats.backend,
                    model=stats.model,
                    units=Decimal(units or 0),
                    unit_price=price or Decimal(0),
                    request_id=f"model_call:{call_id}:{part}",
                    **who,
                )
            return
        await ledger.record(
            kind=kind,
            provider=stats.backend,
            model=stats.model,
            units=Decimal(tokens),
            request_id=f"model_call:{call_id}",
            **who,
        )
