"""Chat with an Ollama server (/api/chat, through bot/brains/http.py), with explicit time-outs."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama
import pydantic

from bot.brains.base import CallStats, ChatRequest, Chunk, RequestRejected, ToolCall
from bot.brains.http import ollama_client
from bot.errors import ModelInterrupted, ModelUnavailable

log = logging.getLogger(__name__)

_NS_PER_MS = 1_000_000


def redact_host(host: str) -> str:
    """The host without any user:password part, fit for logs and notices."""
    parts = urlsplit(host if "://" in host else f"http://{host}")
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    return netloc or host


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / _NS_PER_MS


def call_stats(backend: str, model: str, final: ollama.ChatResponse) -> CallStats:
    """CallStats from Ollama's final chunk (or a whole non-streamed answer)."""
    return CallStats(
        backend=backend,
        model=model,
        prompt_tokens=final.prompt_eval_count,
        completion_tokens=final.eval_count,
        total_ms=_ms(final.total_duration),
        load_ms=_ms(final.load_duration),
        prompt_eval_ms=_ms(final.prompt_eval_duration),
        eval_ms=_ms(final.eval_duration),
        done_reason=final.done_reason,
    )


def _tool_calls(message: ollama.Message) -> tuple[ToolCall, ...]:
    return tuple(
        ToolCall(call.function.name, dict(call.function.arguments or {}))
        for call in message.tool_calls or ()
    )


def _lacks_tools(exc: ollama.ResponseError) -> bool:
    """Ollama's 400 for tools sent to a model whose template has none."""
    return exc.status_code == 400 and "does not support tools" in str(exc.error)


def _request_fault(exc: BaseException) -> bool:
    """An answer that blames the request, not the machine: 400, or 404 (model not pulled)."""
    return isinstance(exc, ollama.ResponseError) and exc.status_code in (400, 404)


# What a call to Ollama can fail with: its HTTP errors, the transport's, and a body that is
# not JSON. `failure_reason()` words each of them.
OLLAMA_ERRORS: tuple[type[BaseException], ...] = (
    ollama.ResponseError,
    httpx.HTTPError,
    OSError,  # ConnectionError among them
    json.JSONDecodeError,
    pydantic.ValidationError,  # JSON that is not of the answer's shape
)


def failure_reason(exc: BaseException, model: str | None = None) -> str:
    """A short reason an Ollama call failed, for logs, records and notices; never the raw
    body, which may echo the prompt. Used by every caller of Ollama (chat, guard, memory)."""
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code == 404:
            return f"{model or 'the model'} is not pulled there"
        return f"it answered HTTP {exc.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return "it did not answer in time"
    if isinstance(exc, (ConnectionError, httpx.ConnectError, OSError)):
        return "nothing is listening there"
    if isinstance(exc, ValueError):  # json.JSONDecodeError and pydantic's ValidationError
        return "it sent an answer that is not JSON"
    return type(exc).__name__


def _chunks(batch: list[ollama.ChatResponse], backend: str, model: str) -> tuple[list[Chunk], bool]:
    """The chunks of the parts one read brought: their text joined, a tool call a chunk of its
    own, the final part's figures on the last chunk; and whether the final part was among them."""
    chunks: list[Chunk] = []
    texts: list[str] = []
    for part in batch:
        text = part.message.content or ""
        calls = _tool_calls(part.message)
        if part.done:
            chunks.append(Chunk("".join(texts) + text, call_stats(backend, model, part), calls))
            return chunks, True
        if calls:
            if texts:
                chunks.append(Chunk("".join(texts)))
                texts = []
            chunks.append(Chunk(text, tool_calls=calls))
        elif text:
            texts.append(text)
    if texts:
        chunks.append(Chunk("".join(texts)))
    return chunks, False


class OllamaBrain:
    def __init__(
        self,
        host: str,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 120.0,
        keep_alive: str | float | None = "10m",
    ) -> None:
        self.host = host
        self._shown = redact_host(host)  # asked for every reply's label
        self.name = f"ollama:{self._shown}"
        self._keep_alive = keep_alive
        self._client = ollama_client(
            host, read_timeout=read_timeout, connect_timeout=connect_timeout
        )
        self._no_tools: set[str] = set()  # models Ollama said take no tools

    def label(self, model: str) -> str:
        return f"{model} on Ollama at {self._shown}"

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        """The reply in chunks: one for each network read of Ollama's stream (the parts that
        arrived together, their text joined), a tool call a chunk of its own, and the final
        chunk with the call's figures."""
        started = False
        tools = list(request.tools) if request.model not in self._no_tools else []
        batches = self._batches(request, tools)
        try:
            try:
                batch = await anext(batches, None)
            except ollama.ResponseError as exc:
                if not tools or not _lacks_tools(exc):
                    raise
                # The model has no tool support (Ollama answers 400): chat without tools.
                log.info("%s: %s takes no tools; asking without them", self.name, request.model)
                self._no_tools.add(request.model)
                await batches.aclose()
                batches = self._batches(request, [])
                batch = await anext(batches, None)
            while batch is not None:
                chunks, done = _chunks(batch, self.name, request.model)
                if done:
                    # Read the stream to its end before the last chunk goes out: a response
                    # closed unread costs its connection, and the next call a new one.
                    await anext(batches, None)
                for chunk in chunks:
                    started = True
                    yield chunk
                if done:
                    return
                batch = await anext(batches, None)
        except OLLAMA_ERRORS as exc:
            reason = failure_reason(exc)
            log.warning("%s failed for model %s: %s", self.name, request.model, reason)
            if started:
                raise ModelInterrupted(f"{self.name}: {reason}") from exc
            if _request_fault(exc):
                raise RequestRejected(f"{self.name}: {reason}") from exc
            raise ModelUnavailable(f"{self.name}: {reason}") from exc
        finally:
            await batches.aclose()
        error = ModelInterrupted if started else ModelUnavailable
        raise error(f"{self.name}: the stream ended without a final chunk")

    def _batches(
        self, request: ChatRequest, tools: list[dict[str, Any]]
    ) -> AsyncGenerator[list[ollama.ChatResponse], None]:
        """Ollama's stream of parts; `stream` closes it when it stops early, which ends the
        HTTP request at once."""
        return self._client.chat_batches(
            model=request.model,
            messages=request.messages,
            tools=tools,
            options=request.options(),
            keep_alive=self._keep_alive,
        )

    async def ready(self, model: str) -> bool:
        """True once Ollama answers with `model` loaded: an empty chat loads it."""
        try:
            await self._client.chat(model=model, messages=[], keep_alive=self._keep_alive)
        except OLLAMA_ERRORS as exc:
            log.info("%s is not ready for %s: %s", self.name, model, failure_reason(exc))
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()
