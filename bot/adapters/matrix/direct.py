"""Direct rooms, recognised the way the spec defines them: `is_direct` on the invitation and
the account's `m.direct` account data, never by counting members.

`m.direct` maps each other user to the rooms that are direct chats with them. The bot reads its
own at start (`GET /user/{id}/account_data/m.direct`), adds rooms it was invited to with
`is_direct: true` or opened itself, and writes the map back, so the answer survives a restart
and Element on the bot's account shows the same rooms as direct chats.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

from nio import AsyncClient, DirectRoomsResponse, RoomMemberEvent

log = logging.getLogger(__name__)


class DirectRooms:
    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self._by_user: dict[str, list[str]] = {}

    async def load(self) -> None:
        response = await self.client.list_direct_rooms()
        if isinstance(response, DirectRoomsResponse):
            self._by_user = {
                str(user): [str(room) for room in rooms]
                for user, rooms in response.rooms.items()
                if isinstance(rooms, list)
            }

    async def recover(self, joined: dict[str, Any], user_id: str) -> None:
        """Direct rooms joined before `m.direct` was kept (or with it lost): the bot's own
        membership still shows the `is_direct` invitation it accepted (`prev_content`)."""
        for room_id, info in joined.items():
            room = self.client.rooms.get(room_id)
            if room is None or self.is_direct(room_id):
                continue
            others = [user for user in room.users if user != user_id]
            invited_directly = any(
                isinstance(e, RoomMemberEvent)
                and e.state_key == user_id
                and e.membership == "join"
                and bool((e.prev_content or {}).get("is_direct"))
                for e in [*info.state, *info.timeline.events]
            )
            if invited_directly and len(others) == 1:
                log.info("%s is a direct room with %s (its invitation said so)", room_id, others[0])
                await self.add(room_id, others[0])

    def is_direct(self, room_id: str) -> bool:
        return any(room_id in rooms for rooms in self._by_user.values())

    def room_with(self, user_id: str) -> list[str]:
        """Direct rooms with `user_id`, newest first."""
        return list(reversed(self._by_user.get(user_id, [])))

    async def add(self, room_id: str, user_id: str) -> None:
        """Mark `room_id` as a direct room with `user_id` and save the account's `m.direct`."""
        rooms = self._by_user.setdefault(user_id, [])
        if room_id in rooms:
            return
        rooms.append(room_id)
        path = (
            f"/_matrix/client/v3/user/{quote(self.client.user_id, safe='')}/account_data/m.direct"
        )
        headers = {
            "Authorization": f"Bearer {self.client.access_token}",
            "Content-Type": "application/json",
        }
        try:
            response = await self.client.send("PUT", path, json.dumps(self._by_user), headers)
            if response.status != 200:
                log.warning("saving m.direct failed: HTTP %s", response.status)
        except Exception:
            log.warning("saving m.direct failed", exc_info=True)
