"""A Matrix session that lasts (issue 18): the access token survives restarts, a refused token
means a new login, a lost key store means a new device, and /healthz tells when sync fails.
Against the real Synapse with stock message rate limits."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tomllib
from pathlib import Path, PurePosixPath

import httpx
import pytest

from bot import runner
from bot.config import REPO_ROOT, Settings
from tests.adapters.matrix.helpers import (
    Ask,
    SettingsWith,
    direct_room,
    e2e_available,
    running_bot,
)
from tests.fakes.loopback import free_port
from tests.matrix_human import Human
from tests.synapse import MatrixUser, Synapse


async def _log_out(synapse: Synapse, token: str) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{synapse.url}/_matrix/client/v3/logout",
            headers={"Authorization": f"Bearer {token}"},
            json={},
        )
    response.raise_for_status()


async def test_a_restart_reuses_the_token_and_a_refused_token_means_a_new_login(
    matrix_settings: Settings, ask: Ask, synapse: Synapse, bot_user: MatrixUser, human: Human
) -> None:
    async with running_bot(matrix_settings) as (app, adapter):
        first_token = adapter.client.access_token
        device = adapter.client.device_id
        saved = await app.pool.fetchval("SELECT access_token FROM matrix_state")
    assert saved == first_token
    async with running_bot(matrix_settings) as (app, adapter):
        assert adapter.client.access_token == first_token, "no new login at a restart"
        assert adapter.client.user_id == bot_user.user_id
        await _log_out(synapse, first_token)  # the token dies while the bot runs
        for _ in range(300):  # until the bot has noticed (M_UNKNOWN_TOKEN) and logged in
            if adapter.client.access_token != first_token:
                break
            await asyncio.sleep(0.1)
        room = await direct_room(human, bot_user)
        _, reply = await ask(room, "are you still there?", "still here")
        saved = await app.pool.fetchval("SELECT access_token FROM matrix_state")
        assert adapter.connected
    assert reply["content"]["body"] == "still here"
    assert saved == adapter.client.access_token != first_token
    assert adapter.client.device_id == device, "logged in again on the same device"


class _Proxy:
    """A TCP relay on loopback in front of Synapse, to cut the bot off from its homeserver."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_healthz_turns_unhealthy_when_sync_keeps_failing(
    settings_with: SettingsWith, synapse: Synapse
) -> None:
    proxy = _Proxy(synapse.port)
    await proxy.start()
    port = free_port()
    settings = settings_with(
        matrix_homeserver=f"http://127.0.0.1:{proxy.port}",
        matrix_unhealthy_after=1.0,  # a minute by default; a second keeps the test short
        web_enabled=True,
        web_port=port,
    )
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(settings, stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(httpx.HTTPError):
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    await asyncio.sleep(0.2)
            await proxy.cut()  # network errors: nio retries them without ever raising
            for _ in range(150):
                response = await http.get("/healthz")
                if response.status_code != 200:
                    break
                await asyncio.sleep(0.2)
    finally:
        stop.set()
        await running
    assert response.status_code == 503
    assert "matrix is not connected" in response.json()["problems"]


async def _devices(synapse: Synapse, user_id: str) -> set[str]:
    listing = await synapse.admin("GET", f"/_synapse/admin/v2/users/{user_id}/devices")
    return {device["device_id"] for device in listing["devices"]}


async def test_a_lost_key_store_means_a_new_device_and_the_old_one_logged_out(
    tmp_path: Path, settings_with: SettingsWith, synapse: Synapse, bot_user: MatrixUser
) -> None:
    if not e2e_available():
        pytest.skip("matrix-nio[e2e] is not installed")
    store = tmp_path / "keys"
    settings = settings_with(matrix_encryption=True, matrix_store_dir=store)
    async with running_bot(settings) as (_, adapter):
        first = adapter.client.device_id
        token = adapter.client.access_token
    async with running_bot(settings) as (_, adapter):
        assert (adapter.client.device_id, adapter.client.access_token) == (first, token)
    shutil.rmtree(store)  # a redeploy without the volume
    async with running_bot(settings) as (app, adapter):
        second = adapter.client.device_id
        saved = await app.pool.fetchrow("SELECT device_id, access_token FROM matrix_state")
    assert second != first, "no new keys under the old device id"
    assert (saved["device_id"], saved["access_token"]) == (second, adapter.client.access_token)
    assert (store / f"{bot_user.user_id}_{second}.db").exists()
    devices = await _devices(synapse, bot_user.user_id)
    assert first not in devices and second in devices, "the old device was logged out"


async def test_admin_notices_reach_the_admin_room(
    settings_with: SettingsWith, bot_user: MatrixUser, human: Human
) -> None:
    room = await human.create_room([bot_user.user_id])  # invited while the bot is offline
    settings = settings_with(matrix_admin_room=room)
    async with running_bot(settings) as (app, _):
        await human.wait_membership(room, bot_user.user_id, "join")
        assert await app.notifier.send("the budget is at 80%") == 1
        notice = (await human.wait_for(room, bot_user.user_id))[0]
    assert notice["content"] == {
        "msgtype": "m.notice",
        "body": "the budget is at 80%",
        "format": "org.matrix.custom.html",
        "formatted_body": "<p>the budget is at 80%</p>",
    }


def test_fly_toml_keeps_the_matrix_key_store_on_a_volume() -> None:
    fly = tomllib.loads((REPO_ROOT / "fly.toml").read_text())
    store = PurePosixPath(fly["env"]["MATRIX_STORE_DIR"])
    mount = PurePosixPath(fly["mounts"]["destination"])
    assert mount in store.parents, "the crypto store survives a redeploy"
    source = fly["mounts"]["source"]
    assert f"fly volumes create {source}" in (REPO_ROOT / "fly.toml").read_text()
