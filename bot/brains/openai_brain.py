"""Chat with any OpenAI-compatible server (vLLM, llama.cpp's server, LM Studio, a hosted API)
through the official `openai` client (AsyncOpenAI with `base_url`), streamed as server-sent events.

What is sent: the persona's temperature, the reply length (`max_tokens`), the user's fixed
`seed`, and the repeat penalty as `presence_penalty` (the standard parameter closest to
Ollama's: a flat penalty on tokens already present; Ollama's neutral 1.0 maps to OpenAI's
neutral 0.0, 1.1 to 0.1). `stream_options: {include_usage: true}` makes the server send a last
chunk with the token counts, which are booked at the backend's per-token prices. Tools
(draw_image) go as the API's `tools`; streamed `tool_calls` deltas are put back together.

The client retries nothing (`max_retries=0`): the pool decides what happens after a failure.
401/403 (a bad key) and 429 (rate limited, with its Retry-After) raise `BackendRefused`, which
tells the pool how long to rest the backend; the key itself is never logged or put in a message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx
import openai
from pydantic import SecretStr

from bot.brains.base import BackendRefused, CallStats, ChatRequest, Chunk, ToolCall
from bot.brains.ollama_brain import redact_host
from bot.errors import ModelInterrupted, ModelUnavailable

log = logging.getLogger(__name__)

Alert = Callable[[str], Awaitable[object]]
_NO_KEY = "no-key"  # servers without auth (a local vLLM) ignore the header
_RETRY_AFTER_MAX = 3600.0
OPENAI_ERRORS: tuple[type[BaseException], ...] = (
    openai.APIError,
    httpx.HTTPError,
    OSError,
    ValueError,  # a body that is not JSON
)


_REASONS: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], str], ...] = (
    (openai.RateLimitError, "it is rate limiting us (HTTP 429)"),
    ((openai.APITimeoutError, httpx.TimeoutException), "it did not answer in time"),
    ((openai.APIConnectionError, httpx.ConnectError, OSError), "nothing is listening there"),
    (openai.APIError, "it reported an error in the stream"),
    (httpx.HTTPError, "the connection broke"),
)


def failure_reason(exc: BaseException, model: str | None = None) -> str:
    """Why a call failed, in a few words; never the body (it may echo the prompt or key)."""
    if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
        return f"it refused the API key (HTTP {exc.status_code})"
    if isinstance(exc, openai.NotFoundError):
        return f"{model or 'the model'} is not served there (HTTP 404)"
    if isinstance(exc, openai.APIStatusError) and exc.status_code != 429:
        return f"it answered HTTP {exc.status_code}"
    for kinds, reason in _REASONS:
        if isinstance(exc, kinds):
            return reason
    return "it sent an answer that is not JSON"


def retry_after(headers: httpx.Headers) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), capped."""
    try:
        if (ms := headers.get("retry-after-ms")) is not None:
            return min(_RETRY_AFTER_MAX, max(0.0, float(ms) / 1000))
        value = headers.get("retry-after")
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (ValueError, TypeError):
        return None
    return min(_RETRY_AFTER_MAX, max(0.0, seconds))


def presence_penalty(repeat_penalty: float) -> float:
    """Ollama's multiplicative repeat penalty as OpenAI's additive presence penalty."""
    return max(-2.0, min(2.0, round(repeat_penalty - 1.0, 4)))


