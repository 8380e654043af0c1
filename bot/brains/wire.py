"""HTTP/1.1 on asyncio's own transports: the client under every call the bot makes to Ollama.

A reply costs the bot two or three calls to Ollama (the reply, the recall's embedding, a share of
a memory extraction and its embeddings), and on two cores the client's own CPU is a good part of
the bot's. aiohttp, used before, spent most of its CPU around the request: its request object,
header multidicts, timers and trace hooks. Here a request is one prepared write and the answer
is read with a few slices of one buffer: an embedding call costs 0.24 to 0.27 ms of CPU against
0.36 to 0.43 ms on aiohttp (bench/ollama_client.py; docs/benchmarks.md, "The model server's
accept queue, the bot's own HTTP client, and the database pool's way in and out").

What it speaks (RFC 9112), which is what an Ollama (Go's net/http) or a proxy in front of it sends:

- a request with a body of known length (`Content-Length`), `Host` and the caller's headers, in one
  write;
- a response's status line and headers; its body framed by `Content-Length`, by the chunked
  transfer coding (how Ollama streams), or by the connection's end; interim 1xx responses skipped;
- connections kept alive to one origin and reused (the most recently used first), at most
  `limit` at once (more requests wait their turn, `pool_timeout` at most), an idle one closed
  after `keepalive` seconds, one whose response was not read to its end (a reply stopped
  early), or that says `Connection: close`, closed at once;
- TLS for https with the caller's context; an HTTP proxy: requests in absolute form for http, a
  `CONNECT` tunnel for https (credentials in the proxy's URL sent as Basic);
- time-outs: for connecting (the proxy's tunnel included), and for each wait for more bytes.

Failures raise httpx's transport errors, as the official `ollama` client's callers expect and
word (bot/brains/ollama_brain.py `failure_reason`): a refused or unresolvable connection, or a
bad certificate, `ConnectError`; no connection in time `ConnectTimeout`; a silence
`ReadTimeout`; a hang-up or a malformed answer `RemoteProtocolError`.
"""

from __future__ import annotations

import asyncio
import base64
import re
import ssl
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import cast
from urllib.parse import unquote, urlsplit

import httpx

from bot.errors import ConfigError

_HEAD_LIMIT = 64 * 1024  # a response's status line and headers, at most
_SIZE_LINE_LIMIT = 4096  # a chunk's size line, at most
_HIGH_WATER = 2**20  # bytes read ahead of the reader before the socket is paused
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(rb"[0-9]{1,19}")

# How a response's body ends
_LENGTH, _CHUNKED, _CLOSE = 0, 1, 2
# Where the chunked decoder is: a size line next, the CRLF after a chunk's data, trailers next
_SIZE, _DATA_END, _TRAILERS = 0, -1, -2


