"""The HTTP connections under the official `ollama` client: aiohttp's pool, not httpx's own.

The ollama client speaks through httpx, whose connection pool (httpcore) walks every connection
on every request and every release, polling each idle socket (httpx#3215, httpcore#1035). Its
defaults (100 connections, 20 kept idle) made the 101st reply wait for a connection and most
replies beyond 20 at once open a new one; raising the limits makes the walk longer. At 500 calls
at once it cost 12.7 ms of CPU a call against 1.2 ms through aiohttp's pool (docs/benchmarks.md,
"The HTTP client's connection pool", has the measurements).

So the client keeps its API and its parsing, and its requests go through `httpx-aiohttp`'s
transport. That transport maps aiohttp's errors onto httpx's, but takes a refused connection and
a server that hung up for time-outs (its map checks `ClientConnectionError` first); `_mapped`
puts those right, so a refused connection still reads "nothing is listening there".
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import httpx
import ollama
from httpx_aiohttp import AiohttpTransport

# Requests the bot sends one Ollama at once, and idle connections it keeps for the next ones.
# Ollama itself queues up to OLLAMA_MAX_QUEUE (512 by default, its FAQ) beyond
# OLLAMA_NUM_PARALLEL and answers 503 past it.
OLLAMA_CONNECTIONS = 512


def ollama_client(host: str, *, read_timeout: float, connect_timeout: float) -> ollama.AsyncClient:
    """The official client with explicit time-outs (its default is none), on aiohttp's pool."""
    return ollama.AsyncClient(
        host=host,
        timeout=httpx.Timeout(read_timeout, connect=min(connect_timeout, read_timeout)),
        transport=_Transport(client=_session),
    )


def _session() -> aiohttp.ClientSession:
    """The transport's aiohttp session, made in the running loop at the first request. As httpx
    did: proxies from HTTP(S)_PROXY/NO_PROXY (`trust_env`), certificates checked with certifi's
    store, idle connections closed after 5 s."""
    connector = aiohttp.TCPConnector(
        limit=OLLAMA_CONNECTIONS,
        keepalive_timeout=5.0,
        ssl=httpx.create_ssl_context(),
    )
    return aiohttp.ClientSession(connector=connector, trust_env=True)


class _Transport(AiohttpTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        with _mapped():
            response = await super().handle_async_request(request)
        response.stream = _Stream(response.stream)
        return response


class _Stream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream | httpx.SyncByteStream) -> None:
        assert isinstance(inner, httpx.AsyncByteStream)
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _mapped():
            async for chunk in self._inner:
                yield chunk

    async def aclose(self) -> None:
        with _mapped():
            await self._inner.aclose()


@contextlib.contextmanager
def _mapped() -> Iterator[None]:
    """httpx's error for what aiohttp raised, where the transport's own map got it wrong or
    left it out (an unmapped aiohttp error would escape every `except httpx.HTTPError`)."""
    try:
        yield
    except httpx.TransportError as exc:
        better = _better(exc.__cause__)
        if better is None:
            raise
        raise better(str(exc)) from exc.__cause__
    except aiohttp.ClientError as exc:
        raise httpx.NetworkError(str(exc) or type(exc).__name__) from exc


def _better(cause: BaseException | None) -> type[httpx.TransportError] | None:
    if cause is None or isinstance(cause, TimeoutError):  # aiohttp's time-outs are TimeoutErrors
        return None
    if isinstance(cause, aiohttp.ClientConnectorError):
        return httpx.ConnectError
    if isinstance(cause, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError
    if isinstance(cause, aiohttp.ClientConnectionError):
        return httpx.ReadError
    return None