def to_openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our (Ollama-shaped) turns as chat-completions messages: tool calls get ids and JSON
    string arguments, and each tool result names the call it answers."""
    converted: list[dict[str, Any]] = []
    pending: list[str] = []  # ids of calls not answered yet, in order
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant" and message.get("tool_calls"):
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                call_id = f"call_{index}_{j}"
                function = call.get("function", {})
                arguments = function.get("arguments") or {}
                if not isinstance(arguments, str):
                    arguments = json.dumps(arguments)
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": function.get("name", ""), "arguments": arguments},
                    }
                )
                pending.append(call_id)
            content = message.get("content") or None
            converted.append({"role": "assistant", "content": content, "tool_calls": calls})
        elif role == "tool":
            call_id = pending.pop(0) if pending else f"call_{index}"
            converted.append(
                {"role": "tool", "tool_call_id": call_id, "content": message.get("content", "")}
            )
        else:
            converted.append({"role": role, "content": message.get("content", "")})
    return converted


@dataclass
class _PartialCall:
    name: str = ""
    arguments: str = ""


def _finished_calls(parts: dict[int, _PartialCall]) -> tuple[ToolCall, ...]:
    calls: list[ToolCall] = []
    for _, part in sorted(parts.items()):
        try:
            arguments = json.loads(part.arguments) if part.arguments else {}
        except ValueError:
            log.warning("tool call %s came with arguments that are not JSON", part.name)
            arguments = {}
        calls.append(ToolCall(part.name, arguments if isinstance(arguments, dict) else {}))
    return tuple(calls)


class OpenAIBrain:
    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        api_key: SecretStr | None = None,
        key_source: str | None = None,
        model_ids: dict[str, str] | None = None,
        usd_per_token: tuple[Decimal, Decimal] = (Decimal(0), Decimal(0)),
        connect_timeout: float = 3.0,
        read_timeout: float = 120.0,
        bad_key_rest: float = 3600.0,
        alert: Alert | None = None,
    ) -> None:
        self.url = url
        self.name = name or f"openai:{redact_host(url)}"
        self._model_ids = dict(model_ids or {})
        self._per_in, self._per_out = usd_per_token
        self._key_source = key_source
        self._bad_key_rest = bad_key_rest
        self._alert = alert
        self._alerted = False
        key = api_key.get_secret_value() if api_key is not None else _NO_KEY
        self._client = openai.AsyncOpenAI(
            base_url=url,
            api_key=key,
            max_retries=0,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
        )

    def server_model(self, model: str) -> str:
        """The server's id for a persona's model tag (the tag itself when not mapped)."""
        if model in self._model_ids:
            return self._model_ids[model]
        for tag, served in self._model_ids.items():
            if tag.removesuffix(":latest") == model.removesuffix(":latest"):
                return served
        return model

    def label(self, model: str) -> str:
        return f"{self.server_model(model)} on {self.name} (OpenAI-compatible API)"

    async def stream(self, request: ChatRequest) -> AsyncIterator[Chunk]:
        model = self.server_model(request.model)
        try:
            stream = await self._client.chat.completions.create(**self._params(request, model))
        except OPENAI_ERRORS as exc:
            raise await self._unavailable(exc, model) from exc
        started = False
        parts: dict[int, _PartialCall] = {}
        usage: Any = None
        finish: str | None = None
        try:
            async for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices or ():
                    finish = choice.finish_reason or finish
                    for delta in choice.delta.tool_calls or ():
                        part = parts.setdefault(delta.index, _PartialCall())
                        if delta.function is not None:
                            part.name += delta.function.name or ""
                            part.arguments += delta.function.arguments or ""
                    if choice.delta.content:
                        started = True
                        yield Chunk(choice.delta.content)
        except OPENAI_ERRORS as exc:
            reason = failure_reason(exc, model)
            log.warning("%s failed for model %s: %s", self.name, model, reason)
            error = ModelInterrupted if started else ModelUnavailable
            raise error(f"{self.name}: {reason}") from exc
        finally:
            await stream.close()
        if finish is None and usage is None:
            error = ModelInterrupted if started else ModelUnavailable
            raise error(f"{self.name}: the stream ended without a finish")
        self._alerted = False
        yield Chunk("", self._stats(model, usage, finish), _finished_calls(parts))

    def _params(self, request: ChatRequest, model: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": model,
            "messages": to_openai_messages(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            "presence_penalty": presence_penalty(request.repeat_penalty),
        }
        if request.tools:
            params["tools"] = list(request.tools)
        return params

    def _stats(self, model: str, usage: Any, finish: str | None) -> CallStats:
        priced = bool(self._per_in or self._per_out)
        return CallStats(
            backend=self.name,
            model=model,
            prompt_tokens=getattr(usage, "prompt_tokens", None),
            completion_tokens=getattr(usage, "completion_tokens", None),
            done_reason=finish,
            usd_per_input_token=self._per_in if priced else None,
            usd_per_output_token=self._per_out if priced else None,
        )

    def estimate(self, request: ChatRequest, reply: str) -> CallStats | None:
        """What a call cut off part-way (or closed unread) most likely cost: the provider bills
        the tokens it processed, but such a stream never sends its usage chunk. Counted at 4
        characters a token (like bot/core/prompts.py's estimate), priced like a finished call;
        None for a backend that bills nothing per token."""
        if not (self._per_in or self._per_out):
            return None
        prompt = sum(len(str(m.get("content") or "")) for m in request.messages)
        return CallStats(
            backend=self.name,
            model=self.server_model(request.model),
            prompt_tokens=prompt // 4 + 4 * len(request.messages),
            completion_tokens=(len(reply) + 3) // 4,
            done_reason="cut off: tokens estimated",
            usd_per_input_token=self._per_in,
            usd_per_output_token=self._per_out,
        )

    async def _unavailable(self, exc: BaseException, model: str) -> ModelUnavailable:
        """The error to raise for a failure before the first token (and the alert for a key)."""
        reason = failure_reason(exc, model)
        log.warning("%s failed for model %s: %s", self.name, model, reason)
        message = f"{self.name}: {reason}"
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            await self._alert_bad_key(exc.status_code)
            return BackendRefused(message, rest=self._bad_key_rest)
        if isinstance(exc, openai.RateLimitError):
            return BackendRefused(message, rest=retry_after(exc.response.headers))
        return ModelUnavailable(message)

    async def _alert_bad_key(self, status: int) -> None:
        if self._alerted:
            return
        self._alerted = True
        where = f" (the key is read from {self._key_source})" if self._key_source else ""
        text = (
            f"Backend {self.name} refused its API key with HTTP {status}{where}. It is left"
            f" alone for {self._bad_key_rest / 60:.0f} min at a time until the key is fixed."
        )
        if self._alert is None:
            log.error("%s", text)
            return
        try:
            await self._alert(text)
        except Exception:
            log.exception("could not alert the admins about %s's key", self.name)

    async def served_models(self) -> list[str]:
        """The ids `GET /models` lists; raises ModelUnavailable (or BackendRefused)."""
        try:
            page = await self._client.models.list()
        except OPENAI_ERRORS as exc:
            raise await self._unavailable(exc, "the models list") from exc
        return [m.id for m in page.data]

    async def ready(self, model: str) -> bool:
        """True once the server lists the model (a woken vLLM answers /models when loaded)."""
        try:
            served = await self.served_models()
        except ModelUnavailable as exc:
            log.info("%s is not ready for %s: %s", self.name, model, exc)
            return False
        return self.server_model(model) in served

    async def aclose(self) -> None:
        await self._client.close()
