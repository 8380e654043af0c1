"""The Matrix adapter: personas in Matrix rooms, on matrix-nio's AsyncClient.

    start: log in (login.py: the saved token, else the password) → `m.direct` → catch-up sync
           (joins allowed invites; every message in it predates the bot and is never answered)
           → the live sync loop
    live sync: invites → join or decline; encrypted rooms with encryption off → one notice and
           leave; each new message → `MatrixMessages` (claim, trigger, attention, rate limit,
           reply or `!` command); typing → pre-wake; then the sync token is saved. A refused
           token (M_UNKNOWN_TOKEN) means a new login, not a stuck loop.

The sync token, the catch-up marker (server time of the newest event seen), the device id and
its access token live in Postgres (`matrix_state`), so a restart neither re-answers old
messages nor makes a new login. `connected` (for /healthz) is the time since the last good
sync. Sending goes through outbox.py, paced per room. End-to-end encryption is optional
(`MATRIX_ENCRYPTION`, needs `matrix-nio[e2e]`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    InviteMemberEvent,
    MatrixRoom,
    MegolmEvent,
    RoomMemberEvent,
    SyncError,
    SyncResponse,
    TypingNoticeEvent,
)

from bot.adapters.matrix.commands import MatrixCommands
from bot.adapters.matrix.deletions import honour_removal
from bot.adapters.matrix.direct import DirectRooms
from bot.adapters.matrix.login import UNKNOWN_TOKEN, Login
from bot.adapters.matrix.messages import MatrixMessages, RoomMessage
from bot.adapters.matrix.outbox import Outbox
from bot.adapters.matrix.pacing import Pacers
from bot.adapters.matrix.render import message_content
from bot.adapters.matrix.state import MatrixState
from bot.adapters.matrix.threads import ThreadContext
from bot.app import App
from bot.errors import ConfigError

log = logging.getLogger(__name__)

_LIVE_FILTER = {"room": {"timeline": {"limit": 50}}, "presence": {"not_types": ["*"]}}
_CATCH_UP_FILTER = {"room": {"timeline": {"limit": 1}}, "presence": {"not_types": ["*"]}}
_RETRY_SECONDS = (1, 2, 5, 10, 30)
_ENCRYPTED_ROOM = (
    "This room is end-to-end encrypted and encryption is turned off for me, so I could not "
    "read anything here. I'm leaving; invite me to an unencrypted room instead."
)
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
        store = self._store()
        self.client = AsyncClient(
            settings.matrix_homeserver,
            self.user_id,
            config=self._client_config(),
            store_path=str(store) if store else "",
        )
        self.login = Login(self.client, settings, self.state, store)
        self.direct = DirectRooms(self.client)
        self.pacers = Pacers(settings.matrix_edit_interval)
        self.outbox = Outbox(self.client, self.pacers)
        self.send = self.outbox.send
        self.messages = MatrixMessages(
            app,
            self.state,
            self.user_id,
            send=self.send,
            typing=self.typing,
            commands=MatrixCommands(self.client, app.commands, self.send, self.direct),
            direct=self.direct,
            pacers=self.pacers,
            redact=self.outbox.redact,
            threads=ThreadContext(self.client, app.engine, self.user_id),
        )
        self._token: str | None = None
        self._marker: int | None = None  # newest event time seen (ms), saved
        self._catch_up_point = 0  # events older than this (less clock skew) are history
        self._sync_task: asyncio.Task[None] | None = None
        self._last_sync: float | None = None  # monotonic time of the last good sync
        self._leaving: set[str] = set()  # encrypted rooms left (encryption off)
        self.allowed_inviters = {
            part.strip() for part in settings.matrix_allowed_inviters.split(",") if part.strip()
        } or {self.user_id.split(":", 1)[1]}

    @property
    def connected(self) -> bool:
        """For /healthz: a sync succeeded within MATRIX_UNHEALTHY_AFTER (plus one long poll).
        Time-based, so failures that never raise (nio retries network errors) count too."""
        if self._last_sync is None:
            return False
        limit = self.settings.matrix_unhealthy_after + self.settings.matrix_sync_timeout
        return time.monotonic() - self._last_sync < limit

    def _client_config(self) -> AsyncClientConfig:
        if self.settings.matrix_encryption:
            from nio.crypto import ENCRYPTION_ENABLED

            if not ENCRYPTION_ENABLED:
                raise ConfigError(
                    "MATRIX_ENCRYPTION needs matrix-nio's encryption extra: "
                    "pip install 'matrix-nio[e2e]'."
                )
        return AsyncClientConfig(
            encryption_enabled=self.settings.matrix_encryption,
            store_sync_tokens=False,
            max_limit_exceeded=0,  # M_LIMIT_EXCEEDED comes back to us: `send` paces per room
        )

    def _store(self) -> Path | None:
        if not self.settings.matrix_encryption:
            return None
        path = self.settings.matrix_store_dir or self.settings.data_dir / "matrix-store"
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def start(self) -> None:
        nio_log = logging.getLogger("nio")
        nio_log.setLevel(max(nio_log.getEffectiveLevel(), logging.WARNING))  # chatty at INFO
        saved = await self.state.load()
        self._token, self._marker = saved.next_batch, saved.caught_up_ts
        await self.login.login()
        await self.direct.load()
        await self._catch_up()
        self._sync_task = asyncio.create_task(self._sync_forever())
        if self.settings.matrix_admin_room:
            self.app.notifier.register("matrix", self._admin_notice)
        self.app.scheduler.every(86_400, self.state.prune, name=f"matrix-prune-{self.user_id}")

    async def stop(self) -> None:
        self._last_sync = None
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
        for info in response.rooms.join.values():
            for event in info.timeline.events:
                self._marker = max(self._marker or 0, _timestamp(event))
                skipped += 1
        await self._invites(response)
        await self.direct.recover(response.rooms.join, self.user_id)
        await self._crypto_upkeep()
        self._token = response.next_batch
        self._catch_up_point = self._marker or 0
        await self.state.save_position(self._token, self._marker)
        self._last_sync = time.monotonic()
        await self._refuse_encrypted(response.rooms.join)
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
                if isinstance(response, SyncError) and response.status_code == UNKNOWN_TOKEN:
                    log.warning("Matrix refused the access token; logging in again")
                    await self.login.relogin()
                    continue
                if not isinstance(response, SyncResponse):
                    raise RuntimeError(f"sync answered {getattr(response, 'status_code', '?')}")
                await self._process(response)
                failures = 0
                self._last_sync = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception:
                delay = _RETRY_SECONDS[min(failures, len(_RETRY_SECONDS) - 1)]
                failures += 1
                log.warning("Matrix sync failed; retrying in %ss", delay, exc_info=True)
                await asyncio.sleep(delay)

    async def _process(self, response: SyncResponse) -> None:
        await self._invites(response)
        await self._crypto_upkeep()
        await self._refuse_encrypted(response.rooms.join)
        for room_id, info in response.rooms.join.items():
            room = self.client.rooms.get(room_id)
            if room is None or room_id in self._leaving:
                continue
            await self._timeline(room, info.timeline.events)
            for event in info.ephemeral:
                if isinstance(event, TypingNoticeEvent):
                    typing = [u for u in event.users if u != self.user_id]
                    if typing:
                        await self.messages.on_typing(room)
        self._token = response.next_batch
        await self.state.save_position(self._token, self._marker)
        await self.outbox.room_synced()

    async def _timeline(self, room: MatrixRoom, events: list[Any]) -> None:
        # A timeline that holds our own join shows the room's past first: skip up to the join.
        joined_at = max((i for i, e in enumerate(events) if self._is_own_join(e)), default=-1)
        for event in events[joined_at + 1 :]:
            older = _timestamp(event) < self._catch_up_point - _CLOCK_SKEW_MS
            self._marker = max(self._marker or 0, _timestamp(event))
            if event.sender == self.user_id or older:
                continue
            if isinstance(event, MegolmEvent):
                if self.client.olm:
                    await self._undecryptable(room, event)
                else:
                    await self._leave_encrypted(room.room_id)
                    return
                continue
            if await honour_removal(self.app.engine, event.source):
                continue  # a redaction or an edit (issue 15)
            if event.source.get("type") != "m.room.message":
                continue
            message = RoomMessage.from_source(room.room_id, event.source)
            if message is not None and message.body:
                await self.messages.on_message(room, message)

    async def _undecryptable(self, room: MatrixRoom, event: MegolmEvent) -> None:
        with contextlib.suppress(Exception):  # the key may just be late: ask the sender for it
            await self.client.request_room_key(event)
        await self.messages.on_undecryptable(room, event.event_id)

    async def _refuse_encrypted(self, joined: dict[str, Any]) -> None:
        """Encryption off: an encrypted room gets one notice, and the bot leaves it."""
        if self.client.olm:
            return
        for room_id in joined:
            room = self.client.rooms.get(room_id)
            if room is not None and room.encrypted:
                await self._leave_encrypted(room_id)

    async def _leave_encrypted(self, room_id: str) -> None:
        if room_id in self._leaving:
            return
        self._leaving.add(room_id)
        log.info("leaving %s: it is encrypted and MATRIX_ENCRYPTION is off", room_id)
        content = message_content(_ENCRYPTED_ROOM, "m.notice")
        await self.send(room_id, content, f"pb-encrypted-{room_id}")
        await self.client.room_leave(room_id)

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
                if _invited_directly(info.invite_state, self.user_id):
                    await self.direct.add(room_id, inviter)
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

    async def typing(self, room_id: str, on: bool) -> None:
        """A typing notice (MATRIX_TYPING_TIMEOUT); `MatrixMessages` renews it while a reply
        is prepared."""
        timeout = int(self.settings.matrix_typing_timeout * 1000)
        with contextlib.suppress(Exception):
            await self.client.room_typing(room_id, typing_state=on, timeout=timeout)

    async def _admin_notice(self, text: str) -> None:
        room = self.settings.matrix_admin_room
        if room and await self.send(room, message_content(text, "m.notice"), None) is None:
            raise RuntimeError("the admin room did not take the notice")


def _invited_directly(invite_state: list[Any], user_id: str) -> bool:
    """The invitation says `is_direct` (what Element sets for a direct message)."""
    return any(
        isinstance(e, InviteMemberEvent)
        and e.state_key == user_id
        and bool((e.content or {}).get("is_direct"))
        for e in invite_state
    )


def _timestamp(event: Any) -> int:
    return int(getattr(event, "server_timestamp", 0) or 0)
