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
from urllib.parse import quote

from nio import AsyncClient, DirectRoomsResponse

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
