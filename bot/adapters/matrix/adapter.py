"""The Matrix adapter: personas in Matrix rooms, on matrix-nio's AsyncClient.

    start: log in (password with the saved device id, or an access token) → catch-up sync
           (joins allowed invites; every message in it predates the bot and is never answered)
           → the live sync loop
    live sync: invites → join or decline; each new message → `MatrixMessages` (claim, trigger,
           attention, rate limit, reply or `!` command); then the sync token is saved

The sync token, the catch-up marker (server time of the newest event seen) and the device id
live in Postgres (`matrix_state`), so a restart neither re-answers old messages nor makes a new
device. End-to-end encryption is optional (`MATRIX_ENCRYPTION`, needs `matrix-nio[e2e]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    LoginResponse,
    MatrixRoom,
    MegolmEvent,
    RoomMemberEvent,
    RoomSendResponse,
    SyncResponse,
    WhoamiResponse,
)

from bot.adapters.matrix.commands import MatrixCommands
from bot.adapters.matrix.deletions import honour_removal
from bot.adapters.matrix.messages import MatrixMessages, RoomMessage
from bot.adapters.matrix.render import message_content
from bot.adapters.matrix.state import MatrixState
from bot.app import App
from bot.errors import ConfigError

log = logging.getLogger(__name__)

_LIVE_FILTER = {"room": {"timeline": {"limit": 50}}, "presence": {"not_types": ["*"]}}
_CATCH_UP_FILTER = {"room": {"timeline": {"limit": 1}}, "presence": {"not_types": ["*"]}}
_RETRY_SECONDS = (1, 2, 5, 10, 30)
# Origin timestamps come from each sender's server clock; replays are stopped by claims anyway.
_CLOCK_SKEW_MS = 60_000


def create(app: App) -> MatrixAdapter | None:
    """The runner's factory: None unless MATRIX_HOMESERVER and MATRIX_USER_ID are set."""
    settings = app.settings
    if not settings.matrix_homeserver or not settings.matrix_user_id:
        return None
    if settings.matrix_password is None and settings.matrix_access_token is None:
        raise ConfigError("Matrix needs MATRIX_PASSWORD or MATRIX_ACCESS_TOKEN.")
    return MatrixAdapter(app)


