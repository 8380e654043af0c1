"""Ollama's HTTP API, spoken directly: the requests the official `ollama` client sends, its
answers parsed into that client's own types.

Every call the bot makes to Ollama (a reply, the guard's verdict, a memory extraction, an
embedding) goes through `OllamaHTTP`, on the bot's own HTTP/1.1 client (bot/brains/wire.py).
The official client sends through httpx, which cost 2.2 ms of CPU a streamed chat and 2.5 ms
an embedding: httpx builds and merges a request, its cookies and headers per call, and its pool
(httpcore) walks every connection on every request and release (httpx#3215, httpcore#1035).
aiohttp, used next, 0.36 to 0.43 ms an embedding; the wire 0.24 to 0.27 ms
(bench/ollama_client.py; docs/benchmarks.md). A bot that answers hundreds of people at once on
two cores spends that on every reply.

What is kept from the official client, so a server sees no difference
(tests/brains/test_ollama_http.py compares the bodies both send):

- the host as it parses it (`_parse_host`: http, port 11434 unless given);
- the request bodies: messages without their empty fields, `tools: []` when there are none,
  nothing that is None;
- its headers, with `OLLAMA_API_KEY` as a bearer token;
- its answers: `ollama.ChatResponse`, `GenerateResponse`, `EmbedResponse`, parsed from the JSON
  by pydantic; an HTTP error or an `error` line in a stream raises `ollama.ResponseError`;
- no total time-out, a connect time-out and a read time-out between bytes;
- certificates checked against certifi's store, or `SSL_CERT_FILE` (httpx's context).

Transport failures raise httpx's exceptions, which every caller already words
(`failure_reason` in bot/brains/ollama_brain.py): a refused connection is `ConnectError`, a hang-up
`RemoteProtocolError`, a silence `ReadTimeout`. A proxy comes from `HTTP(S)_PROXY`/`NO_PROXY`, read
once per client, as httpx reads them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from typing import Any, Required, TypedDict, TypeVar, Unpack
from urllib.parse import urlsplit

import httpx
import ollama
import pydantic
from ollama._client import _parse_host  # the official client's reading of OLLAMA_HOST

from bot.brains.wire import Response, Wire

# Requests the bot sends one Ollama at once, and idle connections it keeps for the next ones.
# Ollama itself queues up to OLLAMA_MAX_QUEUE (512 by default, its FAQ) beyond
# OLLAMA_NUM_PARALLEL and answers 503 past it.
OLLAMA_CONNECTIONS = 512
_LINE_LIMIT = 2**20  # the longest streamed line read
_KEEPALIVE = 5.0  # seconds an idle connection is kept

Answer = TypeVar("Answer", bound=pydantic.BaseModel)


class ChatArgs(TypedDict, total=False):
    """What `chat` and `chat_stream` take, as the official client's `chat` names it."""

    model: Required[str]
    messages: Required[Sequence[Mapping[str, Any]]]
    tools: Sequence[Mapping[str, Any]] | None
    format: Mapping[str, Any] | str | None
    options: Mapping[str, Any] | None
    keep_alive: str | float | None


def ollama_client(host: str, *, read_timeout: float, connect_timeout: float) -> OllamaHTTP:
    """A client of the Ollama at `host` with explicit time-outs (the official one has none)."""
    return OllamaHTTP(host, read_timeout=read_timeout, connect_timeout=connect_timeout)


