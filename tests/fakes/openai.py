"""A loopback fake of an OpenAI-compatible chat completions server (a hosted API, vLLM, llama.cpp's
server), driven in tests through the official `openai` client (AsyncOpenAI with `base_url`).

Wire format, from the OpenAI API reference and the client that parses it (openai-python 2.x,
`openai/_streaming.py`, `openai/_base_client.py`):

* ``POST /v1/chat/completions`` with ``stream: true`` answers ``text/event-stream``: one
  ``data: {chat.completion.chunk}`` event per piece, then ``data: [DONE]``. The first chunk's
  delta carries ``role: assistant``; text comes as ``delta.content``; the last choice chunk has an
  empty delta and ``finish_reason`` (``stop``, ``length`` or ``tool_calls``).
* ``stream_options: {include_usage: true}``: every chunk carries ``usage: null`` and one more
  chunk before ``[DONE]`` has ``choices: []`` and the request's ``usage`` (prompt, completion
  and total tokens) — "ChatCompletionStreamOptions" in the OpenAPI spec.
* Tool calls stream as ``delta.tool_calls`` fragments keyed by ``index``: the first has ``id``,
  ``type: function`` and ``function.name`` with empty ``arguments``; later ones append pieces of
  the JSON ``arguments`` string.
* An error mid-stream is an event ``data: {"error": {...}}``; the client raises ``APIError``.
* Errors before the stream are JSON ``{"error": {"message", "type", "param", "code"}}`` with
  the HTTP status: 401 ``invalid_api_key`` when the ``Authorization: Bearer`` key is wrong,
  404 ``model_not_found``, 429 ``rate_limit_exceeded`` with ``retry-after`` (seconds) and the
  non-standard ``retry-after-ms`` OpenAI also sends.
* ``GET /v1/models`` lists ``{"object": "list", "data": [{"id", "object": "model", "created",
  "owned_by"}]}``.

Token counts are words and punctuation (not a real tokenizer, but the same count for the same
text, so tests can compute the price). Requests are recorded with the key left out.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from tests.fakes.loopback import serve
from tests.fakes.ollama import split_into_chunks

__all__ = ["FakeOpenAI"]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    return len(_TOKEN_RE.findall(text))


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The fake's prompt count: every message's content, plus 3 per message (role, separators)."""
    return sum(count_tokens(str(m.get("content") or "")) + 3 for m in messages)


@dataclass
class _Reply:
    text: str
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass
class _Failure:
    status: int
    code: str
    headers: dict[str, str]


class FakeOpenAI:
    def __init__(
        self, *, models: tuple[str, ...] = ("meta-llama/llama-3.2-3b-instruct",), key: str = ""
    ) -> None:
        self.models = list(models)
        self.key = key  # empty: any key (or none) is accepted
        self.requests: list[dict[str, Any]] = []  # chat bodies, as sent
        self.model_list_calls = 0
        self._replies: deque[_Reply] = deque()
        self._failures: deque[_Failure] = deque()
        self._break_after: int | None = None
        self._hang: float = 0.0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        self._runner, port = await serve(app, shutdown_timeout=0.5)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ what tests set up

    def queue_reply(self, text: str) -> None:
        self._replies.append(_Reply(text))

    def queue_tool_call(self, name: str, arguments: dict[str, Any], *, text: str = "") -> None:
        self._replies.append(_Reply(text, [(name, arguments)]))

    def fail_next(self, status: int, *, count: int = 1, retry_after: float | None = None) -> None:
        """The next `count` chat (and models) requests fail with `status`."""
        code = {401: "invalid_api_key", 403: "unsupported_country_region_territory"}.get(
            status,
            "rate_limit_exceeded" if status == 429 else "server_error",
        )
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers = {
                "retry-after": f"{retry_after:g}",
                "retry-after-ms": f"{retry_after * 1000:g}",
            }
        for _ in range(count):
            self._failures.append(_Failure(status, code, headers))

    def hang_next(self, *, seconds: float) -> None:
        """The next chat request waits `seconds` before answering (a server that stalls)."""
        self._hang = seconds

    def break_stream_after(self, pieces: int) -> None:
        """The next stream sends `pieces` text chunks, then an error event."""
        self._break_after = pieces

    # ------------------------------------------------------------------ the server

    @staticmethod
    def _error(
        status: int, message: str, code: str, headers: dict[str, str] | None = None
    ) -> web.Response:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
        return web.json_response(body, status=status, headers=headers)

    def _refused(self, request: web.Request) -> web.Response | None:
        if self.key and request.headers.get("Authorization") != f"Bearer {self.key}":
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        if self._failures:
            failure = self._failures.popleft()
            return self._error(failure.status, "Request refused.", failure.code, failure.headers)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        self.model_list_calls += 1
        refused = self._refused(request)
        if refused is not None:
            return refused
        data = [
            {"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "fake"}
            for m in self.models
        ]
        return web.json_response({"object": "list", "data": data})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        body = await request.json()
        self.requests.append(body)
        if self._hang:
            hang, self._hang = self._hang, 0.0
            await asyncio.sleep(hang)
        if body.get("model") not in self.models:
            return self._error(
                404, f"The model `{body.get('model')}` does not exist.", "model_not_found"
            )
        reply = self._replies.popleft() if self._replies else _Reply(_echo(body))
        if not body.get("stream"):
            return self._error(400, "This fake only streams.", "unsupported")
        return await self._stream(request, body, reply)

    async def _stream(
        self, request: web.Request, body: dict[str, Any], reply: _Reply
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        usage_wanted = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body["model"],
        }

        async def send(choices: list[dict[str, Any]], usage: Any = None) -> None:
            chunk = {**base, "choices": choices}
            if usage_wanted:
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

        def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

        await send([choice({"role": "assistant", "content": ""})])
        limit = body.get("max_tokens") or 1_000_000
        pieces = split_into_chunks(reply.text)
        finish = "length" if len(pieces) > limit else "stop"
        pieces = pieces[:limit]
        for n, piece in enumerate(pieces):
            if self._break_after is not None and n == self._break_after:
                self._break_after = None
                error = {"error": {"message": "upstream went away", "type": "server_error"}}
                await response.write(f"data: {json.dumps(error)}\n\n".encode())
                return response
            await send([choice({"content": piece})])
            await asyncio.sleep(0)
        completion = count_tokens("".join(pieces))
        for index, (name, arguments) in enumerate(reply.tool_calls):
            start = {"index": index, "id": f"call_{index}", "type": "function"}
            start["function"] = {"name": name, "arguments": ""}
            await send([choice({"tool_calls": [start]})])
            text = json.dumps(arguments)
            for at in range(0, len(text), 7):  # the JSON arrives in pieces
                fragment = {"index": index, "function": {"arguments": text[at : at + 7]}}
                await send([choice({"tool_calls": [fragment]})])
            completion += count_tokens(text)
            finish = "tool_calls"
        await send([choice({}, finish)])
        if usage_wanted:
            used = prompt_tokens(body["messages"])
            usage = {"prompt_tokens": used, "completion_tokens": completion}
            usage["total_tokens"] = used + completion
            await send([], usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def _echo(body: dict[str, Any]) -> str:
    last = body["messages"][-1].get("content") or ""
    return f"You said: {last}"
