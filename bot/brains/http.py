"""Ollama's HTTP API, spoken directly on aiohttp: the requests the official `ollama` client
sends, its answers parsed into that client's own types.

Every call the bot makes to Ollama (a reply, the guard's verdict, a memory extraction, an
embedding) goes through `OllamaHTTP`. The official client sends through httpx, which cost
2.2 ms of CPU a streamed chat and 2.5 ms an embedding against 0.8 and 0.7 ms here, for the same
answers (`bench/ollama_client.py`; docs/benchmarks.md, "Ollama spoken directly"): httpx
builds and merges a request, its cookies and headers per call, and its pool (httpcore) walks
every connection on every request and release (httpx#3215, httpcore#1035); aiohttp's
`trust_env` reads ~/.netrc and the proxy variables on a worker thread per request. A bot that
answers hundreds of people at once on two cores spends that on every reply.

What is kept from the official client, so a server sees no difference
(tests/brains/test_ollama_http.py compares the bodies both send):

- the host as it parses it (`_parse_host`: http, port 11434 unless given);
- the request bodies: messages without their empty fields, `tools: []` when there are none,
  nothing that is None;
- its headers, with `OLLAMA_API_KEY` as a bearer token;
- its answers: `ollama.ChatResponse`, `GenerateResponse`, `EmbedResponse`, parsed from the JSON
  by pydantic; an HTTP error or an `error` line in a stream raises `ollama.ResponseError`;
- no total time-out, a connect time-out and a read time-out between bytes.

Transport failures raise httpx's exceptions, which every caller already words
(`failure_reason` in bot/brains/ollama_brain.py): a refused connection is `ConnectError`, a hang-up
`RemoteProtocolError`, a silence `ReadTimeout`. A proxy comes from `HTTP(S)_PROXY`/`NO_PROXY`, read
once per client, as aiohttp's `trust_env` would read them per request.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Required, TypedDict, TypeVar, Unpack
from urllib.parse import urlsplit

import aiohttp
import httpx
import ollama
import pydantic
from ollama._client import _parse_host  # the official client's reading of OLLAMA_HOST

# Requests the bot sends one Ollama at once, and idle connections it keeps for the next ones.
# Ollama itself queues up to OLLAMA_MAX_QUEUE (512 by default, its FAQ) beyond
# OLLAMA_NUM_PARALLEL and answers 503 past it.
OLLAMA_CONNECTIONS = 512
_LINE_LIMIT = 2**20  # the longest streamed line read (aiohttp's default is 128 KiB)

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
        self._timeout = aiohttp.ClientTimeout(
            total=None,
            connect=read_timeout,  # waiting for a free connection, then connecting
            sock_connect=min(connect_timeout, read_timeout),
            sock_read=read_timeout,
        )
        self._headers = _headers()
        self._proxy = _proxy_for(self.base)
        self._session: aiohttp.ClientSession | None = None

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
            async for lines in _line_batches(response.content):
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
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _answer(self, path: str, body: dict[str, Any], kind: type[Answer]) -> Answer:
        async with self._post(path, body) as response:
            data = await response.read()
        return kind.model_validate_json(data)

    @contextlib.asynccontextmanager
    async def _post(self, path: str, body: dict[str, Any]) -> AsyncIterator[aiohttp.ClientResponse]:
        """The response to a POST of `body` as JSON; an HTTP error raises ResponseError."""
        session = self._session or self._open()
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        with _mapped():
            async with session.post(
                self.base + path,
                data=data,
                headers=self._headers,
                timeout=self._timeout,
                proxy=self._proxy,
            ) as response:
                if response.status >= 400:
                    raise ollama.ResponseError(await response.text(), response.status)
                yield response

    def _open(self) -> aiohttp.ClientSession:
        """The session, made in the running loop at the first request: certificates checked
        against certifi's store (as httpx does), idle connections closed after 5 s."""
        connector = aiohttp.TCPConnector(
            limit=OLLAMA_CONNECTIONS,
            keepalive_timeout=5.0,
            ssl=httpx.create_ssl_context(),
        )
        self._session = aiohttp.ClientSession(connector=connector, read_bufsize=_LINE_LIMIT)
        return self._session


def _chat(args: ChatArgs, *, stream: bool) -> dict[str, Any]:
    return _present(
        model=args["model"],
        # as the official client copies them: a field with an empty value is left out
        messages=[{k: v for k, v in m.items() if v} for m in args["messages"]],
        tools=list(args.get("tools") or ()),
        stream=stream,
        format=args.get("format"),
        options=args.get("options"),
        keep_alive=args.get("keep_alive"),
    )


def _present(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


async def _line_batches(content: aiohttp.StreamReader) -> AsyncIterator[list[bytes]]:
    """The body's non-blank lines, as many at a time as one read brought (aiohttp's own line
    iterator wakes the reader once a line). A line longer than `_LINE_LIMIT` is refused, as
    aiohttp's reader refuses one over its buffer."""
    rest = b""
    while data := await content.readany():
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


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """httpx's exception for what aiohttp raised, as the official client's callers expect."""
    try:
        yield
    except aiohttp.ClientError as exc:
        raise _as_httpx(exc)(str(exc) or type(exc).__name__) from exc


def _as_httpx(exc: aiohttp.ClientError) -> type[httpx.TransportError]:
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return httpx.ReadTimeout
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return httpx.RemoteProtocolError  # a hang-up, or a body cut short
    if isinstance(exc, aiohttp.ClientConnectionError):
        return httpx.ReadError
    return httpx.NetworkError
