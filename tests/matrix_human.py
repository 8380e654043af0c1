"""A human on the test homeserver: a second matrix-nio client that sends and watches messages."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    RoomCreateResponse,
    RoomPutStateResponse,
    RoomSendResponse,
    SyncResponse,
)

from tests.synapse import MatrixUser


class Human:
    def __init__(self, url: str, user: MatrixUser, *, key_store: Path | None = None) -> None:
        """`key_store` turns end-to-end encryption on (needs matrix-nio's e2e extra)."""
        self.user = user
        config = AsyncClientConfig(encryption_enabled=key_store is not None)
        if key_store is not None:
            key_store.mkdir(parents=True, exist_ok=True)
        self.client = AsyncClient(
            url, user.user_id, config=config, store_path=str(key_store) if key_store else ""
        )
        self.client.restore_login(user.user_id, user.device_id, user.access_token)
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.typing: dict[str, set[str]] = {}
        self.typing_log: list[tuple[float, str, set[str]]] = []  # (received, room, who types)
        self.decrypted: set[str] = set()  # ids of events that arrived encrypted
        self.invites: list[str] = []  # rooms this user was invited to
        self._since: str | None = None

    async def close(self) -> None:
        await self.client.close()

    async def create_room(
        self, invite: list[str], *, direct: bool = False, encrypted: bool = False
    ) -> str:
        state = [
            {
                "type": "m.room.encryption",
                "state_key": "",
                "content": {"algorithm": "m.megolm.v1.aes-sha2"},
            }
        ]
        response = await self.client.room_create(
            invite=invite, is_direct=direct, initial_state=state if encrypted else ()
        )
        assert isinstance(response, RoomCreateResponse), response
        return str(response.room_id)

    async def set_power(self, room_id: str, user_id: str, level: int) -> None:
        current = await self.client.room_get_state_event(room_id, "m.room.power_levels")
        content = dict(current.content)  # type: ignore[union-attr]
        content["users"] = {**content.get("users", {}), user_id: level}
        response = await self.client.room_put_state(room_id, "m.room.power_levels", content)
        assert isinstance(response, RoomPutStateResponse), response

    async def join(self, room_id: str) -> None:
        await self.client.join(room_id)

    async def send(
        self,
        room_id: str,
        text: str,
        *,
        mention: str | None = None,
        reply_to: str | None = None,
        thread_root: str | None = None,
        event_type: str = "m.room.message",
        content: dict[str, Any] | None = None,
    ) -> str:
        if content is None:
            content = {"msgtype": "m.text", "body": text}
            if mention:
                content["m.mentions"] = {"user_ids": [mention]}
            relates: dict[str, Any] = {}
            if thread_root:
                relates = {"rel_type": "m.thread", "event_id": thread_root}
                relates["is_falling_back"] = reply_to is None
                relates["m.in_reply_to"] = {"event_id": reply_to or thread_root}
            elif reply_to:
                relates = {"m.in_reply_to": {"event_id": reply_to}}
            if relates:
                content["m.relates_to"] = relates
        response = await self.client.room_send(
            room_id, event_type, content, ignore_unverified_devices=True
        )
        assert isinstance(response, RoomSendResponse), response
        return str(response.event_id)

    async def sync(self, timeout_ms: int = 300) -> None:
        response = await self.client.sync(timeout=timeout_ms, since=self._since)
        assert isinstance(response, SyncResponse), response
        self._since = response.next_batch
        if self.client.olm:
            if self.client.should_upload_keys:
                await self.client.keys_upload()
            if self.client.should_query_keys:
                await self.client.keys_query()
            await self.client.send_to_device_messages()
        for room_id, info in response.rooms.join.items():
            self.events.setdefault(room_id, []).extend(e.source for e in info.timeline.events)
            self.decrypted.update(
                e.event_id for e in info.timeline.events if getattr(e, "decrypted", False)
            )
            for event in info.ephemeral:
                users = getattr(event, "users", None)
                if users is not None:
                    self.typing_log.append((time.time(), room_id, set(users)))
                if users:
                    self.typing.setdefault(room_id, set()).update(users)
        self.invites.extend(r for r in response.rooms.invite if r not in self.invites)
        for room_id, info in response.rooms.leave.items():
            self.events.setdefault(room_id, []).extend(e.source for e in info.timeline.events)

    def from_user(self, room_id: str, user_id: str, *, edits: bool = False) -> list[dict[str, Any]]:
        """Message events `user_id` sent in the room (edits only when asked for)."""
        found = []
        for event in self.events.get(room_id, []):
            if event.get("sender") != user_id or event.get("type") != "m.room.message":
                continue
            is_edit = "m.new_content" in event.get("content", {})
            if is_edit == edits:
                found.append(event)
        return found

    def membership(self, room_id: str, user_id: str) -> str | None:
        state = None
        for event in self.events.get(room_id, []):
            if event.get("type") == "m.room.member" and event.get("state_key") == user_id:
                state = event["content"].get("membership")
        return state

    async def wait_for(
        self, room_id: str, user_id: str, count: int = 1, wait: float = 20.0
    ) -> list[dict[str, Any]]:
        """Wait until `user_id` has sent `count` messages in the room; returns them."""
        deadline = time.monotonic() + wait
        while len(self.from_user(room_id, user_id)) < count:
            if time.monotonic() > deadline:
                got = self.from_user(room_id, user_id)
                raise AssertionError(f"expected {count} messages from {user_id}, got {got}")
            await self.sync()
        return self.from_user(room_id, user_id)

    async def wait_membership(
        self, room_id: str, user_id: str, membership: str, wait: float = 20.0
    ) -> None:
        deadline = time.monotonic() + wait
        while self.membership(room_id, user_id) != membership:
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id} never reached {membership} in {room_id}")
            await self.sync()
            await asyncio.sleep(0)

    async def accept_invite(self, wait: float = 20.0) -> str:
        """Join the first room this user is invited to; returns its id."""
        deadline = time.monotonic() + wait
        while not self.invites:
            if time.monotonic() > deadline:
                raise AssertionError("no invitation arrived")
            await self.sync()
        room_id = self.invites.pop(0)
        await self.join(room_id)
        return room_id

    def final_text(self, room_id: str, event: dict[str, Any]) -> str:
        """The body of a message after its latest edit."""
        body = str(event["content"]["body"])
        for edit in self.from_user(room_id, event["sender"], edits=True):
            if edit["content"].get("m.relates_to", {}).get("event_id") == event["event_id"]:
                body = str(edit["content"]["m.new_content"]["body"])
        return body
