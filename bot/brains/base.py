"""What every model backend speaks: a chat request in, a stream of text chunks out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from bot.errors import ModelUnavailable

_CHARS_PER_TOKEN = 4  # the rough rule of bot/core/prompts.estimate_tokens
_TOKENS_PER_MESSAGE = 4  # role and separators


class RequestRejected(ModelUnavailable):
    """The backend is fine but refused this request (HTTP 400, the model not pulled there):
    try the next backend, but neither rest nor stop this one."""


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, Any]]  # role and content; tool calls and results (tool_calls)
    temperature: float
    seed: int
    max_tokens: int
    context_window: int
    repeat_penalty: float = 1.1
    tools: tuple[dict[str, Any], ...] = ()  # Ollama tool schemas offered (draw_image)

    def options(self) -> dict[str, Any]:
        """Ollama's `options` for this request."""
        return {
            "temperature": self.temperature,
            "seed": self.seed,
            "num_predict": self.max_tokens,
            "num_ctx": self.context_window,
            "repeat_penalty": self.repeat_penalty,
        }

    def context_needed(self) -> int:
        """Tokens this request needs: its prompt (estimated from characters) and the reply."""
        prompt = 0
        for message in self.messages:
            content = message.get("content") or ""
            text = content if isinstance(content, str) else str(content)
            prompt += len(text) // _CHARS_PER_TOKEN + _TOKENS_PER_MESSAGE
        return prompt + self.max_tokens


@dataclass
class CallStats:
    """What a finished call cost, from Ollama's final chunk or counted locally."""

    backend: str
    model: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_ms: float | None = None
    load_ms: float | None = None
    prompt_eval_ms: float | None = None
    eval_ms: float | None = None
    done_reason: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # A backend billed per token (kind: openai with a cost): dollars per input/output token.
    usd_per_input_token: Decimal | None = None
    usd_per_output_token: Decimal | None = None
    # Of `prompt_tokens`, those the model took from its prompt cache (the longest beginning it
    # had already evaluated) instead of evaluating again. Newer Ollama servers report it as
    # `prompt_eval_cached_count`, but the official client's answer types (0.6), which
    # bot/brains/http.py parses into, drop fields they do not declare, so only the local model
    # fills it. None: the backend does not say. Not a column of model_calls; for benches.
    prompt_cached_tokens: int | None = None

    @property
    def priced(self) -> bool:
        return bool(self.usd_per_input_token or self.usd_per_output_token)

    @property
    def prompt_evaluated_tokens(self) -> int | None:
        """Prompt tokens the model actually evaluated for this call (the rest came from its
        prompt cache); None when the backend reports no cache figure."""
        if self.prompt_tokens is None or self.prompt_cached_tokens is None:
            return None
        return self.prompt_tokens - self.prompt_cached_tokens


@dataclass(frozen=True)
class ToolCall:
    """The model asked for a tool (Ollama's `message.tool_calls[].function`)."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class Chunk:
    """A piece of the reply; the last one carries `stats` and may have empty text."""

    text: str
    stats: CallStats | None = None
    tool_calls: tuple[ToolCall, ...] = ()


class Brain(Protocol):
    name: str

    def label(self, model: str) -> str:
        """Human-readable 'which model answered', e.g. 'llama3.2:3b on ollama at host'."""
        ...

    def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        """Yield the reply. Raise ModelUnavailable before the first chunk if this backend
        cannot answer, ModelInterrupted if it fails part-way."""
        ...

    async def aclose(self) -> None: ...


class BackendRefused(ModelUnavailable):
    """The backend refused before the first token for a reason that says how long to leave it
    alone: a bad key (401/403: long, and the admins are told) or a rate limit (429: as long as
    its Retry-After says). `rest` is seconds; None means the breaker's usual back-off."""

    def __init__(self, message: str, *, rest: float | None = None) -> None:
        super().__init__(message)
        self.rest = rest
