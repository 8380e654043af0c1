"""Chat through the official `ollama` AsyncClient, with explicit time-outs (its default is none)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import ollama

from bot.brains.base import CallStats, ChatRequest, Chunk
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


def _stats(backend: str, model: str, final: ollama.ChatResponse) -> CallStats:
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


def _why(exc: BaseException) -> str:
    """A short reason for logs and notices; never the raw body, which may echo the prompt."""
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code == 404:
            return "the model is not pulled there"
        return f"it answered HTTP {exc.status_code}"
    if isinstance(exc, httpx.TimeoutException):
        return "it did not answer in time"
    if isinstance(exc, (ConnectionError, httpx.ConnectError, OSError)):
        return "nothing is listening there"
    return type(exc).__name__


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
        self.name = f"ollama:{redact_host(host)}"
        self._keep_alive = keep_alive
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = ollama.AsyncClient(host=host, timeout=timeout)

    def label(self, model: str) -> str:
        return f"{model} on Ollama at {redact_host(self.host)}"

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        started = False
        try:
            parts = await self._client.chat(
                model=request.model,
                messages=request.messages,
                stream=True,
                options=request.options(),
                keep_alive=self._keep_alive,
            )
            async for part in parts:
                text = part.message.content or ""
                if part.done:
                    yield Chunk(text, _stats(self.name, request.model, part))
                    return
                if text:
                    started = True
                    yield Chunk(text)
        except (
            ollama.ResponseError,
            httpx.HTTPError,
            ConnectionError,
            OSError,
            json.JSONDecodeError,
        ) as exc:
            reason = _why(exc)
            log.warning("%s failed for model %s: %s", self.name, request.model, reason)
            if started:
                raise ModelInterrupted(f"{self.name}: {reason}") from exc
            raise ModelUnavailable(f"{self.name}: {reason}") from exc
        error = ModelInterrupted if started else ModelUnavailable
        raise error(f"{self.name}: the stream ended without a final chunk")

    async def ready(self, model: str) -> bool:
        """True once Ollama answers with `model` loaded: an empty chat loads it."""
        try:
            await self._client.chat(model=model, messages=[], keep_alive=self._keep_alive)
        except (ollama.ResponseError, httpx.HTTPError, OSError, json.JSONDecodeError) as exc:
            log.info("%s is not ready for %s: %s", self.name, model, _why(exc))
            return False
        return True

    async def aclose(self) -> None:
        await self._client.close()
