"""What every model backend speaks: a chat request in, a stream of text chunks out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot.errors import ModelUnavailable


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
