"""A picture over https (bot/images/fetch.py), against real aiohttp servers on loopback, one over
TLS with its certificate trusted through `SSL_CERT_FILE` as httpx reads it: redirects are
followed to https only, an error status, a silence and a refused type each say what went wrong
without the address."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from bot.images.fetch import FetchFailed, fetch_picture
from tests.fakes.fal import make_certificate
from tests.fakes.loopback import serve

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32


@pytest.fixture
async def servers(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, str]]:
    """An https server and a plain http one, each answering the same routes."""
    cert, key = make_certificate(tmp_path_factory.mktemp("fetch-tls"))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    urls: dict[str, str] = {}

    async def picture(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def to_https(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{urls['https']}/p.png")

    async def to_http(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{urls['http']}/p.png")

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no such picture")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(2)
        return web.Response(body=PNG, content_type="image/png")

    app = web.Application()
    for path, handler in (
        ("/p.png", picture),
        ("/to-https", to_https),
        ("/to-http", to_http),
        ("/missing", missing),
        ("/slow", slow),
    ):
        app.router.add_get(path, handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    secure, secure_port = await serve(app, ssl_context=context, shutdown_timeout=0.1)
    plain, plain_port = await serve(app, shutdown_timeout=0.1)
    urls["https"] = f"https://127.0.0.1:{secure_port}"
    urls["http"] = f"http://127.0.0.1:{plain_port}"
    try:
        yield urls["https"], urls["http"]
    finally:
        await secure.cleanup()
        await plain.cleanup()


async def test_a_picture_is_fetched_through_an_https_redirect(servers: tuple[str, str]) -> None:
    https, _ = servers
    fetched = await fetch_picture(f"{https}/to-https", seconds=5, max_bytes=1000)
    assert fetched.data == PNG and fetched.suffix == ".png" and fetched.mime == "image/png"


@pytest.mark.parametrize(
    ("path", "reason", "timed_out"),
    [
        ("/to-http", "a redirect led away from https", False),
        ("/missing", "the server answered HTTP 404", False),
        ("/slow", "the download timed out", True),
    ],
)
async def test_what_went_wrong_is_said_without_the_address(
    servers: tuple[str, str], path: str, reason: str, timed_out: bool
) -> None:
    https, _ = servers
    with pytest.raises(FetchFailed) as failed:
        await fetch_picture(f"{https}{path}?key=s3cret", seconds=0.5, max_bytes=1000)
    assert str(failed.value) == reason and failed.value.timed_out is timed_out
    assert "s3cret" not in str(failed.value) and "127.0.0.1" not in str(failed.value)


async def test_a_plain_http_address_is_refused_before_asking(servers: tuple[str, str]) -> None:
    _, http = servers
    with pytest.raises(FetchFailed, match="not https"):
        await fetch_picture(f"{http}/p.png", seconds=5, max_bytes=1000)