class _Connection(asyncio.Protocol):
    """One connection: bytes arrive in `buffer`, and a reader waits for them with `more`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False  # the peer closed its side, or the connection is gone
        self.idle_since = 0.0
        self.generation = 0  # the pool's generation it was opened in (`Wire.close`)
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > _HIGH_WATER and not self._paused and self.transport is not None:
            self.transport.pause_reading()
            self._paused = True
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._wake()

    # -- for the reader

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self, seconds: float) -> None:
        """Until more bytes are in `buffer`, `seconds` at most (ReadTimeout); the
        connection's end raises RemoteProtocolError (callers that read to the end check
        `ended` first)."""
        if self.ended:
            raise httpx.RemoteProtocolError("the server closed the connection mid-answer")
        if self._paused and self.transport is not None:
            self.transport.resume_reading()
            self._paused = False
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(seconds, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()

    def usable(self) -> bool:
        transport = self.transport
        return not self.ended and transport is not None and not transport.is_closing()

    def close(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(httpx.ReadTimeout("no answer in time"))


class Response:
    """A response's status and headers; its body read whole (`read`) or as it arrives
    (`pieces`). Read once."""

    def __init__(self, connection: _Connection, read_timeout: float, head: bool) -> None:
        self._connection = connection
        self._timeout = read_timeout
        self._head_request = head
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = False
        self.complete = False
        self._framing = _CLOSE
        self._left = 0  # body bytes still to come (_LENGTH), or the chunked decoder's state

    async def _read_head(self) -> None:
        while True:
            lines = await self._head_lines()
            version, status = _status_line(lines[0])
            if not 100 <= status < 200 or status == 101:
                break  # not an interim answer (100 Continue, 103 Early Hints)
        self.status, self.headers = status, _header_fields(lines[1:])
        self._frame(version)

    async def _head_lines(self) -> list[bytes]:
        buffer = self._connection.buffer
        end = buffer.find(b"\r\n\r\n")
        while end < 0:
            if len(buffer) > _HEAD_LIMIT:
                raise httpx.RemoteProtocolError("the answer's headers are too long")
            await self._connection.more(self._timeout)
            end = buffer.find(b"\r\n\r\n")
        head = bytes(buffer[:end])
        del buffer[: end + 4]
        return head.split(b"\r\n")

    def _frame(self, version: bytes) -> None:
        """How the body ends (RFC 9112 6.3) and whether the connection stays open after it."""
        headers = self.headers
        connection = {t.strip() for t in headers.get("connection", "").lower().split(",")}
        if version == b"HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        codings = headers.get("transfer-encoding")
        if codings is not None:
            if codings.lower().rsplit(",", 1)[-1].strip() != "chunked":
                raise httpx.RemoteProtocolError("an answer in a transfer coding not known here")
            self._framing, self._left = _CHUNKED, _SIZE
        elif self._head_request or self.status in (204, 304):
            self._framing, self._left = _LENGTH, 0
        elif "content-length" in headers:
            lengths = {v.strip().encode() for v in headers["content-length"].split(",")}
            if len(lengths) != 1 or not _DIGITS.fullmatch(next(iter(lengths))):
                raise httpx.RemoteProtocolError("the answer's Content-Length is malformed")
            self._framing, self._left = _LENGTH, int(next(iter(lengths)))
        else:
            self._framing, self.keep_alive = _CLOSE, False
        self.complete = self._framing == _LENGTH and self._left == 0

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([piece async for piece in self.pieces()])

    async def text(self) -> str:
        return (await self.read()).decode("utf-8", errors="replace")

    async def pieces(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive, as much as is there at each wake-up, decoded."""
        connection = self._connection
        while not self.complete:
            piece = self._take()
            if piece:
                yield piece
            elif not self.complete:
                if self._framing == _CLOSE and connection.ended:
                    self.complete = True  # the body ends with the connection
                else:
                    await connection.more(self._timeout)

    def _take(self) -> bytes:
        buffer = self._connection.buffer
        if not buffer:
            return b""
        if self._framing == _LENGTH:
            size = min(self._left, len(buffer))
            piece = bytes(buffer[:size])
            del buffer[:size]
            self._left -= size
            self.complete = self._left == 0
            return piece
        if self._framing == _CLOSE:
            piece = bytes(buffer)
            buffer.clear()
            return piece
        return self._take_chunked(buffer)

    def _take_chunked(self, buffer: bytearray) -> bytes:
        """The data of the chunks in `buffer`, as far as they have arrived; what was read is
        removed from it at once (one copy in, one cut out, however many chunks came)."""
        data = bytes(buffer)
        at, end, state = 0, len(data), self._left
        pieces: list[bytes] = []
        while at < end:
            if state > 0:  # within a chunk's data
                size = min(state, end - at)
                pieces.append(data[at : at + size])
                at += size
                state = state - size or _DATA_END
            elif state == _DATA_END:
                if end - at < 2:
                    break
                if data[at : at + 2] != b"\r\n":
                    raise httpx.RemoteProtocolError("a malformed chunk in the answer")
                at += 2
                state = _SIZE
            else:  # a size line; or a trailer line (none expected), then the blank line
                stop = data.find(b"\r\n", at)
                if stop < 0:
                    if end - at > (_SIZE_LINE_LIMIT if state == _SIZE else _HEAD_LIMIT):
                        raise httpx.RemoteProtocolError("a malformed chunk in the answer")
                    break
                line, at = data[at:stop], stop + 2
                if state == _SIZE:
                    size_field = line.split(b";", 1)[0].strip()
                    if not _HEX.fullmatch(size_field):
                        raise httpx.RemoteProtocolError("a malformed chunk in the answer")
                    state = int(size_field, 16) or _TRAILERS
                elif not line:
                    self.complete = True
                    break
        del buffer[:at]
        self._left = state
        return b"".join(pieces)


