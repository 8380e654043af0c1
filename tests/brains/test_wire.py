"""bot/brains/wire.py, the HTTP/1.1 client under every Ollama call, against servers on loopback
that write exactly the bytes each test gives them (RFC 9112's framings, hang-ups, silences), a
real aiohttp server over TLS, and proxies (absolute-form requests, a CONNECT tunnel)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from bot.brains.wire import Wire
from bot.errors import ConfigError
from tests.fakes.fal import make_certificate
from tests.fakes.loopback import dead_url, serve

Step = bytes | float | None  # bytes to write, seconds to wait, or hang up


class Scripted:
    """A server that reads each request (head and Content-Length body) and answers it with the
    next script's steps; it records the requests and which connection (its number) each came
    on."""

    def __init__(self, *scripts: list[Step]) -> None:
        self.scripts = deque(scripts)
        self.requests: list[tuple[object, bytes, bytes]] = []
        self.ended: list[object] = []  # peers whose connection ended, in order
        self.open = 0
        self.most_open = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        peer = self.connections  # which connection: ports are reused once closed
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.requests.append((peer, head, body))
                for step in self.scripts.popleft():
                    if step is None:
                        return
                    if isinstance(step, float):
                        await asyncio.sleep(step)
                    else:
                        writer.write(step)
                        await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.open -= 1
            self.ended.append(peer)
            writer.close()


def wire(
    url: str,
    *,
    proxy: str | None = None,
    context: ssl.SSLContext | None = None,
    **settings: float,
) -> Wire:
    return Wire(
        url,
        headers={"content-type": "application/json", "user-agent": "test"},
        limit=int(settings.get("limit", 8)),
        keepalive=settings.get("keepalive", 5.0),
        connect_timeout=settings.get("connect_timeout", 2.0),
        read_timeout=settings.get("read_timeout", 2.0),
        pool_timeout=settings.get("pool_timeout", 2.0),
        ssl_context=context,
        proxy=proxy,
    )


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


OK_CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def with_length(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Length: %d\r\n%s\r\n%s" % (status, len(body), extra, body)


async def test_a_request_is_sent_whole_and_a_sized_answer_read_whole() -> None:
    async with Scripted([with_length(b'{"ok":true}')]) as server:
        client = wire(server.url)
        async with client.post("/api/embed", b'{"x":1}') as response:
            assert (response.status, await response.read()) == (200, b'{"ok":true}')
            assert response.headers["content-length"] == "11"
        await client.close()
    _, head, body = server.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/embed HTTP/1.1"
    assert f"Host: {server.url.removeprefix('http://')}" in lines
    assert "content-type: application/json" in lines and "Content-Length: 7" in lines
    assert body == b'{"x":1}'


async def test_a_chunked_answer_cut_anywhere_is_put_back_together() -> None:
    """Ollama streams in the chunked coding; every cut of the bytes (here one byte a write),
    chunk extensions and trailers give the same body, and the connection is kept after it."""
    wire_bytes = OK_CHUNKED + b"5;ext=1\r\nhello\r\n" + b"6\r\n there\r\n0\r\nX-T: 1\r\n\r\n"
    one_by_one: list[Step] = []
    for i in range(len(wire_bytes)):
        one_by_one += [wire_bytes[i : i + 1], 0.0]
    async with Scripted(one_by_one, [OK_CHUNKED + chunked(b"again")]) as server:
        client = wire(server.url)
        async with client.post("/api/chat", b"{}") as response:
            pieces = [piece async for piece in response.pieces()]
        assert b"".join(pieces) == b"hello there" and len(pieces) > 1
        async with client.post("/api/chat", b"{}") as response:
            assert await response.read() == b"again"
        await client.close()
    assert server.requests[0][0] == server.requests[1][0], "the connection was not kept"


async def test_a_large_answer_is_read_whole_while_reading_pauses_and_resumes() -> None:
    """Bodies beyond what is read ahead (1 MiB) pause the socket until the reader catches up:
    3 MiB by length and in 64 KiB chunks, read slowly, arrive whole and in order."""
    big = bytes(range(256)) * (3 * 4096)
    pieces = [big[i : i + 65536] for i in range(0, len(big), 65536)]
    async with Scripted([with_length(big)], [OK_CHUNKED + chunked(*pieces)]) as server:
        client = wire(server.url)
        async with client.post("/", b"") as response:
            assert await response.read() == big
        async with client.post("/", b"") as response:
            got = []
            async for piece in response.pieces():
                got.append(piece)
                await asyncio.sleep(0.001)  # a slow reader
            assert b"".join(got) == big
        await client.close()
    assert server.requests[0][0] == server.requests[1][0]


async def test_an_answer_without_length_ends_with_its_connection() -> None:
    """HTTP/1.0 without a length: the body is all until the close, and the next request opens
    a new connection; an interim 100 Continue before the answer is skipped."""
    async with Scripted(
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nuntil ", 0.05, b"the end", None],
        [with_length(b"next")],
    ) as server:
        client = wire(server.url)
        async with client.post("/", b"") as response:
            assert await response.read() == b"until the end"
        async with client.post("/", b"") as response:
            assert await response.read() == b"next"
        await client.close()
    assert server.requests[0][0] != server.requests[1][0]


async def test_connection_close_and_a_reply_stopped_early_are_not_kept() -> None:
    body = chunked(b"one", b"two", b"three")
    async with Scripted(
        [with_length(b"a", extra=b"Connection: close\r\n")],
        [OK_CHUNKED + body[:8], 5.0],  # the reader stops after the first piece
        [with_length(b"c")],
    ) as server:
        client = wire(server.url)
        async with client.post("/", b"") as response:
            assert await response.read() == b"a"
        async with client.post("/", b"") as response:
            assert await anext(response.pieces()) == b"one"
        async with client.post("/", b"") as response:
            assert await response.read() == b"c"
        await client.close()
    peers = [peer for peer, _, _ in server.requests]
    assert len(set(peers)) == 3


async def test_a_kept_connection_the_server_closed_is_not_used_again() -> None:
    async with Scripted([with_length(b"a"), 0.01, None], [with_length(b"b")]) as server:
        client = wire(server.url)
        async with client.post("/", b"") as response:
            assert await response.read() == b"a"
        await asyncio.sleep(0.2)  # the server hangs up the idle connection
        async with client.post("/", b"") as response:
            assert await response.read() == b"b"
        await client.close()


async def test_a_closed_client_closes_its_connections_and_opens_new_ones_after() -> None:
    """As aiohttp's session was reopened on the next request: close() ends the kept
    connections at once and one in use when its answer ends; a later request opens anew."""
    async with Scripted(
        [with_length(b"a")], [0.2, with_length(b"b")], [with_length(b"c")]
    ) as server:
        client = wire(server.url)
        async with client.post("/", b"") as response:
            assert await response.read() == b"a"

        async def in_use() -> bytes:
            async with client.post("/", b"") as response:
                return await response.read()

        task = asyncio.create_task(in_use())
        await asyncio.sleep(0.05)
        await client.close()
        assert await task == b"b"
        async with client.post("/", b"") as response:
            assert await response.read() == b"c"
        await client.close()
        await asyncio.sleep(0.1)
    # the kept connection was in use at the close: it answered, then was not kept
    assert [peer for peer, _, _ in server.requests] == [1, 1, 2]
    assert sorted(server.ended) == [1, 2]


async def test_idle_connections_are_closed_after_the_keepalive() -> None:
    async with Scripted([with_length(b"a")], [with_length(b"b")]) as server:
        client = wire(server.url, keepalive=0.2)
        async with client.post("/", b"") as response:
            await response.read()
        await asyncio.sleep(0.05)
        assert server.ended == []
        await asyncio.sleep(0.4)
        assert len(server.ended) == 1, "the idle connection was not closed"
        async with client.post("/", b"") as response:
            assert await response.read() == b"b"
        await client.close()


@pytest.mark.parametrize(
    "script",
    [
        [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", None],  # cut short
        [OK_CHUNKED + b"5\r\nhel", None],  # hung up mid-chunk
        [None],  # hung up before answering
        [b"SPDY/3 200 OK\r\n\r\n"],  # not HTTP/1.x
        [OK_CHUNKED + b"zz\r\nhello\r\n"],  # a chunk size that is not hex
        [b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx"],  # two lengths
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx"],  # not chunked last
        [b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n"],  # a malformed header
    ],
)
async def test_a_broken_answer_raises_a_protocol_error(script: list[Step]) -> None:
    async with Scripted(script) as server:
        client = wire(server.url)
        with pytest.raises(httpx.RemoteProtocolError):
            async with client.post("/", b"") as response:
                await response.read()
        await client.close()


async def test_a_silence_between_bytes_is_a_read_timeout_and_the_connection_goes() -> None:
    async with Scripted(
        [OK_CHUNKED + b"3\r\none\r\n", 0.3, b"3\r\ntwo\r\n0\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\n", 1.0],
        [with_length(b"fine")],
    ) as server:
        client = wire(server.url, read_timeout=0.2)
        with pytest.raises(httpx.ReadTimeout):
            async with client.post("/", b"") as response:
                [piece async for piece in response.pieces()]
        with pytest.raises(httpx.ReadTimeout):  # in the headers, too
            async with client.post("/", b"") as response:
                pass
        async with client.post("/", b"") as response:
            assert await response.read() == b"fine"
        await client.close()
    assert len({peer for peer, _, _ in server.requests}) == 3


async def test_at_most_limit_connections_and_the_rest_wait_their_turn() -> None:
    answer: list[Step] = [0.1, with_length(b"x")]
    async with Scripted(*[answer] * 6) as server:
        client = wire(server.url, limit=2)

        async def one() -> bytes:
            async with client.post("/", b"") as response:
                return await response.read()

        assert await asyncio.gather(*(one() for _ in range(6))) == [b"x"] * 6
        await client.close()
    assert server.most_open == 2
    assert len({peer for peer, _, _ in server.requests}) == 2


async def test_a_request_that_cannot_get_a_connection_in_time_is_a_connect_timeout() -> None:
    async with Scripted([1.0, with_length(b"slow")]) as server:
        client = wire(server.url, limit=1, pool_timeout=0.1)

        async def slow() -> bytes:
            async with client.post("/", b"") as response:
                return await response.read()

        first = asyncio.create_task(slow())
        await asyncio.sleep(0.05)
        with pytest.raises(httpx.ConnectTimeout):
            async with client.post("/", b""):
                pass
        assert await first == b"slow"
        await client.close()


async def test_a_refused_connection_is_a_connect_error() -> None:
    client = wire(dead_url())
    with pytest.raises(httpx.ConnectError):
        async with client.post("/", b""):
            pass
    await client.close()


async def test_cancelled_mid_answer_closes_the_connection() -> None:
    async with Scripted([OK_CHUNKED + b"3\r\none\r\n", 5.0], [with_length(b"b")]) as server:
        client = wire(server.url, limit=1)

        async def reads() -> None:
            async with client.post("/", b"") as response:
                [piece async for piece in response.pieces()]

        task = asyncio.create_task(reads())
        await asyncio.sleep(0.1)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        async with client.post("/", b"") as response:  # its slot was given back
            assert await response.read() == b"b"
        await client.close()
    assert server.requests[0][0] != server.requests[1][0]


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_certificate(tmp_path_factory.mktemp("wire-tls"))


@contextlib.asynccontextmanager
async def tls_server(certificate: tuple[Path, Path]) -> AsyncIterator[str]:
    """An aiohttp server over TLS whose /echo answers with the request's body."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=b"tls:" + await request.read())

    app = web.Application()
    app.router.add_post("/echo", echo)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    runner, port = await serve(app, ssl_context=context)
    try:
        yield f"https://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def tls_wire(url: str, trusted: Path | None, proxy: str | None = None) -> Wire:
    context = ssl.create_default_context()
    if trusted is not None:
        context.load_verify_locations(trusted)
    return wire(url, proxy=proxy, context=context)