class MatrixAdapter:
    name = "matrix"

    def __init__(self, app: App) -> None:
        settings = app.settings
        assert settings.matrix_homeserver and settings.matrix_user_id
        self.app = app
        self.settings = settings
        self.user_id = settings.matrix_user_id
        self.state = MatrixState(app.pool, self.user_id)
        self.client = AsyncClient(
            settings.matrix_homeserver, self.user_id, config=self._client_config(), **self._store()
        )
        self.messages = MatrixMessages(
            app,
            self.state,
            self.user_id,
            send=self.send,
            typing=self.typing,
            commands=MatrixCommands(self.client, app.commands, self.send),
        )
        self._token: str | None = None
        self._marker: int | None = None  # newest event time seen (ms), saved
        self._catch_up_point = 0  # events older than this (less clock skew) are history
        self._sync_task: asyncio.Task[None] | None = None
        self.connected = False  # the last sync succeeded (reported by /healthz)
        self._synced = asyncio.Condition()  # notified after every processed sync
        self.allowed_inviters = {
            part.strip() for part in settings.matrix_allowed_inviters.split(",") if part.strip()
        } or {self.user_id.split(":", 1)[1]}

    def _client_config(self) -> AsyncClientConfig:
        if self.settings.matrix_encryption:
            from nio.crypto import ENCRYPTION_ENABLED

            if not ENCRYPTION_ENABLED:
                raise ConfigError(
                    "MATRIX_ENCRYPTION needs matrix-nio's encryption extra: "
                    "pip install 'matrix-nio[e2e]'."
                )
        return AsyncClientConfig(
            encryption_enabled=self.settings.matrix_encryption, store_sync_tokens=False
        )

    def _store(self) -> dict[str, Any]:
        if not self.settings.matrix_encryption:
            return {}
        path = self.settings.data_dir / "matrix-store"
        path.mkdir(parents=True, exist_ok=True)
        return {"store_path": str(path)}

    async def start(self) -> None:
        nio_log = logging.getLogger("nio")
        nio_log.setLevel(max(nio_log.getEffectiveLevel(), logging.WARNING))  # chatty at INFO
        saved = await self.state.load()
        self._token, self._marker = saved.next_batch, saved.caught_up_ts
        await self._login(saved.device_id)
        await self._catch_up()
        self._sync_task = asyncio.create_task(self._sync_forever())
        if self.settings.matrix_admin_room:
            self.app.notifier.register("matrix", self._admin_notice)
        self.app.scheduler.every(86_400, self.state.prune, name=f"matrix-prune-{self.user_id}")

    async def stop(self) -> None:
        self.connected = False
        self.app.notifier.unregister("matrix")
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        try:
            await self.messages.drain()
        finally:
            self.messages.cancel()
            await self.client.close()

    async def _login(self, device_id: str | None) -> None:
        token = self.settings.matrix_access_token
        if token is not None:
            self.client.access_token = token.get_secret_value()
            whoami = await self.client.whoami()
            if not isinstance(whoami, WhoamiResponse) or not whoami.device_id:
                log.error("Matrix access token refused: %s", getattr(whoami, "status_code", ""))
                raise ConfigError("Matrix refused MATRIX_ACCESS_TOKEN; check it in the settings.")
            self.client.restore_login(self.user_id, whoami.device_id, token.get_secret_value())
        else:
            assert self.settings.matrix_password is not None
            self.client.device_id = device_id
            response = await self.client.login(
                self.settings.matrix_password.get_secret_value(),
                device_name=self.settings.matrix_device_name,
            )
            if not isinstance(response, LoginResponse):
                log.error("Matrix login failed: %s", getattr(response, "status_code", ""))
                raise ConfigError("Matrix login failed; check MATRIX_USER_ID and MATRIX_PASSWORD.")
        await self.state.save_device(self.client.device_id)
        log.info("logged in to Matrix as %s (device %s)", self.user_id, self.client.device_id)

    async def _catch_up(self) -> None:
        """One full-state sync from the saved position; its messages are history, not answered."""
        response = await self.client.sync(
            timeout=0, since=self._token, full_state=True, sync_filter=_CATCH_UP_FILTER
        )
        if not isinstance(response, SyncResponse) and self._token is not None:
            log.warning("the saved Matrix sync token was refused; syncing from scratch")
            response = await self.client.sync(
                timeout=0, full_state=True, sync_filter=_CATCH_UP_FILTER
            )
        if not isinstance(response, SyncResponse):
            log.error("Matrix catch-up sync failed: %s", getattr(response, "status_code", ""))
            raise ConfigError("The Matrix homeserver did not answer the first sync.")
        skipped = 0
        for room_id, info in response.rooms.join.items():
            self._note_state(room_id, [*info.state, *info.timeline.events])
            for event in info.timeline.events:
                self._marker = max(self._marker or 0, _timestamp(event))
                skipped += 1
        await self._invites(response)
        await self._crypto_upkeep()
        self._token = response.next_batch
        self._catch_up_point = self._marker or 0
        await self.state.save_position(self._token, self._marker)
        self.connected = True
        log.info("Matrix caught up: %d earlier events are not answered", skipped)

    async def _sync_forever(self) -> None:
        failures = 0
        while True:
            try:
                response = await self.client.sync(
                    timeout=int(self.settings.matrix_sync_timeout * 1000),
                    since=self._token,
                    sync_filter=_LIVE_FILTER,
                )
                if not isinstance(response, SyncResponse):
                    raise RuntimeError(f"sync answered {getattr(response, 'status_code', '?')}")
                await self._process(response)
                failures = 0
                self.connected = True
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                self.connected = False
                log.warning("Matrix sync failed; retrying in %ss", delay, exc_info=True)
                await asyncio.sleep(delay)

    async def _process(self, response: SyncResponse) -> None:
        await self._invites(response)
        await self._crypto_upkeep()
        for room_id, info in response.rooms.join.items():
            room = self.client.rooms.get(room_id)
            self._note_state(room_id, [*info.state, *info.timeline.events])
            if room is not None:
                await self._timeline(room, info.timeline.events)
        self._token = response.next_batch
        await self.state.save_position(self._token, self._marker)
        async with self._synced:
            self._synced.notify_all()

    async def _timeline(self, room: MatrixRoom, events: list[Any]) -> None:
        # A timeline that holds our own join shows the room's past first: skip up to the join.
        joined_at = max((i for i, e in enumerate(events) if self._is_own_join(e)), default=-1)
        for event in events[joined_at + 1 :]:
            older = _timestamp(event) < self._catch_up_point - _CLOCK_SKEW_MS
            self._marker = max(self._marker or 0, _timestamp(event))
            if event.sender == self.user_id or older:
                continue
            if isinstance(event, MegolmEvent):
                await self._undecryptable(room, event)
                continue
            if await honour_removal(self.app.engine, event.source):
                continue  # a redaction or an edit (issue 15)
            if event.source.get("type") != "m.room.message":
                continue
            message = RoomMessage.from_source(room.room_id, event.source)
            if message is not None and message.body:
                await self.messages.on_message(room, message)

    async def _undecryptable(self, room: MatrixRoom, event: MegolmEvent) -> None:
        if self.client.olm:  # the key may just be late: ask the sender's devices for it
            with contextlib.suppress(Exception):
                await self.client.request_room_key(event)
        await self.messages.on_undecryptable(room, event.event_id)

    def _note_state(self, room_id: str, events: list[Any]) -> None:
        for event in events:
            source = getattr(event, "source", None)
            if isinstance(source, dict):
                self.messages.note_state(room_id, source)

    def _is_own_join(self, event: Any) -> bool:
        return (
            isinstance(event, RoomMemberEvent)
            and event.state_key == self.user_id
            and event.membership == "join"
            and event.prev_membership != "join"
        )

    async def _invites(self, response: SyncResponse) -> None:
        for room_id, info in response.rooms.invite.items():
            inviter = next(
                (
                    e.sender
                    for e in info.invite_state
                    if isinstance(e, InviteMemberEvent)
                    and e.state_key == self.user_id
                    and e.membership == "invite"
                ),
                None,
            )
            if inviter is not None and self._may_invite(inviter):
                log.info("joining %s on %s's invitation", room_id, inviter)
                await self.client.join(room_id)
            else:
                log.info("declining invitation to %s from %s", room_id, inviter)
                await self.client.room_leave(room_id)

    def _may_invite(self, user_id: str) -> bool:
        server = user_id.split(":", 1)[-1]
        allowed = self.allowed_inviters
        return "*" in allowed or user_id in allowed or server in allowed or f":{server}" in allowed

    async def _crypto_upkeep(self) -> None:
        """Key upload, query and claim, as matrix-nio's sync_forever does (encryption only)."""
        if not self.client.olm:
            return
        if self.client.should_upload_keys:
            await self.client.keys_upload()
        if self.client.should_query_keys:
            await self.client.keys_query()
        if self.client.should_claim_keys:
            await self.client.keys_claim(self.client.get_users_for_key_claiming())
        await self.client.send_to_device_messages()

    async def send(self, room_id: str, content: dict[str, Any], txn: str | None) -> str | None:
        """Send a room message; the event id, or None (logged) when the server refused it."""
        await self._known(room_id)
        try:
            response = await self.client.room_send(
                room_id, "m.room.message", content, tx_id=txn, ignore_unverified_devices=True
            )
        except Exception:
            log.exception("sending to %s failed", room_id)
            return None
        if isinstance(response, RoomSendResponse):
            return str(response.event_id)
        log.warning("sending to %s failed: %s", room_id, getattr(response, "status_code", ""))
        return None

    async def _known(self, room_id: str, wait: float = 10.0) -> None:
        """With encryption, nio sends only to rooms it has synced (a direct room just opened)."""
        if not self.client.olm or room_id in self.client.rooms:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait), self._synced:
                await self._synced.wait_for(lambda: room_id in self.client.rooms)

    async def typing(self, room_id: str, on: bool) -> None:
        with contextlib.suppress(Exception):
            await self.client.room_typing(room_id, typing_state=on, timeout=30_000)

    async def _admin_notice(self, text: str) -> None:
        room = self.settings.matrix_admin_room
        if room and await self.send(room, message_content(text, "m.notice"), None) is None:
            raise RuntimeError("the admin room did not take the notice")


def _timestamp(event: Any) -> int:
    return int(getattr(event, "server_timestamp", 0) or 0)
