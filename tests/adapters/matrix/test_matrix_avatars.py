"""Persona avatars on Matrix, against the real Synapse's media repository and a real PostgreSQL:
a picture file or an https URL (a loopback server over TLS, its certificate trusted through
`SSL_CERT_FILE` as httpx reads it) is uploaded once, and after a restart the upload kept in
`matrix_media` is used again; a picture that cannot be had is tried again later, not on every
reply, and its address never reaches the log."""

from __future__ import annotations

import io
import logging
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from nio import AsyncClient, DownloadResponse
from PIL import Image

from bot import db
from bot.config import REPO_ROOT
from bot.core.personas import Persona
from tests.fakes.fal import make_certificate
from tests.fakes.loopback import serve
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse, available

if available():
    from bot.adapters.matrix.faces import Avatars
    from bot.adapters.matrix.state import MatrixState

pytestmark = pytest.mark.skipif(not available(), reason="matrix-synapse is not installed")


def png(colour: tuple[int, int, int]) -> bytes:
    picture = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(picture, format="PNG")
    return picture.getvalue()


def persona(avatar: str) -> Persona:
    return Persona(name="sage", display_name="Sage", description="d", greeting="g", avatar=avatar)


class Pictures:
    """An https server of pictures: `/p.png` answers `body` as `kind`; `hits` counts requests."""

    def __init__(self) -> None:
        self.body = png((40, 90, 160))
        self.kind = "image/png"
        self.hits = 0
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=self.body, content_type=self.kind)


@pytest.fixture
async def pictures(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Pictures]:
    cert, key = make_certificate(tmp_path_factory.mktemp("avatar-tls"))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as an admin's own CA would be trusted
    served = Pictures()
    app = web.Application()
    app.router.add_get("/p.png", served.handle)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner, port = await serve(app, ssl_context=context)
    served.url = f"https://127.0.0.1:{port}/p.png?token=s3cret"
    try:
        yield served
    finally:
        await runner.cleanup()


@pytest.fixture
async def state(database_url: str, bot_user: MatrixUser) -> AsyncIterator[MatrixState]:
    pool = await db.connect(database_url, REPO_ROOT / "migrations")
    try:
        yield MatrixState(pool, bot_user.user_id)
    finally:
        await pool.close()


@pytest.fixture
async def bot_client(synapse: Synapse, bot_user: MatrixUser) -> AsyncIterator[AsyncClient]:
    client = AsyncClient(synapse.url, bot_user.user_id)
    client.restore_login(bot_user.user_id, bot_user.device_id, bot_user.access_token)
    try:
        yield client
    finally:
        await client.close()


async def downloaded(human: Human, mxc: str | None) -> bytes:
    assert mxc is not None and mxc.startswith("mxc://")
    response = await human.client.download(mxc=mxc)
    assert isinstance(response, DownloadResponse)
    return bytes(response.body)


async def test_a_picture_file_is_uploaded_once_and_again_only_when_it_changes(
    bot_client: AsyncClient, state: MatrixState, human: Human, tmp_path: Path
) -> None:
    (tmp_path / "sage.png").write_bytes(png((40, 90, 160)))
    sage = persona("sage.png")
    first = await Avatars(bot_client, tmp_path, state).mxc(sage)
    assert await downloaded(human, first) == (tmp_path / "sage.png").read_bytes()
    # A restart: a new process finds the upload kept in Postgres (a new upload would have a
    # new media id), while one without the table uploads the same picture again.
    assert await Avatars(bot_client, tmp_path, state).mxc(sage) == first
    assert await Avatars(bot_client, tmp_path, None).mxc(sage) not in (first, None)
    # An edited picture is uploaded anew, by the same process.
    avatars = Avatars(bot_client, tmp_path, state)
    assert await avatars.mxc(sage) == first
    (tmp_path / "sage.png").write_bytes(png((200, 30, 30)))
    os.utime(tmp_path / "sage.png", ns=(1, 1))  # a changed mtime, whatever the clock's grain
    changed = await avatars.mxc(sage)
    assert changed != first
    assert await downloaded(human, changed) == png((200, 30, 30))


async def test_an_https_avatar_is_fetched_once_a_process_and_uploaded_once(
    bot_client: AsyncClient,
    state: MatrixState,
    human: Human,
    pictures: Pictures,
    tmp_path: Path,
) -> None:
    sage = persona(pictures.url)
    avatars = Avatars(bot_client, tmp_path, state)
    face = await avatars.face(sage)
    assert face.avatar_url is not None
    assert await downloaded(human, face.avatar_url) == pictures.body
    assert await avatars.mxc(sage) == face.avatar_url
    assert pictures.hits == 1, "fetched once by this process"
    restarted = Avatars(bot_client, tmp_path, state)
    assert await restarted.mxc(sage) == face.avatar_url, "the upload kept is used again"
    assert pictures.hits == 2


async def test_an_avatar_that_cannot_be_had_is_tried_again_later_and_its_address_not_logged(
    bot_client: AsyncClient,
    state: MatrixState,
    human: Human,
    pictures: Pictures,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    avatars = Avatars(bot_client, tmp_path, state, retry_after=60.0, clock=lambda: now[0])
    sage = persona(pictures.url)
    pictures.kind = "text/html"  # a login page, say, where the picture was
    with caplog.at_level(logging.WARNING, logger="bot.adapters.matrix.faces"):
        assert (await avatars.face(sage)).avatar_url is None
    assert "text/html" in caplog.text and "s3cret" not in caplog.text
    assert "127.0.0.1" not in caplog.text
    assert await avatars.mxc(sage) is None
    assert pictures.hits == 1, "not fetched again on the next reply"
    pictures.kind = "image/png"
    now[0] += 61.0
    mxc = await avatars.mxc(sage)
    assert pictures.hits == 2
    assert await downloaded(human, mxc) == pictures.body


async def test_a_picture_over_the_size_limit_is_not_uploaded(
    bot_client: AsyncClient, state: MatrixState, pictures: Pictures, tmp_path: Path
) -> None:
    avatars = Avatars(bot_client, tmp_path, state, max_bytes=len(pictures.body) - 1)
    assert await avatars.mxc(persona(pictures.url)) is None
    fits = Avatars(bot_client, tmp_path, state, max_bytes=len(pictures.body))
    assert await fits.mxc(persona(pictures.url)) is not None


async def test_a_missing_file_gives_no_avatar(
    bot_client: AsyncClient, state: MatrixState, tmp_path: Path
) -> None:
    assert await Avatars(bot_client, tmp_path, state).mxc(persona("gone.png")) is None
    assert await Avatars(bot_client, tmp_path, state).mxc(persona("")) is None