async def test_https_checks_the_certificate(certificate: tuple[Path, Path]) -> None:
    async with tls_server(certificate) as url:
        trusting = tls_wire(url, certificate[0])
        for _ in range(2):
            async with trusting.post("/echo", b"secret") as response:
                assert await response.read() == b"tls:secret"
        await trusting.close()
        stranger = tls_wire(url, None)  # the system's store does not know this certificate
        with pytest.raises(httpx.ConnectError):
            async with stranger.post("/echo", b"secret"):
                pass
        await stranger.close()


class ConnectProxy:
    """An HTTP proxy's CONNECT: it checks the credentials, opens the tunnel and relays bytes."""

    def __init__(self, credentials: str) -> None:
        self.credentials = "Basic " + base64.b64encode(credentials.encode()).decode()
        self.tunnels: list[str] = []
        self.refused = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        method, target, _ = head.split("\r\n")[0].split(" ")
        if method != "CONNECT" or f"Proxy-Authorization: {self.credentials}" not in head:
            self.refused += 1
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            writer.close()
            return
        self.tunnels.append(target)
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_https_through_a_proxy_goes_in_a_connect_tunnel(
    certificate: tuple[Path, Path],
) -> None:
    proxy = ConnectProxy("bot:p@ss")
    server = await asyncio.start_server(proxy.serve, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with tls_server(certificate) as url:
            client = tls_wire(url, certificate[0], proxy=proxy_url.replace("//", "//bot:p%40ss@"))
            async with client.post("/echo", b"through") as response:
                assert await response.read() == b"tls:through"
            await client.close()
            assert proxy.tunnels == [url.removeprefix("https://")]
            wrong = tls_wire(url, certificate[0], proxy=proxy_url.replace("//", "//bot:no@"))
            with pytest.raises(httpx.ConnectError, match="407"):
                async with wrong.post("/echo", b"x"):
                    pass
            await wrong.close()
    finally:
        server.close()


async def test_http_through_a_proxy_names_the_origin_in_full() -> None:
    async with Scripted([with_length(b"via proxy")]) as proxy:
        client = wire("http://ollama.internal:11434", proxy=proxy.url.replace("//", "//user:pw@"))
        async with client.post("/api/chat", b"{}") as response:
            assert await response.read() == b"via proxy"
        await client.close()
    lines = proxy.requests[0][1].decode().split("\r\n")
    assert lines[0] == "POST http://ollama.internal:11434/api/chat HTTP/1.1"
    assert "Host: ollama.internal:11434" in lines
    expected = "Basic " + base64.b64encode(b"user:pw").decode()
    assert f"Proxy-Authorization: {expected}" in lines


def test_a_proxy_that_is_not_http_is_refused_without_its_credentials() -> None:
    with pytest.raises(ConfigError) as refused:
        wire("http://ollama.internal:11434", proxy="https://bot:hunter2@proxy.example:3128")
    assert "only http:// proxies" in str(refused.value)
    assert "hunter2" not in str(refused.value)