def _status_line(line: bytes) -> tuple[bytes, int]:
    version, _, rest = line.partition(b" ")
    code = rest[:3]
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise httpx.RemoteProtocolError("the answer is not HTTP/1.1")
    return version, int(code)


def _header_fields(lines: list[bytes]) -> dict[str, str]:
    """Header fields by lower-case name; repeated ones joined with commas (RFC 9110 5.3)."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise httpx.RemoteProtocolError("a malformed header in the answer")
        key = name.decode("latin-1").lower()
        text = value.strip().decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


class Exchange:
    """One request and its response: `async with` it; leaving returns the connection to the
    pool when the response was read to its end, and closes it otherwise."""

    def __init__(self, wire: Wire, data: bytes) -> None:
        self._wire = wire
        self._data = data
        self._connection: _Connection | None = None
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        wire = self._wire
        connection = self._connection = await wire.acquire()
        try:
            assert connection.transport is not None
            connection.transport.write(self._data)
            response = self._response = Response(connection, wire.read_timeout, head=False)
            await response._read_head()
        except BaseException:
            self._connection = None
            wire.release(connection, reusable=False)
            raise
        return response

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        connection, response = self._connection, self._response
        if connection is None:
            return
        reusable = (
            kind is None
            and response is not None
            and response.complete
            and response.keep_alive
            and not connection.buffer
        )
        self._wire.release(connection, reusable)


class Wire:
    """Connections to one origin (`base`: scheme, host and port), kept and reused."""

    def __init__(
        self,
        base: str,
        *,
        headers: dict[str, str],
        limit: int,
        keepalive: float,
        connect_timeout: float,
        read_timeout: float,
        pool_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> None:
        target = urlsplit(base)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"not an http(s) URL: {base!r}")
        self._tls = target.scheme == "https"
        self._host = target.hostname
        self._port = target.port or (443 if self._tls else 80)
        authority = _authority(self._host, target.port)
        self._ssl = (ssl_context or ssl.create_default_context()) if self._tls else None
        self._proxy = _Proxy(proxy, authority) if proxy else None
        # requests through a proxy to an http origin name it in full (RFC 9112 3.2.2)
        self._prefix = f"{target.scheme}://{authority}" if proxy and not self._tls else ""
        fixed = f"Host: {authority}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        if self._proxy is not None and not self._tls and self._proxy.credentials:
            fixed += f"Proxy-Authorization: {self._proxy.credentials}\r\n"
        self._fixed = fixed
        self.read_timeout = read_timeout
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._keepalive = keepalive
        self._slots = asyncio.Semaphore(limit)
        self._idle: list[_Connection] = []
        self._sweeping: asyncio.TimerHandle | None = None
        self._generation = 0  # one more at each close: older connections are not kept

    def post(self, path: str, body: bytes) -> Exchange:
        head = (
            f"POST {self._prefix}{path} HTTP/1.1\r\n{self._fixed}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        return Exchange(self, head.encode("latin-1") + body)

    # -- the pool

    async def acquire(self) -> _Connection:
        """A connection of the pool's, kept or new, once a slot is free."""
        if self._slots.locked():
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise httpx.ConnectTimeout("no connection to the server was free in time") from None
        else:
            await self._slots.acquire()  # returns at once
        try:
            while self._idle:
                kept = self._idle.pop()
                if self._keepable(kept, time.monotonic()):
                    return kept
                kept.close()
            return await self._connect()
        except BaseException:
            self._slots.release()
            raise

    def release(self, connection: _Connection, reusable: bool) -> None:
        self._slots.release()
        if not reusable or connection.generation != self._generation or not connection.usable():
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)
        if self._sweeping is None:
            loop = asyncio.get_running_loop()
            self._sweeping = loop.call_later(self._keepalive, self._sweep)

    def _keepable(self, connection: _Connection, now: float) -> bool:
        """Still open, and idle for less than `keepalive` seconds."""
        return connection.usable() and now - connection.idle_since < self._keepalive

    def _sweep(self) -> None:
        """Close the connections idle for `keepalive` seconds; come back while any are kept."""
        self._sweeping = None
        now = time.monotonic()
        kept = []
        for connection in self._idle:
            if self._keepable(connection, now):
                kept.append(connection)
            else:
                connection.close()
        self._idle = kept
        if kept:
            wait = max(0.05, kept[0].idle_since + self._keepalive - now)
            self._sweeping = asyncio.get_running_loop().call_later(wait, self._sweep)

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        connection = _Connection()
        connection.generation = self._generation
        proxy = self._proxy
        try:
            async with asyncio.timeout(self._connect_timeout):
                if proxy is None:
                    await loop.create_connection(
                        lambda: connection,
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                    )
                    return connection
                await loop.create_connection(lambda: connection, proxy.host, proxy.port)
                if not self._tls:
                    return connection
                await proxy.tunnel(connection, self.read_timeout)
                assert connection.transport is not None and self._ssl is not None
                secured = await loop.start_tls(
                    connection.transport, connection, self._ssl, server_hostname=self._host
                )
                if secured is None:
                    raise httpx.ConnectError("the TLS handshake through the proxy failed")
                connection.transport = secured
                return connection
        except TimeoutError:
            connection.close()
            raise httpx.ConnectTimeout("the server was not reached in time") from None
        except OSError as exc:  # refused, unresolvable, unreachable; ssl.SSLError is one too
            connection.close()
            raise httpx.ConnectError(_reason(exc)) from exc
        except BaseException:
            connection.close()
            raise

    async def close(self) -> None:
        """Close the kept connections; those in use are closed when their answer ends. The
        client stays usable: a later request opens a new connection."""
        self._generation += 1
        if self._sweeping is not None:
            self._sweeping.cancel()
            self._sweeping = None
        idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class _Proxy:
    """An HTTP proxy from its URL: where it listens, and its credentials (Basic)."""

    def __init__(self, url: str, authority: str) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:  # never the URL: it may hold a password
            raise ConfigError(
                f"the proxy for Ollama (HTTP_PROXY/HTTPS_PROXY) is a {parts.scheme}:// URL;"
                " only http:// proxies are supported"
            )
        self.host = parts.hostname
        self.port = parts.port or 80
        self.authority = authority
        self.credentials = ""
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.credentials = "Basic " + base64.b64encode(user.encode()).decode()

    async def tunnel(self, connection: _Connection, read_timeout: float) -> None:
        """A CONNECT tunnel to the origin through this proxy (RFC 9110 9.3.6)."""
        assert connection.transport is not None
        auth = f"Proxy-Authorization: {self.credentials}\r\n" if self.credentials else ""
        connection.transport.write(
            f"CONNECT {self.authority} HTTP/1.1\r\nHost: {self.authority}\r\n{auth}\r\n".encode()
        )
        answer = Response(connection, read_timeout, head=True)
        try:
            await answer._read_head()
        except httpx.TransportError as exc:
            raise httpx.ConnectError(f"the proxy's tunnel failed: {exc}") from None
        if not 200 <= answer.status < 300:
            raise httpx.ConnectError(f"the proxy refused the tunnel (HTTP {answer.status})")


def _authority(host: str, port: int | None) -> str:
    name = f"[{host}]" if ":" in host else host
    return f"{name}:{port}" if port else name


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