class OllamaHTTP:
    def __init__(self, host: str, *, read_timeout: float, connect_timeout: float) -> None:
        self.base = _parse_host(host)
        self._wire = Wire(
            self.base,
            headers=_headers(),
            limit=OLLAMA_CONNECTIONS,
            keepalive=_KEEPALIVE,
            connect_timeout=min(connect_timeout, read_timeout),
            read_timeout=read_timeout,  # between bytes
            pool_timeout=read_timeout,  # waiting for a free connection
            ssl_context=httpx.create_ssl_context(),  # certifi's store, SSL_CERT_FILE
            proxy=_proxy_for(self.base),
        )

    async def chat(self, **args: Unpack[ChatArgs]) -> ollama.ChatResponse:
        """One whole answer (`stream: false`)."""
        return await self._answer("/api/chat", _chat(args, stream=False), ollama.ChatResponse)

    async def chat_stream(
        self, **args: Unpack[ChatArgs]
    ) -> AsyncGenerator[ollama.ChatResponse, None]:
        """The answer as Ollama streams it, one part per line; closing it early ends the
        request."""
        async for parts in self.chat_batches(**args):
            for part in parts:
                yield part

    async def chat_batches(
        self, **args: Unpack[ChatArgs]
    ) -> AsyncGenerator[list[ollama.ChatResponse], None]:
        """The streamed answer a network read at a time: the parts (lines) that arrived
        together, in order. While the model is slower than the bot that is one part, one token;
        when the bot has fallen behind (busy, or a fast model), the several parts waiting are
        handled as one instead of each on its own way through the pipeline. A line carrying
        `error` (or one that is not JSON) raises after the parts before it; closing this early
        ends the request."""
        async with self._post("/api/chat", _chat(args, stream=True)) as response:
            async for lines in _line_batches(response.pieces()):
                parts: list[ollama.ChatResponse] = []
                try:
                    for line in lines:
                        parts.append(_part(line, ollama.ChatResponse))
                except Exception:  # an error line, or one that is not JSON: what came first goes
                    if parts:
                        yield parts
                    raise
                yield parts

    async def generate(
        self,
        *,
        model: str,
        prompt: str,
        raw: bool | None = None,
        options: Mapping[str, Any] | None = None,
        keep_alive: str | float | None = None,
    ) -> ollama.GenerateResponse:
        """A completion of `prompt` (`raw`: already in the model's format), whole."""
        body = _present(
            model=model,
            prompt=prompt,
            stream=False,
            raw=raw,
            options=options,
            keep_alive=keep_alive,
        )
        return await self._answer("/api/generate", body, ollama.GenerateResponse)

    async def embed(
        self,
        *,
        model: str,
        input: Sequence[str],
        keep_alive: str | float | None = None,
    ) -> ollama.EmbedResponse:
        body = _present(model=model, input=list(input), keep_alive=keep_alive)
        return await self._answer("/api/embed", body, ollama.EmbedResponse)

    async def close(self) -> None:
        await self._wire.close()

    async def _answer(self, path: str, body: dict[str, Any], kind: type[Answer]) -> Answer:
        async with self._post(path, body) as response:
            data = await response.read()
        return kind.model_validate_json(data)

    @contextlib.asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any]) -> AsyncIterator[Response]:
        """The response to a POST of `body` as JSON; an HTTP error raises ResponseError."""
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        async with self._wire.post(path, data) as response:
            if response.status >= 400:
                raise ollama.ResponseError(await response.text(), response.status)
            yield response


def _chat(args: ChatArgs, *, stream: bool) -> dict[str, Any]:
    return _present(
        model=args["model"],
        # as the official client copies them: a field with an empty value is left out (most
        # messages have none, and go as they are)
        messages=[
            m if all(m.values()) else {k: v for k, v in m.items() if v} for m in args["messages"]
        ],
        tools=list(args.get("tools") or ()),
        stream=stream,
        format=args.get("format"),
        options=args.get("options"),
        keep_alive=args.get("keep_alive"),
    )


def _present(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


async def _line_batches(body: AsyncIterator[bytes]) -> AsyncIterator[list[bytes]]:
    """The body's non-blank lines, as many at a time as one read brought (not one wake-up a
    line). A line longer than `_LINE_LIMIT` is refused."""
    rest = b""
    async for data in body:
        *lines, rest = (rest + data).split(b"\n") if rest else data.split(b"\n")
        if len(rest) > _LINE_LIMIT:
            raise ValueError("a streamed line longer than the limit")
        lines = [line for line in lines if line.strip()]
        if lines:
            yield lines
    if rest.strip():
        yield [rest]


def _part(line: bytes, kind: type[Answer]) -> Answer:
    """One streamed line; a line carrying `error` (Ollama failed mid-answer) raises."""
    if b'"error"' in line:
        error = json.loads(line).get("error")
        if error:
            raise ollama.ResponseError(error)
    return kind.model_validate_json(line)


def _headers() -> dict[str, str]:
    """The official client's headers (ollama/_client.py, BaseClient)."""
    headers = {
        "content-type": "application/json",
        "accept": "application/json",
        "user-agent": (
            f"personabot ({platform.machine()} {platform.system().lower()})"
            f" Python/{platform.python_version()}"
        ),
    }
    api_key = os.environ.get("OLLAMA_API_KEY")
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


def _proxy_for(base: str) -> str | None:
    """The proxy `HTTP_PROXY`/`HTTPS_PROXY` name for this host unless `NO_PROXY` exempts it."""
    parts = urlsplit(base)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)
